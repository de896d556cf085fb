package mig_test

import (
	"errors"
	"fmt"
	"reflect"
	"slices"
	"testing"

	"github.com/gpuaas/gpuaas/pkg/mig"
)

// gpu is an eligible H200 with the instances, all busy.
func gpu(t testing.TB, id string, instances ...mig.Instance) mig.GPUState {
	return mig.GPUState{ID: id, Model: h200(t), Instances: instances, Eligible: true}
}

func TestPlanAcross_Rules(t *testing.T) {
	tests := []struct {
		name    string
		fleet   []mig.GPUState
		profile mig.ProfileID
		wantGPU string
		wantAt  mig.Placement
	}{
		{
			"a small instance goes to a partly used GPU and keeps the empty one whole",
			[]mig.GPUState{gpu(t, "empty"), gpu(t, "half", in(mig.Profile3g, 4, 4))},
			// Capacity lost: 11 on half (its 4g, 3g, a 2g, a 1g double
			// memory and a 1g), 12 on empty (its 7g, a 3g, a 1g double
			// memory and a 1g). Within half every start costs the same;
			// the lowest wins, as in Place.
			mig.Profile1g, "half", at(0, 1),
		},
		{
			"a 3g opens an empty GPU rather than take the 4 slices a 4g could use",
			[]mig.GPUState{gpu(t, "empty"), gpu(t, "half", in(mig.Profile3g, 4, 4))},
			// Capacity lost: 17 on empty (35 -> 18, the 7g among it), 18
			// on half (all it has left). The recorded trace places more
			// requests with this weighting than with one that protects
			// empty GPUs first (see PlanAcross).
			mig.Profile3g, "empty", at(4, 4),
		},
		{
			"it fills the gap only small profiles fit before it breaks a 4g",
			[]mig.GPUState{
				gpu(t, "4g-free", in(mig.Profile3g, 4, 4)),
				gpu(t, "gap", in(mig.Profile4g, 0, 4), in(mig.Profile2g, 4, 2)),
			},
			mig.Profile1g, "gap", at(6, 1),
		},
		{
			"a 4g takes the GPU where slot 0 is free, not the empty one",
			[]mig.GPUState{gpu(t, "empty"), gpu(t, "top-used", in(mig.Profile2g, 4, 2), in(mig.Profile1g, 6, 1))},
			mig.Profile4g, "top-used", at(0, 4),
		},
		{
			"a 7g takes the only empty GPU",
			[]mig.GPUState{gpu(t, "a", in(mig.Profile1g, 6, 1)), gpu(t, "b"), gpu(t, "c", in(mig.Profile1g, 0, 1))},
			mig.Profile7g, "b", at(0, 8),
		},
		{
			"best fit on equal loss: the fuller GPU",
			[]mig.GPUState{
				gpu(t, "roomy", in(mig.Profile1g, 0, 1)),
				gpu(t, "tight", in(mig.Profile1g, 0, 1), in(mig.Profile2g, 4, 2)),
			},
			// A 1g at 1 costs one 1g on either GPU.
			mig.Profile1g, "tight", at(1, 1),
		},
		{
			"equal GPUs: the lower index",
			[]mig.GPUState{gpu(t, "g0"), gpu(t, "g1")},
			mig.Profile1g, "g0", at(6, 1),
		},
		{
			"on one GPU it agrees with Place: a first 3g keeps the 4g",
			[]mig.GPUState{gpu(t, "g0")},
			mig.Profile3g, "g0", at(4, 4),
		},
		{
			"ineligible GPUs get nothing",
			[]mig.GPUState{{ID: "sick", Model: h200(t)}, gpu(t, "ok", in(mig.Profile7g, 0, 8)), gpu(t, "ok2")},
			mig.Profile7g, "ok2", at(0, 8),
		},
		{
			"a GPU whose instances are not a valid layout is skipped",
			[]mig.GPUState{gpu(t, "broken", in(mig.Profile3g, 2, 4)), gpu(t, "fine", in(mig.Profile3g, 4, 4))},
			mig.Profile1g, "fine", at(0, 1),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, err := mig.PlanAcross(tt.fleet, mig.Request{Profile: tt.profile})
			if err != nil {
				t.Fatalf("PlanAcross: %v", err)
			}
			if d.GPU != tt.wantGPU || d.Placement != tt.wantAt {
				t.Fatalf("PlanAcross = %s at %s, want %s at %s", d.GPU, d.Placement, tt.wantGPU, tt.wantAt)
			}
			g := tt.fleet[d.Index]
			if g.ID != d.GPU || d.Profile != tt.profile {
				t.Errorf("decision %+v does not match its GPU %s", d, g.ID)
			}
			if err := g.Model.Check(g.Instances, d.Profile, d.Placement); err != nil {
				t.Errorf("Check rejects the decision: %v", err)
			}
		})
	}
}

func TestPlanAcross_Constraints(t *testing.T) {
	h100, _ := mig.ModelByName("NVIDIA H100 80GB HBM3")
	fleet := []mig.GPUState{
		{ID: "h100-0", Model: h100, Eligible: true},
		gpu(t, "h200-0", in(mig.Profile3g, 4, 4)),
		gpu(t, "h200-1"),
	}
	tests := []struct {
		name    string
		req     mig.Request
		wantGPU string
		wantErr error
	}{
		{"by id on any model: the partly used H200", mig.Request{Profile: mig.Profile1g}, "h200-0", nil},
		{"by name: only models with that name", mig.Request{ProfileName: "1g.10gb"}, "h100-0", nil},
		{"by name with the nvidia-smi prefix", mig.Request{ProfileName: "MIG 1g.18gb"}, "h200-0", nil},
		{"restricted to GPUs", mig.Request{Profile: mig.Profile1g, GPUs: []string{"h200-1"}}, "h200-1", nil},
		{"restricted to a model by short name", mig.Request{Profile: mig.Profile1g, Model: "h100-80gb"}, "h100-0", nil},
		{"restricted to a model by NVML name", mig.Request{Profile: mig.Profile7g, Model: "NVIDIA H200"}, "h200-1", nil},
		{"a name no model in scope has", mig.Request{ProfileName: "1g.10gb", Model: "NVIDIA H200"}, "", mig.ErrUnknownProfile},
		{"an id no model has", mig.Request{Profile: 42}, "", mig.ErrUnknownProfile},
		{"no GPU in scope", mig.Request{Profile: mig.Profile1g, GPUs: []string{"nope"}}, "", mig.ErrNoCapacity},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, err := mig.PlanAcross(fleet, tt.req)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("PlanAcross = %+v, %v; want %v", d, err, tt.wantErr)
				}
				return
			}
			if err != nil || d.GPU != tt.wantGPU {
				t.Fatalf("PlanAcross = %+v, %v; want GPU %s", d, err, tt.wantGPU)
			}
			if p, _ := fleet[d.Index].Model.Profile(d.Profile); p.Name != d.ProfileName {
				t.Errorf("decision names profile %q, the model %q", d.ProfileName, p.Name)
			}
		})
	}
}

func TestPlanAcross_NoEligibleGPU(t *testing.T) {
	for _, fleet := range [][]mig.GPUState{nil, {{ID: "sick", Model: h200(t)}}} {
		_, err := mig.PlanAcross(fleet, mig.Request{Profile: mig.Profile1g})
		if !errors.Is(err, mig.ErrNoCapacity) || errors.Is(err, mig.ErrFragmented) {
			t.Errorf("fleet %v: %v, want ErrNoCapacity and not ErrFragmented", fleet, err)
		}
	}
}

func TestPlanAcross_FullIsNotFragmented(t *testing.T) {
	tests := []struct {
		name    string
		fleet   []mig.GPUState
		profile mig.ProfileID
	}{
		{"every GPU full", []mig.GPUState{gpu(t, "a", in(mig.Profile7g, 0, 8)), gpu(t, "b", in(mig.Profile7g, 0, 8))}, mig.Profile1g},
		{"slices exhausted", []mig.GPUState{gpu(t, "a", in(mig.Profile4g, 0, 4), in(mig.Profile2g, 4, 2), in(mig.Profile1g, 6, 1))}, mig.Profile1gDouble},
		{"not enough free slices for a 3g", []mig.GPUState{gpu(t, "a", in(mig.Profile4g, 0, 4), in(mig.Profile1g, 4, 1))}, mig.Profile3g},
		{"instance limit", []mig.GPUState{gpu(t, "a", in(mig.Profile1gME, 0, 1))}, mig.Profile1gME},
		{"too few free memory slots", []mig.GPUState{gpu(t, "a", in(mig.Profile1gDouble, 0, 2), in(mig.Profile1gDouble, 2, 2), in(mig.Profile1gDouble, 4, 2))}, mig.Profile3g},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := mig.PlanAcross(tt.fleet, mig.Request{Profile: tt.profile})
			if !errors.Is(err, mig.ErrNoCapacity) || errors.Is(err, mig.ErrFragmented) {
				t.Fatalf("PlanAcross = %v, want ErrNoCapacity, not ErrFragmented", err)
			}
		})
	}
}

func TestPlanAcross_Fragmented(t *testing.T) {
	idle := func(g mig.GPUState, instances ...mig.Instance) mig.GPUState {
		g.Idle = instances
		return g
	}
	tests := []struct {
		name      string
		fleet     []mig.GPUState
		profile   mig.ProfileID
		wantGPU   string
		wantAt    mig.Placement
		wantMoves []mig.Move
	}{
		{
			"an idle 1g breaks every 2g placement; it can move to slot 6",
			[]mig.GPUState{idle(gpu(t, "a", in(mig.Profile1g, 1, 1), in(mig.Profile1g, 3, 1), in(mig.Profile1g, 5, 1)), in(mig.Profile1g, 1, 1))},
			mig.Profile2g, "a", at(0, 2),
			// Back on a at 2, where it blocks nothing the 1g double memory
			// at 6 could use.
			[]mig.Move{{GPU: "a", Instance: in(mig.Profile1g, 1, 1), ProfileName: "1g.18gb", ToGPU: "a", To: at(2, 1)}},
		},
		{
			"the 4g's only start is blocked by an idle 1g that fits on another GPU",
			[]mig.GPUState{
				idle(gpu(t, "a", in(mig.Profile1g, 2, 1), in(mig.Profile1gDouble, 4, 2), in(mig.Profile1g, 6, 1)), in(mig.Profile1g, 2, 1)),
				gpu(t, "b", in(mig.Profile4g, 0, 4), in(mig.Profile2g, 4, 2)),
			},
			mig.Profile4g, "a", at(0, 4),
			[]mig.Move{{GPU: "a", Instance: in(mig.Profile1g, 2, 1), ProfileName: "1g.18gb", ToGPU: "b", To: at(6, 1)}},
		},
		{
			"an idle instance that fits nowhere else would have to go",
			[]mig.GPUState{idle(gpu(t, "a", in(mig.Profile1g, 2, 1), in(mig.Profile1gDouble, 4, 2), in(mig.Profile1g, 6, 1)), in(mig.Profile1g, 2, 1))},
			mig.Profile4g, "a", at(0, 4),
			[]mig.Move{{GPU: "a", Instance: in(mig.Profile1g, 2, 1), ProfileName: "1g.18gb"}},
		},
		{
			"busy instances block every placement: no moves",
			[]mig.GPUState{gpu(t, "a", in(mig.Profile1g, 1, 1), in(mig.Profile1g, 3, 1), in(mig.Profile1g, 5, 1))},
			mig.Profile2g, "a", mig.Placement{}, nil,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := mig.PlanAcross(tt.fleet, mig.Request{Profile: tt.profile})
			if !errors.Is(err, mig.ErrFragmented) || !errors.Is(err, mig.ErrNoCapacity) {
				t.Fatalf("PlanAcross = %v, want ErrFragmented and ErrNoCapacity", err)
			}
			var fe *mig.FragmentationError
			if !errors.As(err, &fe) {
				t.Fatalf("%v is not a *FragmentationError", err)
			}
			if fe.GPU != tt.wantGPU || fe.Placement != tt.wantAt || !reflect.DeepEqual(fe.Moves, tt.wantMoves) {
				t.Errorf("FragmentationError = %+v, want GPU %s at %s moves %+v", fe, tt.wantGPU, tt.wantAt, tt.wantMoves)
			}
			t.Log(err)
		})
	}
}

func TestPlanAcross_NeverChangesItsInput(t *testing.T) {
	fleet := []mig.GPUState{
		{ID: "a", Model: h200(t), Instances: []mig.Instance{in(mig.Profile1g, 1, 1), in(mig.Profile1g, 3, 1), in(mig.Profile1g, 5, 1)}, Idle: []mig.Instance{in(mig.Profile1g, 1, 1)}, Eligible: true},
		gpu(t, "b", in(mig.Profile3g, 4, 4)),
	}
	before := deepCopy(fleet)
	for _, p := range []mig.ProfileID{mig.Profile1g, mig.Profile2g, mig.Profile4g, mig.Profile7g} {
		mig.PlanAcross(fleet, mig.Request{Profile: p})
		if !reflect.DeepEqual(fleet, before) {
			t.Fatalf("PlanAcross(%d) changed its input", p)
		}
	}
}

// deepCopy copies a fleet of table models.
func deepCopy(fleet []mig.GPUState) []mig.GPUState {
	out := make([]mig.GPUState, len(fleet))
	for i, g := range fleet {
		g.Instances = slices.Clone(g.Instances)
		g.Idle = slices.Clone(g.Idle)
		g.Model, _ = mig.ModelByName(g.Model.Name)
		out[i] = g
	}
	return out
}

// TestPlanAcross_AgreesWithTheModelsRules checks every decision on random
// fleets against Check, and every ErrNoCapacity against Free: when the
// planner says no, no GPU has a free placement.
func TestPlanAcross_AgreesWithTheModelsRules(t *testing.T) {
	reqs := defaultTrace.generate()[:3000]
	fleet := make([]mig.GPUState, 4)
	for i := range fleet {
		fleet[i] = gpu(t, fmt.Sprint(i))
	}
	for n, r := range reqs {
		// Random departures: drop the oldest instance of a GPU now and then.
		if g := &fleet[n%len(fleet)]; n%3 == 0 && len(g.Instances) > 0 {
			g.Instances = g.Instances[1:]
		}
		d, err := mig.PlanAcross(fleet, mig.Request{Profile: r.profile})
		if err != nil {
			if !errors.Is(err, mig.ErrNoCapacity) {
				t.Fatalf("request %d: %v", n, err)
			}
			for _, g := range fleet {
				if free := g.Model.Free(g.Instances, r.profile); len(free) > 0 {
					t.Fatalf("request %d: %v, but %s has %v free", n, err, g.ID, free)
				}
			}
			continue
		}
		g := &fleet[d.Index]
		if err := g.Model.Check(g.Instances, d.Profile, d.Placement); err != nil {
			t.Fatalf("request %d: decision %+v: %v", n, d, err)
		}
		g.Instances = append(g.Instances, d.Instance())
	}
}

func TestPlanAcross_IsDeterministic(t *testing.T) {
	fleet := []mig.GPUState{gpu(t, "a", in(mig.Profile2g, 2, 2)), gpu(t, "b", in(mig.Profile2g, 2, 2))}
	first, err := mig.PlanAcross(fleet, mig.Request{Profile: mig.Profile1g})
	if err != nil {
		t.Fatal(err)
	}
	for range 20 {
		if d, _ := mig.PlanAcross(fleet, mig.Request{Profile: mig.Profile1g}); d != first {
			t.Fatalf("PlanAcross = %+v, then %+v", first, d)
		}
	}
}
