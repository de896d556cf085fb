package mig_test

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/gpuaas/gpuaas/pkg/mig"
)

// randomFleet is n GPUs of random models with random valid layouts, some
// not eligible.
func randomFleet(r *rand.Rand, n int) []mig.GPUState {
	models := mig.Models()
	fleet := make([]mig.GPUState, n)
	for i := range fleet {
		g := mig.GPUState{ID: fmt.Sprint("gpu-", i), Model: models[r.IntN(len(models))], Eligible: r.IntN(8) != 0}
		for range r.IntN(8) {
			p := g.Model.Profiles[r.IntN(len(g.Model.Profiles))]
			at := mig.Placement{Start: p.Starts[r.IntN(len(p.Starts))], Size: p.MemorySlots}
			if g.Model.Check(g.Instances, p.ID, at) == nil {
				g.Instances = append(g.Instances, mig.Instance{Profile: p.ID, Placement: at})
			}
		}
		fleet[i] = g
	}
	return fleet
}

// planByChoices is PlanAcross as ChooseOn documents it: the first GPU that
// no other's choice is Before.
func planByChoices(fleet []mig.GPUState, req mig.Request) (int, mig.Choice, bool) {
	best, bestAt := mig.Choice{}, -1
	for i, g := range fleet {
		c, ok := mig.ChooseOn(g, req)
		if ok && (bestAt < 0 || c.Before(best)) {
			best, bestAt = c, i
		}
	}
	return bestAt, best, bestAt >= 0
}

// TestChooseOn_AgreesWithPlanAcross holds ChooseOn to its contract on
// random fleets and requests: combining the per-GPU choices gives exactly
// PlanAcross's decision, and fails exactly when PlanAcross does.
func TestChooseOn_AgreesWithPlanAcross(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 11))
	names := []string{"1g.18gb", "1g.35gb", "2g.35gb", "3g.71gb", "4g.71gb", "7g.141gb", "1g.10gb", "3g.40gb", "MIG 1g.18gb", "9g.1tb"}
	for iter := range 3000 {
		fleet := randomFleet(r, 1+r.IntN(12))
		var req mig.Request
		if r.IntN(2) == 0 {
			req.ProfileName = names[r.IntN(len(names))]
		} else {
			req.Profile = fleet[0].Model.Profiles[r.IntN(len(fleet[0].Model.Profiles))].ID
		}
		d, err := mig.PlanAcross(fleet, req)
		i, c, ok := planByChoices(fleet, req)
		if (err == nil) != ok {
			t.Fatalf("iteration %d, %+v: PlanAcross = %+v, %v; choices found one: %v", iter, req, d, err, ok)
		}
		if !ok {
			continue
		}
		want := mig.Decision{GPU: fleet[i].ID, Index: i, Profile: c.Profile, ProfileName: c.ProfileName, Placement: c.Placement}
		if d != want {
			t.Fatalf("iteration %d, %+v: PlanAcross = %+v, choices give %+v", iter, req, d, want)
		}
	}
}

// TestChooseOn_IgnoresInstanceOrder: a memo keyed by the set of instances
// is sound only if their order does not matter.
func TestChooseOn_IgnoresInstanceOrder(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 5))
	for iter := range 2000 {
		g := randomFleet(r, 1)[0]
		g.Eligible = true
		p := g.Model.Profiles[r.IntN(len(g.Model.Profiles))]
		req := mig.Request{ProfileName: p.Name}
		want, wok := mig.ChooseOn(g, req)
		shuffled := g
		shuffled.Instances = slices.Clone(g.Instances)
		r.Shuffle(len(shuffled.Instances), func(i, j int) {
			shuffled.Instances[i], shuffled.Instances[j] = shuffled.Instances[j], shuffled.Instances[i]
		})
		shuffled.ID = "other"
		got, gok := mig.ChooseOn(shuffled, req)
		if got != want || gok != wok {
			t.Fatalf("iteration %d: %v on %v = %+v %v; shuffled %v = %+v %v", iter, p.Name, g.Instances, want, wok, shuffled.Instances, got, gok)
		}
	}
}
