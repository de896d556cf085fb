package mig_test

import (
	"errors"
	"slices"
	"testing"

	"github.com/gpuaas/gpuaas/pkg/mig"
)

// FuzzPlace drives a GPU through random sequences of Place, destroy and
// direct Check-gated creates, and asserts after every step that the layout
// is valid (no overlap, allowed placements, slices and counts within
// limits) and that Place, Free, Check and Remaining agree with one another.
func FuzzPlace(f *testing.F) {
	f.Add([]byte{3, 0, 0, 0, 1, 0, 3, 0, 4})
	f.Add([]byte{0, 0, 6, 0, 6, 0, 6, 0, 6, 0, 6, 0, 6, 0, 6, 0, 6})
	f.Add([]byte{1, 3, 4, 4, 1, 0, 2, 2, 0, 5})
	f.Add([]byte{2, 3, 1, 0, 0, 0, 3, 1, 9, 2, 0, 0, 2})
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) == 0 {
			return
		}
		models := mig.Models()
		m := models[int(data[0])%len(models)]
		data = data[1:]
		var existing []mig.Instance
		next := func() (byte, bool) {
			if len(data) == 0 {
				return 0, false
			}
			b := data[0]
			data = data[1:]
			return b, true
		}
		for {
			op, ok := next()
			if !ok {
				return
			}
			arg, _ := next()
			switch op % 4 {
			case 0, 1: // place a model profile
				p := m.Profiles[int(arg)%len(m.Profiles)]
				got, err := m.Place(existing, p.ID)
				free := m.Free(existing, p.ID)
				if err != nil {
					if !errors.Is(err, mig.ErrNoCapacity) {
						t.Fatalf("Place(%s) = %v, want ErrNoCapacity", p.Name, err)
					}
					if len(free) != 0 {
						t.Fatalf("Place(%s) found no capacity but Free = %v", p.Name, free)
					}
					continue
				}
				if err := m.Check(existing, p.ID, got); err != nil {
					t.Fatalf("Place(%s) = %v, which Check rejects: %v", p.Name, got, err)
				}
				if !slices.Contains(free, got) {
					t.Fatalf("Place(%s) = %v, not in Free %v", p.Name, got, free)
				}
				if again, _ := m.Place(existing, p.ID); again != got {
					t.Fatalf("Place(%s) not deterministic: %v then %v", p.Name, got, again)
				}
				existing = append(existing, mig.Instance{Profile: p.ID, Placement: got})
			case 2: // destroy one
				if len(existing) > 0 {
					i := int(arg) % len(existing)
					existing = slices.Delete(existing, i, i+1)
				}
			case 3: // create wherever Check allows, including layouts Place would not choose
				p := m.Profiles[int(arg)%len(m.Profiles)]
				startB, _ := next()
				sizeB, _ := next()
				pl := mig.Placement{Start: int(startB%10) - 1, Size: int(sizeB % 9)}
				if m.Check(existing, p.ID, pl) == nil {
					existing = append(existing, mig.Instance{Profile: p.ID, Placement: pl})
				}
			}
			assertValid(t, m, existing)
		}
	})
}

func assertValid(t *testing.T, m mig.Model, existing []mig.Instance) {
	t.Helper()
	if err := m.CheckLayout(existing); err != nil {
		t.Fatalf("invalid layout %v: %v", existing, err)
	}
	slicesUsed := 0
	counts := map[mig.ProfileID]int{}
	for i, a := range existing {
		p, ok := m.Profile(a.Profile)
		if !ok || !p.Allows(a.Placement) {
			t.Fatalf("instance %v not allowed", a)
		}
		if a.Placement.Start < 0 || a.Placement.End() > m.MemorySlots {
			t.Fatalf("instance %v outside memory", a)
		}
		slicesUsed += p.Slices
		counts[a.Profile]++
		if counts[a.Profile] > p.MaxCount {
			t.Fatalf("%d instances of %s, max %d", counts[a.Profile], p.Name, p.MaxCount)
		}
		for _, b := range existing[i+1:] {
			if a.Placement.Overlaps(b.Placement) {
				t.Fatalf("instances %v and %v overlap", a, b)
			}
		}
	}
	if slicesUsed > m.ComputeSlices {
		t.Fatalf("%d compute slices in use, max %d", slicesUsed, m.ComputeSlices)
	}
	for _, p := range m.Profiles {
		free := m.Free(existing, p.ID)
		for _, pl := range p.Placements() {
			if ok := m.Check(existing, p.ID, pl) == nil; ok != slices.Contains(free, pl) {
				t.Fatalf("%s at %v: Check ok = %v, but Free = %v", p.Name, pl, ok, free)
			}
		}
		rem := m.Remaining(existing, p.ID)
		if (rem > 0) != (len(free) > 0) || rem > p.MaxCount-counts[p.ID] {
			t.Fatalf("%s: Remaining %d, Free %v, %d of max %d exist", p.Name, rem, free, counts[p.ID], p.MaxCount)
		}
	}
}

// FuzzParsePlacement asserts ParsePlacement never panics and round-trips
// through String.
func FuzzParsePlacement(f *testing.F) {
	for _, s := range []string{"0:4", "6:1", "", ":", "1:", "-1:2", "99:99", "0:0", "٣:1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := mig.ParsePlacement(s)
		if err != nil {
			return
		}
		if p.Start < 0 || p.Size <= 0 {
			t.Fatalf("ParsePlacement(%q) = %v", s, p)
		}
		q, err := mig.ParsePlacement(p.String())
		if err != nil || q != p {
			t.Fatalf("round trip %q -> %v -> %v, %v", s, p, q, err)
		}
	})
}
