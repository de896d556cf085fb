package mig_test

import (
	"errors"
	"slices"
	"testing"

	"github.com/gpuaas/gpuaas/pkg/mig"
)

func h200(t testing.TB) mig.Model {
	t.Helper()
	m, ok := mig.ModelByName("NVIDIA H200")
	if !ok {
		t.Fatal("H200 not in the table")
	}
	return m
}

func in(p mig.ProfileID, start, size int) mig.Instance {
	return mig.Instance{Profile: p, Placement: mig.Placement{Start: start, Size: size}}
}

func at(start, size int) mig.Placement { return mig.Placement{Start: start, Size: size} }

func TestPlacement_StringAndParse(t *testing.T) {
	for _, tt := range []struct {
		in      string
		want    mig.Placement
		wantErr bool
	}{
		{"0:4", at(0, 4), false},
		{"6:1", at(6, 1), false},
		{"12:8", at(12, 8), false},
		{"0:0", mig.Placement{}, true},
		{"-1:4", mig.Placement{}, true},
		{"0", mig.Placement{}, true},
		{"0:4:1", mig.Placement{}, true},
		{"a:b", mig.Placement{}, true},
		{"+1:4", mig.Placement{}, true},
		{"999:1", mig.Placement{}, true},
		{"", mig.Placement{}, true},
	} {
		got, err := mig.ParsePlacement(tt.in)
		if (err != nil) != tt.wantErr || got != tt.want {
			t.Errorf("ParsePlacement(%q) = %v, %v; want %v, err %v", tt.in, got, err, tt.want, tt.wantErr)
		}
		if err == nil && got.String() != tt.in {
			t.Errorf("String() = %q, want %q", got.String(), tt.in)
		}
	}
}

func TestPlacement_Overlaps(t *testing.T) {
	for _, tt := range []struct {
		a, b mig.Placement
		want bool
	}{
		{at(0, 4), at(4, 4), false},
		{at(0, 4), at(3, 1), true},
		{at(0, 8), at(6, 2), true},
		{at(2, 2), at(0, 2), false},
		{at(2, 2), at(1, 2), true},
		{at(2, 0), at(0, 8), false},
	} {
		if got := tt.a.Overlaps(tt.b); got != tt.want {
			t.Errorf("%v overlaps %v = %v, want %v", tt.a, tt.b, got, tt.want)
		}
		if got := tt.b.Overlaps(tt.a); got != tt.want {
			t.Errorf("%v overlaps %v = %v, want %v (symmetry)", tt.b, tt.a, got, tt.want)
		}
	}
}

func TestCheck_EveryAllowedPlacementOnAnEmptyGPU(t *testing.T) {
	for _, m := range mig.Models() {
		for _, p := range m.Profiles {
			for start := -1; start <= 8; start++ {
				for size := 0; size <= 8; size++ {
					err := m.Check(nil, p.ID, at(start, size))
					allowed := size == p.MemorySlots && slices.Contains(p.Starts, start)
					switch {
					case allowed && err != nil:
						t.Errorf("%s %s at %d:%d: %v", m.ShortName, p.Name, start, size, err)
					case !allowed && !errors.Is(err, mig.ErrPlacementNotAllowed):
						t.Errorf("%s %s at %d:%d: err %v, want ErrPlacementNotAllowed", m.ShortName, p.Name, start, size, err)
					}
				}
			}
		}
	}
}

func TestCheck_Rules(t *testing.T) {
	m := h200(t)
	tests := []struct {
		name     string
		existing []mig.Instance
		profile  mig.ProfileID
		at       mig.Placement
		want     error
	}{
		{"unknown profile", nil, 42, at(0, 1), mig.ErrUnknownProfile},
		{"existing instance of unknown profile", []mig.Instance{in(42, 0, 1)}, mig.Profile1g, at(3, 1), mig.ErrUnknownProfile},
		{"1g at slot 7 is not allowed", nil, mig.Profile1g, at(7, 1), mig.ErrPlacementNotAllowed},
		{"2g at slot 6 is not allowed", nil, mig.Profile2g, at(6, 2), mig.ErrPlacementNotAllowed},
		{"1g double memory at an odd slot", nil, mig.Profile1gDouble, at(1, 2), mig.ErrPlacementNotAllowed},
		{"3g at slot 2", nil, mig.Profile3g, at(2, 4), mig.ErrPlacementNotAllowed},
		{"4g only at slot 0", nil, mig.Profile4g, at(4, 4), mig.ErrPlacementNotAllowed},
		{"3g with the wrong size", nil, mig.Profile3g, at(0, 3), mig.ErrPlacementNotAllowed},
		{"same slot twice", []mig.Instance{in(mig.Profile1g, 3, 1)}, mig.Profile1g, at(3, 1), mig.ErrOverlap},
		{"2g over a 1g", []mig.Instance{in(mig.Profile1g, 3, 1)}, mig.Profile2g, at(2, 2), mig.ErrOverlap},
		{"7g on a GPU with any instance", []mig.Instance{in(mig.Profile1g, 6, 1)}, mig.Profile7g, at(0, 8), mig.ErrOverlap},
		{"4g over a 3g at 0", []mig.Instance{in(mig.Profile3g, 0, 4)}, mig.Profile4g, at(0, 4), mig.ErrOverlap},
		{"1g double memory over a 1g", []mig.Instance{in(mig.Profile1g, 6, 1)}, mig.Profile1gDouble, at(6, 2), mig.ErrOverlap},
		{"second 1g+me", []mig.Instance{in(mig.Profile1gME, 0, 1)}, mig.Profile1gME, at(3, 1), mig.ErrNoCapacity},
		{"overlap is reported before capacity", []mig.Instance{in(mig.Profile1gME, 0, 1)}, mig.Profile1gME, at(0, 1), mig.ErrOverlap},
		{"1g next to a 1g+me", []mig.Instance{in(mig.Profile1gME, 0, 1)}, mig.Profile1g, at(1, 1), nil},
		{"3g beside a 4g fills 7 slices", []mig.Instance{in(mig.Profile4g, 0, 4)}, mig.Profile3g, at(4, 4), nil},
		{"three 2g and a 1g double memory", []mig.Instance{in(mig.Profile2g, 0, 2), in(mig.Profile2g, 2, 2), in(mig.Profile2g, 4, 2)}, mig.Profile1gDouble, at(6, 2), nil},
		{"seventh 1g", []mig.Instance{in(19, 0, 1), in(19, 1, 1), in(19, 2, 1), in(19, 3, 1), in(19, 4, 1), in(19, 5, 1)}, mig.Profile1g, at(6, 1), nil},
		{"two 3g", []mig.Instance{in(mig.Profile3g, 4, 4)}, mig.Profile3g, at(0, 4), nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := m.Check(tt.existing, tt.profile, tt.at)
			if tt.want == nil {
				if err != nil {
					t.Fatalf("Check = %v, want nil", err)
				}
				return
			}
			if !errors.Is(err, tt.want) {
				t.Fatalf("Check = %v, want %v", err, tt.want)
			}
		})
	}
}

// syntheticModel is an H200 whose geometry breaks the real one's invariants,
// to exercise rules the real geometry never reaches on its own: with 2g
// allowed at slot 6, four 2g fit in memory but need 8 of 7 slices; with a 1g
// limit of 2, the third 1g has free slots but no allowance.
func syntheticModel(t *testing.T) mig.Model {
	m := h200(t)
	for i := range m.Profiles {
		switch m.Profiles[i].ID {
		case mig.Profile2g:
			m.Profiles[i].Starts = []int{0, 2, 4, 6}
			m.Profiles[i].MaxCount = 4
		case mig.Profile1g:
			m.Profiles[i].MaxCount = 2
		}
	}
	return m
}

func TestCheck_ComputeSlicesAndMaxCountAreEnforcedOnTheirOwn(t *testing.T) {
	m := syntheticModel(t)
	three2g := []mig.Instance{in(mig.Profile2g, 0, 2), in(mig.Profile2g, 2, 2), in(mig.Profile2g, 4, 2)}
	if err := m.Check(three2g, mig.Profile2g, at(6, 2)); !errors.Is(err, mig.ErrNoCapacity) {
		t.Errorf("fourth 2g (8 slices): %v, want ErrNoCapacity", err)
	}
	if err := m.Check(three2g, mig.Profile1gDouble, at(6, 2)); err != nil {
		t.Errorf("1g double memory after three 2g (7 slices): %v", err)
	}
	two1g := []mig.Instance{in(mig.Profile1g, 0, 1), in(mig.Profile1g, 1, 1)}
	if err := m.Check(two1g, mig.Profile1g, at(5, 1)); !errors.Is(err, mig.ErrNoCapacity) {
		t.Errorf("third 1g with MaxCount 2: %v, want ErrNoCapacity", err)
	}
	if got := m.Remaining(nil, mig.Profile2g); got != 3 {
		t.Errorf("Remaining 2g = %d, want 3 (slices bind before slots)", got)
	}
}

func TestCheckLayout(t *testing.T) {
	m := h200(t)
	good := []mig.Instance{in(mig.Profile4g, 0, 4), in(mig.Profile2g, 4, 2), in(mig.Profile1g, 6, 1)}
	if err := m.CheckLayout(good); err != nil {
		t.Errorf("valid layout: %v", err)
	}
	bad := []mig.Instance{in(mig.Profile3g, 4, 4), in(mig.Profile1g, 0, 1), in(mig.Profile2g, 4, 2)}
	if err := m.CheckLayout(bad); !errors.Is(err, mig.ErrOverlap) {
		t.Errorf("overlapping layout: %v, want ErrOverlap", err)
	}
}

func TestFree(t *testing.T) {
	m := h200(t)
	tests := []struct {
		name     string
		existing []mig.Instance
		profile  mig.ProfileID
		want     []mig.Placement
	}{
		{"empty 1g", nil, mig.Profile1g, []mig.Placement{at(0, 1), at(1, 1), at(2, 1), at(3, 1), at(4, 1), at(5, 1), at(6, 1)}},
		{"empty 3g", nil, mig.Profile3g, []mig.Placement{at(0, 4), at(4, 4)}},
		{"3g after a 1g at 6", []mig.Instance{in(mig.Profile1g, 6, 1)}, mig.Profile3g, []mig.Placement{at(0, 4)}},
		{"2g after a 3g at 4", []mig.Instance{in(mig.Profile3g, 4, 4)}, mig.Profile2g, []mig.Placement{at(0, 2), at(2, 2)}},
		{"7g on a used GPU", []mig.Instance{in(mig.Profile1g, 0, 1)}, mig.Profile7g, nil},
		{"1g on a full GPU", []mig.Instance{in(mig.Profile7g, 0, 8)}, mig.Profile1g, nil},
		{"1g+me once", []mig.Instance{in(mig.Profile1gME, 2, 1)}, mig.Profile1gME, nil},
		{"unknown profile", nil, 42, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := m.Free(tt.existing, tt.profile); !slices.Equal(got, tt.want) {
				t.Errorf("Free = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestPlace(t *testing.T) {
	m := h200(t)
	tests := []struct {
		name     string
		existing []mig.Instance
		profile  mig.ProfileID
		want     mig.Placement
	}{
		// Small profiles go to the top of memory, keeping slot 0 (the only
		// 4g and 7g start) and the 3g at 0 free.
		{"first 1g", nil, mig.Profile1g, at(6, 1)},
		{"first 1g+me", nil, mig.Profile1gME, at(6, 1)},
		{"first 1g double memory", nil, mig.Profile1gDouble, at(6, 2)},
		{"first 2g", nil, mig.Profile2g, at(4, 2)},
		{"first 3g keeps the 4g", nil, mig.Profile3g, at(4, 4)},
		{"4g", nil, mig.Profile4g, at(0, 4)},
		{"7g", nil, mig.Profile7g, at(0, 8)},
		{"3g after a 1g", []mig.Instance{in(mig.Profile1g, 6, 1)}, mig.Profile3g, at(0, 4)},
		{"2g beside a 3g at 4 keeps the other 2g", []mig.Instance{in(mig.Profile3g, 4, 4)}, mig.Profile2g, at(0, 2)},
		{"1g fills the half a 2g already broke", []mig.Instance{in(mig.Profile2g, 4, 2)}, mig.Profile1g, at(6, 1)},
		{"1g goes beside the existing 1g", []mig.Instance{in(mig.Profile1g, 6, 1)}, mig.Profile1g, at(4, 1)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := m.Place(tt.existing, tt.profile)
			if err != nil {
				t.Fatalf("Place: %v", err)
			}
			if got != tt.want {
				t.Errorf("Place = %v, want %v", got, tt.want)
			}
			if err := m.Check(tt.existing, tt.profile, got); err != nil {
				t.Errorf("Check disagrees with Place: %v", err)
			}
		})
	}
}

func TestPlace_Errors(t *testing.T) {
	m := h200(t)
	if _, err := m.Place(nil, 42); !errors.Is(err, mig.ErrUnknownProfile) {
		t.Errorf("unknown profile: %v", err)
	}
	full := []mig.Instance{in(mig.Profile7g, 0, 8)}
	for _, p := range m.Profiles {
		if _, err := m.Place(full, p.ID); !errors.Is(err, mig.ErrNoCapacity) {
			t.Errorf("%s on a full GPU: %v, want ErrNoCapacity", p.Name, err)
		}
	}
	if _, err := m.Place([]mig.Instance{in(mig.Profile1gME, 0, 1)}, mig.Profile1gME); !errors.Is(err, mig.ErrNoCapacity) {
		t.Errorf("second 1g+me: %v, want ErrNoCapacity", err)
	}
}

// firstFit is the naive planner: the lowest free start.
func firstFit(m mig.Model, existing []mig.Instance, p mig.ProfileID) (mig.Placement, bool) {
	free := m.Free(existing, p)
	if len(free) == 0 {
		return mig.Placement{}, false
	}
	return free[0], true
}

// TestPlace_PacksBetterThanFirstFit shows why Place is not first fit: a
// small instance placed at slot 0 blocks the only start of the 4g (and the
// 7g), where Place keeps it.
func TestPlace_PacksBetterThanFirstFit(t *testing.T) {
	m := h200(t)

	// One 1g, then a 3g.
	ff1, _ := firstFit(m, nil, mig.Profile1g)
	ours1, _ := m.Place(nil, mig.Profile1g)
	ffAfter := []mig.Instance{{Profile: mig.Profile1g, Placement: ff1}}
	oursAfter := []mig.Instance{{Profile: mig.Profile1g, Placement: ours1}}
	ff3, _ := firstFit(m, ffAfter, mig.Profile3g)
	ours3, _ := m.Place(oursAfter, mig.Profile3g)
	if ff1 != at(0, 1) || ff3 != at(4, 4) {
		t.Fatalf("first fit: 1g %v, 3g %v; want 0:1, 4:4", ff1, ff3)
	}
	if ours1 != at(6, 1) || ours3 != at(0, 4) {
		t.Fatalf("Place: 1g %v, 3g %v; want 6:1, 0:4", ours1, ours3)
	}

	// One 1g, then a 4g: first fit has blocked the 4g's only start.
	if _, ok := firstFit(m, ffAfter, mig.Profile4g); ok {
		t.Error("first fit: a 4g still fits after a 1g at slot 0")
	}
	if _, err := m.Place(oursAfter, mig.Profile4g); err != nil {
		t.Errorf("Place: 4g after the 1g: %v", err)
	}

	// Request streams a control plane might see; count what each planner
	// satisfies. Both streams fit a GPU exactly (7 slices).
	for _, stream := range [][]mig.ProfileID{
		{mig.Profile1g, mig.Profile2g, mig.Profile4g},
		{mig.Profile1g, mig.Profile1g, mig.Profile4g, mig.Profile1g},
	} {
		var ffSet, oursSet []mig.Instance
		ffOK, oursOK := 0, 0
		for _, p := range stream {
			if pl, ok := firstFit(m, ffSet, p); ok {
				ffSet = append(ffSet, mig.Instance{Profile: p, Placement: pl})
				ffOK++
			}
			if pl, err := m.Place(oursSet, p); err == nil {
				oursSet = append(oursSet, mig.Instance{Profile: p, Placement: pl})
				oursOK++
			}
		}
		if oursOK != len(stream) || ffOK >= oursOK {
			t.Errorf("stream %v satisfied: Place %d, first fit %d; want Place all and first fit fewer", stream, oursOK, ffOK)
		}
	}
}

func TestPlace_IsDeterministic(t *testing.T) {
	m := h200(t)
	existing := []mig.Instance{in(mig.Profile2g, 2, 2)}
	first, err := m.Place(existing, mig.Profile1g)
	if err != nil {
		t.Fatal(err)
	}
	for range 20 {
		if got, _ := m.Place(existing, mig.Profile1g); got != first {
			t.Fatalf("Place = %v, then %v", first, got)
		}
	}
}

func TestRemaining(t *testing.T) {
	m := h200(t)
	for _, p := range m.Profiles {
		if got := m.Remaining(nil, p.ID); got != p.MaxCount {
			t.Errorf("empty GPU: Remaining(%s) = %d, want MaxCount %d", p.Name, got, p.MaxCount)
		}
	}
	tests := []struct {
		name     string
		existing []mig.Instance
		profile  mig.ProfileID
		want     int
	}{
		{"1g beside a 3g", []mig.Instance{in(mig.Profile3g, 4, 4)}, mig.Profile1g, 4},
		{"1g beside a 4g", []mig.Instance{in(mig.Profile4g, 0, 4)}, mig.Profile1g, 3},
		{"2g beside a 4g", []mig.Instance{in(mig.Profile4g, 0, 4)}, mig.Profile2g, 1},
		{"3g after a 1g", []mig.Instance{in(mig.Profile1g, 6, 1)}, mig.Profile3g, 1},
		{"1g+me once", []mig.Instance{in(mig.Profile1gME, 6, 1)}, mig.Profile1gME, 0},
		{"1g after a 1g+me", []mig.Instance{in(mig.Profile1gME, 6, 1)}, mig.Profile1g, 6},
		{"full", []mig.Instance{in(mig.Profile7g, 0, 8)}, mig.Profile1g, 0},
		{"unknown profile", nil, 42, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := m.Remaining(tt.existing, tt.profile); got != tt.want {
				t.Errorf("Remaining = %d, want %d", got, tt.want)
			}
		})
	}
}

func TestRemaining_DoesNotModifyExisting(t *testing.T) {
	m := h200(t)
	existing := make([]mig.Instance, 1, 8)
	existing[0] = in(mig.Profile1g, 0, 1)
	m.Remaining(existing, mig.Profile1g)
	if got := existing[:2][1]; got != (mig.Instance{}) {
		t.Errorf("Remaining wrote into the caller's backing array: %v", got)
	}
}

// TestPlace_MatchesTheDriversOwnChoices replays requests whose outcome on
// hardware is published (nvidia-smi mig -cgi without placements, the
// driver choosing; GPU instance id 7+s is a 1g at slot s, 3-5 a 2g at
// 0/2/4, 1 a 4g at 0): Place chooses what the driver chose.
func TestPlace_MatchesTheDriversOwnChoices(t *testing.T) {
	tests := []struct {
		name     string
		requests []mig.ProfileID
		want     []mig.Placement
	}{
		{
			"seven 1g (gpu instances 13 11 12 7 8 9 10)",
			[]mig.ProfileID{19, 19, 19, 19, 19, 19, 19},
			[]mig.Placement{at(6, 1), at(4, 1), at(5, 1), at(0, 1), at(1, 1), at(2, 1), at(3, 1)},
		},
		{
			"1g 2g 4g (gpu instances 13 5 1)",
			[]mig.ProfileID{mig.Profile1g, mig.Profile2g, mig.Profile4g},
			[]mig.Placement{at(6, 1), at(4, 2), at(0, 4)},
		},
		{
			"1g 1g 2g (gpu instances 13 11 3)",
			[]mig.ProfileID{mig.Profile1g, mig.Profile1g, mig.Profile2g},
			[]mig.Placement{at(6, 1), at(4, 1), at(0, 2)},
		},
	}
	for _, m := range mig.Models() {
		for _, tt := range tests {
			t.Run(m.ShortName+"/"+tt.name, func(t *testing.T) {
				var existing []mig.Instance
				for i, p := range tt.requests {
					got, err := m.Place(existing, p)
					if err != nil || got != tt.want[i] {
						t.Fatalf("request %d (profile %d): Place = %v, %v; want %v", i, p, got, err, tt.want[i])
					}
					existing = append(existing, mig.Instance{Profile: p, Placement: got})
				}
			})
		}
	}
}
