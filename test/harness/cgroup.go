package harness

import (
	"errors"
	"os"
	"path/filepath"
)

// ErrNoCgroupV2 is returned by CgroupV2Root when no cgroup2 hierarchy is
// mounted where runc would use it.
var ErrNoCgroupV2 = errors.New("no cgroup v2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified")

// CgroupV2Root returns the cgroup v2 mount: /sys/fs/cgroup on a pure v2
// host, /sys/fs/cgroup/unified on a hybrid one (v1 controllers plus a
// controller-less cgroup2 tree, where runc still places every container).
// A directory is taken as cgroup2 when it has cgroup.controllers.
func CgroupV2Root() (string, error) {
	for _, dir := range []string{"/sys/fs/cgroup", "/sys/fs/cgroup/unified"} {
		if _, err := os.Stat(filepath.Join(dir, "cgroup.controllers")); err == nil {
			return dir, nil
		}
	}
	return "", ErrNoCgroupV2
}

// CgroupHybrid reports whether cgroup v1 controllers are mounted next to a
// cgroup2 tree at /sys/fs/cgroup/unified, in which case resource limits are
// enforced by the v1 hierarchies (/sys/fs/cgroup/memory, .../pids, ...).
func CgroupHybrid() bool {
	root, err := CgroupV2Root()
	return err == nil && root == "/sys/fs/cgroup/unified"
}

// CgroupDirs returns every existing directory for the cgroup path rel
// (e.g. "/gpuaas/my-container"): the cgroup2 one and, on a hybrid host, one
// per v1 hierarchy.
func CgroupDirs(rel string) []string {
	var dirs []string
	if root, err := CgroupV2Root(); err == nil {
		dirs = append(dirs, filepath.Join(root, rel))
	}
	if CgroupHybrid() {
		v1, _ := filepath.Glob("/sys/fs/cgroup/*")
		for _, h := range v1 {
			if filepath.Base(h) == "unified" {
				continue
			}
			dirs = append(dirs, filepath.Join(h, rel))
		}
	}
	var existing []string
	for _, d := range dirs {
		if fi, err := os.Stat(d); err == nil && fi.IsDir() {
			existing = append(existing, d)
		}
	}
	return existing
}

// RemoveNamespaceDirs removes what runc leaves per containerd namespace
// once its last container is gone: the empty parent cgroups and runc's
// state directory. Call it only for a namespace no other containerd on the
// host is using (a unique one, or a package's own at its end).
func RemoveNamespaceDirs(ns string) error {
	var errs []error
	for _, d := range append(CgroupDirs("/"+ns), filepath.Join(runcRoot, ns)) {
		if err := os.Remove(d); err != nil && !os.IsNotExist(err) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
