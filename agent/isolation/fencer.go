package isolation

import "context"

// Fencer is the seam between the lease executor and the kernel: what the
// executor needs to fence a lease's task, converge and describe the fence,
// and remove it. *Enforcer implements it on the kernel;
// isolationtest.Fake implements it in memory for tests that inject
// failures, and isolationtest.Run holds both to the same contract.
type Fencer interface {
	// Fence attaches and pins the lease's programs to cgroupDir, or
	// converges an existing fence of the lease on the same cgroup.
	Fence(leaseID, cgroupDir string, p Policy) (Description, error)
	// UpdatePolicy changes the egress policy with map updates only.
	UpdatePolicy(leaseID string, p Policy) error
	// UpdateDevices swaps the device program in its link.
	UpdateDevices(leaseID string, devices []DeviceRule) error
	// Adopt takes over a fence pinned by an earlier agent.
	Adopt(leaseID string) (Description, error)
	// Describe reads back what the kernel enforces for the lease.
	Describe(leaseID string) (Description, error)
	// Detach removes the lease's fence; no fence is not an error.
	Detach(leaseID string) error
	// Sweep removes the fences of the leases keep rejects.
	Sweep(keep func(leaseID string) bool) ([]string, error)
	// Leases lists the fenced leases.
	Leases() ([]string, error)
	// Events streams deny events until ctx is done.
	Events(ctx context.Context) (<-chan DenyEvent, error)
	// Close releases the Fencer; fences stay in force.
	Close() error
}

var _ Fencer = (*Enforcer)(nil)
