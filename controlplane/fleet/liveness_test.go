package fleet_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/fleet"
	"github.com/gpuaas/gpuaas/controlplane/lease"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/controlplane/store/storetest"
	"github.com/gpuaas/gpuaas/pkg/errs"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) Add(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }

var (
	operator = lease.Caller{ID: "spiffe://gpuaas.test/gpuaas/operator/alice"}
	liveness = fleet.Liveness{MinTTL: 10 * time.Second, MaxHeartbeatsPerSecond: 50, Grace: 5 * time.Second, FailoverTTL: time.Minute}
)

// plane is a fleet registry and a lease service wired as the daemon wires
// them, on one store and one fake clock.
type plane struct {
	st  store.Store
	clk *clock
	reg *fleet.Registry
	svc *lease.Service
}

func newPlane(t *testing.T, st store.Store, clk *clock) *plane {
	svc := lease.New(lease.Options{Store: st, Now: clk.Now})
	reg := fleet.NewRegistry(st, fleet.Options{Now: clk.Now, Liveness: liveness, Leases: svc})
	svc.SetFleet(reg)
	return &plane{st: st, clk: clk, reg: reg, svc: svc}
}

func (p *plane) create(t *testing.T, key, node string) *leasev1.Lease {
	t.Helper()
	r := &leasev1.CreateLeaseRequest{IdempotencyKey: key, Spec: &leasev1.LeaseSpec{
		Tenant:   "acme",
		Gpu:      &leasev1.GpuRequest{Kind: &leasev1.GpuRequest_MigProfile{MigProfile: "1g.18gb"}, Node: node},
		Workload: &leasev1.Workload{Image: "localhost/gpuaas/busybox:demo"},
		Duration: durationpb.New(time.Hour),
	}}
	l, err := p.svc.Create(context.Background(), operator, r)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func (p *plane) phase(t *testing.T, id string) *leasev1.Lease {
	t.Helper()
	l, err := p.svc.Get(context.Background(), operator, id)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func auditActions(t *testing.T, st store.Store) []string {
	t.Helper()
	es, err := audit.List(context.Background(), st, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range es {
		out = append(out, e.Action+" "+e.Resource)
	}
	return out
}

func TestHeartbeatTTLScalesWithFleetSize(t *testing.T) {
	for _, tc := range []struct {
		nodes int
		want  time.Duration
	}{
		{0, 10 * time.Second}, {1, 10 * time.Second}, {500, 10 * time.Second},
		{1000, 20 * time.Second}, {10000, 200 * time.Second},
	} {
		if got := liveness.TTL(tc.nodes); got != tc.want {
			t.Errorf("TTL(%d) = %v, want %v (max 50 heartbeats/s)", tc.nodes, got, tc.want)
		}
		// The fleet's heartbeat rate at the advertised interval (TTL/2)
		// is at most twice the cap.
		if rate := float64(tc.nodes) / (liveness.TTL(tc.nodes) / 2).Seconds(); tc.nodes >= 1000 && rate > 2*50+1e-9 {
			t.Errorf("%d nodes beat %.1f/s", tc.nodes, rate)
		}
	}
	if got := (fleet.Liveness{}).TTL(1); got != 10*time.Second {
		t.Errorf("default minimum TTL = %v", got)
	}
	clk := &clock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	r := fleet.NewRegistry(openStore(t), fleet.Options{Now: clk.Now, Liveness: fleet.Liveness{MinTTL: time.Second, MaxHeartbeatsPerSecond: 1}})
	for i := 0; i < 3; i++ {
		connect(t, r, fmt.Sprint("node-", i), peerA, "v1", inventory(fmt.Sprint("GPU-", i)))
	}
	if r.HeartbeatTTL() != 3*time.Second || r.HeartbeatInterval() != 1500*time.Millisecond {
		t.Fatalf("3 nodes at 1/s: TTL %v interval %v, want 3s and 1.5s", r.HeartbeatTTL(), r.HeartbeatInterval())
	}
}

func TestASilentNodeGoesDownAndItsLeasesAreLost(t *testing.T) {
	storetest.Each(t, testASilentNodeGoesDownAndItsLeasesAreLost)
}

func testASilentNodeGoesDownAndItsLeasesAreLost(t *testing.T) {
	ctx := context.Background()
	clk := &clock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	p := newPlane(t, storetest.OpenFor(t), clk)
	a := connect(t, p.reg, "node-a", peerA, "v1", inventory("GPU-a0"))
	b := connect(t, p.reg, "node-b", "spiffe://gpuaas.test/gpuaas/agent/node-b", "v1", inventory("GPU-b0"))
	running := p.create(t, "k1", "node-a")
	scheduled := p.create(t, "k2", "node-a")
	onB := p.create(t, "k3", "node-b")
	err := p.svc.Observe(ctx, lease.Caller{ID: peerA}, "node-a", &agentv1.ObservedState{Leases: []*agentv1.ObservedLease{
		{LeaseId: running.GetId(), Phase: leasev1.Phase_PHASE_RUNNING}}})
	if err != nil {
		t.Fatal(err)
	}
	lastSeenA := clk.Now()
	deadline := liveness.TTL(2) + liveness.Grace // 15s

	// node-b keeps beating; node-a falls silent. Right at TTL + grace
	// nothing is down yet.
	for elapsed := time.Duration(0); elapsed < deadline; elapsed += 5 * time.Second {
		clk.Add(5 * time.Second)
		if err := p.reg.Seen(ctx, b, nil); err != nil {
			t.Fatal(err)
		}
		if down, err := p.reg.Sweep(ctx); err != nil || len(down) != 0 {
			t.Fatalf("at +%v: down %v, %v; want none before TTL+grace", clk.Now().Sub(lastSeenA), down, err)
		}
	}
	clk.Add(time.Second)
	down, err := p.reg.Sweep(ctx)
	if err != nil || fmt.Sprint(down) != "[node-a]" {
		t.Fatalf("after TTL+grace: down %v, %v; want [node-a]", down, err)
	}
	detected := clk.Now().Sub(lastSeenA)
	if detected > deadline+time.Second {
		t.Fatalf("detected after %v, want within TTL+grace (%v) plus one sweep", detected, deadline)
	}
	t.Logf("dead node detected %v after its last heartbeat (TTL %v + grace %v)", detected, liveness.TTL(2), liveness.Grace)

	st, err := p.reg.State(ctx, "node-a")
	if err != nil || st.State != fleet.StateDown || !strings.Contains(st.Reason, "no heartbeat") {
		t.Fatalf("node-a state = %+v, %v", st, err)
	}
	for _, l := range []*leasev1.Lease{running, scheduled} {
		got := p.phase(t, l.GetId())
		h := got.GetHistory()
		if got.GetPhase() != leasev1.Phase_PHASE_LOST || h[len(h)-1].GetPhase() != leasev1.Phase_PHASE_LOST || !strings.Contains(h[len(h)-1].GetReason(), "no heartbeat") {
			t.Errorf("lease on the dead node: %v, last transition %v", got.GetPhase(), h[len(h)-1])
		}
	}
	if got := p.phase(t, onB.GetId()); got.GetPhase() != leasev1.Phase_PHASE_SCHEDULED {
		t.Errorf("lease on the live node: %v", got.GetPhase())
	}
	select {
	case <-a.Replaced:
	default:
		t.Error("the dead node's session was not ended")
	}
	if _, ok := connectedIDs(p.reg)["node-a"]; ok {
		t.Error("a down node is still offered to the scheduler")
	}
	// Not rescheduled: nothing new lands on node-b for node-a's leases.
	if ds, _ := p.svc.DesiredState(ctx, "node-b"); len(ds.GetLeases()) != 1 {
		t.Errorf("node-b runs %d leases, want its own 1", len(ds.GetLeases()))
	}
	actions := strings.Join(auditActions(t, p.st), "\n")
	for _, want := range []string{"node.down node/node-a", "lease.lost lease/" + running.GetId(), "lease.lost lease/" + scheduled.GetId()} {
		if !strings.Contains(actions, want) {
			t.Errorf("audit lacks %q:\n%s", want, actions)
		}
	}
	// A later sweep does not declare it down again.
	if again, _ := p.reg.Sweep(ctx); len(again) != 0 {
		t.Errorf("second sweep: %v", again)
	}

	// The agent comes back: up again, audited; its leases stay LOST until
	// it reports how they ended.
	connect(t, p.reg, "node-a", peerA, "v1", inventory("GPU-a0"))
	if st, _ := p.reg.State(ctx, "node-a"); st.State != fleet.StateUp {
		t.Fatalf("after reconnect: %+v", st)
	}
	if !strings.Contains(strings.Join(auditActions(t, p.st), "\n"), "node.up node/node-a") {
		t.Error("reconnect of a down node not audited")
	}
	if got := p.phase(t, running.GetId()); got.GetPhase() != leasev1.Phase_PHASE_LOST {
		t.Errorf("lost lease after reconnect: %v", got.GetPhase())
	}
}

func TestAfterARestartKnownNodesGetTheFailoverTTL(t *testing.T) {
	ctx := context.Background()
	clk := &clock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	st := openStore(t)
	before := newPlane(t, st, clk)
	connect(t, before.reg, "node-a", peerA, "v1", inventory("GPU-a0"))
	connect(t, before.reg, "node-b", "spiffe://gpuaas.test/gpuaas/agent/node-b", "v1", inventory("GPU-b0"))
	l := before.create(t, "k1", "node-a")

	// The control plane restarts ten minutes later; the agents have been
	// cut off meanwhile.
	clk.Add(10 * time.Minute)
	after := newPlane(t, st, clk)
	if down, err := after.reg.Sweep(ctx); err != nil || len(down) != 0 {
		t.Fatalf("first sweep after restart: %v, %v; want none (failover TTL)", down, err)
	}
	clk.Add(30 * time.Second)
	b := connect(t, after.reg, "node-b", "spiffe://gpuaas.test/gpuaas/agent/node-b", "v1", inventory("GPU-b0"))
	clk.Add(25 * time.Second) // 55s after the start: still within the minute
	after.reg.Seen(ctx, b, nil)
	if down, _ := after.reg.Sweep(ctx); len(down) != 0 {
		t.Fatalf("within the failover TTL: %v down", down)
	}
	clk.Add(6 * time.Second)
	after.reg.Seen(ctx, b, nil)
	down, err := after.reg.Sweep(ctx)
	if err != nil || fmt.Sprint(down) != "[node-a]" {
		t.Fatalf("after the failover TTL: %v, %v; want [node-a] (node-b reconnected)", down, err)
	}
	st2, _ := after.reg.State(ctx, "node-a")
	if !strings.Contains(st2.Reason, "did not reconnect") {
		t.Errorf("reason = %q", st2.Reason)
	}
	if got := after.phase(t, l.GetId()); got.GetPhase() != leasev1.Phase_PHASE_LOST {
		t.Errorf("lease on node-a = %v, want LOST", got.GetPhase())
	}
}

func TestACordonedNodeGetsNoNewLeases(t *testing.T) {
	storetest.Each(t, testACordonedNodeGetsNoNewLeases)
}

func testACordonedNodeGetsNoNewLeases(t *testing.T) {
	ctx := context.Background()
	clk := &clock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	st := storetest.OpenFor(t)
	p := newPlane(t, st, clk)
	connect(t, p.reg, "node-a", peerA, "v1", inventory("GPU-a0"))
	connect(t, p.reg, "node-b", "spiffe://gpuaas.test/gpuaas/agent/node-b", "v1", inventory("GPU-b0"))
	running := p.create(t, "k0", "node-a")

	if err := p.reg.Cordon(ctx, operator, "node-a", true, "maintenance: replace PSU"); err != nil {
		t.Fatal(err)
	}
	if _, ok := connectedIDs(p.reg)["node-a"]; ok {
		t.Fatal("a cordoned node is offered to the scheduler")
	}
	for i := 0; i < 3; i++ {
		if l := p.create(t, fmt.Sprint("k", i+1), ""); l.GetPlacement().GetNode() != "node-b" {
			t.Fatalf("lease placed on %q while node-a is cordoned", l.GetPlacement().GetNode())
		}
	}
	// Pinned to the cordoned node: it waits.
	if l := p.create(t, "pinned", "node-a"); l.GetPhase() != leasev1.Phase_PHASE_PENDING {
		t.Fatalf("lease pinned to a cordoned node: %v", l.GetPhase())
	}
	// Running leases stay.
	if got := p.phase(t, running.GetId()); got.GetPhase() != leasev1.Phase_PHASE_SCHEDULED {
		t.Fatalf("cordon touched a placed lease: %v", got.GetPhase())
	}
	s, _ := p.reg.State(ctx, "node-a")
	if !s.Cordoned || s.CordonReason != "maintenance: replace PSU" || s.CordonedBy != operator.ID {
		t.Fatalf("state = %+v", s)
	}
	if err := p.reg.Cordon(ctx, operator, "node-zz", true, ""); !errors.Is(err, errs.ErrNotFound) {
		t.Fatalf("cordon of an unknown node: %v", err)
	}
	// The cordon survives a control-plane restart.
	p2 := newPlane(t, st, clk)
	connect(t, p2.reg, "node-a", peerA, "v1", inventory("GPU-a0"))
	if _, ok := connectedIDs(p2.reg)["node-a"]; ok {
		t.Fatal("the cordon was forgotten across a restart")
	}
	if err := p2.reg.Cordon(ctx, operator, "node-a", false, "done"); err != nil {
		t.Fatal(err)
	}
	if _, ok := connectedIDs(p2.reg)["node-a"]; !ok {
		t.Fatal("an uncordoned node is not offered to the scheduler")
	}
	actions := strings.Join(auditActions(t, st), "\n")
	if !strings.Contains(actions, "node.cordon node/node-a") || !strings.Contains(actions, "node.uncordon node/node-a") {
		t.Fatalf("cordon not audited:\n%s", actions)
	}
}

// A node is timed by the heartbeat interval it was told: when the fleet
// shrinks (the TTL falls back to its minimum), a node still beating at
// the longer interval it was given is not declared down.
func TestANodeIsTimedByTheIntervalItWasTold(t *testing.T) {
	ctx := context.Background()
	clk := &clock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	live := fleet.Liveness{MinTTL: 10 * time.Second, MaxHeartbeatsPerSecond: 1, Grace: 5 * time.Second, FailoverTTL: time.Hour}
	r := fleet.NewRegistry(openStore(t), fleet.Options{Now: clk.Now, Liveness: live})
	var others []*fleet.Session
	for i := range 39 {
		others = append(others, connect(t, r, fmt.Sprint("node-", i), "spiffe://gpuaas.test/gpuaas/agent/"+fmt.Sprint("node-", i), "v1", inventory(fmt.Sprint("GPU-", i))))
	}
	a := connect(t, r, "node-a", peerA, "v1", inventory("GPU-a0"))
	// 40 nodes at 1/s: TTL 40s, interval 20s.
	if told := r.Advertise(a); told != 20*time.Second {
		t.Fatalf("advertised %v, want 20s", told)
	}
	for _, s := range others {
		r.Disconnect(ctx, s)
	}
	if r.HeartbeatTTL() != 10*time.Second {
		t.Fatalf("TTL %v after the fleet shrank, want 10s", r.HeartbeatTTL())
	}
	if err := r.Seen(ctx, a, nil); err != nil {
		t.Fatal(err)
	}
	// Silent for 30s: past TTL + grace (15s), within two told intervals
	// + grace (45s).
	clk.Add(30 * time.Second)
	down, err := r.Sweep(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range down {
		if n == "node-a" {
			t.Fatal("node-a, beating at the interval it was told, was declared down")
		}
	}
	clk.Add(16 * time.Second)
	down, err = r.Sweep(ctx)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, n := range down {
		found = found || n == "node-a"
	}
	if !found {
		t.Fatalf("node-a silent for two told intervals + grace: down %v", down)
	}
}
