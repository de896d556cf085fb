package partition_test

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"testing"

	"github.com/gpuaas/gpuaas/agent/partition"
	"github.com/gpuaas/gpuaas/pkg/mig"
)

// migPartedConfig is in the shape of NVIDIA's shipped config, for H200s.
const migPartedConfig = `version: v1
mig-configs:
  all-disabled:
    - devices: all
      mig-enabled: false

  all-1g.18gb:
    - devices: all
      mig-enabled: true
      mig-devices:
        "1g.18gb": 7

  all-3g.71gb:
    - devices: all
      mig-enabled: true
      mig-devices:
        "3g.71gb": 2

  all-balanced:
    - device-filter: ["0x233510DE"]
      devices: all
      mig-enabled: true
      mig-devices:
        "1g.18gb": 2
        "2g.35gb": 1
        "3g.71gb": 1

  halves-on-0-1:
    - devices: [0, 1]
      mig-enabled: true
      mig-devices:
        "3g.71gb": 2
    - devices: [2, 3]
      mig-enabled: true
      mig-devices:
        "1g.18gb": 2
        "2g.35gb": 1
        "3g.71gb": 1
`

func parseConfig(t *testing.T, text string) *mig.MigPartedConfig {
	t.Helper()
	cfg, err := mig.ParseMigParted([]byte(text))
	if err != nil {
		t.Fatalf("ParseMigParted: %v", err)
	}
	return cfg
}

// counts is a GPU's instances by profile.
func (g *rig) counts(uuid string) map[mig.ProfileID]int {
	out := map[mig.ProfileID]int{}
	for in, s := range g.layout(uuid) {
		if s.cis != 1 {
			g.t.Errorf("gpu %s: %v has %d compute instances", uuid, in, s.cis)
		}
		out[in.Profile]++
	}
	return out
}

func (g *rig) applyStatic(cfg *mig.MigPartedConfig, name string) partition.Report {
	g.t.Helper()
	rep, err := partition.ApplyStatic(g.t.Context(), g.r, cfg, name, g.rec, g.isProtected)
	if err != nil {
		g.t.Fatalf("ApplyStatic(%s): %v", name, err)
	}
	return rep
}

var balanced = map[mig.ProfileID]int{mig.Profile1g: 2, mig.Profile2g: 1, mig.Profile3g: 1}

func TestApplyStaticPartitionsTheHostAndThenOnlyWhatChanged(t *testing.T) {
	// MIG off and changes pending until a reset, the conservative driver.
	g := newRig(t, false, h200s(8, false)...)
	cfg := parseConfig(t, migPartedConfig)

	rep := g.applyStatic(cfg, "all-balanced")

	for _, u := range g.uuids {
		if got := g.counts(u); !maps.Equal(got, balanced) {
			t.Errorf("gpu %s holds %v, want %v", u, got, balanced)
		}
		gr, _ := rep.GPU(u)
		if !gr.ModeChanged || !gr.Reset || len(gr.Created) != 4 {
			t.Errorf("gpu %s report %+v: want mig enabled, reset and 4 instances created", u, gr)
		}
	}

	// The same config again: nothing to do.
	n := len(g.rec.taken())
	g.applyStatic(cfg, "all-balanced")
	if again := g.rec.taken()[n:]; len(again) != 0 {
		t.Errorf("re-applying made %d calls: %v", len(again), again)
	}

	// Another config: GPUs 0 and 1 keep their 3g and get a second one;
	// 2 and 3 already match; 4 to 7 are not selected and stay.
	before := map[string]map[mig.Instance]state{}
	for _, u := range g.uuids {
		before[u] = g.layout(u)
	}
	n = len(g.rec.taken())
	g.applyStatic(cfg, "halves-on-0-1")
	calls := g.rec.taken()[n:]
	for i, u := range g.uuids {
		switch {
		case i < 2:
			if got := g.counts(u); !maps.Equal(got, map[mig.ProfileID]int{mig.Profile3g: 2}) {
				t.Errorf("gpu %d holds %v, want 2 x 3g", i, got)
			}
			for in, s := range before[u] {
				if in.Profile == mig.Profile3g && g.layout(u)[in] != s {
					t.Errorf("gpu %d: the existing 3g %v was touched", i, in)
				}
			}
			// 1g x2 and 2g destroyed (6 calls), one 3g created (2).
			if c := len(onGPU(calls, u)); c != 8 {
				t.Errorf("gpu %d: %d calls, want 8", i, c)
			}
		default:
			if c := len(onGPU(calls, u)); c != 0 || !maps.Equal(g.layout(u), before[u]) {
				t.Errorf("gpu %d: %d calls, layout %v; want untouched %v", i, c, g.layout(u), before[u])
			}
		}
	}
}

func TestApplyStaticKeepsAnEquivalentHandMadeLayout(t *testing.T) {
	g := newRig(t, true, h200s(1, true)...)
	uuid := g.uuids[0]
	// The balanced counts, at placements the planner would not choose (it
	// puts the 2g at 0 and the 1g at 2 and 3).
	g.seed(uuid, false, inst(mig.Profile3g, 4, 4), inst(mig.Profile2g, 2, 2), inst(mig.Profile1g, 0, 1), inst(mig.Profile1g, 1, 1))
	before := g.layout(uuid)

	rep := g.applyStatic(parseConfig(t, migPartedConfig), "all-balanced")

	if calls := g.rec.taken(); len(calls) != 0 {
		t.Errorf("ApplyStatic made calls %v on a gpu that already has the counts", calls)
	}
	if !maps.Equal(g.layout(uuid), before) {
		t.Errorf("layout %v, want unchanged %v", g.layout(uuid), before)
	}
	if gr, _ := rep.GPU(uuid); len(gr.Kept) != 4 {
		t.Errorf("report kept %v, want the 4 instances", gr.Kept)
	}
}

func TestApplyStaticPlacesAroundARunningLease(t *testing.T) {
	g := newRig(t, true, h200s(2, true)...)
	a, b := g.uuids[0], g.uuids[1]
	lease := inst(mig.Profile1g, 0, 1) // where the planner puts the 2g
	g.seed(a, false, lease)
	gi := g.lease(a, lease, 77)
	protected := map[string]map[int]mig.Instance{a: {gi: lease}}

	rep := g.applyStatic(parseConfig(t, migPartedConfig), "all-balanced")

	for _, u := range []string{a, b} {
		if got := g.counts(u); !maps.Equal(got, balanced) {
			t.Errorf("gpu %s holds %v, want %v", u, got, balanced)
		}
	}
	g.requireProtectedNeverTargeted(protected)
	if gr, _ := rep.GPU(a); len(gr.Conflicts) != 0 || len(gr.Untouched) != 1 {
		t.Errorf("report %+v: want the lease untouched and no conflict", gr)
	}

	// A config whose layout needs the lease's space: that GPU is left as
	// it is and reported; the other is applied.
	beforeA := g.layout(a)
	rep = g.applyStatic(parseConfig(t, migPartedConfig), "all-3g.71gb")
	if !maps.Equal(g.layout(a), beforeA) {
		t.Errorf("gpu with the lease changed to %v, want unchanged %v", g.layout(a), beforeA)
	}
	if gr, _ := rep.GPU(a); len(gr.Conflicts) != 1 || gr.Conflicts[0].Reason != partition.ConflictProtected {
		t.Errorf("conflicts %+v, want the lease's", gr.Conflicts)
	}
	if got := g.counts(b); !maps.Equal(got, map[mig.ProfileID]int{mig.Profile3g: 2}) {
		t.Errorf("other gpu holds %v, want 2 x 3g", got)
	}
	g.requireProtectedNeverTargeted(protected)
}

func TestApplyStaticRejectsABadConfigWithoutTouchingAnyGPU(t *testing.T) {
	for _, tc := range []struct {
		name   string
		config string
		apply  string
		line   int
		class  error
	}{
		{
			name:   "unknown config name",
			config: migPartedConfig,
			apply:  "all-3g",
			class:  mig.ErrUnknownConfig,
		},
		{
			name: "unknown profile",
			config: `version: v1
mig-configs:
  mixed:
    - devices: all
      mig-enabled: true
      mig-devices:
        "3g.71gb": 1
        "1g.10gb": 2
`,
			apply: "mixed",
			line:  8,
			class: mig.ErrUnknownProfile,
		},
		{
			name: "too many instances",
			config: `version: v1
mig-configs:
  crowded:
    - devices: [0]
      mig-enabled: true
      mig-devices:
        "1g.18gb": 1
    - devices: [1]
      mig-enabled: true
      mig-devices:
        "1g.18gb": 8
`,
			apply: "crowded",
			line:  10,
			class: mig.ErrNoCapacity,
		},
		{
			name: "a filter matching nothing",
			config: `version: v1
mig-configs:
  a100-only:
    - device-filter: "0x20B010DE"
      devices: all
      mig-enabled: true
      mig-devices:
        "1g.5gb": 7
`,
			apply: "a100-only",
			line:  3,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := newRig(t, true, h200s(2, true)...)
			g.seed(g.uuids[0], false, inst(mig.Profile7g, 0, 8))
			before := [2]map[mig.Instance]state{g.layout(g.uuids[0]), g.layout(g.uuids[1])}

			_, err := partition.ApplyStatic(t.Context(), g.r, parseConfig(t, tc.config), tc.apply, g.rec, nil)

			if !errors.Is(err, mig.ErrInvalidConfig) || (tc.class != nil && !errors.Is(err, tc.class)) {
				t.Errorf("ApplyStatic = %v, want %v (%v)", err, mig.ErrInvalidConfig, tc.class)
			}
			var ce *mig.ConfigError
			if !errors.As(err, &ce) || ce.Line != tc.line {
				t.Errorf("ApplyStatic = %v, want a config error at line %d", err, tc.line)
			}
			if calls := g.rec.taken(); len(calls) != 0 {
				t.Errorf("calls %v, want none", calls)
			}
			for i, u := range g.uuids {
				if !maps.Equal(g.layout(u), before[i]) {
					t.Errorf("gpu %d changed to %v", i, g.layout(u))
				}
			}
		})
	}
}

func TestApplyStaticDisablesMIGExceptWhereALeaseRuns(t *testing.T) {
	g := newRig(t, false, h200s(3, true)...)
	cfg := parseConfig(t, migPartedConfig)
	g.applyStatic(cfg, "all-balanced")
	busy := g.uuids[1]
	var lease mig.Instance
	for in := range g.layout(busy) {
		if in.Profile == mig.Profile3g {
			lease = in
		}
	}
	gi := g.lease(busy, lease, 5)
	before := g.layout(busy)
	n := len(g.rec.taken())

	rep := g.applyStatic(cfg, "all-disabled")

	calls := g.rec.taken()[n:]
	for _, u := range g.uuids {
		if u == busy {
			continue
		}
		if m := g.mode(u); m.Current || m.Pending {
			t.Errorf("gpu %s mig mode %+v, want disabled", u, m)
		}
	}
	if c := onGPU(calls, busy); len(c) != 0 || !maps.Equal(g.layout(busy), before) {
		t.Errorf("busy gpu: calls %v, layout %v; want untouched %v", c, g.layout(busy), before)
	}
	if gr, _ := rep.GPU(busy); len(gr.Conflicts) != 1 || gr.Conflicts[0].Reason != partition.ConflictBusy ||
		len(gr.Conflicts[0].Instances) != 1 || gr.Conflicts[0].Instances[0].GIID != gi {
		t.Errorf("busy gpu conflicts %+v, want busy naming gi %d", gr.Conflicts, gi)
	}
	resets := 0
	for _, c := range calls {
		if c.Op == "Reset" {
			resets++
		}
	}
	if resets != 2 {
		t.Errorf("%d resets, want one per idle gpu (2)", resets)
	}
}

// Every shape of a GPU reaches every other through ApplyStatic: the
// placements chosen around what exists always form a valid layout with
// exactly the counts asked for, and applying again is a no-op.
func TestApplyStaticReachesEveryLayoutFromEveryLayout(t *testing.T) {
	shapes := []map[string]int{
		{"7g.141gb": 1},
		{"4g.71gb": 1, "3g.71gb": 1},
		{"3g.71gb": 2},
		{"1g.18gb": 7},
		{"1g.18gb": 2, "2g.35gb": 1, "3g.71gb": 1},
		{"2g.35gb": 3, "1g.18gb": 1},
		{"1g.35gb": 4},
		{"1g.18gb+me": 1, "1g.18gb": 5},
		{"4g.71gb": 1, "2g.35gb": 1, "1g.18gb": 1},
		{"3g.71gb": 1, "1g.35gb": 2},
	}
	config := "version: v1\nmig-configs:\n"
	for i, sh := range shapes {
		config += fmt.Sprintf("  shape-%d:\n    - devices: all\n      mig-enabled: true\n      mig-devices:\n", i)
		for _, name := range slices.Sorted(maps.Keys(sh)) {
			config += fmt.Sprintf("        %q: %d\n", name, sh[name])
		}
	}
	cfg := parseConfig(t, config)
	m, _ := mig.LookupModel("H200")
	want := func(i int) map[mig.ProfileID]int {
		out := map[mig.ProfileID]int{}
		for name, n := range shapes[i] {
			p, ok := m.ProfileByName(name)
			if !ok {
				t.Fatalf("no profile %s", name)
			}
			out[p.ID] = n
		}
		return out
	}
	g := newMemRig(t, true, h200s(1, true)...)
	uuid := g.uuids[0]
	for from := range shapes {
		for to := range shapes {
			g.applyStatic(cfg, fmt.Sprintf("shape-%d", from))
			rep := g.applyStatic(cfg, fmt.Sprintf("shape-%d", to))
			if got := g.counts(uuid); !maps.Equal(got, want(to)) {
				t.Errorf("shape %d -> %d: gpu holds %v, want %v", from, to, got, want(to))
			}
			if c := rep.Conflicts(); len(c) > 0 {
				t.Errorf("shape %d -> %d: conflicts %+v", from, to, c)
			}
			n := len(g.rec.taken())
			g.applyStatic(cfg, fmt.Sprintf("shape-%d", to))
			if again := g.rec.taken()[n:]; len(again) != 0 {
				t.Errorf("shape %d again: %d calls", to, len(again))
			}
		}
	}
}
