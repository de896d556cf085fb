package partition_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/agent/gpu/sim"
	"github.com/gpuaas/gpuaas/agent/partition"
	"github.com/gpuaas/gpuaas/pkg/mig"
)

// call is one mutating call that reached the recorder.
type call struct {
	Op        string // SetMIGMode, CreateGPUInstance, DestroyGPUInstance, CreateComputeInstance, DestroyComputeInstance, Reset
	GPU       string
	GIID      int
	Profile   mig.ProfileID
	Placement mig.Placement
	// OK: the driver did it (not refused, not injected).
	OK bool
}

// killed is what the recorder panics with to simulate the agent being
// killed right after a call returned, before it could record anything.
type killed struct{ n int }

var errInjected = errors.New("injected driver failure")

// recorder is a gpu.Backend and partition.Resetter that forwards to the
// simulator and records every mutating call. It can refuse the n-th one
// before it reaches the driver (failAt), or let the n-th one happen and
// then panic (killAfter), as if the agent were killed between the NVML
// call and its record.
type recorder struct {
	gpu.Backend
	sim *sim.Sim

	mu        sync.Mutex
	calls     []call
	failAt    int
	killAfter int
	// onCall, if set, sees each call before it is made.
	onCall func(call)
}

func (r *recorder) before(c call) (int, error) {
	if r.onCall != nil {
		r.onCall(c)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	n := len(r.calls) + 1
	if n == r.failAt {
		r.calls = append(r.calls, c)
		return n, fmt.Errorf("%s: %w", c.Op, errInjected)
	}
	return n, nil
}

func (r *recorder) after(n int, c call, err error) {
	r.mu.Lock()
	c.OK = err == nil
	r.calls = append(r.calls, c)
	kill := n == r.killAfter
	r.mu.Unlock()
	if kill {
		panic(killed{n})
	}
}

func (r *recorder) SetMIGMode(ctx context.Context, uuid string, enabled bool) (gpu.MIGMode, error) {
	c := call{Op: "SetMIGMode", GPU: uuid, GIID: -1}
	n, err := r.before(c)
	if err != nil {
		return gpu.MIGMode{}, err
	}
	m, err := r.Backend.SetMIGMode(ctx, uuid, enabled)
	r.after(n, c, err)
	return m, err
}

func (r *recorder) CreateGPUInstance(ctx context.Context, uuid string, p mig.ProfileID, at mig.Placement) (gpu.GPUInstance, error) {
	c := call{Op: "CreateGPUInstance", GPU: uuid, GIID: -1, Profile: p, Placement: at}
	n, err := r.before(c)
	if err != nil {
		return gpu.GPUInstance{}, err
	}
	gi, err := r.Backend.CreateGPUInstance(ctx, uuid, p, at)
	c.GIID = gi.ID
	r.after(n, c, err)
	return gi, err
}

func (r *recorder) DestroyGPUInstance(ctx context.Context, uuid string, gi int) error {
	c := call{Op: "DestroyGPUInstance", GPU: uuid, GIID: gi}
	n, err := r.before(c)
	if err != nil {
		return err
	}
	err = r.Backend.DestroyGPUInstance(ctx, uuid, gi)
	r.after(n, c, err)
	return err
}

func (r *recorder) CreateComputeInstance(ctx context.Context, uuid string, gi int) (gpu.ComputeInstance, error) {
	c := call{Op: "CreateComputeInstance", GPU: uuid, GIID: gi}
	n, err := r.before(c)
	if err != nil {
		return gpu.ComputeInstance{}, err
	}
	ci, err := r.Backend.CreateComputeInstance(ctx, uuid, gi)
	r.after(n, c, err)
	return ci, err
}

func (r *recorder) DestroyComputeInstance(ctx context.Context, uuid string, gi, ci int) error {
	c := call{Op: "DestroyComputeInstance", GPU: uuid, GIID: gi}
	n, err := r.before(c)
	if err != nil {
		return err
	}
	err = r.Backend.DestroyComputeInstance(ctx, uuid, gi, ci)
	r.after(n, c, err)
	return err
}

func (r *recorder) Reset(_ context.Context, uuid string) error {
	c := call{Op: "Reset", GPU: uuid, GIID: -1}
	n, err := r.before(c)
	if err != nil {
		return err
	}
	err = r.sim.ResetGPU(uuid)
	r.after(n, c, err)
	return err
}

func (r *recorder) taken() []call {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.calls)
}

// rig is a simulated host whose driver state and intent journal live in
// files, so that an agent "restart" (restart) keeps what the driver and
// the journal hold and loses everything else.
type rig struct {
	t         testing.TB
	cfg       sim.Config
	journal   string
	noReset   bool
	sim       *sim.Sim
	rec       *recorder
	log       *partition.IntentLog
	r         *partition.Reconciler
	uuids     []string
	history   []call // calls of earlier lives
	protected map[string]map[int]bool
}

func newRig(t testing.TB, immediate bool, gpus ...sim.GPUConfig) *rig {
	t.Helper()
	return newRigWith(t, immediate, false, gpus...)
}

// newMemRig is newRig whose driver keeps its state in memory only (no
// state file written on every change), for the tests that make many
// changes and never restart.
func newMemRig(t testing.TB, immediate bool, gpus ...sim.GPUConfig) *rig {
	t.Helper()
	g := &rig{
		t:         t,
		cfg:       sim.Config{GPUs: gpus, ImmediateModeChange: immediate, HostID: t.Name()},
		journal:   filepath.Join(t.TempDir(), "partition-intents.db"),
		protected: map[string]map[int]bool{},
	}
	g.start()
	t.Cleanup(func() { g.log.Close() })
	return g
}

// newRigWith is newRig with the reset hook optionally left out.
func newRigWith(t testing.TB, immediate, noReset bool, gpus ...sim.GPUConfig) *rig {
	t.Helper()
	dir := t.TempDir()
	g := &rig{
		t:         t,
		cfg:       sim.Config{GPUs: gpus, StatePath: filepath.Join(dir, "sim.json"), ImmediateModeChange: immediate, HostID: t.Name()},
		journal:   filepath.Join(dir, "partition-intents.db"),
		noReset:   noReset,
		protected: map[string]map[int]bool{},
	}
	g.start()
	t.Cleanup(func() { g.log.Close() })
	return g
}

func h200s(n int, migEnabled bool) []sim.GPUConfig {
	out := make([]sim.GPUConfig, n)
	for i := range out {
		out[i] = sim.GPUConfig{Model: "H200", MIGEnabled: migEnabled}
	}
	return out
}

// start brings the agent up: the driver from its state file, the journal
// from its file.
func (g *rig) start() {
	g.t.Helper()
	s, err := sim.New(g.cfg)
	if err != nil {
		g.t.Fatalf("new simulator: %v", err)
	}
	g.sim = s
	g.rec = &recorder{Backend: s, sim: s}
	if g.log, err = partition.OpenIntentLog(g.journal); err != nil {
		g.t.Fatalf("OpenIntentLog: %v", err)
	}
	cfg := partition.ReconcilerConfig{Backend: g.rec, Intents: g.log}
	if !g.noReset {
		cfg.Reset = g.rec
	}
	if g.r, err = partition.NewReconciler(cfg); err != nil {
		g.t.Fatalf("NewReconciler: %v", err)
	}
	devs, err := s.Devices(g.t.Context())
	if err != nil {
		g.t.Fatal(err)
	}
	g.uuids = g.uuids[:0]
	for _, d := range devs {
		g.uuids = append(g.uuids, d.UUID)
	}
}

// restart simulates the agent being killed and started again.
func (g *rig) restart() {
	g.t.Helper()
	g.history = append(g.history, g.rec.taken()...)
	if err := g.log.Close(); err != nil {
		g.t.Fatalf("close journal: %v", err)
	}
	g.start()
}

// allCalls are the mutating calls of every life of the agent.
func (g *rig) allCalls() []call { return append(slices.Clone(g.history), g.rec.taken()...) }

func (g *rig) isProtected(uuid string, gi int) bool { return g.protected[uuid][gi] }

// seed makes instances directly on the driver (not through the recorder),
// each with its compute instance unless bare.
func (g *rig) seed(uuid string, bare bool, ins ...mig.Instance) map[mig.Instance]int {
	g.t.Helper()
	ids := map[mig.Instance]int{}
	for _, in := range ins {
		gi, err := g.sim.CreateGPUInstance(g.t.Context(), uuid, in.Profile, in.Placement)
		if err != nil {
			g.t.Fatalf("seed %v on %s: %v", in, uuid, err)
		}
		if !bare {
			if _, err := g.sim.CreateComputeInstance(g.t.Context(), uuid, gi.ID); err != nil {
				g.t.Fatal(err)
			}
		}
		ids[in] = gi.ID
	}
	return ids
}

// lease marks the instance as a running lease's: protected, and a process
// attached to its MIG device, as a running container would be.
func (g *rig) lease(uuid string, in mig.Instance, pid int) int {
	g.t.Helper()
	gi := g.giAt(uuid, in)
	if g.protected[uuid] == nil {
		g.protected[uuid] = map[int]bool{}
	}
	g.protected[uuid][gi] = true
	g.attach(uuid, in, pid)
	return gi
}

// attach attaches a process to the instance's MIG device.
func (g *rig) attach(uuid string, in mig.Instance, pid int) {
	g.t.Helper()
	gi := g.giAt(uuid, in)
	devs, err := g.sim.MIGDevices(g.t.Context(), uuid)
	if err != nil {
		g.t.Fatal(err)
	}
	for _, d := range devs {
		if d.GPUInstanceID == gi {
			if err := g.sim.AttachProcess(d.UUID, pid); err != nil {
				g.t.Fatal(err)
			}
			return
		}
	}
	g.t.Fatalf("no mig device for %v on %s", in, uuid)
}

func (g *rig) giAt(uuid string, in mig.Instance) int {
	g.t.Helper()
	for k, v := range g.layout(uuid) {
		if k == in {
			return v.gi
		}
	}
	g.t.Fatalf("no instance %v on %s", in, uuid)
	return -1
}

type state struct{ gi, cis int }

// layout is what the driver holds on a GPU: every GPU instance with its
// id and compute instance count; nil when MIG is not current.
func (g *rig) layout(uuid string) map[mig.Instance]state {
	g.t.Helper()
	ctx := g.t.Context()
	mode, err := g.sim.MIGMode(ctx, uuid)
	if err != nil {
		g.t.Fatal(err)
	}
	if !mode.Current {
		return nil
	}
	gis, err := g.sim.GPUInstances(ctx, uuid)
	if err != nil {
		g.t.Fatal(err)
	}
	out := map[mig.Instance]state{}
	for _, gi := range gis {
		cis, err := g.sim.ComputeInstances(ctx, uuid, gi.ID)
		if err != nil {
			g.t.Fatal(err)
		}
		out[mig.Instance{Profile: gi.ProfileID, Placement: gi.Placement}] = state{gi: gi.ID, cis: len(cis)}
	}
	return out
}

func (g *rig) mode(uuid string) gpu.MIGMode {
	g.t.Helper()
	m, err := g.sim.MIGMode(g.t.Context(), uuid)
	if err != nil {
		g.t.Fatal(err)
	}
	return m
}

// requireLayout fails unless the GPU holds exactly the instances, each
// with one compute instance (nil: MIG not current).
func (g *rig) requireLayout(uuid string, want []mig.Instance) {
	g.t.Helper()
	got := g.layout(uuid)
	if want == nil {
		if got != nil {
			g.t.Errorf("gpu %s: mig enabled with %v, want mig disabled", uuid, got)
		}
		return
	}
	if got == nil {
		g.t.Errorf("gpu %s: mig disabled, want %v", uuid, want)
		return
	}
	if len(got) != len(want) {
		g.t.Errorf("gpu %s holds %v, want exactly %v", uuid, got, want)
	}
	for _, in := range want {
		if s, ok := got[in]; !ok || s.cis != 1 {
			g.t.Errorf("gpu %s holds %v, want %v with one compute instance", uuid, got, in)
		}
	}
}

func (g *rig) reconcile(desired ...partition.Desired) partition.Report {
	g.t.Helper()
	rep, err := g.r.Reconcile(g.t.Context(), desired, g.isProtected)
	if err != nil {
		g.t.Fatalf("Reconcile: %v", err)
	}
	return rep
}

// mutations are the calls that changed something.
func mutations(calls []call) []call {
	var out []call
	for _, c := range calls {
		if c.OK {
			out = append(out, c)
		}
	}
	return out
}

func countOps(calls []call) map[string]int {
	out := map[string]int{}
	for _, c := range calls {
		out[c.Op]++
	}
	return out
}

func inst(p mig.ProfileID, start, size int) mig.Instance {
	return mig.Instance{Profile: p, Placement: mig.Placement{Start: start, Size: size}}
}

func onGPU(calls []call, uuid string) []call {
	var out []call
	for _, c := range calls {
		if c.GPU == uuid {
			out = append(out, c)
		}
	}
	return out
}

// requireProtectedNeverTargeted fails if any call named a protected GPU
// instance, or created one over its placement.
func (g *rig) requireProtectedNeverTargeted(protected map[string]map[int]mig.Instance) {
	g.t.Helper()
	for _, c := range g.allCalls() {
		for gi, in := range protected[c.GPU] {
			if c.GIID == gi && c.Op != "CreateGPUInstance" {
				g.t.Errorf("%s on protected gi %d (%v) of %s", c.Op, gi, in, c.GPU)
			}
			if c.Op == "CreateGPUInstance" && c.Placement.Overlaps(in.Placement) {
				g.t.Errorf("CreateGPUInstance %v at %s over protected gi %d of %s", c.Profile, c.Placement, gi, c.GPU)
			}
			if c.Op == "Reset" || c.Op == "SetMIGMode" {
				g.t.Errorf("%s on %s, which has protected gi %d", c.Op, c.GPU, gi)
			}
		}
	}
	for uuid, ins := range protected {
		got := g.layout(uuid)
		for gi, in := range ins {
			if s, ok := got[in]; !ok || s.gi != gi || s.cis != 1 {
				g.t.Errorf("protected %v on %s is now %+v (present %t), want gi %d with its compute instance", in, uuid, s, ok, gi)
			}
		}
	}
}

func refInstances(refs []partition.InstanceRef) []mig.Instance {
	out := make([]mig.Instance, len(refs))
	for i, r := range refs {
		out[i] = r.Instance()
	}
	return out
}

func sameInstances(a, b []mig.Instance) bool {
	cmp := func(x, y mig.Instance) int {
		if x.Placement.Start != y.Placement.Start {
			return x.Placement.Start - y.Placement.Start
		}
		return int(x.Profile) - int(y.Profile)
	}
	a, b = slices.Clone(a), slices.Clone(b)
	slices.SortFunc(a, cmp)
	slices.SortFunc(b, cmp)
	return slices.Equal(a, b)
}

func TestReconcileTouchesOnlyWhatDiffers(t *testing.T) {
	var (
		i3g0   = inst(mig.Profile3g, 0, 4)
		i2g4   = inst(mig.Profile2g, 4, 2)
		i1g4   = inst(mig.Profile1g, 4, 1)
		i1g5   = inst(mig.Profile1g, 5, 1)
		i1g6   = inst(mig.Profile1g, 6, 1)
		i1g0   = inst(mig.Profile1g, 0, 1)
		i1gD0  = inst(mig.Profile1gDouble, 0, 2)
		i2g2   = inst(mig.Profile2g, 2, 2)
		i7g    = inst(mig.Profile7g, 0, 8)
		i3g4   = inst(mig.Profile3g, 4, 4)
		i1gME3 = inst(mig.Profile1gME, 3, 1)
	)
	for _, tc := range []struct {
		name       string
		have, bare []mig.Instance
		want       []mig.Instance
		ops        map[string]int
		created    []mig.Instance
		destroyed  []mig.Instance
		adopted    []mig.Instance
		kept       []mig.Instance
	}{
		{
			name:    "an empty gpu gets the whole layout",
			want:    []mig.Instance{i3g0, i2g4, i1g6},
			ops:     map[string]int{"CreateGPUInstance": 3, "CreateComputeInstance": 3},
			created: []mig.Instance{i3g0, i2g4, i1g6},
		},
		{
			name: "the same layout makes no call",
			have: []mig.Instance{i3g0, i2g4, i1g6},
			want: []mig.Instance{i3g0, i2g4, i1g6},
			ops:  map[string]int{},
			kept: []mig.Instance{i3g0, i2g4, i1g6},
		},
		{
			name:      "only the differing instances are destroyed and created",
			have:      []mig.Instance{i3g0, i1g4, i1g5, i1g6},
			want:      []mig.Instance{i3g0, i2g4, i1g6},
			ops:       map[string]int{"DestroyComputeInstance": 2, "DestroyGPUInstance": 2, "CreateGPUInstance": 1, "CreateComputeInstance": 1},
			created:   []mig.Instance{i2g4},
			destroyed: []mig.Instance{i1g4, i1g5},
			kept:      []mig.Instance{i3g0, i1g6},
		},
		{
			name:      "another profile at the same start is destroyed and created",
			have:      []mig.Instance{i1g0, i1gME3},
			want:      []mig.Instance{i1gD0, i1gME3},
			ops:       map[string]int{"DestroyComputeInstance": 1, "DestroyGPUInstance": 1, "CreateGPUInstance": 1, "CreateComputeInstance": 1},
			created:   []mig.Instance{i1gD0},
			destroyed: []mig.Instance{i1g0},
			kept:      []mig.Instance{i1gME3},
		},
		{
			name:    "a desired gpu instance without its compute instance is adopted",
			bare:    []mig.Instance{i2g2},
			want:    []mig.Instance{i2g2},
			ops:     map[string]int{"CreateComputeInstance": 1},
			adopted: []mig.Instance{i2g2},
		},
		{
			name:      "an undesired gpu instance without its compute instance is destroyed",
			bare:      []mig.Instance{i3g4},
			want:      []mig.Instance{i3g0},
			ops:       map[string]int{"DestroyGPUInstance": 1, "CreateGPUInstance": 1, "CreateComputeInstance": 1},
			created:   []mig.Instance{i3g0},
			destroyed: []mig.Instance{i3g4},
		},
		{
			name:      "everything undesired is destroyed",
			have:      []mig.Instance{i7g},
			want:      []mig.Instance{},
			ops:       map[string]int{"DestroyComputeInstance": 1, "DestroyGPUInstance": 1},
			destroyed: []mig.Instance{i7g},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := newRig(t, true, h200s(2, true)...)
			target, bystander := g.uuids[0], g.uuids[1]
			ids := g.seed(target, false, tc.have...)
			maps.Copy(ids, g.seed(target, true, tc.bare...))
			g.seed(bystander, false, i3g4, i1g0)
			other := g.layout(bystander)

			rep := g.reconcile(partition.Desired{GPUUUID: target, MIGEnabled: true, Instances: tc.want})

			g.requireLayout(target, tc.want)
			calls := g.rec.taken()
			if got := countOps(calls); !maps.Equal(got, tc.ops) {
				t.Errorf("calls = %v, want %v", got, tc.ops)
			}
			if n := len(onGPU(calls, bystander)); n != 0 || !maps.Equal(g.layout(bystander), other) {
				t.Errorf("gpu not named: %d calls, layout %v; want untouched %v", n, g.layout(bystander), other)
			}
			gr, ok := rep.GPU(target)
			if !ok {
				t.Fatalf("report %+v lacks gpu %s", rep, target)
			}
			for _, f := range []struct {
				what      string
				got, want []mig.Instance
			}{
				{"created", refInstances(gr.Created), tc.created},
				{"destroyed", refInstances(gr.Destroyed), tc.destroyed},
				{"adopted", refInstances(gr.Adopted), tc.adopted},
				{"kept", refInstances(gr.Kept), tc.kept},
			} {
				if !sameInstances(f.got, f.want) {
					t.Errorf("report %s %v, want %v", f.what, f.got, f.want)
				}
			}
			got := g.layout(target)
			for _, in := range tc.kept {
				if got[in].gi != ids[in] {
					t.Errorf("kept %v has gi %d, was %d", in, got[in].gi, ids[in])
				}
			}
			if len(gr.Conflicts) > 0 || gr.ModeChanged || gr.Reset || gr.Err != nil {
				t.Errorf("report %+v: want no conflict, mode change, reset or error", gr)
			}

			// Level-triggered: the same desired state again changes nothing.
			before := len(g.rec.taken())
			g.reconcile(partition.Desired{GPUUUID: target, MIGEnabled: true, Instances: tc.want})
			if again := g.rec.taken()[before:]; len(again) != 0 {
				t.Errorf("second Reconcile made %d calls: %v", len(again), again)
			}
			if o, err := g.log.Outstanding(); err != nil || !o.Empty() {
				t.Errorf("intent journal after a finished apply = %+v, %v; want empty", o, err)
			}
		})
	}
}

func TestReconcileNeverTouchesARunningLease(t *testing.T) {
	var (
		i3g0   = inst(mig.Profile3g, 0, 4)
		i3g4   = inst(mig.Profile3g, 4, 4)
		i1g0   = inst(mig.Profile1g, 0, 1)
		i1g1   = inst(mig.Profile1g, 1, 1)
		i1g2   = inst(mig.Profile1g, 2, 1)
		i1g4   = inst(mig.Profile1g, 4, 1)
		i1g5   = inst(mig.Profile1g, 5, 1)
		i1g6   = inst(mig.Profile1g, 6, 1)
		i2g4   = inst(mig.Profile2g, 4, 2)
		i7g    = inst(mig.Profile7g, 0, 8)
		i1gME0 = inst(mig.Profile1gME, 0, 1)
		i1gME4 = inst(mig.Profile1gME, 4, 1)
	)
	for _, tc := range []struct {
		name      string
		have      []mig.Instance
		leased    []mig.Instance // protected, with a process
		held      []mig.Instance // a process attached, not protected
		want      []mig.Instance
		final     []mig.Instance
		conflict  partition.ConflictReason
		blocking  []mig.Instance
		untouched []mig.Instance
		inUse     []mig.Instance
	}{
		{
			name:      "a lease outside the desired space stays and the rest is applied",
			have:      []mig.Instance{i3g0, i1g4, i1g5},
			leased:    []mig.Instance{i3g0},
			want:      []mig.Instance{i2g4, i1g6},
			final:     []mig.Instance{i3g0, i2g4, i1g6},
			untouched: []mig.Instance{i3g0},
		},
		{
			name:      "a desired lease is kept and the rest is created",
			have:      []mig.Instance{i3g0},
			leased:    []mig.Instance{i3g0},
			want:      []mig.Instance{i3g0, i3g4},
			final:     []mig.Instance{i3g0, i3g4},
			untouched: []mig.Instance{i3g0},
		},
		{
			name:      "a lease in the desired space: conflict, gpu unchanged",
			have:      []mig.Instance{i3g0, i1g4},
			leased:    []mig.Instance{i3g0},
			want:      []mig.Instance{i7g},
			final:     []mig.Instance{i3g0, i1g4},
			conflict:  partition.ConflictProtected,
			blocking:  []mig.Instance{i3g0},
			untouched: []mig.Instance{i3g0},
		},
		{
			name:      "a lease holding the only 1g+me: conflict, gpu unchanged",
			have:      []mig.Instance{i1gME0, i1g1},
			leased:    []mig.Instance{i1gME0},
			want:      []mig.Instance{i1gME4},
			final:     []mig.Instance{i1gME0, i1g1},
			conflict:  partition.ConflictProtected,
			blocking:  []mig.Instance{i1gME0},
			untouched: []mig.Instance{i1gME0},
		},
		{
			name:     "a process on an instance in the desired space: rolled back, gpu unchanged",
			have:     []mig.Instance{i1g0, i1g1, i1g2},
			held:     []mig.Instance{i1g2},
			want:     []mig.Instance{i3g0},
			final:    []mig.Instance{i1g0, i1g1, i1g2},
			conflict: partition.ConflictInUse,
			blocking: []mig.Instance{i1g2},
		},
		{
			name:  "a process on an instance outside the desired space: it stays and the rest is applied",
			have:  []mig.Instance{i1g0, i1g6},
			held:  []mig.Instance{i1g6},
			want:  []mig.Instance{i3g0},
			final: []mig.Instance{i3g0, i1g6},
			inUse: []mig.Instance{i1g6},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := newRig(t, true, h200s(1, true)...)
			uuid := g.uuids[0]
			g.seed(uuid, false, tc.have...)
			protected := map[string]map[int]mig.Instance{uuid: {}}
			pid := 100
			for _, in := range tc.leased {
				pid++
				protected[uuid][g.lease(uuid, in, pid)] = in
			}
			for _, in := range tc.held {
				pid++
				g.attach(uuid, in, pid)
			}
			before := g.layout(uuid)

			rep := g.reconcile(partition.Desired{GPUUUID: uuid, MIGEnabled: true, Instances: tc.want})

			g.requireLayout(uuid, tc.final)
			g.requireProtectedNeverTargeted(protected)
			gr, _ := rep.GPU(uuid)
			if !sameInstances(refInstances(gr.Untouched), tc.untouched) {
				t.Errorf("untouched = %v, want %v", gr.Untouched, tc.untouched)
			}
			if !sameInstances(refInstances(gr.InUse), tc.inUse) {
				t.Errorf("in use = %v, want %v", gr.InUse, tc.inUse)
			}
			if tc.conflict == "" {
				if len(gr.Conflicts) > 0 {
					t.Errorf("conflicts %+v, want none", gr.Conflicts)
				}
				return
			}
			if len(gr.Conflicts) != 1 || gr.Conflicts[0].Reason != tc.conflict ||
				!sameInstances(refInstances(gr.Conflicts[0].Instances), tc.blocking) || gr.Conflicts[0].Detail == "" {
				t.Fatalf("conflicts %+v, want one %s naming %v", gr.Conflicts, tc.conflict, tc.blocking)
			}
			if after := g.layout(uuid); !maps.Equal(after, before) {
				t.Errorf("layout %v, want unchanged %v (same gi ids)", after, before)
			}
			if gr.Created != nil || gr.Destroyed != nil {
				t.Errorf("conflicted gpu reports created %v destroyed %v", gr.Created, gr.Destroyed)
			}

			// A lasting conflict costs no change: at most one refused probe
			// of the instance a process holds.
			n := len(g.rec.taken())
			rep = g.reconcile(partition.Desired{GPUUUID: uuid, MIGEnabled: true, Instances: tc.want})
			again := g.rec.taken()[n:]
			if len(mutations(again)) != 0 || len(again) > len(tc.held) {
				t.Errorf("second Reconcile made calls %v, want none that changed anything", again)
			}
			if gr, _ := rep.GPU(uuid); len(gr.Conflicts) != 1 {
				t.Errorf("second Reconcile conflicts %+v, want the conflict again", gr.Conflicts)
			}
			if after := g.layout(uuid); !maps.Equal(after, before) {
				t.Errorf("layout after the second Reconcile %v, want unchanged %v", after, before)
			}
		})
	}
}

func TestReconcileChangesMIGModeOnlyOnAnIdleGPU(t *testing.T) {
	var (
		i1g0 = inst(mig.Profile1g, 0, 1)
		i1g1 = inst(mig.Profile1g, 1, 1)
		i3g0 = inst(mig.Profile3g, 0, 4)
		i3g4 = inst(mig.Profile3g, 4, 4)
		i4g0 = inst(mig.Profile4g, 0, 4)
	)
	type setup struct {
		immediate, noReset bool
		migOn, pending     bool // target GPU's mode, and a change already requested
		have               []mig.Instance
		leased, held       []mig.Instance
	}
	for _, tc := range []struct {
		name     string
		setup    setup
		want     partition.Desired // GPUUUID filled in
		final    []mig.Instance    // nil: MIG off
		ops      map[string]int
		resets   int
		modeCh   bool
		conflict partition.ConflictReason
	}{
		{
			name:   "enabling an idle gpu that stays pending resets that gpu once",
			setup:  setup{},
			want:   partition.Desired{MIGEnabled: true, Instances: []mig.Instance{i3g0, i3g4}},
			final:  []mig.Instance{i3g0, i3g4},
			ops:    map[string]int{"SetMIGMode": 1, "Reset": 1, "CreateGPUInstance": 2, "CreateComputeInstance": 2},
			resets: 1, modeCh: true,
		},
		{
			name:   "enabling where the change is immediate resets nothing",
			setup:  setup{immediate: true},
			want:   partition.Desired{MIGEnabled: true, Instances: []mig.Instance{i4g0}},
			final:  []mig.Instance{i4g0},
			ops:    map[string]int{"SetMIGMode": 1, "CreateGPUInstance": 1, "CreateComputeInstance": 1},
			modeCh: true,
		},
		{
			name:   "a change already pending is reset, not requested again",
			setup:  setup{pending: true},
			want:   partition.Desired{MIGEnabled: true, Instances: []mig.Instance{i4g0}},
			final:  []mig.Instance{i4g0},
			ops:    map[string]int{"Reset": 1, "CreateGPUInstance": 1, "CreateComputeInstance": 1},
			resets: 1,
		},
		{
			name:   "disabling destroys the instances, then resets",
			setup:  setup{migOn: true, have: []mig.Instance{i1g0, i1g1}},
			want:   partition.Desired{},
			ops:    map[string]int{"DestroyComputeInstance": 2, "DestroyGPUInstance": 2, "SetMIGMode": 1, "Reset": 1},
			resets: 1, modeCh: true,
		},
		{
			name:   "a requested disable is cancelled",
			setup:  setup{migOn: true, pending: true, have: []mig.Instance{i3g0}},
			want:   partition.Desired{MIGEnabled: true, Instances: []mig.Instance{i3g0}},
			final:  []mig.Instance{i3g0},
			ops:    map[string]int{"SetMIGMode": 1},
			modeCh: true,
		},
		{
			name:     "disabling is refused while a lease runs",
			setup:    setup{migOn: true, have: []mig.Instance{i3g0, i3g4}, leased: []mig.Instance{i3g0}},
			want:     partition.Desired{},
			final:    []mig.Instance{i3g0, i3g4},
			ops:      map[string]int{},
			conflict: partition.ConflictBusy,
		},
		{
			name:     "disabling is refused and rolled back while a process holds an instance",
			setup:    setup{migOn: true, have: []mig.Instance{i1g0, i1g1}, held: []mig.Instance{i1g1}},
			want:     partition.Desired{},
			final:    []mig.Instance{i1g0, i1g1},
			ops:      map[string]int{"DestroyComputeInstance": 2, "CreateComputeInstance": 1},
			conflict: partition.ConflictBusy,
		},
		{
			name:     "without a reset hook the pending change is reported",
			setup:    setup{noReset: true},
			want:     partition.Desired{MIGEnabled: true, Instances: []mig.Instance{i4g0}},
			ops:      map[string]int{"SetMIGMode": 1},
			modeCh:   true,
			conflict: partition.ConflictResetRequired,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			gpus := []sim.GPUConfig{{Model: "H200", MIGEnabled: tc.setup.migOn}, {Model: "H200", MIGEnabled: true}, {Model: "H100", MIGEnabled: false}}
			g := newRigWith(t, tc.setup.immediate, tc.setup.noReset, gpus...)
			uuid := g.uuids[0]
			ctx := t.Context()
			if tc.setup.pending {
				if _, err := g.sim.SetMIGMode(ctx, uuid, !tc.setup.migOn); err != nil {
					t.Fatal(err)
				}
			}
			g.seed(uuid, false, tc.setup.have...)
			protected := map[string]map[int]mig.Instance{uuid: {}}
			for i, in := range tc.setup.leased {
				protected[uuid][g.lease(uuid, in, 200+i)] = in
			}
			for i, in := range tc.setup.held {
				g.attach(uuid, in, 300+i)
			}
			// The bystanders: a busy MIG GPU, and one with MIG off whose
			// change is pending, that no reset may touch.
			g.seed(g.uuids[1], false, i3g0)
			g.lease(g.uuids[1], i3g0, 400)
			if _, err := g.sim.SetMIGMode(ctx, g.uuids[2], true); err != nil {
				t.Fatal(err)
			}
			bystanders := [][2]any{{g.layout(g.uuids[1]), g.mode(g.uuids[1])}, {g.layout(g.uuids[2]), g.mode(g.uuids[2])}}
			want := tc.want
			want.GPUUUID = uuid

			rep := g.reconcile(want)

			g.requireLayout(uuid, tc.final)
			if m := g.mode(uuid); tc.conflict == "" && (m.Current != want.MIGEnabled || m.Pending != want.MIGEnabled) {
				t.Errorf("mig mode %+v, want %t", m, want.MIGEnabled)
			}
			calls := g.rec.taken()
			if got := countOps(calls); !maps.Equal(got, tc.ops) {
				t.Errorf("calls %v, want %v", got, tc.ops)
			}
			var resets []string
			for _, c := range calls {
				if c.Op == "Reset" {
					resets = append(resets, c.GPU)
				}
				if c.GPU != uuid {
					t.Errorf("call %+v on a gpu not named", c)
				}
			}
			if len(resets) != tc.resets {
				t.Errorf("reset %v, want %d reset of %s only", resets, tc.resets, uuid)
			}
			for i, u := range g.uuids[1:] {
				if l, m := g.layout(u), g.mode(u); !maps.Equal(l, bystanders[i][0].(map[mig.Instance]state)) || m != bystanders[i][1].(gpu.MIGMode) {
					t.Errorf("bystander %s changed to %v %+v", u, l, m)
				}
			}
			g.requireProtectedNeverTargeted(protected)
			gr, _ := rep.GPU(uuid)
			if gr.ModeChanged != tc.modeCh || gr.Reset != (tc.resets > 0) {
				t.Errorf("report mode changed %t reset %t, want %t %t", gr.ModeChanged, gr.Reset, tc.modeCh, tc.resets > 0)
			}
			switch {
			case tc.conflict == "" && len(gr.Conflicts) > 0:
				t.Errorf("conflicts %+v, want none", gr.Conflicts)
			case tc.conflict != "" && (len(gr.Conflicts) != 1 || gr.Conflicts[0].Reason != tc.conflict):
				t.Errorf("conflicts %+v, want one %s", gr.Conflicts, tc.conflict)
			}

			// Again: nothing changes (a refused probe of a held instance
			// aside).
			n := len(g.rec.taken())
			g.reconcile(want)
			if again := g.rec.taken()[n:]; len(mutations(again)) != 0 || len(again) > len(tc.setup.held) {
				t.Errorf("second Reconcile made calls %v", again)
			}
		})
	}
}

func TestReconcileRejectsBadInputBeforeTouchingAnything(t *testing.T) {
	g := newRig(t, true, h200s(2, false)...)
	a, b := g.uuids[0], g.uuids[1]
	good := partition.Desired{GPUUUID: a, MIGEnabled: true, Instances: []mig.Instance{inst(mig.Profile7g, 0, 8)}}
	for _, tc := range []struct {
		name string
		bad  partition.Desired
	}{
		{"an unknown gpu", partition.Desired{GPUUUID: "GPU-00000000-0000-4000-8000-000000000000", MIGEnabled: true}},
		{"a gpu given twice", partition.Desired{GPUUUID: a}},
		{"instances with mig disabled", partition.Desired{GPUUUID: b, Instances: []mig.Instance{inst(mig.Profile1g, 0, 1)}}},
		{"overlapping instances", partition.Desired{GPUUUID: b, MIGEnabled: true, Instances: []mig.Instance{inst(mig.Profile3g, 0, 4), inst(mig.Profile2g, 2, 2)}}},
		{"an unknown profile", partition.Desired{GPUUUID: b, MIGEnabled: true, Instances: []mig.Instance{inst(99, 0, 1)}}},
		{"a placement the profile does not allow", partition.Desired{GPUUUID: b, MIGEnabled: true, Instances: []mig.Instance{inst(mig.Profile3g, 2, 4)}}},
		{"more than fit", partition.Desired{GPUUUID: b, MIGEnabled: true, Instances: []mig.Instance{inst(mig.Profile4g, 0, 4), inst(mig.Profile3g, 4, 4), inst(mig.Profile1gME, 7, 1)}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := g.r.Reconcile(t.Context(), []partition.Desired{good, tc.bad}, nil)
			if !errors.Is(err, partition.ErrInvalidDesired) {
				t.Errorf("Reconcile = %v, want %v", err, partition.ErrInvalidDesired)
			}
			if calls := g.rec.taken(); len(calls) != 0 {
				t.Errorf("calls %v, want none: bad input must change nothing", calls)
			}
			if m := g.mode(a); m.Current || m.Pending {
				t.Errorf("gpu %s mig mode %+v, want untouched", a, m)
			}
		})
	}
}

// scenario is a host, what it holds, and what is desired of it, for the
// crash tests.
type scenario struct {
	name    string
	gpus    []sim.GPUConfig
	prepare func(g *rig) (desired []partition.Desired, protected map[string]map[int]mig.Instance)
	// check verifies the converged host; nil: exactly the desired layouts.
	check func(g *rig, desired []partition.Desired, rep partition.Report)
}

func crashScenarios() []scenario {
	i3g0, i3g4 := inst(mig.Profile3g, 0, 4), inst(mig.Profile3g, 4, 4)
	i1g := func(s int) mig.Instance { return inst(mig.Profile1g, s, 1) }
	return []scenario{
		{
			name: "layout change around a lease, mig enable with a reset, mig disable",
			gpus: []sim.GPUConfig{{Model: "H200", MIGEnabled: true}, {Model: "H200"}, {Model: "H200", MIGEnabled: true}},
			prepare: func(g *rig) ([]partition.Desired, map[string]map[int]mig.Instance) {
				a, b, c := g.uuids[0], g.uuids[1], g.uuids[2]
				g.seed(a, false, i3g0, i1g(4), i1g(5), i1g(6))
				g.seed(c, false, inst(mig.Profile7g, 0, 8))
				protected := map[string]map[int]mig.Instance{a: {g.lease(a, i3g0, 7): i3g0}}
				return []partition.Desired{
					{GPUUUID: a, MIGEnabled: true, Instances: []mig.Instance{i3g0, inst(mig.Profile2g, 4, 2), inst(mig.Profile1gDouble, 6, 2)}},
					{GPUUUID: b, MIGEnabled: true, Instances: []mig.Instance{inst(mig.Profile4g, 0, 4), inst(mig.Profile2g, 4, 2), i1g(6)}},
					{GPUUUID: c},
				}, protected
			},
		},
		{
			name: "a process in the way: the apply is rolled back",
			gpus: []sim.GPUConfig{{Model: "H200", MIGEnabled: true}},
			prepare: func(g *rig) ([]partition.Desired, map[string]map[int]mig.Instance) {
				a := g.uuids[0]
				g.seed(a, false, i1g(0), i1g(1), i1g(2), i3g4)
				g.attach(a, i1g(2), 9)
				return []partition.Desired{{GPUUUID: a, MIGEnabled: true, Instances: []mig.Instance{i3g0, i3g4}}}, nil
			},
			check: func(g *rig, _ []partition.Desired, rep partition.Report) {
				// The instance the process holds, and the desired one,
				// stay. A kill before the process was found may have
				// completed destroys the apply had begun (an intended
				// destroy is completed), never more.
				a := g.uuids[0]
				got := g.layout(a)
				if s, ok := got[i1g(2)]; !ok || s.cis != 1 {
					g.t.Errorf("the held instance is %+v (present %t), want it with its compute instance", s, ok)
				}
				if s, ok := got[i3g4]; !ok || s.cis != 1 {
					g.t.Errorf("the desired 3g at 4 is %+v (present %t)", s, ok)
				}
				for in, s := range got {
					if !slices.Contains([]mig.Instance{i1g(0), i1g(1), i1g(2), i3g4}, in) || s.cis != 1 {
						g.t.Errorf("gpu holds %v %+v, not one of the original instances with its compute instance", in, s)
					}
				}
				if gr, _ := rep.GPU(a); len(gr.Conflicts) != 1 || gr.Conflicts[0].Reason != partition.ConflictInUse {
					g.t.Errorf("conflicts %+v, want the process's", gr.Conflicts)
				}
			},
		},
	}
}

func (sc scenario) converged(g *rig, desired []partition.Desired, rep partition.Report) {
	g.t.Helper()
	if sc.check != nil {
		sc.check(g, desired, rep)
		return
	}
	for _, d := range desired {
		if d.MIGEnabled {
			g.requireLayout(d.GPUUUID, d.Instances)
		} else {
			g.requireLayout(d.GPUUUID, nil)
		}
		if m := g.mode(d.GPUUUID); m.Current != d.MIGEnabled || m.Pending != d.MIGEnabled {
			g.t.Errorf("gpu %s mig mode %+v, want %t", d.GPUUUID, m, d.MIGEnabled)
		}
	}
	if c := rep.Conflicts(); len(c) > 0 {
		g.t.Errorf("conflicts %+v, want none", c)
	}
}

// requireNoOrphan fails if a GPU holds a GPU instance without its compute
// instance, or one that is neither in its layout before nor desired.
func (g *rig) requireNoOrphan(before map[string]map[mig.Instance]state, desired []partition.Desired) {
	g.t.Helper()
	for _, d := range desired {
		for in, s := range g.layout(d.GPUUUID) {
			if s.cis != 1 {
				g.t.Errorf("gpu %s: %v has %d compute instances after Recover", d.GPUUUID, in, s.cis)
			}
			_, was := before[d.GPUUUID][in]
			if !was && !slices.Contains(d.Instances, in) {
				g.t.Errorf("gpu %s: orphan %v after Recover: neither there before nor desired", d.GPUUUID, in)
			}
		}
	}
}

func TestReconcileConvergesAfterAKillAtEveryStep(t *testing.T) {
	for _, sc := range crashScenarios() {
		// A clean run counts the calls a full apply makes.
		clean := newRig(t, false, sc.gpus...)
		desired, _ := sc.prepare(clean)
		rep := clean.reconcile(desired...)
		sc.converged(clean, desired, rep)
		total := len(clean.rec.taken())
		if total == 0 {
			t.Fatalf("%s: the clean run made no call", sc.name)
		}
		for k := 1; k <= total; k++ {
			t.Run(fmt.Sprintf("%s/killed after call %d of %d", sc.name, k, total), func(t *testing.T) {
				g := newRig(t, false, sc.gpus...)
				desired, protected := sc.prepare(g)
				before := map[string]map[mig.Instance]state{}
				for _, u := range g.uuids {
					before[u] = g.layout(u)
				}
				g.rec.killAfter = k

				func() {
					defer func() {
						if p := recover(); p == nil {
							t.Fatalf("the agent was not killed at call %d", k)
						} else if _, ok := p.(killed); !ok {
							panic(p)
						}
					}()
					_, _ = g.r.Reconcile(t.Context(), desired, g.isProtected)
				}()
				g.restart()

				if _, err := g.r.Recover(t.Context(), g.isProtected); err != nil {
					t.Fatalf("Recover: %v", err)
				}
				if o, err := g.log.Outstanding(); err != nil || !o.Empty() {
					t.Errorf("journal after Recover = %+v, %v; want empty", o, err)
				}
				g.requireNoOrphan(before, desired)

				rep := g.reconcile(desired...)
				sc.converged(g, desired, rep)
				g.requireProtectedNeverTargeted(protected)

				n := len(g.rec.taken())
				g.reconcile(desired...)
				if again := g.rec.taken()[n:]; len(mutations(again)) != 0 {
					t.Errorf("Reconcile after convergence changed things: %v", again)
				}
			})
			t.Run(fmt.Sprintf("%s/call %d of %d failed", sc.name, k, total), func(t *testing.T) {
				g := newRig(t, false, sc.gpus...)
				desired, protected := sc.prepare(g)
				g.rec.failAt = k

				_, err := g.r.Reconcile(t.Context(), desired, g.isProtected)
				if !errors.Is(err, errInjected) {
					t.Errorf("Reconcile = %v, want the injected failure", err)
				}
				g.rec.failAt = 0
				rep := g.reconcile(desired...)
				sc.converged(g, desired, rep)
				g.requireProtectedNeverTargeted(protected)
			})
		}
	}
}

// eightGPUs is the full-host change: 8 H200s, each with running leases
// (protected, a process attached) and other instances, and a desired state
// that changes everything else. Even GPUs list their leases in the desired
// layout, odd ones leave them out (still never touched).
func eightGPUs(g *rig) (layoutA, layoutB []partition.Desired, protected map[string]map[int]mig.Instance) {
	i3g0 := inst(mig.Profile3g, 0, 4)
	i1g := func(s int) mig.Instance { return inst(mig.Profile1g, s, 1) }
	protected = map[string]map[int]mig.Instance{}
	for i, u := range g.uuids {
		leases := []mig.Instance{i3g0}
		a := []mig.Instance{i1g(4), i1g(5)}
		b := []mig.Instance{inst(mig.Profile2g, 4, 2)}
		if i%2 == 1 {
			leases = append(leases, i1g(6))
		} else {
			a = append(a, i1g(6))
			b = append(b, inst(mig.Profile1gDouble, 6, 2))
		}
		g.seed(u, false, leases...)
		g.seed(u, false, a...)
		protected[u] = map[int]mig.Instance{}
		for j, in := range leases {
			protected[u][g.lease(u, in, 1000+10*i+j)] = in
		}
		if i%2 == 0 {
			a = append(a, leases...)
			b = append(b, leases...)
		}
		layoutA = append(layoutA, partition.Desired{GPUUUID: u, MIGEnabled: true, Instances: a})
		layoutB = append(layoutB, partition.Desired{GPUUUID: u, MIGEnabled: true, Instances: b})
	}
	return layoutA, layoutB, protected
}

func TestReconcile8GPUsNeverTouchesRunningInstances(t *testing.T) {
	g := newRig(t, true, h200s(8, true)...)
	_, layoutB, protected := eightGPUs(g)

	start := time.Now()
	rep := g.reconcile(layoutB...)
	elapsed := time.Since(start)

	t.Logf("reconciled a full 8-gpu change in %v (report: %v)", elapsed, rep.Elapsed)
	g.requireProtectedNeverTargeted(protected)
	calls := g.rec.taken()
	touched := 0
	for _, c := range calls {
		if _, ok := protected[c.GPU][c.GIID]; ok && c.Op != "CreateGPUInstance" {
			touched++
		}
	}
	if touched != 0 {
		t.Fatalf("%d calls touched running instances", touched)
	}
	for i, d := range layoutB {
		final := slices.Clone(d.Instances)
		if i%2 == 1 {
			for _, in := range protected[d.GPUUUID] {
				final = append(final, in)
			}
		}
		g.requireLayout(d.GPUUUID, final)
		gr, _ := rep.GPU(d.GPUUUID)
		if len(gr.Untouched) != len(protected[d.GPUUUID]) || len(gr.Conflicts) != 0 || len(gr.Created) == 0 || len(gr.Destroyed) == 0 {
			t.Errorf("gpu %d report %+v: want every lease untouched, the rest changed, no conflict", i, gr)
		}
	}
	// 8 GPUs x (2 or 3 destroyed, 1 or 2 created), each a GPU and a
	// compute instance call.
	if got, want := len(mutations(calls)), 4*(3*2+2*2)+4*(2*2+1*2); got != want {
		t.Errorf("%d mutating calls, want %d", got, want)
	}
	n := len(calls)
	g.reconcile(layoutB...)
	if again := g.rec.taken()[n:]; len(again) != 0 {
		t.Errorf("second Reconcile made %d calls", len(again))
	}
}

// BenchmarkReconcile8GPUs times a full 8-GPU change with running leases
// left in place: each iteration moves every GPU from layout A to layout B
// or back, with the intent journal synced to disk for every call.
func BenchmarkReconcile8GPUs(b *testing.B) {
	// The driver keeps its state in memory (no state file to write), so
	// the figure is the reconciler's: diffing, planning, the synced intent
	// journal and the calls.
	g := newMemRig(b, true, h200s(8, true)...)
	layoutA, layoutB, protected := eightGPUs(g)
	layouts := [2][]partition.Desired{layoutB, layoutA}
	i := 0
	for b.Loop() {
		rep, err := g.r.Reconcile(b.Context(), layouts[i%2], g.isProtected)
		if err != nil || len(rep.Conflicts()) > 0 {
			b.Fatalf("Reconcile: %v, conflicts %+v", err, rep.Conflicts())
		}
		i++
	}
	calls := g.rec.taken()
	for _, c := range calls {
		if _, ok := protected[c.GPU][c.GIID]; ok && c.Op != "CreateGPUInstance" {
			b.Fatalf("call %+v touched a running instance", c)
		}
	}
	b.ReportMetric(float64(len(calls))/float64(i), "nvml-calls/op")
}
