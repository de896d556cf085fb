package mig

import (
	"errors"
	"fmt"
	"slices"
	"strings"
)

// ErrInvalidLayout: a requested layout is malformed (a negative count) or
// too large to search.
var ErrInvalidLayout = errors.New("invalid mig layout")

// maxLayoutSearch bounds PlanLayout's search. A model with 8 memory slots
// has at most a few hundred layouts; only a hand-made model far beyond
// real hardware can reach it.
const maxLayoutSearch = 1 << 22

// PlanLayout packs the given number of instances of each profile onto an
// empty GPU of this model: the static layout a mig-parted style config asks
// for. The search is exhaustive, so if any packing exists it is found.
// Among all packings it returns the one that leaves the most capacity
// (PlanAcross's rule 1), then the most free placements comparing profiles
// from the largest down (Place's rule), then the first in a fixed
// enumeration order (profiles largest first, starts ascending), so the
// result is deterministic. Instances come sorted by start. Zero counts are
// ignored; no counts give an empty layout.
//
// Errors: ErrUnknownProfile for a profile the model lacks; ErrInvalidLayout
// for a negative count; ErrNoCapacity when the instances do not fit (more
// than a profile's MaxCount, more compute slices than the GPU has, or no
// arrangement of their memory slots), with the reason.
func (m Model) PlanLayout(counts map[ProfileID]int) ([]Instance, error) {
	c := compile(&m)
	if !c.ok {
		return nil, fmt.Errorf("plan layout on %s: model has a placement beyond 64 memory slots or a profile without slices: %w", m.Name, ErrInvalidLayout)
	}
	need := make([]int, len(c.profs))
	ids := make([]ProfileID, 0, len(counts))
	for id := range counts {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	total, slicesNeeded := 0, 0
	for _, id := range ids {
		n := counts[id]
		i := c.find(id)
		switch {
		case n < 0:
			return nil, fmt.Errorf("plan layout on %s: %d instances of profile %d: %w", m.Name, n, id, ErrInvalidLayout)
		case n == 0:
			continue
		case i < 0:
			return nil, fmt.Errorf("plan layout on %s: profile %d: %w", m.Name, id, ErrUnknownProfile)
		}
		p := c.profs[i]
		if n > p.MaxCount {
			return nil, fmt.Errorf("plan layout on %s: %d x %s, at most %d fit: %w", m.Name, n, p.Name, p.MaxCount, ErrNoCapacity)
		}
		need[i] = n
		total += n
		slicesNeeded += n * p.Slices
	}
	if slicesNeeded > m.ComputeSlices {
		return nil, fmt.Errorf("plan layout on %s: %s need %d compute slices of %d: %w",
			m.Name, describeCounts(c, need), slicesNeeded, m.ComputeSlices, ErrNoCapacity)
	}
	s := &layoutSearch{c: c, need: need, cur: layout{counts: make([]int, len(c.profs))}}
	s.walk(0, 0, 0)
	if s.visits > maxLayoutSearch {
		return nil, fmt.Errorf("plan layout on %s: search larger than %d steps: %w", m.Name, maxLayoutSearch, ErrInvalidLayout)
	}
	if !s.found {
		return nil, fmt.Errorf("plan layout on %s: %s fit no arrangement of the %d memory slots: %w",
			m.Name, describeCounts(c, need), m.MemorySlots, ErrNoCapacity)
	}
	out := make([]Instance, 0, total)
	for _, pj := range s.best {
		p := c.profs[pj[0]]
		out = append(out, Instance{Profile: p.ID, Placement: Placement{Start: p.Starts[pj[1]], Size: p.MemorySlots}})
	}
	return sortedByStart(out), nil
}

// describeCounts renders need as "2 x 1g.18gb, 1 x 3g.71gb".
func describeCounts(c *compiled, need []int) string {
	var parts []string
	for i, n := range need {
		if n > 0 {
			parts = append(parts, fmt.Sprintf("%d x %s", n, c.profs[i].Name))
		}
	}
	return strings.Join(parts, ", ")
}

// layoutSearch enumerates, depth first, every way to choose need[i]
// placements of each profile (in ascending start order within a profile,
// so each layout is seen once) and keeps the best complete one.
type layoutSearch struct {
	c      *compiled
	need   []int
	cur    layout
	chosen [][2]int // (profile, placement) pairs of the current path
	best   [][2]int
	found  bool
	bestW  int
	bestF  []int // negated free-placement counts of best
	visits int
}

// walk places the remaining instances of profile i, the next one at a
// placement index of at least from; placed of them are down already.
func (s *layoutSearch) walk(i, from, placed int) {
	s.visits++
	if s.visits > maxLayoutSearch {
		return
	}
	if i == len(s.need) {
		s.consider()
		return
	}
	if placed == s.need[i] {
		s.walk(i+1, 0, 0)
		return
	}
	masks := s.c.masks[i]
	for j := from; j < len(masks); j++ {
		if !s.c.fits(&s.cur, i, j) {
			continue
		}
		s.c.add(&s.cur, i, j)
		s.chosen = append(s.chosen, [2]int{i, j})
		s.walk(i, j+1, placed+1)
		s.chosen = s.chosen[:len(s.chosen)-1]
		s.c.remove(&s.cur, i, j)
	}
}

// consider keeps the current complete layout if it beats the best.
func (s *layoutSearch) consider() {
	w := s.c.weightedCapacity(&s.cur)
	free := make([]int, len(s.c.profs))
	for i := range s.c.profs {
		free[i] = -s.c.freeCount(&s.cur, i)
	}
	if s.found && (w < s.bestW || (w == s.bestW && slices.Compare(free, s.bestF) >= 0)) {
		return
	}
	s.best, s.found = slices.Clone(s.chosen), true
	s.bestW, s.bestF = w, free
}
