package mig

// SetCapacityWeight replaces the planners' capacity weight (see
// capacityWeight) until restore is called, so that the trace test can
// measure alternative rules. Not safe to use from parallel tests.
func SetCapacityWeight(w func(slices, memorySlots, rank, profiles int) int) (restore func()) {
	old := capacityWeight
	capacityWeight = func(p *Profile, rank, n int) int { return w(p.Slices, p.MemorySlots, rank, n) }
	return func() { capacityWeight = old }
}
