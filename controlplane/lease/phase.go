package lease

import (
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// transitions is the lease state machine: from -> allowed next phases.
var transitions = map[leasev1.Phase][]leasev1.Phase{
	leasev1.Phase_PHASE_PENDING:      {leasev1.Phase_PHASE_SCHEDULED, leasev1.Phase_PHASE_TERMINATED, leasev1.Phase_PHASE_FAILED},
	leasev1.Phase_PHASE_SCHEDULED:    {leasev1.Phase_PHASE_PROVISIONING, leasev1.Phase_PHASE_RUNNING, leasev1.Phase_PHASE_TERMINATING, leasev1.Phase_PHASE_TERMINATED, leasev1.Phase_PHASE_FAILED, leasev1.Phase_PHASE_LOST},
	leasev1.Phase_PHASE_PROVISIONING: {leasev1.Phase_PHASE_RUNNING, leasev1.Phase_PHASE_TERMINATING, leasev1.Phase_PHASE_TERMINATED, leasev1.Phase_PHASE_FAILED, leasev1.Phase_PHASE_LOST},
	leasev1.Phase_PHASE_RUNNING:      {leasev1.Phase_PHASE_TERMINATING, leasev1.Phase_PHASE_TERMINATED, leasev1.Phase_PHASE_FAILED, leasev1.Phase_PHASE_LOST},
	leasev1.Phase_PHASE_TERMINATING:  {leasev1.Phase_PHASE_TERMINATED, leasev1.Phase_PHASE_FAILED, leasev1.Phase_PHASE_LOST},
	// A lost node that comes back reports how its leases ended.
	leasev1.Phase_PHASE_LOST: {leasev1.Phase_PHASE_TERMINATED, leasev1.Phase_PHASE_FAILED},
}

// CanTransition reports whether the state machine allows from -> to.
func CanTransition(from, to leasev1.Phase) bool {
	for _, p := range transitions[from] {
		if p == to {
			return true
		}
	}
	return false
}

// Terminal reports whether a lease in phase p will never change again.
func Terminal(p leasev1.Phase) bool {
	return p == leasev1.Phase_PHASE_TERMINATED || p == leasev1.Phase_PHASE_FAILED
}

// Live reports whether a lease in phase p holds (or will hold) a partition.
func Live(p leasev1.Phase) bool {
	switch p {
	case leasev1.Phase_PHASE_SCHEDULED, leasev1.Phase_PHASE_PROVISIONING, leasev1.Phase_PHASE_RUNNING, leasev1.Phase_PHASE_TERMINATING, leasev1.Phase_PHASE_LOST:
		return true
	}
	return false
}

// ShouldRun reports whether a lease in phase p belongs in its node's desired
// set.
func ShouldRun(p leasev1.Phase) bool {
	switch p {
	case leasev1.Phase_PHASE_SCHEDULED, leasev1.Phase_PHASE_PROVISIONING, leasev1.Phase_PHASE_RUNNING:
		return true
	}
	return false
}
