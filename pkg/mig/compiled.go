package mig

import (
	"cmp"
	"math/bits"
	"slices"
)

// compiled is a model reduced to bit masks for the planners' inner loops: a
// layout is a memory-slot mask, the compute slices in use and a count per
// profile, and every rule of Check is a few integer operations. It is built
// from a Model and never outlives the call that built it.
type compiled struct {
	model *Model
	// profs are the model's profiles, largest first (largestFirst's order):
	// the order capacity vectors are compared in.
	profs []*Profile
	// masks[i][j] is the memory-slot mask of profs[i]'s j-th allowed start.
	masks [][]uint64
	// weights[i] is capacityWeight of profs[i].
	weights []int
	// ok is false when the model cannot be represented: a placement beyond
	// 64 memory slots, or a profile without compute slices.
	ok bool
}

// capacityWeight is what one more placeable instance of a profile is worth
// in the planners' capacity: its compute slices, so that every profile's
// future placeability counts alike, per slice. rank is the profile's place
// in largestFirst's order, of n. Tests swap it to measure alternatives on
// the trace (export_test.go); nothing else changes it.
var capacityWeight = func(p *Profile, rank, n int) int { return p.Slices }

// layout is one GPU's instances as compiled sees them.
type layout struct {
	mask   uint64
	slices int
	counts []int // per compiled.profs index
}

// rangeMask is the mask of memory slots [start, start+size); ok is false
// when the range does not fit in 64 slots.
func rangeMask(at Placement) (uint64, bool) {
	if at.Start < 0 || at.Size <= 0 || at.End() > 64 {
		return 0, false
	}
	if at.Size == 64 {
		return ^uint64(0), true
	}
	return ((uint64(1) << at.Size) - 1) << at.Start, true
}

func compile(m *Model) *compiled {
	c := &compiled{model: m, profs: m.largestFirst(), ok: true}
	n := 0
	for _, p := range c.profs {
		n += len(p.Starts)
	}
	flat := make([]uint64, 0, n)
	c.masks = make([][]uint64, len(c.profs))
	c.weights = make([]int, len(c.profs))
	for i, p := range c.profs {
		c.weights[i] = capacityWeight(p, i, len(c.profs))
		if p.Slices <= 0 {
			c.ok = false
		}
		from := len(flat)
		for _, s := range p.Starts {
			mk, ok := rangeMask(Placement{Start: s, Size: p.MemorySlots})
			if !ok {
				c.ok = false
			}
			flat = append(flat, mk)
		}
		c.masks[i] = flat[from:len(flat):len(flat)]
	}
	return c
}

// compileCache compiles each distinct model of a fleet once per planner
// call: GPUs of one model carry equal but separate copies of it.
type compileCache []*compiled

func (cc *compileCache) get(m *Model) *compiled {
	for _, c := range *cc {
		if sameModel(c.model, m) {
			return c
		}
	}
	c := compile(m)
	*cc = append(*cc, c)
	return c
}

// sameModel reports whether two models are equal in everything the
// planners read.
func sameModel(a, b *Model) bool {
	if a == b {
		return true
	}
	if a.Name != b.Name || a.ComputeSlices != b.ComputeSlices || a.MemorySlots != b.MemorySlots || len(a.Profiles) != len(b.Profiles) {
		return false
	}
	for i := range a.Profiles {
		p, q := &a.Profiles[i], &b.Profiles[i]
		if p.ID != q.ID || p.Name != q.Name || p.Slices != q.Slices || p.MemorySlots != q.MemorySlots ||
			p.MaxCount != q.MaxCount || !slices.Equal(p.Starts, q.Starts) {
			return false
		}
	}
	return true
}

// find is the position of profile id in profs, -1 when the model lacks it.
func (c *compiled) find(id ProfileID) int {
	for i, p := range c.profs {
		if p.ID == id {
			return i
		}
	}
	return -1
}

// load turns instances into a layout. ok is false when an instance names a
// profile the model lacks, or the instances do not form a valid layout
// (what CheckLayout would reject): the planners do not place next to a
// layout they cannot account for.
func (c *compiled) load(instances []Instance) (layout, bool) {
	l := layout{counts: make([]int, len(c.profs))}
	if !c.ok {
		return l, false
	}
	for _, in := range instances {
		i := c.find(in.Profile)
		if i < 0 || !c.profs[i].Allows(in.Placement) {
			return l, false
		}
		mk, _ := rangeMask(in.Placement)
		if l.mask&mk != 0 {
			return l, false
		}
		l.mask |= mk
		l.slices += c.profs[i].Slices
		l.counts[i]++
		if l.counts[i] > c.profs[i].MaxCount {
			return l, false
		}
	}
	if l.slices > c.model.ComputeSlices {
		return l, false
	}
	return l, true
}

// fits reports whether profs[i]'s j-th placement can be added to l: Check's
// rules without the error.
func (c *compiled) fits(l *layout, i, j int) bool {
	p := c.profs[i]
	return l.mask&c.masks[i][j] == 0 && l.counts[i] < p.MaxCount && l.slices+p.Slices <= c.model.ComputeSlices
}

// add puts profs[i]'s j-th placement into l (the caller has checked fits).
func (c *compiled) add(l *layout, i, j int) {
	l.mask |= c.masks[i][j]
	l.slices += c.profs[i].Slices
	l.counts[i]++
}

// remove undoes add.
func (c *compiled) remove(l *layout, i, j int) {
	l.mask &^= c.masks[i][j]
	l.slices -= c.profs[i].Slices
	l.counts[i]--
}

// remaining is how many more instances of profs[i] fit in l: the largest
// set of pairwise disjoint free placements (taking them by ascending start
// is optimal, as they are equal-sized intervals), capped by the profile's
// MaxCount and by the free compute slices. It equals Model.Remaining.
func (c *compiled) remaining(l *layout, i int) int {
	p := c.profs[i]
	n, taken := 0, l.mask
	for _, mk := range c.masks[i] {
		if taken&mk == 0 {
			n++
			taken |= mk
		}
	}
	n = min(n, p.MaxCount-l.counts[i], (c.model.ComputeSlices-l.slices)/p.Slices)
	return max(n, 0)
}

// freeCount is how many of profs[i]'s placements could be created in l
// now (len(Model.Free)).
func (c *compiled) freeCount(l *layout, i int) int {
	n := 0
	for j := range c.masks[i] {
		if c.fits(l, i, j) {
			n++
		}
	}
	return n
}

// freeSlots is the number of memory slots no instance uses, of the model's
// MemorySlots.
func (c *compiled) freeSlots(l *layout) int {
	all, _ := rangeMask(Placement{Start: 0, Size: c.model.MemorySlots})
	return bits.OnesCount64(all &^ l.mask)
}

// sortedByStart returns the instances ordered by placement start, then
// profile: the canonical order planners report layouts in.
func sortedByStart(in []Instance) []Instance {
	slices.SortFunc(in, func(a, b Instance) int {
		return cmp.Or(cmp.Compare(a.Placement.Start, b.Placement.Start), cmp.Compare(a.Profile, b.Profile))
	})
	return in
}
