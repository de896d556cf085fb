package mig_test

import (
	"container/heap"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/gpuaas/gpuaas/pkg/mig"
)

// The trace simulation replays one seeded stream of lease requests against
// a fleet of 8 H200s under three strategies and counts the requests each
// places. A request that cannot be placed when it arrives is lost (a
// control plane would keep it pending; losing it keeps the strategies'
// fleets comparable request by request). Nothing ever moves.
//
//   - ours: PlanAcross.
//   - first fit: the first GPU (by index) where the profile fits, at the
//     lowest free start.
//   - placement-less: what creating an instance without a placement does
//     (nvidia-smi mig -cgi, mig-parted, NVML CreateGpuInstance): the first
//     GPU where the profile fits, and there the driver takes the first free
//     placement of its own fixed preference list (driverOrder).

// traceConfig is one trace: the profile mix, the load and its length.
type traceConfig struct {
	seed     uint64
	requests int
	gpus     int
	// meanLifetime is in units of the mean inter-arrival time, so the
	// offered load in compute slices is meanLifetime * E[slices].
	meanLifetime float64
	mix          []weighted
}

type weighted struct {
	profile mig.ProfileID
	weight  float64
}

// defaultTrace is the recorded trace: 20,000 requests weighted toward small
// profiles, offered load about 1.05 times the fleet's 56 compute slices.
var defaultTrace = traceConfig{
	seed:         20240611,
	requests:     20000,
	gpus:         8,
	meanLifetime: 28,
	mix: []weighted{
		{mig.Profile1g, 0.35},
		{mig.Profile1gME, 0.03},
		{mig.Profile1gDouble, 0.12},
		{mig.Profile2g, 0.20},
		{mig.Profile3g, 0.15},
		{mig.Profile4g, 0.10},
		{mig.Profile7g, 0.05},
	},
}

// request is one arrival of the trace.
type request struct {
	at, lifetime float64
	profile      mig.ProfileID
}

// generate draws the trace: Poisson arrivals (exponential gaps, mean 1),
// exponential lifetimes, profiles from the mix.
func (tc traceConfig) generate() []request {
	r := rand.New(rand.NewPCG(tc.seed, tc.seed^0x9E3779B97F4A7C15))
	total := 0.0
	for _, w := range tc.mix {
		total += w.weight
	}
	out := make([]request, tc.requests)
	now := 0.0
	for i := range out {
		now += r.ExpFloat64()
		x := r.Float64() * total
		p := tc.mix[len(tc.mix)-1].profile
		for _, w := range tc.mix {
			if x < w.weight {
				p = w.profile
				break
			}
			x -= w.weight
		}
		out[i] = request{at: now, lifetime: r.ExpFloat64() * tc.meanLifetime, profile: p}
	}
	return out
}

// strategy places one instance of p on the fleet: the GPU's index and the
// placement, or ok false.
type strategy func(fleet []mig.GPUState, p mig.ProfileID) (gpu int, at mig.Placement, ok bool)

func oursStrategy(fleet []mig.GPUState, p mig.ProfileID) (int, mig.Placement, bool) {
	d, err := mig.PlanAcross(fleet, mig.Request{Profile: p})
	if err != nil {
		return 0, mig.Placement{}, false
	}
	return d.Index, d.Placement, true
}

func firstFitStrategy(fleet []mig.GPUState, p mig.ProfileID) (int, mig.Placement, bool) {
	for i, g := range fleet {
		if free := g.Model.Free(g.Instances, p); len(free) > 0 {
			return i, free[0], true
		}
	}
	return 0, mig.Placement{}, false
}

// driverOrder is the model of the driver's own choice when it is given no
// placement: a fixed preference list per profile, the first free entry
// wins. Where published examples show the driver's choices (nvidia-smi mig
// -cgi on an A100: seven 1g land at slots 6, 4, 5, 0, 1, 2, 3; a 2g after a
// 1g at 6 at slot 4, after 1g at 6 and 4 at slot 0; two 3g at 4 then 0) a
// fixed list must read as below; the 1g double memory list is assumed by
// analogy with the 1g's (top slot first). A list that is really computed
// from the occupancy would be at least as good as this one, no better than
// Place on the published cases (TestPlace_MatchesTheDriversOwnChoices).
var driverOrder = map[mig.ProfileID][]int{
	mig.Profile1g:       {6, 4, 5, 0, 1, 2, 3},
	mig.Profile1gME:     {6, 4, 5, 0, 1, 2, 3},
	mig.Profile1gDouble: {6, 4, 0, 2},
	mig.Profile2g:       {4, 0, 2},
	mig.Profile3g:       {4, 0},
	mig.Profile4g:       {0},
	mig.Profile7g:       {0},
}

func placementlessStrategy(fleet []mig.GPUState, p mig.ProfileID) (int, mig.Placement, bool) {
	for i, g := range fleet {
		free := g.Model.Free(g.Instances, p)
		for _, s := range driverOrder[p] {
			if j := slices.IndexFunc(free, func(at mig.Placement) bool { return at.Start == s }); j >= 0 {
				return i, free[j], true
			}
		}
	}
	return 0, mig.Placement{}, false
}

// departure is a placed lease's end.
type departure struct {
	at  float64
	gpu int
	in  mig.Instance
}

type departures []departure

func (d departures) Len() int           { return len(d) }
func (d departures) Less(i, j int) bool { return d[i].at < d[j].at }
func (d departures) Swap(i, j int)      { d[i], d[j] = d[j], d[i] }
func (d *departures) Push(x any)        { *d = append(*d, x.(departure)) }
func (d *departures) Pop() any {
	old := *d
	x := old[len(old)-1]
	*d = old[:len(old)-1]
	return x
}

// traceResult counts what a strategy placed.
type traceResult struct {
	placed, total int
	// fragmented counts the failures PlanAcross would call ErrFragmented
	// on the strategy's own fleet.
	fragmented int
	byProfile  map[mig.ProfileID][2]int // placed, total
}

func (r traceResult) share() float64 { return float64(r.placed) / float64(r.total) }

// replay runs the trace under one strategy. It checks every layout the
// strategy makes with CheckLayout, so a strategy that breaks a MIG rule
// fails the test instead of winning it.
func replay(t testing.TB, tc traceConfig, reqs []request, s strategy) traceResult {
	m, _ := mig.ModelByName("NVIDIA H200")
	fleet := make([]mig.GPUState, tc.gpus)
	for i := range fleet {
		fleet[i] = mig.GPUState{ID: fmt.Sprintf("gpu-%d", i), Model: m, Eligible: true}
	}
	res := traceResult{byProfile: map[mig.ProfileID][2]int{}}
	var pending departures
	for _, rq := range reqs {
		for len(pending) > 0 && pending[0].at <= rq.at {
			d := heap.Pop(&pending).(departure)
			g := &fleet[d.gpu]
			i := slices.Index(g.Instances, d.in)
			g.Instances = slices.Delete(g.Instances, i, i+1)
		}
		res.total++
		c := res.byProfile[rq.profile]
		c[1]++
		if gi, at, ok := s(fleet, rq.profile); ok {
			in := mig.Instance{Profile: rq.profile, Placement: at}
			g := &fleet[gi]
			g.Instances = append(g.Instances, in)
			if err := g.Model.CheckLayout(g.Instances); err != nil {
				t.Fatalf("strategy made an invalid layout on %s: %v", g.ID, err)
			}
			heap.Push(&pending, departure{at: rq.at + rq.lifetime, gpu: gi, in: in})
			res.placed++
			c[0]++
		} else if _, err := mig.PlanAcross(fleet, mig.Request{Profile: rq.profile}); errors.Is(err, mig.ErrFragmented) {
			res.fragmented++
		}
		res.byProfile[rq.profile] = c
	}
	return res
}

// traceReport runs the three strategies on tc and renders one line of
// figures per strategy.
func traceReport(t testing.TB, tc traceConfig) (ours, ff, pl traceResult, lines []string) {
	reqs := tc.generate()
	ours = replay(t, tc, reqs, oursStrategy)
	ff = replay(t, tc, reqs, firstFitStrategy)
	pl = replay(t, tc, reqs, placementlessStrategy)
	for _, r := range []struct {
		name string
		res  traceResult
	}{{"ours", ours}, {"first-fit", ff}, {"placement-less", pl}} {
		line := fmt.Sprintf("%-15s placed %5d/%d = %5.2f%%, %4d failed for fragmentation;", r.name, r.res.placed, r.res.total, 100*r.res.share(), r.res.fragmented)
		for _, w := range tc.mix {
			c := r.res.byProfile[w.profile]
			line += fmt.Sprintf("  p%d %5.1f%%", w.profile, 100*float64(c[0])/float64(max(c[1], 1)))
		}
		lines = append(lines, line)
	}
	return ours, ff, pl, lines
}

// TestTraceOursPlacesMoreThanFirstFitAndPlacementless replays the recorded
// trace (and two other loads) and asserts the planner places at least as
// many requests as first fit and as the driver's own choice, and strictly
// more than one of them. Run with -v for the figures.
func TestTraceOursPlacesMoreThanFirstFitAndPlacementless(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  traceConfig
	}{
		{"recorded load 1.05", defaultTrace},
		{"load 0.8", func() traceConfig {
			c := defaultTrace
			c.meanLifetime, c.seed, c.requests = 21, c.seed+1, 10000
			return c
		}()},
		{"load 1.4", func() traceConfig {
			c := defaultTrace
			c.meanLifetime, c.seed, c.requests = 37, c.seed+2, 10000
			return c
		}()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.cfg.requests < 10000 {
				t.Fatalf("trace of %d requests, want at least 10000", tc.cfg.requests)
			}
			ours, ff, pl, lines := traceReport(t, tc.cfg)
			for _, l := range lines {
				t.Log(l)
			}
			if ours.placed < ff.placed || ours.placed < pl.placed {
				t.Errorf("ours placed %d, first fit %d, placement-less %d: want ours >= both", ours.placed, ff.placed, pl.placed)
			}
			if ours.placed == ff.placed && ours.placed == pl.placed {
				t.Errorf("ours placed %d, as many as both others: want strictly more than one", ours.placed)
			}
		})
	}
}
