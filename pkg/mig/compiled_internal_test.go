package mig

import (
	"math/rand/v2"
	"testing"
)

// TestCompiled_AgreesWithTheModel checks the planners' bit-mask arithmetic
// against Check, Free and Remaining on random layouts of every model, valid
// and invalid.
func TestCompiled_AgreesWithTheModel(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for _, m := range Models() {
		c := compile(&m)
		if !c.ok {
			t.Fatalf("%s does not compile", m.Name)
		}
		for range 500 {
			var existing []Instance
			for range r.IntN(8) {
				p := m.Profiles[r.IntN(len(m.Profiles))]
				at := Placement{Start: p.Starts[r.IntN(len(p.Starts))], Size: p.MemorySlots}
				// Mostly valid creates; now and then anything, to exercise
				// load's rejection of invalid layouts.
				if r.IntN(10) == 0 || m.Check(existing, p.ID, at) == nil {
					existing = append(existing, Instance{Profile: p.ID, Placement: at})
				}
			}
			l, ok := c.load(existing)
			if valid := m.CheckLayout(existing) == nil; ok != valid {
				t.Fatalf("%s %v: load ok %v, CheckLayout valid %v", m.ShortName, existing, ok, valid)
			}
			if !ok {
				continue
			}
			for i, p := range c.profs {
				if got, want := c.remaining(&l, i), m.Remaining(existing, p.ID); got != want {
					t.Fatalf("%s %v: remaining(%s) = %d, Remaining = %d", m.ShortName, existing, p.Name, got, want)
				}
				if got, want := c.freeCount(&l, i), len(m.Free(existing, p.ID)); got != want {
					t.Fatalf("%s %v: freeCount(%s) = %d, Free has %d", m.ShortName, existing, p.Name, got, want)
				}
				for j, s := range p.Starts {
					at := Placement{Start: s, Size: p.MemorySlots}
					if got, want := c.fits(&l, i, j), m.Check(existing, p.ID, at) == nil; got != want {
						t.Fatalf("%s %v: fits(%s at %s) = %v, Check ok = %v", m.ShortName, existing, p.Name, at, got, want)
					}
				}
			}
		}
	}
}

func TestRangeMask(t *testing.T) {
	for _, tt := range []struct {
		at   Placement
		want uint64
		ok   bool
	}{
		{Placement{0, 1}, 0b1, true},
		{Placement{4, 4}, 0xF0, true},
		{Placement{0, 8}, 0xFF, true},
		{Placement{0, 64}, ^uint64(0), true},
		{Placement{60, 5}, 0, false},
		{Placement{-1, 2}, 0, false},
		{Placement{3, 0}, 0, false},
	} {
		got, ok := rangeMask(tt.at)
		if got != tt.want || ok != tt.ok {
			t.Errorf("rangeMask(%v) = %#x, %v; want %#x, %v", tt.at, got, ok, tt.want, tt.ok)
		}
	}
}
