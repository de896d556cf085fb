package mig_test

import (
	"testing"

	"github.com/gpuaas/gpuaas/pkg/mig"
)

// busyFleet is 8 H200s as a fleet under load looks: one empty, one whole,
// the rest partly used in the ways the trace leaves them (35 of 56 compute
// slices in use).
func busyFleet(b testing.TB) []mig.GPUState {
	return []mig.GPUState{
		gpu(b, "gpu-0", in(mig.Profile1g, 0, 1), in(mig.Profile3g, 4, 4)),
		gpu(b, "gpu-1", in(mig.Profile4g, 0, 4), in(mig.Profile2g, 4, 2)),
		gpu(b, "gpu-2", in(mig.Profile2g, 0, 2), in(mig.Profile1g, 4, 1), in(mig.Profile1g, 6, 1)),
		gpu(b, "gpu-3"),
		gpu(b, "gpu-4", in(mig.Profile7g, 0, 8)),
		gpu(b, "gpu-5", in(mig.Profile3g, 0, 4), in(mig.Profile3g, 4, 4)),
		gpu(b, "gpu-6", in(mig.Profile2g, 2, 2), in(mig.Profile1gDouble, 6, 2)),
		gpu(b, "gpu-7", in(mig.Profile1g, 0, 1), in(mig.Profile1g, 1, 1), in(mig.Profile1g, 2, 1), in(mig.Profile2g, 4, 2)),
	}
}

// BenchmarkPlanAcross8GPUs is one planner decision for 8 partly used
// H200s, cycling through the profiles a tenant asks for. The target is
// under 50 µs per decision.
func BenchmarkPlanAcross8GPUs(b *testing.B) {
	fleet := busyFleet(b)
	profiles := []mig.ProfileID{mig.Profile1g, mig.Profile2g, mig.Profile3g, mig.Profile1gDouble, mig.Profile4g, mig.Profile7g, mig.Profile1gME}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if _, err := mig.PlanAcross(fleet, mig.Request{Profile: profiles[i%len(profiles)]}); err != nil {
			b.Fatal(err)
		}
		i++
	}
}

// BenchmarkPlanLayout packs mig-parted's all-balanced layout.
func BenchmarkPlanLayout(b *testing.B) {
	m := h200(b)
	counts := map[mig.ProfileID]int{mig.Profile1g: 2, mig.Profile2g: 1, mig.Profile3g: 1}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := m.PlanLayout(counts); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkParseMigParted parses and lays out a shared config for an
// 8-GPU host.
func BenchmarkParseMigParted(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		cfg, err := mig.ParseMigParted([]byte(sampleConfig))
		if err != nil {
			b.Fatal(err)
		}
		if _, err := cfg.Layout("all-balanced", host(8)); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkTrace replays the recorded trace under each strategy and reports
// the share of requests placed (placed-%) and the failures PlanAcross calls
// fragmentation (frag-fails) beside the time per replay.
func BenchmarkTrace(b *testing.B) {
	reqs := defaultTrace.generate()
	for _, s := range []struct {
		name string
		s    strategy
	}{{"ours", oursStrategy}, {"first-fit", firstFitStrategy}, {"placement-less", placementlessStrategy}} {
		b.Run(s.name, func(b *testing.B) {
			var res traceResult
			for b.Loop() {
				res = replay(b, defaultTrace, reqs, s.s)
			}
			b.ReportMetric(100*res.share(), "placed-%")
			b.ReportMetric(float64(res.fragmented), "frag-fails")
		})
	}
}

// BenchmarkTraceCapacityWeightings records why PlanAcross weights a
// profile's remaining instances by their compute slices: it replays 24
// traces (8 seeds; loads 0.8, 1.05 and 1.4; 10,000 requests each) with
// other weightings of the capacity rule, and first fit and placement-less
// for reference, and reports the share placed over all of them (placed-%),
// the worst trace's (worst-%) and the failures PlanAcross calls
// fragmentation (frag-fails).
func BenchmarkTraceCapacityWeightings(b *testing.B) {
	var traces []traceConfig
	for seed := uint64(1); seed <= 8; seed++ {
		for _, life := range []float64{21, 28, 37} {
			c := defaultTrace
			c.seed, c.meanLifetime, c.requests = seed*7919, life, 10000
			traces = append(traces, c)
		}
	}
	ours := func(w func(slices, slots, rank, n int) int) strategy {
		return func(fleet []mig.GPUState, p mig.ProfileID) (int, mig.Placement, bool) {
			restore := mig.SetCapacityWeight(w)
			defer restore()
			return oursStrategy(fleet, p)
		}
	}
	for _, s := range []struct {
		name string
		s    strategy
	}{
		{"slices-ours", oursStrategy},
		{"one-per-instance", ours(func(_, _, _, _ int) int { return 1 })},
		{"slices-squared", ours(func(s, _, _, _ int) int { return s * s })},
		{"largest-first-lexicographic", ours(func(_, _, rank, n int) int { return 1 << (4 * (n - 1 - rank)) })},
		{"first-fit", firstFitStrategy},
		{"placement-less", placementlessStrategy},
	} {
		b.Run(s.name, func(b *testing.B) {
			var placed, total, frag int
			worst := 1.0
			for b.Loop() {
				placed, total, frag, worst = 0, 0, 0, 1.0
				for _, tc := range traces {
					res := replay(b, tc, tc.generate(), s.s)
					placed, total, frag = placed+res.placed, total+res.total, frag+res.fragmented
					worst = min(worst, res.share())
				}
			}
			b.ReportMetric(100*float64(placed)/float64(total), "placed-%")
			b.ReportMetric(100*worst, "worst-%")
			b.ReportMetric(float64(frag), "frag-fails")
		})
	}
}
