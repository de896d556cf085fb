package mig_test

import (
	"errors"
	"maps"
	"slices"
	"testing"

	"github.com/gpuaas/gpuaas/pkg/mig"
)

func TestPlanLayout(t *testing.T) {
	m := h200(t)
	tests := []struct {
		name   string
		counts map[mig.ProfileID]int
		want   []mig.Instance
	}{
		{"nothing", nil, []mig.Instance{}},
		{"zero counts are ignored", map[mig.ProfileID]int{mig.Profile3g: 0}, []mig.Instance{}},
		// mig-parted's all-balanced on an H200: the 3g takes the top half,
		// which the 2g and 1g cannot use, and the 1g go where they leave
		// the most room (a 1g double memory still fits at 6 before them).
		{"all-balanced", map[mig.ProfileID]int{mig.Profile1g: 2, mig.Profile2g: 1, mig.Profile3g: 1},
			[]mig.Instance{in(mig.Profile2g, 0, 2), in(mig.Profile1g, 2, 1), in(mig.Profile1g, 3, 1), in(mig.Profile3g, 4, 4)}},
		{"seven 1g", map[mig.ProfileID]int{mig.Profile1g: 7},
			[]mig.Instance{in(19, 0, 1), in(19, 1, 1), in(19, 2, 1), in(19, 3, 1), in(19, 4, 1), in(19, 5, 1), in(19, 6, 1)}},
		{"4g and 3g", map[mig.ProfileID]int{mig.Profile4g: 1, mig.Profile3g: 1},
			[]mig.Instance{in(mig.Profile4g, 0, 4), in(mig.Profile3g, 4, 4)}},
		{"one 1g keeps the 4g and a 3g", map[mig.ProfileID]int{mig.Profile1g: 1}, []mig.Instance{in(mig.Profile1g, 6, 1)}},
		{"a 3g keeps the 4g", map[mig.ProfileID]int{mig.Profile3g: 1}, []mig.Instance{in(mig.Profile3g, 4, 4)}},
		// Order matters to a greedy packer: three 1g double memory placed
		// first at 6, 4, 2 would leave no room for the 2g; the search finds
		// the arrangement that fits.
		{"three 1g double memory and a 2g", map[mig.ProfileID]int{mig.Profile1gDouble: 3, mig.Profile2g: 1},
			[]mig.Instance{in(mig.Profile2g, 0, 2), in(mig.Profile1gDouble, 2, 2), in(mig.Profile1gDouble, 4, 2), in(mig.Profile1gDouble, 6, 2)}},
		{"whole GPU", map[mig.ProfileID]int{mig.Profile7g: 1}, []mig.Instance{in(mig.Profile7g, 0, 8)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := m.PlanLayout(tt.counts)
			if err != nil {
				t.Fatalf("PlanLayout: %v", err)
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("PlanLayout = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestPlanLayout_Errors(t *testing.T) {
	m := h200(t)
	tests := []struct {
		name   string
		counts map[mig.ProfileID]int
		want   error
	}{
		{"unknown profile", map[mig.ProfileID]int{42: 1}, mig.ErrUnknownProfile},
		{"negative count", map[mig.ProfileID]int{mig.Profile1g: -1}, mig.ErrInvalidLayout},
		{"more than MaxCount", map[mig.ProfileID]int{mig.Profile1g: 8}, mig.ErrNoCapacity},
		{"two 1g+me", map[mig.ProfileID]int{mig.Profile1gME: 2}, mig.ErrNoCapacity},
		{"more compute slices than the GPU", map[mig.ProfileID]int{mig.Profile4g: 1, mig.Profile2g: 2}, mig.ErrNoCapacity},
		{"slices fit, memory does not", map[mig.ProfileID]int{mig.Profile4g: 1, mig.Profile1gDouble: 3}, mig.ErrNoCapacity},
		{"two 3g and a 1g: 7 slices, no slot", map[mig.ProfileID]int{mig.Profile3g: 2, mig.Profile1g: 1}, mig.ErrNoCapacity},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := m.PlanLayout(tt.counts)
			if !errors.Is(err, tt.want) {
				t.Fatalf("PlanLayout = %v, %v; want %v", got, err, tt.want)
			}
		})
	}
}

// TestPlanLayout_FindsAPackingWheneverOneExists compares PlanLayout with a
// brute-force search built on Check alone, for every combination of counts,
// on the H200 (every table model has its geometry, see
// TestModels_HaveTheDriverGeometry) and on a 4-slot model as a driver may
// report one.
func TestPlanLayout_FindsAPackingWheneverOneExists(t *testing.T) {
	a30, err := mig.ModelFromProfiles("NVIDIA A30", 0x20B710DE, 24576, []mig.ReportedProfile{
		{ID: 14, Name: "1g.6gb", Slices: 1, MemorySlots: 1, MemoryMiB: 5836, InstanceCount: 4, Placements: []mig.Placement{at(0, 1), at(1, 1), at(2, 1), at(3, 1)}},
		{ID: 21, Name: "1g.6gb+me", Slices: 1, MemorySlots: 1, MemoryMiB: 5836, InstanceCount: 1, Placements: []mig.Placement{at(0, 1), at(1, 1), at(2, 1), at(3, 1)}},
		{ID: 5, Name: "2g.12gb", Slices: 2, MemorySlots: 2, MemoryMiB: 11940, InstanceCount: 2, Placements: []mig.Placement{at(0, 2), at(2, 2)}},
		{ID: 0, Name: "4g.24gb", Slices: 4, MemorySlots: 4, MemoryMiB: 24062, InstanceCount: 1, Placements: []mig.Placement{at(0, 4)}},
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range []mig.Model{h200(t), a30} {
		t.Run(m.ShortName, func(t *testing.T) {
			counts := map[mig.ProfileID]int{}
			tried, packed := 0, 0
			var each func(i, slicesNeeded int)
			each = func(i, slicesNeeded int) {
				if i == len(m.Profiles) {
					tried++
					got, err := m.PlanLayout(counts)
					if err != nil && !errors.Is(err, mig.ErrNoCapacity) {
						t.Fatalf("counts %v: %v, want ErrNoCapacity", counts, err)
					}
					// More slices than the GPU has cannot pack; only the
					// rest needs the brute force.
					exists := slicesNeeded <= m.ComputeSlices && bruteForcePacks(m, nil, flatten(m, counts))
					if exists != (err == nil) {
						t.Fatalf("counts %v: PlanLayout = %v, %v; brute force finds a packing: %v", counts, got, err, exists)
					}
					if err != nil {
						return
					}
					packed++
					if err := m.CheckLayout(got); err != nil {
						t.Fatalf("counts %v: PlanLayout = %v, invalid: %v", counts, got, err)
					}
					have := map[mig.ProfileID]int{}
					for _, in := range got {
						have[in.Profile]++
					}
					want := maps.Clone(counts)
					maps.DeleteFunc(want, func(_ mig.ProfileID, n int) bool { return n == 0 })
					if !maps.Equal(have, want) {
						t.Fatalf("counts %v: PlanLayout made %v", counts, have)
					}
					if again, _ := m.PlanLayout(counts); !slices.Equal(again, got) {
						t.Fatalf("counts %v: not deterministic: %v then %v", counts, got, again)
					}
					return
				}
				p := m.Profiles[i]
				for n := 0; n <= p.MaxCount; n++ {
					counts[p.ID] = n
					each(i+1, slicesNeeded+n*p.Slices)
				}
				delete(counts, p.ID)
			}
			each(0, 0)
			t.Logf("%d combinations, %d pack", tried, packed)
		})
	}
}

// flatten lists one profile id per wanted instance, largest first.
func flatten(m mig.Model, counts map[mig.ProfileID]int) []mig.ProfileID {
	var out []mig.ProfileID
	for i := len(m.Profiles) - 1; i >= 0; i-- {
		for range counts[m.Profiles[i].ID] {
			out = append(out, m.Profiles[i].ID)
		}
	}
	return out
}

// bruteForcePacks tries every placement of every instance in turn, with
// Check as the only rule.
func bruteForcePacks(m mig.Model, existing []mig.Instance, todo []mig.ProfileID) bool {
	if len(todo) == 0 {
		return true
	}
	p, _ := m.Profile(todo[0])
	for _, at := range p.Placements() {
		if m.Check(existing, p.ID, at) == nil {
			if bruteForcePacks(m, append(slices.Clip(existing), mig.Instance{Profile: p.ID, Placement: at}), todo[1:]) {
				return true
			}
		}
	}
	return false
}
