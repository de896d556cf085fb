package lease

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/controlplane/store/storetest"
	"github.com/gpuaas/gpuaas/pkg/mig"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

func (f *fixture) checkIndex(t *testing.T, step string) {
	t.Helper()
	if err := f.st.View(context.Background(), CheckIndex); err != nil {
		t.Fatalf("after %s: %v", step, err)
	}
}

func agentOf(node string) Caller { return Caller{ID: "spiffe://gpuaas.test/gpuaas/agent/" + node} }

func TestAllocationIndexAgreesWithAFullScan(t *testing.T) {
	storetest.Each(t, testAllocationIndexAgreesWithAFullScan)
}

func testAllocationIndexAgreesWithAFullScan(t *testing.T) {
	f := newFixture(t, h200("node-a", 2), h200("node-b", 1))
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(7, 7))
	profiles := []string{"1g.18gb", "2g.35gb", "3g.71gb", "7g.141gb"}
	var ids []string
	for step := 0; step < 150; step++ {
		var what string
		switch op := rng.IntN(10); {
		case op < 4 || len(ids) == 0:
			what = "create"
			l, err := f.svc.Create(ctx, operator, req(fmt.Sprint("k", step), profiles[rng.IntN(len(profiles))]))
			if err != nil {
				t.Fatal(err)
			}
			ids = append(ids, l.GetId())
		case op < 6:
			what = "cancel"
			if _, err := f.svc.Cancel(ctx, operator, ids[rng.IntN(len(ids))], ""); err != nil {
				t.Fatal(err)
			}
		case op < 8:
			id := ids[rng.IntN(len(ids))]
			l, _ := f.svc.Get(ctx, operator, id)
			to := []leasev1.Phase{leasev1.Phase_PHASE_RUNNING, leasev1.Phase_PHASE_TERMINATED, leasev1.Phase_PHASE_FAILED}[rng.IntN(3)]
			what = "observe " + short(to)
			node := l.GetPlacement().GetNode()
			if node == "" {
				continue
			}
			err := f.svc.Observe(ctx, agentOf(node), node, &agentv1.ObservedState{Leases: []*agentv1.ObservedLease{{LeaseId: id, Phase: to}}})
			if err != nil {
				t.Fatal(err)
			}
		case op < 9:
			what = "tick"
			f.clk.Add(time.Duration(rng.IntN(40)) * time.Second)
			if err := f.svc.Tick(ctx); err != nil {
				t.Fatal(err)
			}
		default:
			what = "node lost"
			if _, err := f.svc.NodeLost(ctx, []string{"node-a", "node-b"}[rng.IntN(2)], "node down"); err != nil {
				t.Fatal(err)
			}
		}
		f.checkIndex(t, fmt.Sprintf("step %d (%s)", step, what))
	}
	// And placement through the index never doubled a partition.
	live, err := f.svc.LiveLeases(ctx)
	if err != nil {
		t.Fatal(err)
	}
	used := map[string]bool{}
	for _, l := range live {
		p := l.GetPlacement()
		for s := p.GetStart(); s < p.GetStart()+p.GetSize(); s++ {
			k := fmt.Sprint(p.GetGpuUuid(), "/", s)
			if used[k] {
				t.Fatalf("memory slot %s held by two live leases", k)
			}
			used[k] = true
		}
	}
}

func TestIndexIsBuiltForAStoreWrittenBeforeIt(t *testing.T) {
	storetest.Each(t, testIndexIsBuiltForAStoreWrittenBeforeIt)
}

func testIndexIsBuiltForAStoreWrittenBeforeIt(t *testing.T) {
	f := newFixture(t, h200("node-a", 1))
	ctx := context.Background()
	first, err := f.svc.Create(ctx, operator, req("k1", "4g.71gb"))
	if err != nil {
		t.Fatal(err)
	}
	// Drop the index, as a store from before it would be.
	err = f.st.Update(ctx, func(tx store.Tx) error {
		var keys []string
		tx.Scan(store.BucketAllocations, "", false, func(k string, _ []byte) error { keys = append(keys, k); return nil })
		for _, k := range keys {
			if err := tx.Delete(store.BucketAllocations, k); err != nil {
				return err
			}
		}
		return tx.Delete(store.BucketMeta, keyIndexBuilt)
	})
	if err != nil {
		t.Fatal(err)
	}
	// Reads work without it.
	if ds, err := f.svc.DesiredState(ctx, "node-a"); err != nil || len(ds.GetLeases()) != 1 {
		t.Fatalf("desired state without an index: %v, %v", ds, err)
	}
	// The next create builds it, and so does not place on the 4g lease's
	// slices.
	second, err := f.svc.Create(ctx, operator, req("k2", "4g.71gb"))
	if err != nil {
		t.Fatal(err)
	}
	if second.GetPhase() != leasev1.Phase_PHASE_PENDING {
		t.Fatalf("second 4g lease %v at %v; the first holds slots %d+%d", second.GetPhase(), second.GetPlacement(), first.GetPlacement().GetStart(), first.GetPlacement().GetSize())
	}
	f.checkIndex(t, "rebuild")
}

func TestNodeLostMarksItsLeasesLost(t *testing.T) { storetest.Each(t, testNodeLostMarksItsLeasesLost) }

func testNodeLostMarksItsLeasesLost(t *testing.T) {
	f := newFixture(t, h200("node-a", 1), h200("node-b", 1))
	ctx := context.Background()
	mk := func(key, node string) *leasev1.Lease {
		r := req(key, "1g.18gb")
		r.Spec.Gpu.Node = node
		l, err := f.svc.Create(ctx, operator, r)
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	scheduled, running, ending, done := mk("a1", "node-a"), mk("a2", "node-a"), mk("a3", "node-a"), mk("a4", "node-a")
	other := mk("b1", "node-b")
	obs := func(id string, p leasev1.Phase) {
		if err := f.svc.Observe(ctx, agentOf("node-a"), "node-a", &agentv1.ObservedState{Leases: []*agentv1.ObservedLease{{LeaseId: id, Phase: p}}}); err != nil {
			t.Fatal(err)
		}
	}
	obs(running.GetId(), leasev1.Phase_PHASE_RUNNING)
	obs(ending.GetId(), leasev1.Phase_PHASE_RUNNING)
	if _, err := f.svc.Cancel(ctx, operator, ending.GetId(), ""); err != nil {
		t.Fatal(err)
	}
	obs(done.GetId(), leasev1.Phase_PHASE_TERMINATED)
	_, before := f.counts(t)

	lost, err := f.svc.NodeLost(ctx, "node-a", "node node-a missed heartbeats for 30s")
	if err != nil {
		t.Fatal(err)
	}
	if len(lost) != 3 {
		t.Fatalf("%d leases lost, want 3 (scheduled, running, terminating)", len(lost))
	}
	for _, l := range []*leasev1.Lease{scheduled, running, ending} {
		got, _ := f.svc.Get(ctx, operator, l.GetId())
		h := got.GetHistory()
		if got.GetPhase() != leasev1.Phase_PHASE_LOST || !strings.Contains(got.GetReason(), "missed heartbeats") ||
			h[len(h)-1].GetPhase() != leasev1.Phase_PHASE_LOST || h[len(h)-1].GetReason() != got.GetReason() {
			t.Errorf("lease %s after node loss: %v %q, last transition %v", l.GetId(), got.GetPhase(), got.GetReason(), h[len(h)-1])
		}
	}
	for id, want := range map[string]leasev1.Phase{done.GetId(): leasev1.Phase_PHASE_TERMINATED, other.GetId(): leasev1.Phase_PHASE_SCHEDULED} {
		if got, _ := f.svc.Get(ctx, operator, id); got.GetPhase() != want {
			t.Errorf("lease %s = %v, want %v untouched", id, got.GetPhase(), want)
		}
	}
	es, err := audit.List(ctx, f.st, uint64(before), 0)
	if err != nil || len(es) != 3 {
		t.Fatalf("audit entries = %d, %v; want 3", len(es), err)
	}
	for _, e := range es {
		if e.Action != "lease.lost" || e.Actor != System.ID || e.Details["node"] != "node-a" {
			t.Errorf("audit entry %+v", e)
		}
	}
	// Not rescheduled: the node's partitions stay held and nothing runs
	// elsewhere on its behalf.
	if ds, _ := f.svc.DesiredState(ctx, "node-b"); len(ds.GetLeases()) != 1 {
		t.Errorf("node-b desired = %d leases, want only its own", len(ds.GetLeases()))
	}
	// A second sweep changes nothing.
	if again, err := f.svc.NodeLost(ctx, "node-a", "again"); err != nil || len(again) != 0 {
		t.Fatalf("second NodeLost: %d, %v", len(again), err)
	}
	// The node comes back and reports how the leases ended.
	obs(running.GetId(), leasev1.Phase_PHASE_TERMINATED)
	if got, _ := f.svc.Get(ctx, operator, running.GetId()); got.GetPhase() != leasev1.Phase_PHASE_TERMINATED {
		t.Fatalf("lost lease reported ended: %v", got.GetPhase())
	}
	f.checkIndex(t, "node lost")
}

func TestSweepsOverManyLeasesFitEtcdTransactions(t *testing.T) {
	storetest.Each(t, testSweepsOverManyLeasesFitEtcdTransactions)
}

func testSweepsOverManyLeasesFitEtcdTransactions(t *testing.T) {
	// 100 leases expire in one Tick and 56 are lost in one NodeLost: far
	// more than etcd's 128 operations in one transaction.
	var nodes []NodeView
	for i := 0; i < 3; i++ {
		nodes = append(nodes, h200(fmt.Sprint("node-", i), 8))
	}
	f := newFixture(t, nodes...)
	ctx := context.Background()
	for i := 0; i < 100; i++ {
		if _, err := f.svc.Create(ctx, operator, req(fmt.Sprint("k", i), "1g.18gb")); err != nil {
			t.Fatal(err)
		}
	}
	lost, err := f.svc.NodeLost(ctx, "node-0", "gone")
	if err != nil || len(lost) != 56 {
		t.Fatalf("NodeLost = %d, %v; want 56", len(lost), err)
	}
	f.clk.Add(2 * time.Minute)
	if err := f.svc.Tick(ctx); err != nil {
		t.Fatal(err)
	}
	ls, _, err := f.svc.List(ctx, operator, &leasev1.ListLeasesRequest{PageSize: 1000, Phases: []leasev1.Phase{leasev1.Phase_PHASE_TERMINATING}})
	if err != nil || len(ls) != 44 {
		t.Fatalf("terminating after expiry = %d, %v; want the 44 not lost", len(ls), err)
	}
	f.checkIndex(t, "sweeps")
}

// TestStateMachineEveryPair checks every (from, to) pair against the
// state machine written out in full.
func TestStateMachineEveryPair(t *testing.T) {
	const (
		U = leasev1.Phase_PHASE_UNSPECIFIED
		P = leasev1.Phase_PHASE_PENDING
		S = leasev1.Phase_PHASE_SCHEDULED
		V = leasev1.Phase_PHASE_PROVISIONING
		R = leasev1.Phase_PHASE_RUNNING
		G = leasev1.Phase_PHASE_TERMINATING
		T = leasev1.Phase_PHASE_TERMINATED
		F = leasev1.Phase_PHASE_FAILED
		L = leasev1.Phase_PHASE_LOST
	)
	allowed := map[leasev1.Phase]string{
		P: "STF", S: "VRGTFL", V: "RGTFL", R: "GTFL", G: "TFL", L: "TF",
	}
	letter := map[leasev1.Phase]string{U: "U", P: "P", S: "S", V: "V", R: "R", G: "G", T: "T", F: "F", L: "L"}
	all := []leasev1.Phase{U, P, S, V, R, G, T, F, L}
	for _, from := range all {
		for _, to := range all {
			want := strings.Contains(allowed[from], letter[to])
			if got := CanTransition(from, to); got != want {
				t.Errorf("%s -> %s = %v, want %v", short(from), short(to), got, want)
			}
		}
	}
}

// placeOverEveryGPU is Place without its deduplication of GPUs in the same
// state: the planner over every GPU of the fleet.
func placeOverEveryGPU(nodes []NodeView, held map[string][]mig.Instance, profile string) (string, error) {
	var states []mig.GPUState
	var ids []string
	sorted := slices.Clone(nodes)
	slices.SortFunc(sorted, func(a, b NodeView) int { return strings.Compare(a.ID, b.ID) })
	for _, n := range sorted {
		for _, g := range n.GPUs {
			model, _ := modelOf(g)
			states = append(states, mig.GPUState{ID: n.ID + "/" + g.GetUuid(), Model: model, Instances: instancesOn(g, held[g.GetUuid()]), Eligible: g.GetMigEnabled() && !g.GetUnhealthy()})
			ids = append(ids, g.GetUuid())
		}
	}
	d, err := mig.PlanAcross(states, mig.Request{ProfileName: profile})
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%s@%d+%d", ids[d.Index], d.Placement.Start, d.Placement.Size), nil
}

func TestPlaceDecidesAsThePlannerOverEveryGPU(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	profiles := []string{"1g.18gb", "1g.35gb", "2g.35gb", "3g.71gb", "4g.71gb", "7g.141gb"}
	for trial := 0; trial < 40; trial++ {
		var nodes []NodeView
		for i := 0; i < 1+rng.IntN(6); i++ {
			n := h200(fmt.Sprint("node-", rng.IntN(100)), 1+rng.IntN(8))
			if rng.IntN(5) == 0 {
				n.GPUs[0].Unhealthy = true
			}
			nodes = append(nodes, n)
		}
		held := map[string][]mig.Instance{}
		for step := 0; step < 60; step++ {
			profile := profiles[rng.IntN(len(profiles))]
			want, werr := placeOverEveryGPU(nodes, held, profile)
			p, err := Place(nodes, held, &leasev1.GpuRequest{Kind: &leasev1.GpuRequest_MigProfile{MigProfile: profile}})
			if (err == nil) != (werr == nil) {
				t.Fatalf("trial %d step %d %s: Place err %v, planner err %v", trial, step, profile, err, werr)
			}
			if err != nil {
				continue
			}
			got := fmt.Sprintf("%s@%d+%d", p.GetGpuUuid(), p.GetStart(), p.GetSize())
			if got != want {
				t.Fatalf("trial %d step %d %s: Place chose %s, the planner over every GPU %s", trial, step, profile, got, want)
			}
			held[p.GetGpuUuid()] = append(held[p.GetGpuUuid()], instanceOf(p))
		}
	}
}

// TestTwoReplicasOnEtcdNeverShareAPartition runs two lease services on one
// etcd prefix, as two control-plane replicas would, creating at once: the
// commit's compare on the allocation index token makes one of two
// conflicting placements rerun, so no partition is given twice.
func TestTwoReplicasOnEtcdNeverShareAPartition(t *testing.T) {
	e := storetest.SharedEtcd(t)
	a := storetest.OpenEtcdStore(t, e, store.EtcdOptions{})
	b := storetest.OpenEtcdStore(t, e, store.EtcdOptions{Prefix: a.Prefix()})
	fl := &fakeFleet{nodes: []NodeView{h200("node-a", 1)}}
	clk := newClock()
	replicas := []*Service{New(Options{Store: a, Fleet: fl, Now: clk.Now}), New(Options{Store: b, Fleet: fl, Now: clk.Now})}
	ctx := context.Background()
	const n = 16
	results := make(chan *leasev1.Lease, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l, err := replicas[i%2].Create(ctx, operator, req(fmt.Sprint("k", i), "1g.18gb"))
			if err != nil {
				t.Error(err)
				return
			}
			results <- l
		}()
	}
	wg.Wait()
	close(results)
	slots := map[uint32]string{}
	scheduled := 0
	for l := range results {
		if l.GetPhase() != leasev1.Phase_PHASE_SCHEDULED {
			continue
		}
		scheduled++
		if other, dup := slots[l.GetPlacement().GetStart()]; dup {
			t.Fatalf("slot %d given to %s and %s", l.GetPlacement().GetStart(), other, l.GetId())
		}
		slots[l.GetPlacement().GetStart()] = l.GetId()
	}
	if scheduled != 7 {
		t.Fatalf("%d scheduled, want the 7 1g slices of the one GPU", scheduled)
	}
	if err := a.View(ctx, CheckIndex); err != nil {
		t.Fatal(err)
	}
	f := &fixture{st: a}
	if leases, entries := f.counts(t); leases != n || entries != n {
		t.Fatalf("%d leases and %d audit entries, want %d each", leases, entries, n)
	}
}
