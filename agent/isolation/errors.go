package isolation

import "errors"

// Error classes. Every error the package returns wraps at most one of them;
// test with errors.Is. Messages say what was being done and why it failed.
var (
	// ErrUnsupported: the kernel, the privileges or the host lack what a
	// fence needs (cgroup device or sock_addr programs, LPM tries, ring
	// buffers, bpf_link, a bpf filesystem, a cgroup v2 hierarchy).
	ErrUnsupported = errors.New("isolation unsupported on this host")
	// ErrAttach: attaching a program to the lease's cgroup failed (the
	// directory is missing, is not cgroup v2, or the kernel refused the
	// attachment). Nothing of the fence is left behind.
	ErrAttach = errors.New("attach isolation programs")
	// ErrInvalidPolicy: a lease id, device rule or prefix was refused.
	ErrInvalidPolicy = errors.New("invalid isolation policy")
	// ErrNotFenced: no fence is pinned for the lease.
	ErrNotFenced = errors.New("lease not fenced")
	// ErrConflict: the lease is already fenced on another cgroup, or
	// another Enforcer holds the pin root.
	ErrConflict = errors.New("isolation conflict")
	// ErrCorrupt: the lease's pin directory is incomplete or holds objects
	// this package did not make. Fence repairs it; Adopt and Describe
	// report it.
	ErrCorrupt = errors.New("isolation pins corrupt")
	// ErrClosed: the Enforcer was closed.
	ErrClosed = errors.New("isolation enforcer closed")
)
