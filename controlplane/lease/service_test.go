package lease

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/controlplane/store/storetest"
	"github.com/gpuaas/gpuaas/pkg/errs"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

// fakeFleet is an in-memory fleet: the nodes it lists are connected.
type fakeFleet struct {
	mu       sync.Mutex
	nodes    []NodeView
	notified []string
}

func (f *fakeFleet) ConnectedNodes() []NodeView {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]NodeView(nil), f.nodes...)
}

func (f *fakeFleet) Notify(n string) {
	f.mu.Lock()
	f.notified = append(f.notified, n)
	f.mu.Unlock()
}

func h200(node string, gpus int) NodeView {
	n := NodeView{ID: node}
	for i := 0; i < gpus; i++ {
		n.GPUs = append(n.GPUs, &nodev1.Gpu{Index: uint32(i), Uuid: fmt.Sprintf("GPU-%s-%d", node, i), Model: "NVIDIA H200", PciDeviceId: 0x2335, MigCapable: true, MigEnabled: true})
	}
	return n
}

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) Add(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }
func newClock() *clock               { return &clock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)} }

type fixture struct {
	svc   *Service
	st    store.Store
	fleet *fakeFleet
	clk   *clock
}

func newFixture(t testing.TB, nodes ...NodeView) *fixture {
	t.Helper()
	// The backend is the test's (storetest.Each): bbolt, or etcd.
	st := storetest.OpenFor(t)
	f := &fakeFleet{nodes: nodes}
	clk := newClock()
	return &fixture{svc: New(Options{Store: st, Fleet: f, Now: clk.Now}), st: st, fleet: f, clk: clk}
}

var operator = Caller{ID: "spiffe://gpuaas.test/gpuaas/operator/alice"}

func req(key, profile string) *leasev1.CreateLeaseRequest {
	return &leasev1.CreateLeaseRequest{IdempotencyKey: key, Spec: &leasev1.LeaseSpec{
		Tenant:   "acme",
		Gpu:      &leasev1.GpuRequest{Kind: &leasev1.GpuRequest_MigProfile{MigProfile: profile}},
		Workload: &leasev1.Workload{Image: "localhost/gpuaas/busybox:demo", Args: []string{"sleep", "60"}, Env: map[string]string{"TOKEN": "s3cret"}},
		Duration: durationpb.New(time.Minute),
	}}
}

func (f *fixture) counts(t testing.TB) (leases, entries int) {
	t.Helper()
	f.st.View(context.Background(), func(tx store.Tx) error {
		tx.Scan(store.BucketLeases, "", false, func(string, []byte) error { leases++; return nil })
		// Entries are the %020d keys; the audit package keeps its tree
		// nodes in the same bucket.
		tx.Scan(store.BucketAudit, "0", false, func(string, []byte) error { entries++; return nil })
		return nil
	})
	return
}

func TestCreatePlacesAndAudits(t *testing.T) { storetest.Each(t, testCreatePlacesAndAudits) }

func testCreatePlacesAndAudits(t *testing.T) {
	f := newFixture(t, h200("node-a", 2))
	l, err := f.svc.Create(context.Background(), operator, req("k1", "3g.71gb"))
	if err != nil {
		t.Fatal(err)
	}
	if l.GetPhase() != leasev1.Phase_PHASE_SCHEDULED {
		t.Fatalf("phase = %v", l.GetPhase())
	}
	p := l.GetPlacement()
	if p.GetNode() != "node-a" || p.GetGpuUuid() != "GPU-node-a-0" || p.GetSize() != 4 || p.GetProfileId() != 9 {
		t.Fatalf("placement = %v", p)
	}
	if !l.GetNotAfter().AsTime().Equal(f.clk.Now().Add(time.Minute)) {
		t.Fatalf("not_after = %v", l.GetNotAfter().AsTime())
	}
	if len(l.GetHistory()) != 2 {
		t.Fatalf("history = %v", l.GetHistory())
	}
	if n, e := f.counts(t); n != 1 || e != 1 {
		t.Fatalf("leases=%d audit=%d, want 1 and 1", n, e)
	}
	if fmt.Sprint(f.fleet.notified) != "[node-a]" {
		t.Fatalf("notified %v", f.fleet.notified)
	}
	es, _ := audit.List(context.Background(), f.st, 0, 0)
	if es[0].Action != "lease.create" || es[0].Actor != operator.ID || es[0].Tenant != "acme" {
		t.Fatalf("audit entry = %+v", es[0])
	}
	for k, v := range es[0].Details {
		if strings.Contains(v, "s3cret") {
			t.Fatalf("secret env value in audit detail %s", k)
		}
	}
}

func TestCreateRejectsBadInputAndChangesNothing(t *testing.T) {
	storetest.Each(t, testCreateRejectsBadInputAndChangesNothing)
}

func testCreateRejectsBadInputAndChangesNothing(t *testing.T) {
	cases := []struct {
		name  string
		mut   func(*leasev1.CreateLeaseRequest)
		field string
	}{
		{"unknown profile", func(r *leasev1.CreateLeaseRequest) {
			r.Spec.Gpu.Kind = &leasev1.GpuRequest_MigProfile{MigProfile: "9g.999gb"}
		}, "spec.gpu.mig_profile"},
		{"no gpu", func(r *leasev1.CreateLeaseRequest) { r.Spec.Gpu = nil }, "spec.gpu"},
		{"empty image", func(r *leasev1.CreateLeaseRequest) { r.Spec.Workload.Image = "" }, "spec.workload.image"},
		{"image with space", func(r *leasev1.CreateLeaseRequest) { r.Spec.Workload.Image = "a b" }, "spec.workload.image"},
		{"negative duration", func(r *leasev1.CreateLeaseRequest) { r.Spec.Duration = durationpb.New(-time.Second) }, "spec.duration"},
		{"no duration", func(r *leasev1.CreateLeaseRequest) { r.Spec.Duration = nil }, "spec.duration"},
		{"too long", func(r *leasev1.CreateLeaseRequest) { r.Spec.Duration = durationpb.New(31 * 24 * time.Hour) }, "spec.duration"},
		{"oversized env value", func(r *leasev1.CreateLeaseRequest) { r.Spec.Workload.Env["BIG"] = strings.Repeat("x", MaxEnvValue+1) }, "spec.workload.env"},
		{"oversized env total", func(r *leasev1.CreateLeaseRequest) {
			for i := 0; i < 3; i++ {
				r.Spec.Workload.Env[fmt.Sprintf("V%d", i)] = strings.Repeat("x", MaxEnvValue-10)
			}
		}, "spec.workload.env"},
		{"too many env", func(r *leasev1.CreateLeaseRequest) {
			for i := 0; i <= MaxEnv; i++ {
				r.Spec.Workload.Env[fmt.Sprintf("V%d", i)] = "1"
			}
		}, "spec.workload.env"},
		{"bad env name", func(r *leasev1.CreateLeaseRequest) { r.Spec.Workload.Env["1BAD"] = "x" }, "spec.workload.env"},
		{"reserved env", func(r *leasev1.CreateLeaseRequest) { r.Spec.Workload.Env["NVIDIA_VISIBLE_DEVICES"] = "all" }, "spec.workload.env"},
		{"sealed-looking env value", func(r *leasev1.CreateLeaseRequest) { r.Spec.Workload.Env["TOKEN"] = "sealed:v1:k1:AAAA" }, "spec.workload.env"},
		{"bad tenant", func(r *leasev1.CreateLeaseRequest) { r.Spec.Tenant = "Acme Corp" }, "spec.tenant"},
		{"no key", func(r *leasev1.CreateLeaseRequest) { r.IdempotencyKey = "" }, "idempotency_key"},
		{"long key", func(r *leasev1.CreateLeaseRequest) { r.IdempotencyKey = strings.Repeat("k", 129) }, "idempotency_key"},
		{"negative memory", func(r *leasev1.CreateLeaseRequest) { r.Spec.Workload.Resources = &leasev1.Resources{MemoryBytes: -1} }, "spec.workload.resources.memory_bytes"},
		{"bad metadata", func(r *leasev1.CreateLeaseRequest) { r.Spec.Metadata = map[string]string{"BAD KEY": "x"} }, "spec.metadata"},
		{"zero whole gpus", func(r *leasev1.CreateLeaseRequest) { r.Spec.Gpu.Kind = &leasev1.GpuRequest_WholeGpus{WholeGpus: 0} }, "spec.gpu.whole_gpus"},
		{"bad egress cidr", func(r *leasev1.CreateLeaseRequest) { r.Spec.Workload.EgressAllow = []string{"10.0.0.0/33"} }, "spec.workload.egress_allow"},
		{"non-canonical egress cidr", func(r *leasev1.CreateLeaseRequest) { r.Spec.Workload.EgressAllow = []string{"10.1.2.3/8"} }, "spec.workload.egress_allow"},
		{"egress to metadata", func(r *leasev1.CreateLeaseRequest) { r.Spec.Workload.EgressAllow = []string{"169.254.169.254/32"} }, "spec.workload.egress_allow"},
		{"egress to v6 metadata", func(r *leasev1.CreateLeaseRequest) { r.Spec.Workload.EgressAllow = []string{"fd00:ec2::254/128"} }, "spec.workload.egress_allow"},
		{"nul in arg", func(r *leasev1.CreateLeaseRequest) { r.Spec.Workload.Args = []string{"a\x00b"} }, "spec.workload.args"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t, h200("node-a", 1))
			r := req("k", "1g.18gb")
			tc.mut(r)
			_, err := f.svc.Create(context.Background(), operator, r)
			if !errors.Is(err, errs.ErrInvalidArgument) || errs.FieldOf(err) != tc.field {
				t.Fatalf("err = %v (field %q), want InvalidArgument on %s", err, errs.FieldOf(err), tc.field)
			}
			if strings.Contains(err.Error(), "xxxxxxxx") {
				t.Fatal("error echoes an env value")
			}
			if n, e := f.counts(t); n != 0 || e != 0 {
				t.Fatalf("bad input changed state: leases=%d audit=%d", n, e)
			}
		})
	}
}

func TestEgressAllowAcceptsBroadPrefixes(t *testing.T) {
	storetest.Each(t, testEgressAllowAcceptsBroadPrefixes)
}

func testEgressAllowAcceptsBroadPrefixes(t *testing.T) {
	f := newFixture(t, h200("node-a", 1))
	r := req("k", "1g.18gb")
	r.Spec.Workload.EgressAllow = []string{"0.0.0.0/0", "203.0.113.0/24", "2001:db8::/32"}
	if _, err := f.svc.Create(context.Background(), operator, r); err != nil {
		t.Fatal(err)
	}
}

func TestUnhealthyGPUGetsNoNewLeases(t *testing.T) {
	storetest.Each(t, testUnhealthyGPUGetsNoNewLeases)
}

func testUnhealthyGPUGetsNoNewLeases(t *testing.T) {
	n := h200("node-a", 2)
	n.GPUs[0].Unhealthy, n.GPUs[0].HealthReason = true, "xid 79: GPU has fallen off the bus"
	f := newFixture(t, n)
	l, err := f.svc.Create(context.Background(), operator, req("k", "7g.141gb"))
	if err != nil {
		t.Fatal(err)
	}
	if got := l.GetPlacement().GetGpuUuid(); got != "GPU-node-a-1" {
		t.Fatalf("placed on %q, want the healthy GPU-node-a-1", got)
	}
	// With the healthy GPU full, the next one waits instead of going to
	// the unhealthy GPU.
	l2, err := f.svc.Create(context.Background(), operator, req("k2", "7g.141gb"))
	if err != nil || l2.GetPhase() != leasev1.Phase_PHASE_PENDING {
		t.Fatalf("second lease: %v %v on %v", err, l2.GetPhase(), l2.GetPlacement())
	}
}

func TestIdempotencyKey(t *testing.T) { storetest.Each(t, testIdempotencyKey) }

func testIdempotencyKey(t *testing.T) {
	f := newFixture(t, h200("node-a", 1))
	ctx := context.Background()
	a, err := f.svc.Create(ctx, operator, req("same", "1g.18gb"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := f.svc.Create(ctx, operator, req("same", "1g.18gb"))
	if err != nil || b.GetId() != a.GetId() {
		t.Fatalf("retry: %v, id %s vs %s", err, b.GetId(), a.GetId())
	}
	_, err = f.svc.Create(ctx, operator, req("same", "2g.35gb"))
	if !errors.Is(err, errs.ErrAlreadyExists) || errs.FieldOf(err) != "idempotency_key" {
		t.Fatalf("different body: %v", err)
	}
	// Another caller may use the same key for its own request.
	other := Caller{ID: "spiffe://gpuaas.test/gpuaas/operator/bob"}
	c, err := f.svc.Create(ctx, other, req("same", "2g.35gb"))
	if err != nil || c.GetId() == a.GetId() {
		t.Fatalf("other caller: %v", err)
	}
	if n, e := f.counts(t); n != 2 || e != 2 {
		t.Fatalf("leases=%d audit=%d, want 2 and 2", n, e)
	}
}

func TestNoCapacityStaysPendingUntilANodeConnects(t *testing.T) {
	storetest.Each(t, testNoCapacityStaysPendingUntilANodeConnects)
}

func testNoCapacityStaysPendingUntilANodeConnects(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	l, err := f.svc.Create(ctx, operator, req("k", "7g.141gb"))
	if err != nil {
		t.Fatal(err)
	}
	if l.GetPhase() != leasev1.Phase_PHASE_PENDING {
		t.Fatalf("phase = %v", l.GetPhase())
	}
	f.fleet.mu.Lock()
	f.fleet.nodes = []NodeView{h200("node-b", 1)}
	f.fleet.mu.Unlock()
	if err := f.svc.Tick(ctx); err != nil {
		t.Fatal(err)
	}
	got, _ := f.svc.Get(ctx, operator, l.GetId())
	if got.GetPhase() != leasev1.Phase_PHASE_SCHEDULED || got.GetPlacement().GetNode() != "node-b" {
		t.Fatalf("after tick: %v on %v", got.GetPhase(), got.GetPlacement())
	}
}

func TestConcurrentCreatesNeverShareAPartition(t *testing.T) {
	storetest.Each(t, testConcurrentCreatesNeverShareAPartition)
}

func testConcurrentCreatesNeverShareAPartition(t *testing.T) {
	f := newFixture(t, h200("node-a", 1))
	ctx := context.Background()
	var wg sync.WaitGroup
	results := make(chan *leasev1.Lease, 9)
	for i := 0; i < 9; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l, err := f.svc.Create(ctx, operator, req(fmt.Sprint("k", i), "1g.18gb"))
			if err != nil {
				t.Error(err)
				return
			}
			results <- l
		}()
	}
	wg.Wait()
	close(results)
	starts := map[uint32]bool{}
	scheduled, pending := 0, 0
	for l := range results {
		switch l.GetPhase() {
		case leasev1.Phase_PHASE_SCHEDULED:
			scheduled++
			if starts[l.GetPlacement().GetStart()] {
				t.Fatalf("two leases at slot %d", l.GetPlacement().GetStart())
			}
			starts[l.GetPlacement().GetStart()] = true
		case leasev1.Phase_PHASE_PENDING:
			pending++
		}
	}
	if scheduled != 7 || pending != 2 {
		t.Fatalf("scheduled=%d pending=%d, want 7 and 2 (seven 1g slices)", scheduled, pending)
	}
}

func TestCancelAndDesiredState(t *testing.T) { storetest.Each(t, testCancelAndDesiredState) }

func testCancelAndDesiredState(t *testing.T) {
	f := newFixture(t, h200("node-a", 1))
	ctx := context.Background()
	l, _ := f.svc.Create(ctx, operator, req("k", "1g.18gb"))
	ds, _ := f.svc.DesiredState(ctx, "node-a")
	if len(ds.GetLeases()) != 1 || ds.GetLeases()[0].GetSpec().GetWorkload().GetEnv()["TOKEN"] != "s3cret" {
		t.Fatalf("desired state must carry the lease with its env: %v", ds)
	}
	c, err := f.svc.Cancel(ctx, operator, l.GetId(), "done")
	if err != nil || c.GetPhase() != leasev1.Phase_PHASE_TERMINATING || c.GetReason() != "cancelled: done" {
		t.Fatalf("cancel: %v %v %q", err, c.GetPhase(), c.GetReason())
	}
	ds2, _ := f.svc.DesiredState(ctx, "node-a")
	if len(ds2.GetLeases()) != 0 || ds2.GetGeneration() <= ds.GetGeneration() {
		t.Fatalf("desired after cancel: %d leases, gen %d -> %d", len(ds2.GetLeases()), ds.GetGeneration(), ds2.GetGeneration())
	}
	// The agent reports it ended.
	err = f.svc.Observe(ctx, Caller{ID: "spiffe://gpuaas.test/gpuaas/agent/node-a"}, "node-a", &agentv1.ObservedState{Leases: []*agentv1.ObservedLease{
		{LeaseId: l.GetId(), Phase: leasev1.Phase_PHASE_TERMINATED, Reason: "cancelled"}}})
	if err != nil {
		t.Fatal(err)
	}
	got, _ := f.svc.Get(ctx, operator, l.GetId())
	if got.GetPhase() != leasev1.Phase_PHASE_TERMINATED {
		t.Fatalf("phase = %v", got.GetPhase())
	}
	// Cancelling a terminal lease is a no-op, and so adds no audit entry.
	_, before := f.counts(t)
	if _, err := f.svc.Cancel(ctx, operator, l.GetId(), ""); err != nil {
		t.Fatal(err)
	}
	if _, after := f.counts(t); after != before {
		t.Fatalf("no-op cancel audited: %d -> %d", before, after)
	}
	if _, err := f.svc.Extend(ctx, operator, l.GetId(), time.Minute); !errors.Is(err, errs.ErrFailedPrecondition) {
		t.Fatalf("extend terminal lease: %v", err)
	}
}

func TestExpiryAndExtend(t *testing.T) { storetest.Each(t, testExpiryAndExtend) }

func testExpiryAndExtend(t *testing.T) {
	f := newFixture(t, h200("node-a", 1))
	ctx := context.Background()
	l, _ := f.svc.Create(ctx, operator, req("k", "1g.18gb"))
	if _, err := f.svc.Extend(ctx, operator, l.GetId(), 30*time.Second); err != nil {
		t.Fatal(err)
	}
	f.clk.Add(61 * time.Second)
	f.svc.Tick(ctx)
	if got, _ := f.svc.Get(ctx, operator, l.GetId()); got.GetPhase() != leasev1.Phase_PHASE_SCHEDULED {
		t.Fatalf("extended lease expired early: %v", got.GetPhase())
	}
	f.clk.Add(30 * time.Second)
	f.svc.Tick(ctx)
	got, _ := f.svc.Get(ctx, operator, l.GetId())
	if got.GetPhase() != leasev1.Phase_PHASE_TERMINATING || got.GetReason() != "expired" {
		t.Fatalf("phase = %v %q", got.GetPhase(), got.GetReason())
	}
	if _, err := f.svc.Extend(ctx, operator, l.GetId(), time.Minute); !errors.Is(err, errs.ErrFailedPrecondition) {
		t.Fatalf("extend expiring lease: %v", err)
	}
}

func TestObserveRefusesAnotherNodesLease(t *testing.T) {
	storetest.Each(t, testObserveRefusesAnotherNodesLease)
}

func testObserveRefusesAnotherNodesLease(t *testing.T) {
	f := newFixture(t, h200("node-a", 1))
	ctx := context.Background()
	l, _ := f.svc.Create(ctx, operator, req("k", "1g.18gb"))
	_, before := f.counts(t)
	err := f.svc.Observe(ctx, Caller{ID: "spiffe://gpuaas.test/gpuaas/agent/node-b"}, "node-b", &agentv1.ObservedState{Leases: []*agentv1.ObservedLease{
		{LeaseId: l.GetId(), Phase: leasev1.Phase_PHASE_FAILED}}})
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := f.svc.Get(ctx, operator, l.GetId()); got.GetPhase() != leasev1.Phase_PHASE_SCHEDULED {
		t.Fatalf("another node changed the lease: %v", got.GetPhase())
	}
	es, _ := audit.List(ctx, f.st, uint64(before), 0)
	if len(es) != 1 || es[0].Outcome != "denied" {
		t.Fatalf("denial not audited: %+v", es)
	}
}

func TestStateMachine(t *testing.T) {
	for _, tc := range []struct {
		from, to leasev1.Phase
		ok       bool
	}{
		{leasev1.Phase_PHASE_PENDING, leasev1.Phase_PHASE_SCHEDULED, true},
		{leasev1.Phase_PHASE_SCHEDULED, leasev1.Phase_PHASE_RUNNING, true},
		{leasev1.Phase_PHASE_RUNNING, leasev1.Phase_PHASE_TERMINATING, true},
		{leasev1.Phase_PHASE_TERMINATING, leasev1.Phase_PHASE_TERMINATED, true},
		{leasev1.Phase_PHASE_TERMINATED, leasev1.Phase_PHASE_RUNNING, false},
		{leasev1.Phase_PHASE_FAILED, leasev1.Phase_PHASE_TERMINATED, false},
		{leasev1.Phase_PHASE_TERMINATING, leasev1.Phase_PHASE_RUNNING, false},
		{leasev1.Phase_PHASE_RUNNING, leasev1.Phase_PHASE_PENDING, false},
		{leasev1.Phase_PHASE_PENDING, leasev1.Phase_PHASE_RUNNING, false},
	} {
		if got := CanTransition(tc.from, tc.to); got != tc.ok {
			t.Errorf("%v -> %v = %v, want %v", tc.from, tc.to, got, tc.ok)
		}
	}
}

func TestTenantScoping(t *testing.T) { storetest.Each(t, testTenantScoping) }

func testTenantScoping(t *testing.T) {
	f := newFixture(t, h200("node-a", 1))
	ctx := context.Background()
	l, _ := f.svc.Create(ctx, operator, req("k", "1g.18gb"))
	other := Caller{ID: "sub-1", Tenant: "globex"}
	if _, err := f.svc.Get(ctx, other, l.GetId()); !errors.Is(err, errs.ErrNotFound) {
		t.Fatalf("other tenant get: %v", err)
	}
	if _, err := f.svc.Cancel(ctx, other, l.GetId(), ""); !errors.Is(err, errs.ErrNotFound) {
		t.Fatalf("other tenant cancel: %v", err)
	}
	ls, _, err := f.svc.List(ctx, other, &leasev1.ListLeasesRequest{})
	if err != nil || len(ls) != 0 {
		t.Fatalf("other tenant list: %v %d", err, len(ls))
	}
	if _, err := f.svc.Create(ctx, other, req("k2", "1g.18gb")); !errors.Is(err, errs.ErrPermissionDenied) {
		t.Fatalf("create for another tenant: %v", err)
	}
}

func TestListPaginates(t *testing.T) { storetest.Each(t, testListPaginates) }

func testListPaginates(t *testing.T) {
	f := newFixture(t, h200("node-a", 1))
	ctx := context.Background()
	for i := 0; i < 5; i++ {
		f.clk.Add(time.Second)
		f.svc.Create(ctx, operator, req(fmt.Sprint(i), "1g.18gb"))
	}
	var seen []string
	r := &leasev1.ListLeasesRequest{PageSize: 2}
	for {
		ls, next, err := f.svc.List(ctx, operator, r)
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range ls {
			seen = append(seen, l.GetId())
		}
		if next == "" {
			break
		}
		r.PageToken = next
	}
	if len(seen) != 5 {
		t.Fatalf("saw %d leases", len(seen))
	}
	if _, _, err := f.svc.List(ctx, operator, &leasev1.ListLeasesRequest{PageToken: "garbage!"}); !errors.Is(err, errs.ErrInvalidArgument) {
		t.Fatalf("bad token: %v", err)
	}
}

func TestWatchStreamsChanges(t *testing.T) { storetest.Each(t, testWatchStreamsChanges) }

func testWatchStreamsChanges(t *testing.T) {
	f := newFixture(t, h200("node-a", 1))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	first, _ := f.svc.Create(ctx, operator, req("k0", "1g.18gb"))
	got := make(chan *leasev1.Lease, 10)
	done := make(chan error, 1)
	go func() {
		done <- f.svc.Watch(ctx, operator, "", 0, func(l *leasev1.Lease) error { got <- l; return nil })
	}()
	if l := <-got; l.GetId() != first.GetId() {
		t.Fatalf("snapshot sent %s", l.GetId())
	}
	second, _ := f.svc.Create(ctx, operator, req("k1", "1g.18gb"))
	select {
	case l := <-got:
		if l.GetId() != second.GetId() || l.GetRevision() <= first.GetRevision() {
			t.Fatalf("live change: %s rev %d", l.GetId(), l.GetRevision())
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no live change")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestLeaseSurvivesReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.db")
	st, _ := store.OpenBolt(path, store.BoltOptions{})
	svc := New(Options{Store: st, Fleet: &fakeFleet{nodes: []NodeView{h200("node-a", 1)}}})
	l, err := svc.Create(context.Background(), operator, req("k", "1g.18gb"))
	if err != nil {
		t.Fatal(err)
	}
	st.Close()
	st2, err := store.OpenBolt(path, store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer st2.Close()
	got, err := New(Options{Store: st2}).Get(context.Background(), operator, l.GetId())
	if err != nil || got.GetPlacement().GetStart() != l.GetPlacement().GetStart() {
		t.Fatalf("after reopen: %v %v", err, got)
	}
	if res, err := audit.Verify(context.Background(), st2); err != nil || res.Entries != 1 {
		t.Fatalf("audit after reopen: %v %+v", err, res)
	}
}
