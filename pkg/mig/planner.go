package mig

import (
	"cmp"
	"fmt"
	"slices"
)

// profile returns a pointer into the model's own table (no copy), for the
// planner's inner loops; callers must not modify it.
func (m *Model) profile(id ProfileID) *Profile {
	for i := range m.Profiles {
		if m.Profiles[i].ID == id {
			return &m.Profiles[i]
		}
	}
	return nil
}

// Check reports whether an instance of profile p can be created at `at` on a
// GPU of this model that already has the existing instances. It is the one
// statement of the MIG rules; the error, wrapped with context, is of class:
//
//   - ErrUnknownProfile: the model has no profile p (or an existing instance
//     names a profile the model does not have);
//   - ErrPlacementNotAllowed: `at` does not start at one of the profile's
//     allowed slots or is not exactly the profile's size;
//   - ErrOverlap: `at` shares a memory slot with an existing instance;
//   - ErrNoCapacity: the profile's MaxCount is reached, or the compute
//     slices of all instances would exceed the model's.
//
// When several rules fail the first in this order is reported.
func (m Model) Check(existing []Instance, p ProfileID, at Placement) error {
	prof := m.profile(p)
	if prof == nil {
		return fmt.Errorf("profile %d on %s: %w", p, m.Name, ErrUnknownProfile)
	}
	v := m.check(existing, prof, at)
	switch v.rule {
	case ruleUnknownExisting:
		e := existing[v.index]
		return fmt.Errorf("existing instance of profile %d at %s on %s: %w",
			e.Profile, e.Placement, m.Name, ErrUnknownProfile)
	case rulePlacement:
		return fmt.Errorf("%s at %s (allowed starts %v, size %d): %w",
			prof.Name, at, prof.Starts, prof.MemorySlots, ErrPlacementNotAllowed)
	case ruleOverlap:
		e := existing[v.index]
		return fmt.Errorf("%s at %s overlaps %s at %s: %w",
			prof.Name, at, m.profile(e.Profile).Name, e.Placement, ErrOverlap)
	case ruleMaxCount:
		return fmt.Errorf("%s: %d of at most %d already exist: %w",
			prof.Name, v.used, prof.MaxCount, ErrNoCapacity)
	case ruleSlices:
		return fmt.Errorf("%s needs %d compute slices, %d of %d in use: %w",
			prof.Name, prof.Slices, v.used, m.ComputeSlices, ErrNoCapacity)
	}
	return nil
}

// rule names the first MIG rule a placement breaks.
type rule int

const (
	ruleOK rule = iota
	rulePlacement
	ruleUnknownExisting
	ruleOverlap
	ruleMaxCount
	ruleSlices
)

// violation is what check found: the rule broken, the existing instance
// involved (ruleUnknownExisting, ruleOverlap), and the count or slices in use
// (ruleMaxCount, ruleSlices).
type violation struct {
	rule  rule
	index int
	used  int
}

// check applies the rules in Check's order without allocating, so the
// planner can call it in its inner loops; Check turns the result into an
// error.
func (m *Model) check(existing []Instance, prof *Profile, at Placement) violation {
	if !prof.Allows(at) {
		return violation{rule: rulePlacement}
	}
	slicesUsed, sameProfile := 0, 0
	for i, e := range existing {
		ep := m.profile(e.Profile)
		if ep == nil {
			return violation{rule: ruleUnknownExisting, index: i}
		}
		slicesUsed += ep.Slices
		if e.Profile == prof.ID {
			sameProfile++
		}
	}
	for i, e := range existing {
		if at.Overlaps(e.Placement) {
			return violation{rule: ruleOverlap, index: i}
		}
	}
	if sameProfile >= prof.MaxCount {
		return violation{rule: ruleMaxCount, used: sameProfile}
	}
	if slicesUsed+prof.Slices > m.ComputeSlices {
		return violation{rule: ruleSlices, used: slicesUsed}
	}
	return violation{}
}

// CheckLayout reports whether the instances form a valid layout: each one,
// in order, passes Check against the ones before it. The error names the
// first instance that does not.
func (m Model) CheckLayout(instances []Instance) error {
	for i, in := range instances {
		if err := m.Check(instances[:i], in.Profile, in.Placement); err != nil {
			return fmt.Errorf("instance %d: %w", i, err)
		}
	}
	return nil
}

// Free lists every placement at which profile p could be created now, in
// ascending start order. It is empty for an unknown profile or a full GPU.
func (m Model) Free(existing []Instance, p ProfileID) []Placement {
	prof := m.profile(p)
	if prof == nil {
		return nil
	}
	var out []Placement
	for _, s := range prof.Starts {
		at := Placement{Start: s, Size: prof.MemorySlots}
		if m.check(existing, prof, at).rule == ruleOK {
			out = append(out, at)
		}
	}
	return out
}

// countFree is len(m.Free(existing, p)) without allocating.
func (m *Model) countFree(existing []Instance, prof *Profile) int {
	n := 0
	for _, s := range prof.Starts {
		if m.check(existing, prof, Placement{Start: s, Size: prof.MemorySlots}).rule == ruleOK {
			n++
		}
	}
	return n
}

// Place chooses where to create an instance of profile p. The rule, best fit
// with least fragmentation, is: among the placements Free returns, take the
// one after which the most future placements remain possible, comparing
// profiles from the largest down. For every candidate the planner counts, in
// the layout that would result, the free placements of each of the model's
// profiles ordered by memory slots, then compute slices (both descending),
// then id; the candidate whose count vector is lexicographically greatest
// wins, and a tie goes to the lowest start. So a small instance goes where it
// blocks no larger one if it can (a first 1g lands at slot 6, keeping the
// 4g or 3g at slot 0 and the 2g at slot 4 open), and the choice is
// deterministic. In every published example of the driver choosing a
// placement itself, this rule picks the same slots (see
// TestPlace_MatchesTheDriversOwnChoices).
//
// Errors: ErrUnknownProfile for a profile the model does not have,
// ErrNoCapacity when no placement is free.
func (m Model) Place(existing []Instance, p ProfileID) (Placement, error) {
	prof := m.profile(p)
	if prof == nil {
		return Placement{}, fmt.Errorf("place profile %d on %s: %w", p, m.Name, ErrUnknownProfile)
	}
	candidates := m.Free(existing, p)
	if len(candidates) == 0 {
		return Placement{}, fmt.Errorf("place %s on %s with %d instances: %w",
			prof.Name, m.Name, len(existing), ErrNoCapacity)
	}
	order := m.largestFirst()
	after := make([]Instance, len(existing)+1)
	copy(after, existing)

	var best Placement
	var bestScore []int
	for _, c := range candidates {
		after[len(existing)] = Instance{Profile: p, Placement: c}
		score := make([]int, len(order))
		for i, q := range order {
			score[i] = m.countFree(after, q)
		}
		if bestScore == nil || slices.Compare(score, bestScore) > 0 {
			best, bestScore = c, score
		}
	}
	return best, nil
}

// largestFirst orders the model's profiles by memory slots, then compute
// slices (both descending), then id: the order Place protects them in. The
// pointers are into m's own table.
func (m *Model) largestFirst() []*Profile {
	ps := make([]*Profile, len(m.Profiles))
	for i := range m.Profiles {
		ps[i] = &m.Profiles[i]
	}
	slices.SortFunc(ps, func(a, b *Profile) int {
		return cmp.Or(
			cmp.Compare(b.MemorySlots, a.MemorySlots),
			cmp.Compare(b.Slices, a.Slices),
			cmp.Compare(a.ID, b.ID),
		)
	})
	return ps
}

// Remaining is how many more instances of profile p could be created now,
// placing them one after another with Place. The placements of one profile
// never overlap one another (they are aligned runs of equal size), so this
// greedy count is also the maximum. It is 0 for an unknown profile.
func (m Model) Remaining(existing []Instance, p ProfileID) int {
	cur := slices.Clone(existing)
	n := 0
	for {
		at, err := m.Place(cur, p)
		if err != nil {
			return n
		}
		cur = append(cur, Instance{Profile: p, Placement: at})
		n++
	}
}
