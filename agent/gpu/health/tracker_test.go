package health_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/agent/gpu/health"
	"github.com/gpuaas/gpuaas/agent/gpu/sim"
	"github.com/gpuaas/gpuaas/pkg/mig"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

const (
	gpuA  = "GPU-aaaaaaaa-0000-4000-8000-000000000000"
	gpuB  = "GPU-bbbbbbbb-0000-4000-8000-000000000000"
	whole = gpu.WholeGPU
)

var t0 = time.Date(2026, 5, 6, 7, 8, 9, 0, time.UTC)

func xid(uuid string, n uint64, gi, ci uint32) gpu.Event {
	return gpu.Event{Time: t0, Kind: gpu.EventXID, GPUUUID: uuid, XID: n, GPUInstanceID: gi, ComputeInstanceID: ci}
}

func ecc(uuid string, kind gpu.EventKind, gi, ci uint32) gpu.Event {
	return gpu.Event{Time: t0, Kind: kind, GPUUUID: uuid, GPUInstanceID: gi, ComputeInstanceID: ci}
}

// recorder collects OnChange calls.
type recorder struct {
	mu      sync.Mutex
	changes []health.Change
}

func (r *recorder) record(c health.Change) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.changes = append(r.changes, c)
}

func (r *recorder) all() []health.Change {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]health.Change(nil), r.changes...)
}

func newTracker(opts health.Options) (*health.Tracker, *recorder) {
	r := &recorder{}
	if opts.GPUs == nil {
		opts.GPUs = []string{gpuA, gpuB}
	}
	opts.OnChange = r.record
	return health.NewTracker(opts), r
}

// eligibility is where new leases may go on gpuA: the whole GPU, GPU
// instance 3, GPU instance 5; and on gpuB as a whole.
type eligibility struct{ whole, gi3, gi5, other bool }

func eligible(tr *health.Tracker) eligibility {
	return eligibility{tr.Eligible(gpuA, whole), tr.Eligible(gpuA, 3), tr.Eligible(gpuA, 5), tr.Eligible(gpuB, whole)}
}

func TestTracker_PolicyAndAttribution(t *testing.T) {
	all := eligibility{true, true, true, true}
	tests := []struct {
		name       string
		opts       health.Options
		events     []gpu.Event
		action     health.Action // of the last event
		want       eligibility
		changes    int
		scopeGI    uint32 // of the first change
		scopeCI    uint32
		clear      health.Action
		reasonPart string
	}{
		{name: "application error in a partition", events: []gpu.Event{xid(gpuA, 13, 3, 0)}, action: health.RestartApplication, want: all},
		{name: "contained ecc error in a partition", events: []gpu.Event{xid(gpuA, 94, 3, 0)}, action: health.RestartApplication, want: all},
		{name: "informational xid", events: []gpu.Event{xid(gpuA, 43, whole, whole)}, action: health.Ignore, want: all},
		{name: "uncontained ecc error in a partition takes the gpu", events: []gpu.Event{xid(gpuA, 95, 3, 0)}, action: health.ResetGPU,
			want: eligibility{other: true}, changes: 1, scopeGI: whole, scopeCI: whole, clear: health.ResetGPU, reasonPart: "xid 95 (ROBUST_CHANNEL_UNCONTAINED_ERROR) in gpu instance 3 compute instance 0"},
		{name: "double-bit xid in a partition takes the partition", events: []gpu.Event{xid(gpuA, 48, 3, 0)}, action: health.ResetGPU,
			want: eligibility{gi5: true, other: true}, changes: 1, scopeGI: 3, scopeCI: 0, clear: health.ResetGPU, reasonPart: "xid 48"},
		{name: "double-bit xid of a gpu instance alone", events: []gpu.Event{xid(gpuA, 48, 5, whole)}, action: health.ResetGPU,
			want: eligibility{gi3: true, other: true}, changes: 1, scopeGI: 5, scopeCI: whole, clear: health.ResetGPU},
		{name: "double-bit xid on the whole gpu", events: []gpu.Event{xid(gpuA, 48, whole, whole)}, action: health.ResetGPU,
			want: eligibility{other: true}, changes: 1, scopeGI: whole, scopeCI: whole, clear: health.ResetGPU},
		{name: "double-bit ecc event on the gpu", events: []gpu.Event{ecc(gpuA, gpu.EventECCDoubleBit, whole, whole)}, action: health.ResetGPU,
			want: eligibility{other: true}, changes: 1, scopeGI: whole, scopeCI: whole, clear: health.ResetGPU, reasonPart: "double-bit ecc"},
		{name: "double-bit ecc event in a partition", events: []gpu.Event{ecc(gpuA, gpu.EventECCDoubleBit, 3, 0)}, action: health.ResetGPU,
			want: eligibility{gi5: true, other: true}, changes: 1, scopeGI: 3, scopeCI: 0, clear: health.ResetGPU},
		{name: "single-bit ecc is ignored by default", events: []gpu.Event{ecc(gpuA, gpu.EventECCSingleBit, whole, whole), ecc(gpuA, gpu.EventECCSingleBit, whole, whole)},
			action: health.Ignore, want: all},
		{name: "fallen off the bus needs a reboot", events: []gpu.Event{xid(gpuA, 79, whole, whole)}, action: health.RebootNode,
			want: eligibility{other: true}, changes: 1, scopeGI: whole, scopeCI: whole, clear: health.RebootNode},
		{name: "unknown xid fails closed", events: []gpu.Event{xid(gpuA, 999, whole, whole)}, action: health.ResetGPU,
			want: eligibility{other: true}, changes: 1, scopeGI: whole, scopeCI: whole, clear: health.ResetGPU, reasonPart: "not in the catalog"},
		{name: "override ignores 109", opts: health.Options{Overrides: map[uint64]health.Action{109: health.Ignore}},
			events: []gpu.Event{xid(gpuA, 109, whole, whole)}, action: health.Ignore, want: all},
		{name: "override makes 13 fatal", opts: health.Options{Overrides: map[uint64]health.Action{13: health.ResetGPU}},
			events: []gpu.Event{xid(gpuA, 13, 3, 0)}, action: health.ResetGPU, want: eligibility{other: true}, changes: 1, scopeGI: whole, scopeCI: whole, clear: health.ResetGPU},
		{name: "driver restart", events: []gpu.Event{{Time: t0, Kind: gpu.EventDriverRestart, GPUUUID: gpuA, GPUInstanceID: whole, ComputeInstanceID: whole}},
			action: health.ResetGPU, want: eligibility{other: true}, changes: 1, scopeGI: whole, scopeCI: whole, clear: health.ResetGPU, reasonPart: "driver restarted"},
		{name: "monitoring stopped for every gpu", events: []gpu.Event{{Time: t0, Kind: gpu.EventMonitorStopped, GPUInstanceID: whole, ComputeInstanceID: whole}},
			action: health.ResetGPU, want: eligibility{}, changes: 2, scopeGI: whole, scopeCI: whole, clear: health.ResetGPU, reasonPart: "event monitoring stopped"},
		{name: "fatal xid naming no gpu", events: []gpu.Event{xid("", 95, whole, whole)}, action: health.ResetGPU,
			want: eligibility{}, changes: 2, scopeGI: whole, scopeCI: whole, clear: health.ResetGPU},
		{name: "unknown event kind fails closed", events: []gpu.Event{{Time: t0, Kind: "thermal", GPUUUID: gpuA, GPUInstanceID: whole, ComputeInstanceID: whole}},
			action: health.ResetGPU, want: eligibility{other: true}, changes: 1, scopeGI: whole, scopeCI: whole, clear: health.ResetGPU, reasonPart: `unknown event kind "thermal"`},
		{name: "untracked gpu changes nothing", events: []gpu.Event{xid("GPU-other", 79, whole, whole)}, action: health.RebootNode, want: all},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tr, rec := newTracker(tt.opts)
			var d health.Decision
			for _, ev := range tt.events {
				d = tr.Observe(ev)
			}
			if d.Action != tt.action {
				t.Errorf("action %s, want %s", d.Action, tt.action)
			}
			if got := eligible(tr); got != tt.want {
				t.Errorf("eligible %+v, want %+v", got, tt.want)
			}
			changes := rec.all()
			if len(changes) != tt.changes || len(d.Changes) != tt.changes {
				t.Fatalf("changes %+v (decision %+v), want %d", changes, d.Changes, tt.changes)
			}
			if tt.changes == 0 {
				return
			}
			c := changes[0]
			if c.GI != tt.scopeGI || c.CI != tt.scopeCI || c.From != health.Healthy || c.To != health.Unhealthy ||
				c.Clear != tt.clear || !c.Time.Equal(t0) || !strings.Contains(c.Reason, tt.reasonPart) {
				t.Errorf("change %+v, want gi %d ci %d healthy -> unhealthy, clear %s, reason containing %q",
					c, tt.scopeGI, tt.scopeCI, tt.clear, tt.reasonPart)
			}
			if d.Event.Kind == gpu.EventXID && c.XID != d.Event.XID {
				t.Errorf("change names xid %d, event %d", c.XID, d.Event.XID)
			}
		})
	}
}

func TestTracker_UntrackedGPUIsNotEligible(t *testing.T) {
	tr := health.NewTracker(health.Options{})
	if tr.Eligible(gpuA, whole) || tr.Eligible(gpuA, 3) {
		t.Error("a tracker without GPUs vouches for one")
	}
	if _, ok := tr.Health(gpuA, whole); ok {
		t.Error("Health of an untracked GPU is ok")
	}
}

func TestTracker_ResetRecovers(t *testing.T) {
	tr, rec := newTracker(health.Options{})
	tr.Observe(xid(gpuA, 48, 3, 0))
	tr.Observe(xid(gpuA, 95, 5, 0))
	if eligible(tr) != (eligibility{other: true}) {
		t.Fatalf("before reset: %+v", eligible(tr))
	}
	if err := tr.Reset(gpuA); err != nil {
		t.Fatalf("Reset: %v", err)
	}
	if got := eligible(tr); got != (eligibility{true, true, true, true}) {
		t.Errorf("after reset: %+v", got)
	}
	changes := rec.all()
	if len(changes) != 4 {
		t.Fatalf("changes %+v, want 2 down and 2 up", changes)
	}
	for _, c := range changes[2:] {
		if c.From != health.Unhealthy || c.To != health.Healthy || c.Reason != "gpu reset" {
			t.Errorf("recovery change %+v", c)
		}
	}
	if changes[2].GI != 3 || changes[3].GI != whole {
		t.Errorf("recoveries of gi %d then %d, want the partition then the gpu", changes[2].GI, changes[3].GI)
	}
	if h, ok := tr.Health(gpuA, whole); !ok || h.Status != health.Healthy || h.Reason != "" || !h.Since.IsZero() {
		t.Errorf("Health after reset = %+v, %t", h, ok)
	}
	if err := tr.Reset(gpuA); err != nil || len(rec.all()) != 4 {
		t.Errorf("resetting a healthy gpu: %v, %d changes", err, len(rec.all()))
	}
	if err := tr.Reset("GPU-other"); !errors.Is(err, gpu.ErrNotFound) {
		t.Errorf("Reset(untracked) = %v, want ErrNotFound", err)
	}
}

func TestTracker_RebootIsNotClearedByReset(t *testing.T) {
	tr, _ := newTracker(health.Options{})
	tr.Observe(xid(gpuA, 48, 3, 0))
	tr.Observe(xid(gpuA, 79, whole, whole))
	err := tr.Reset(gpuA)
	if !errors.Is(err, health.ErrRebootRequired) || !strings.Contains(err.Error(), "xid 79") {
		t.Fatalf("Reset = %v, want ErrRebootRequired naming xid 79", err)
	}
	if tr.Eligible(gpuA, whole) || tr.Eligible(gpuA, 5) {
		t.Error("a gpu that needs a reboot is eligible")
	}
	// The reset did happen: the partition's own state is gone.
	if h, _ := tr.Health(gpuA, 3); h.Status != health.Healthy {
		t.Errorf("partition after reset: %+v", h)
	}
}

func TestTracker_EscalationKeepsTheFirstTime(t *testing.T) {
	tr, rec := newTracker(health.Options{})
	tr.Observe(xid(gpuA, 95, whole, whole))
	later := xid(gpuA, 119, whole, whole)
	later.Time = t0.Add(time.Minute)
	if d := tr.Observe(later); len(d.Changes) != 0 {
		t.Errorf("a second reset-class xid changed %+v", d.Changes)
	}
	worse := xid(gpuA, 79, whole, whole)
	worse.Time = t0.Add(2 * time.Minute)
	tr.Observe(worse)
	changes := rec.all()
	if len(changes) != 2 || changes[1].From != health.Unhealthy || changes[1].To != health.Unhealthy || changes[1].Clear != health.RebootNode {
		t.Fatalf("changes %+v, want the first failure then an escalation", changes)
	}
	h, _ := tr.Health(gpuA, whole)
	if !h.Since.Equal(t0) || h.XID != 79 || h.Clear != health.RebootNode {
		t.Errorf("health %+v, want unhealthy since the first xid, now needing a reboot", h)
	}
}

func TestTracker_SingleBitThreshold(t *testing.T) {
	tr, rec := newTracker(health.Options{SingleBitThreshold: 3})
	sbe := ecc(gpuA, gpu.EventECCSingleBit, whole, whole)
	for i := range 2 {
		if d := tr.Observe(sbe); d.Action != health.Ignore || !tr.Eligible(gpuA, whole) {
			t.Fatalf("single-bit error %d: %s, eligible %t", i+1, d.Action, tr.Eligible(gpuA, whole))
		}
	}
	if d := tr.Observe(sbe); d.Action != health.ResetGPU || tr.Eligible(gpuA, whole) {
		t.Fatalf("third single-bit error: %s, eligible %t", d.Action, tr.Eligible(gpuA, whole))
	}
	if c := rec.all(); len(c) != 1 || !strings.Contains(c[0].Reason, "3 single-bit ecc errors") {
		t.Errorf("changes %+v", c)
	}
	if err := tr.Reset(gpuA); err != nil {
		t.Fatal(err)
	}
	// The count restarts with the reset.
	tr.Observe(sbe)
	tr.Observe(sbe)
	if !tr.Eligible(gpuA, whole) {
		t.Error("two single-bit errors after a reset made the gpu unhealthy")
	}
}

func TestTracker_Snapshot(t *testing.T) {
	tr, _ := newTracker(health.Options{})
	tr.Observe(xid(gpuB, 48, 9, 0))
	tr.Observe(xid(gpuA, 48, 7, 0))
	tr.Observe(xid(gpuB, 64, whole, whole))
	got := tr.Snapshot()
	if len(got) != 3 || got[0].GPU != gpuA || got[0].GI != 7 || got[1].GPU != gpuB || got[1].GI != whole ||
		got[2].GI != 9 || got[2].CI != 0 || got[2].Health.XID != 48 {
		t.Errorf("Snapshot = %+v", got)
	}
}

// TestTracker_OnChangeMayReadAndIsOrdered observes from many goroutines
// while OnChange reads the tracker (run with -race): no deadlock, every
// change delivered once, each GPU's changes in the order they happened.
func TestTracker_OnChangeMayReadAndIsOrdered(t *testing.T) {
	var gpus []string
	for i := range 16 {
		gpus = append(gpus, "GPU-"+string(rune('a'+i)))
	}
	var mu sync.Mutex
	var got []health.Change
	var tr *health.Tracker
	tr = health.NewTracker(health.Options{GPUs: gpus, OnChange: func(c health.Change) {
		_ = tr.Eligible(c.GPU, c.GI) // reading from the callback is allowed
		mu.Lock()
		got = append(got, c)
		mu.Unlock()
	}})
	var wg sync.WaitGroup
	var want sync.Map
	for _, u := range gpus {
		wg.Go(func() {
			n := 0
			n += len(tr.Observe(xid(u, 48, 3, 0)).Changes)
			n += len(tr.Observe(xid(u, 95, whole, whole)).Changes)
			n += len(tr.Observe(xid(u, 79, whole, whole)).Changes)
			if err := tr.Reset(u); !errors.Is(err, health.ErrRebootRequired) {
				t.Errorf("Reset(%s) = %v", u, err)
			}
			want.Store(u, n+1) // the partition's recovery
		})
	}
	wg.Wait()
	perGPU := map[string][]health.Change{}
	for _, c := range got {
		perGPU[c.GPU] = append(perGPU[c.GPU], c)
	}
	for _, u := range gpus {
		n, _ := want.Load(u)
		cs := perGPU[u]
		if len(cs) != n.(int) || len(cs) != 4 {
			t.Fatalf("%s: %d changes delivered, %v reported: %+v", u, len(cs), n, cs)
		}
		if cs[0].GI != 3 || cs[1].XID != 95 || cs[2].Clear != health.RebootNode || cs[3].To != health.Healthy {
			t.Errorf("%s: changes out of order: %+v", u, cs)
		}
	}
}

func TestTracker_RunWithTheSimulator(t *testing.T) {
	s, err := sim.New(sim.Config{GPUs: []sim.GPUConfig{{Model: "H200", MIGEnabled: true}, {Model: "H100"}}})
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	devs, _ := s.Devices(ctx)
	h200, h100 := devs[0].UUID, devs[1].UUID
	gi, err := s.CreateGPUInstance(ctx, h200, mig.Profile3g, mig.Placement{Start: 0, Size: 4})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateComputeInstance(ctx, h200, gi.ID); err != nil {
		t.Fatal(err)
	}
	other, err := s.CreateGPUInstance(ctx, h200, mig.Profile3g, mig.Placement{Start: 4, Size: 4})
	if err != nil {
		t.Fatal(err)
	}

	changes := make(chan health.Change, 16)
	decisions := make(chan health.Decision, 16)
	tr := health.NewTracker(health.Options{
		GPUs:       []string{h200, h100},
		OnChange:   func(c health.Change) { changes <- c },
		OnDecision: func(d health.Decision) { decisions <- d },
	})
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- tr.Run(runCtx, s) }()
	// Run subscribes asynchronously; an event injected before that would
	// be missed, so wait until an ignorable probe gets through.
	for {
		if err := s.InjectXID(h100, 43, whole, whole); err != nil {
			t.Fatal(err)
		}
		select {
		case d := <-decisions:
			if d.Action != health.Ignore {
				t.Fatalf("probe decision %+v", d)
			}
		case <-time.After(10 * time.Millisecond):
			continue
		}
		break
	}
	waitChange := func() health.Change {
		t.Helper()
		select {
		case c := <-changes:
			return c
		case <-time.After(5 * time.Second):
			t.Fatal("no health change")
		}
		return health.Change{}
	}

	if err := s.InjectXID(h200, 13, uint32(gi.ID), 0); err != nil {
		t.Fatal(err)
	}
	for d := range decisions {
		if d.Event.XID == 43 {
			continue // a late probe
		}
		if d.Action != health.RestartApplication || d.Event.GPUInstanceID != uint32(gi.ID) || len(d.Changes) != 0 {
			t.Errorf("xid 13 decision %+v", d)
		}
		break
	}
	if err := s.InjectXID(h200, 48, uint32(gi.ID), 0); err != nil {
		t.Fatal(err)
	}
	if c := waitChange(); c.GPU != h200 || c.GI != uint32(gi.ID) || c.To != health.Unhealthy {
		t.Errorf("xid 48 change %+v", c)
	}
	if tr.Eligible(h200, uint32(gi.ID)) || !tr.Eligible(h200, uint32(other.ID)) || tr.Eligible(h200, whole) {
		t.Error("after xid 48 in one partition: want only that partition (and the whole gpu) ineligible")
	}
	if err := s.InjectECC(h100, true); err != nil {
		t.Fatal(err)
	}
	if c := waitChange(); c.GPU != h100 || c.GI != whole || !strings.Contains(c.Reason, "double-bit") {
		t.Errorf("double-bit change %+v", c)
	}

	// The agent drains and resets the GPUs, then tells the tracker.
	for _, u := range []string{h200, h100} {
		if err := s.ResetGPU(u); err != nil {
			t.Fatal(err)
		}
		if err := tr.Reset(u); err != nil {
			t.Fatal(err)
		}
		if c := waitChange(); c.GPU != u || c.To != health.Healthy {
			t.Errorf("recovery %+v", c)
		}
	}
	if !tr.Eligible(h200, whole) || !tr.Eligible(h100, whole) {
		t.Error("not eligible after the resets")
	}
	stop()
	if err := <-done; err != nil {
		t.Errorf("Run after cancel = %v, want nil", err)
	}
}

// closedStream is an Observer whose event stream ends at once, as a
// backend's does when it loses the driver.
type closedStream struct{ gpu.Observer }

func (closedStream) Events(context.Context) (<-chan gpu.Event, error) {
	ch := make(chan gpu.Event)
	close(ch)
	return ch, nil
}

func TestTracker_RunFailsClosedWhenTheStreamEnds(t *testing.T) {
	tr, rec := newTracker(health.Options{})
	err := tr.Run(t.Context(), closedStream{})
	if !errors.Is(err, health.ErrMonitorStopped) {
		t.Fatalf("Run = %v, want ErrMonitorStopped", err)
	}
	if got := eligible(tr); got != (eligibility{}) {
		t.Errorf("eligible %+v after the stream ended, want nothing", got)
	}
	if len(rec.all()) != 2 {
		t.Errorf("changes %+v, want both gpus", rec.all())
	}
	// Re-verified after monitoring is back: Reset clears it.
	if err := tr.Reset(gpuA); err != nil || !tr.Eligible(gpuA, whole) {
		t.Errorf("Reset = %v, eligible %t", err, tr.Eligible(gpuA, whole))
	}
}

func TestTracker_RunWithAnEndedContext(t *testing.T) {
	s, err := sim.New(sim.Config{GPUs: []sim.GPUConfig{{Model: "H100"}}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	tr, _ := newTracker(health.Options{})
	if err := tr.Run(ctx, s); !errors.Is(err, context.Canceled) {
		t.Errorf("Run(ended ctx) = %v, want context.Canceled", err)
	}
}
