package lease

import (
	"context"
	"fmt"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/controlplane/store/storetest"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

func (f *fixture) usage(t testing.TB) []UsageEntry {
	t.Helper()
	var out []UsageEntry
	if err := f.st.View(context.Background(), func(tx store.Tx) error {
		var err error
		out, err = Usage(tx, 0, 0)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestUsageLedger(t *testing.T) { storetest.Each(t, testUsageLedger) }

// testUsageLedger: a lease that ran gets one usage entry when it ends, with
// the agent's start and end times and GPU time weighted by its share of the
// GPU; it is an audit entry too; a lease that never started gets none; a
// report repeated after the end adds nothing.
func testUsageLedger(t *testing.T) {
	f := newFixture(t, h200("node-a", 1))
	ctx := context.Background()
	l, err := f.svc.Create(ctx, operator, req("u1", "3g.71gb"))
	if err != nil {
		t.Fatal(err)
	}
	never, err := f.svc.Create(ctx, operator, req("u2", "1g.18gb"))
	if err != nil {
		t.Fatal(err)
	}
	start := f.clk.Now().Add(-70 * time.Second)
	end := start.Add(70 * time.Second)
	running := &leasev1.LeaseStatus{MigUuid: "MIG-1", StartTime: timestamppb.New(start)}
	ended := &leasev1.LeaseStatus{MigUuid: "MIG-1", StartTime: timestamppb.New(start), EndTime: timestamppb.New(end), Exited: true}
	obs := func(id string, p leasev1.Phase, st *leasev1.LeaseStatus) {
		t.Helper()
		if err := f.svc.Observe(ctx, agentOf("node-a"), "node-a", &agentv1.ObservedState{Leases: []*agentv1.ObservedLease{{LeaseId: id, Phase: p, Status: st}}}); err != nil {
			t.Fatal(err)
		}
	}
	obs(l.GetId(), leasev1.Phase_PHASE_RUNNING, running)
	if u := f.usage(t); len(u) != 0 {
		t.Fatalf("usage while running: %+v", u)
	}
	obs(l.GetId(), leasev1.Phase_PHASE_TERMINATED, ended)
	obs(l.GetId(), leasev1.Phase_PHASE_TERMINATED, ended)
	if _, err := f.svc.Cancel(ctx, operator, never.GetId(), "not needed"); err != nil {
		t.Fatal(err)
	}
	u := f.usage(t)
	if len(u) != 1 {
		t.Fatalf("usage entries = %+v, want one", u)
	}
	e := u[0]
	if e.LeaseID != l.GetId() || e.Tenant != "acme" || e.Node != "node-a" || e.Profile != "3g.71gb" || e.EndPhase != "TERMINATED" ||
		!e.Start.Equal(start) || !e.End.Equal(end) || e.Millis != 70_000 || e.GPUMillis != 30_000 {
		t.Fatalf("usage entry = %+v (want 70 s, 3/7 of a GPU = 30 s)", e)
	}
	es, err := audit.List(ctx, f.st, e.AuditSeq-1, 1)
	if err != nil || len(es) != 1 || es[0].Action != ActionUsage || es[0].Details["gpu_ms"] != "30000" || es[0].Tenant != "acme" {
		t.Fatalf("audit record of the usage = %+v, %v", es, err)
	}
}

func TestUsageOfLostLeases(t *testing.T) { storetest.Each(t, testUsageOfLostLeases) }

// testUsageOfLostLeases: a node with more running leases than one sweep
// chunk is lost; every lease gets its usage entry up to the loss, within
// the store's transaction limits, and its later end adds none.
func testUsageOfLostLeases(t *testing.T) {
	f := newFixture(t, h200("node-a", 5))
	ctx := context.Background()
	start := f.clk.Now().Add(-time.Minute)
	var ids []string
	for i := range 30 {
		l, err := f.svc.Create(ctx, operator, req(fmt.Sprintf("lost-%d", i), "1g.18gb"))
		if err != nil {
			t.Fatal(err)
		}
		if l.GetPlacement() == nil {
			t.Fatalf("lease %d not placed", i)
		}
		ids = append(ids, l.GetId())
	}
	var obs []*agentv1.ObservedLease
	for _, id := range ids {
		obs = append(obs, &agentv1.ObservedLease{LeaseId: id, Phase: leasev1.Phase_PHASE_RUNNING, Status: &leasev1.LeaseStatus{StartTime: timestamppb.New(start)}})
	}
	if err := f.svc.Observe(ctx, agentOf("node-a"), "node-a", &agentv1.ObservedState{Leases: obs}); err != nil {
		t.Fatal(err)
	}
	lost, err := f.svc.NodeLost(ctx, "node-a", "missed heartbeats")
	if err != nil || len(lost) != 30 {
		t.Fatalf("lost %d, %v", len(lost), err)
	}
	u := f.usage(t)
	if len(u) != 30 {
		t.Fatalf("%d usage entries, want 30", len(u))
	}
	for _, e := range u {
		if e.EndPhase != "LOST" || e.Millis != time.Minute.Milliseconds() || e.GPUMillis != time.Minute.Milliseconds()/7 {
			t.Fatalf("usage of a lost lease = %+v", e)
		}
	}
	// The node comes back and reports the end: no second entry.
	if err := f.svc.Observe(ctx, agentOf("node-a"), "node-a", &agentv1.ObservedState{Leases: []*agentv1.ObservedLease{{LeaseId: ids[0], Phase: leasev1.Phase_PHASE_TERMINATED,
		Status: &leasev1.LeaseStatus{StartTime: timestamppb.New(start), EndTime: timestamppb.New(f.clk.Now())}}}}); err != nil {
		t.Fatal(err)
	}
	if u := f.usage(t); len(u) != 30 {
		t.Fatalf("%d usage entries after the lost lease ended, want 30", len(u))
	}
}
