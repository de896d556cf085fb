package isolation

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// DefaultBPFFS is where the bpf filesystem is mounted on a Linux host.
const DefaultBPFFS = "/sys/fs/bpf"

func isBPFFS(dir string) bool {
	var st unix.Statfs_t
	return unix.Statfs(dir, &st) == nil && st.Type == unix.BPF_FS_MAGIC
}

// EnsureBPFFS makes sure a bpf filesystem is mounted at dir, mounting one
// (mode 0700, as systemd does) when it is not. Pins live there, so that
// programs outlive the agent. The error wraps ErrUnsupported.
func EnsureBPFFS(dir string) error {
	if isBPFFS(dir) {
		return nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("%w: create bpffs mount point %s: %w", ErrUnsupported, dir, err)
	}
	if err := unix.Mount("bpffs", dir, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("%w: mount bpffs at %s: %w", ErrUnsupported, dir, err)
	}
	if !isBPFFS(dir) {
		return fmt.Errorf("%w: %s is not a bpf filesystem after mounting one", ErrUnsupported, dir)
	}
	return nil
}
