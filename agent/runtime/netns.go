package runtime

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	goruntime "runtime"

	"golang.org/x/sys/unix"
)

// nsfsMagic is the filesystem type of a namespace file (NSFS_MAGIC): what
// a path bind-mounted from /proc/<pid>/ns/net reports to statfs.
const nsfsMagic = 0x6e736673

// newNetNS creates a network namespace with loopback only (up, as runc
// brings it up in a namespace it creates) and bind-mounts it on path, so that it lives until removeNetNS, whatever
// happens to the processes in it. A path already holding a network
// namespace is left as it is (a retry after a crash).
func newNetNS(path string) error {
	if isNetNS(path) {
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("create network namespace %s: %w", path, err)
	}
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE, 0o400)
	if err != nil {
		return fmt.Errorf("create network namespace %s: %w", path, err)
	}
	f.Close()
	errc := make(chan error, 1)
	go func() {
		// The thread goes back to its namespace before it is unlocked; if
		// it cannot, it stays locked and the runtime retires it with this
		// goroutine, so no other goroutine ever runs in the new namespace.
		goruntime.LockOSThread()
		orig, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("unshare: %w", err)
			return
		}
		err = loopbackUp()
		if err == nil {
			src := fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid())
			if err = unix.Mount(src, path, "", unix.MS_BIND, ""); err != nil {
				err = fmt.Errorf("bind mount %s: %w", src, err)
			}
		}
		errc <- err
		if unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET) == nil {
			goruntime.UnlockOSThread()
		}
	}()
	if err := <-errc; err != nil {
		_ = os.Remove(path)
		return fmt.Errorf("create network namespace %s: %w", path, err)
	}
	return nil
}

// loopbackUp sets lo up in the calling thread's network namespace: what
// CNI's loopback plugin does, without running it.
func loopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("loopback up: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return fmt.Errorf("loopback up: %w", err)
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("loopback flags: %w", err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("loopback up: %w", err)
	}
	return nil
}

// isNetNS reports whether path holds a (bind-mounted) namespace.
func isNetNS(path string) bool {
	var st unix.Statfs_t
	return unix.Statfs(path, &st) == nil && st.Type == nsfsMagic
}

// removeNetNS unmounts and deletes a namespace file made by newNetNS; a
// missing one is not an error. The namespace itself goes with its last
// process.
func removeNetNS(path string) error {
	// A namespace mounted twice on the path (two racing creators) takes
	// two unmounts.
	for i := 0; i < 4 && isNetNS(path); i++ {
		err := unix.Unmount(path, unix.MNT_DETACH)
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
			break
		}
		if err != nil {
			return fmt.Errorf("unmount network namespace %s: %w", path, err)
		}
	}
	if err := os.Remove(path); err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("remove network namespace %s: %w", path, err)
	}
	return nil
}

// checkSharedMountNS fails when this process does not share the mount
// namespace of the host's init: a namespace it bind-mounts would then be
// invisible to runc (started by containerd in the host's namespace), and
// the CNI plugins it runs would not see runc's. A systemd unit with
// PrivateTmp=, ProtectSystem= and the like has such a private namespace.
func checkSharedMountNS() error {
	var self, init unix.Stat_t
	if err := unix.Stat("/proc/self/ns/mnt", &self); err != nil {
		return fmt.Errorf("check mount namespace: %w", err)
	}
	if err := unix.Stat("/proc/1/ns/mnt", &init); err != nil {
		// No view of pid 1 (a pid namespace of our own): nothing to compare.
		return nil
	}
	if self.Ino != init.Ino || self.Dev != init.Dev {
		return errors.New("the agent runs in a private mount namespace (systemd PrivateTmp=, ProtectSystem=, ...): " +
			"network namespaces it mounts would be invisible to containerd and runc")
	}
	return nil
}
