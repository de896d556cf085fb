// Package runtime runs tenant workloads as containerd containers: one
// container per lease, bound to exactly one GPU partition, with a hardened
// OCI spec. It never decides what should run; the lease executor does.
package runtime

import (
	"context"
	"errors"
	"net/netip"
	"time"

	"github.com/gpuaas/gpuaas/agent/gpu"
)

// Error classes.
var (
	// ErrNotFound: no container (or task) for the id.
	ErrNotFound = errors.New("container not found")
	// ErrImageNotFound: the image is not in the local store and cannot be
	// fetched.
	ErrImageNotFound = errors.New("image not found")
	// ErrInvalidSpec: the container spec is malformed.
	ErrInvalidSpec = errors.New("invalid container spec")
)

// Labels set on every container, linking it to its lease.
const (
	LabelLease  = "dev.gpuaas.lease"
	LabelTenant = "dev.gpuaas.tenant"
	LabelMIG    = "dev.gpuaas.mig-device"
	// LabelImageDigest records the manifest digest the container was
	// created from, so Status does not depend on the image's tag later.
	LabelImageDigest = "dev.gpuaas.image-digest"
)

// Spec describes one tenant container.
type Spec struct {
	// ID is the container id, derived from the lease id by the caller.
	ID      string
	LeaseID string
	Tenant  string
	Image   string // a reference present in the local store (or pullable)
	Args    []string
	Env     []string // KEY=VALUE; never logged
	// LogPath receives the container's stdout and stderr (written by the
	// shim, so it survives an agent restart).
	LogPath string
	Limits  Limits
	// Device is the GPU partition the container is bound to; its device
	// nodes are the only GPU nodes in the container.
	Device gpu.MIGDevice
	// Network is how the container reaches the network; the zero value is
	// NetworkNone (loopback only). NetworkBridge needs a runtime with a
	// network configured.
	Network NetworkMode
}

// Limits are the lease's resource limits; zero means the runtime default.
type Limits struct {
	MemoryBytes int64
	CPUMillis   int64 // 1000 = one CPU
	Pids        int64
}

// State of a container's task.
type State string

const (
	StateCreated State = "created" // task created, not started
	StateRunning State = "running"
	StateStopped State = "stopped" // exited; ExitCode is valid
	StateNoTask  State = "no-task" // container exists, no task
	// StateUnknown: the shim reports a state this runtime never produces
	// (paused, pausing) or cannot tell.
	StateUnknown State = "unknown"
)

// Status is what the runtime observes of one container.
type Status struct {
	ID          string
	LeaseID     string
	Image       string
	ImageDigest string
	State       State
	Pid         uint32
	ExitCode    uint32
	ExitedAt    time.Time
	// CgroupPath is the task's cgroup v2 directory (absolute), where
	// isolation programs attach.
	CgroupPath string
	// Network is the container's network mode, and IP its address on the
	// bridge network (invalid in NetworkNone).
	Network NetworkMode
	IP      netip.Addr
	// OOMKilled: the kernel's OOM killer killed a process of the container
	// (its memory limit was reached). Read from the task's memory cgroup,
	// so it is known until the task is deleted, across agent restarts.
	OOMKilled bool
}

// Runtime creates, observes and removes tenant containers. Every method is
// idempotent: creating what exists returns it, removing what is gone
// succeeds.
type Runtime interface {
	// ImportArchive imports an OCI image archive (tar) into the local store
	// and returns the image names it contained.
	ImportArchive(ctx context.Context, path string) ([]string, error)
	// Create creates the container and its task, not yet started, so the
	// caller can fence it before it runs. If the container exists it returns
	// its status.
	Create(ctx context.Context, spec Spec) (Status, error)
	// Start starts a created task. Starting a running task is a no-op.
	Start(ctx context.Context, id string) (Status, error)
	// Status reports the container's state; ErrNotFound if none.
	Status(ctx context.Context, id string) (Status, error)
	// Stop signals the task (SIGTERM, then SIGKILL after grace), deletes
	// the task, the container and its snapshot. A missing container is not
	// an error.
	Stop(ctx context.Context, id string, grace time.Duration) error
	// List returns the status of every container this runtime manages.
	List(ctx context.Context) ([]Status, error)
	// Close releases the client connection; containers keep running.
	Close() error
}

// NetworkSweeper is implemented by a runtime whose containers hold network
// resources outside containerd (network namespaces, CNI attachments,
// address allocations).
type NetworkSweeper interface {
	// SweepNetwork releases the network resources of every container that
	// no longer exists (deleted behind the runtime's back, or lost to a
	// crash or a reboot) and returns their ids.
	SweepNetwork(ctx context.Context) ([]string, error)
}
