package runtime

import (
	"os"
	"path/filepath"
)

// cgroupV2Root returns the host's cgroup v2 mount: /sys/fs/cgroup on a pure
// v2 host, /sys/fs/cgroup/unified on a hybrid one (v1 controllers plus a
// cgroup2 tree, where runc still places every container), or "" when there
// is none. A directory is cgroup2 when it has cgroup.controllers.
func cgroupV2Root() string {
	for _, dir := range []string{"/sys/fs/cgroup", "/sys/fs/cgroup/unified"} {
		if _, err := os.Stat(filepath.Join(dir, "cgroup.controllers")); err == nil {
			return dir
		}
	}
	return ""
}
