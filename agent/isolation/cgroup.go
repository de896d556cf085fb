package isolation

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// cgroupCandidates are where a cgroup2 hierarchy is mounted: /sys/fs/cgroup
// on a pure v2 host, /sys/fs/cgroup/unified on a hybrid one (v1 controllers
// plus a controller-less cgroup2 tree, where runc still places every
// container and where cgroup BPF programs attach).
var cgroupCandidates = []string{"/sys/fs/cgroup", "/sys/fs/cgroup/unified"}

// CgroupV2Root returns the host's cgroup2 mount. A directory counts when
// the kernel says it is cgroup2 (statfs magic), which on a pure v2 host is
// also the one with cgroup.controllers at /sys/fs/cgroup. The error wraps
// ErrUnsupported.
func CgroupV2Root() (string, error) {
	for _, dir := range cgroupCandidates {
		if isCgroup2(dir) {
			return dir, nil
		}
	}
	return "", fmt.Errorf("%w: no cgroup2 hierarchy at %s", ErrUnsupported, strings.Join(cgroupCandidates, " or "))
}

func isCgroup2(dir string) bool {
	var st unix.Statfs_t
	return unix.Statfs(dir, &st) == nil && st.Type == unix.CGROUP2_SUPER_MAGIC
}

// CgroupDirOfPID returns the cgroup2 directory of a process (the "0::"
// line of /proc/PID/cgroup under CgroupV2Root), e.g. a container task's,
// for Fence. The agent must run in the host's cgroup namespace.
func CgroupDirOfPID(pid int) (string, error) {
	root, err := CgroupV2Root()
	if err != nil {
		return "", err
	}
	f, err := os.Open(filepath.Join("/proc", strconv.Itoa(pid), "cgroup"))
	if err != nil {
		return "", fmt.Errorf("cgroup of pid %d: %w", pid, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rel, ok := strings.CutPrefix(sc.Text(), "0::"); ok {
			return filepath.Join(root, filepath.Clean("/"+rel)), nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("cgroup of pid %d: %w", pid, err)
	}
	return "", fmt.Errorf("cgroup of pid %d: no cgroup2 entry in /proc/%d/cgroup", pid, pid)
}

// openCgroup opens a cgroup2 directory for attaching and returns it with
// its cgroup id (the id bpf_link info and bpf_get_current_cgroup_id
// report). Errors wrap ErrAttach.
func openCgroup(dir string) (*os.File, uint64, error) {
	if !filepath.IsAbs(dir) {
		return nil, 0, fmt.Errorf("%w: cgroup %q: not an absolute path", ErrAttach, dir)
	}
	f, err := os.OpenFile(dir, os.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, 0, fmt.Errorf("%w: open cgroup: %w", ErrAttach, err)
	}
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(f.Fd()), &st); err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("%w: statfs cgroup %s: %w", ErrAttach, dir, err)
	}
	if st.Type != unix.CGROUP2_SUPER_MAGIC {
		f.Close()
		return nil, 0, fmt.Errorf("%w: %s is not a cgroup v2 directory (see CgroupV2Root)", ErrAttach, dir)
	}
	id, err := cgroupIDOf(f)
	if err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("%w: cgroup id of %s: %w", ErrAttach, dir, err)
	}
	return f, id, nil
}

// cgroupIDOf returns the kernel's id for an open cgroup2 directory: its
// file handle, as libbpf and systemd read it.
func cgroupIDOf(f *os.File) (uint64, error) {
	h, _, err := unix.NameToHandleAt(int(f.Fd()), "", unix.AT_EMPTY_PATH)
	if err == nil && h.Size() == 8 {
		return binary.NativeEndian.Uint64(h.Bytes()), nil
	}
	// Without file handles, the inode number is the id on 64-bit kernels.
	var st unix.Stat_t
	if serr := unix.Fstat(int(f.Fd()), &st); serr != nil {
		return 0, errors.Join(err, serr)
	}
	return st.Ino, nil
}
