package fleet_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/pkg/errs"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// TestDrainCancelsWhatStillRunsAtTheDeadline: a drain cordons the node at
// once (no new placement) and, only when its deadline passes, cancels the
// leases still there as the control plane; it is audited.
func TestDrainCancelsWhatStillRunsAtTheDeadline(t *testing.T) {
	ctx := context.Background()
	clk := &clock{t: time.Now()}
	p := newPlane(t, openStore(t), clk)
	if _, err := p.reg.Connect(ctx, "node-a", peerA, "", "test", inventory("GPU-0")); err != nil {
		t.Fatal(err)
	}
	l := p.create(t, "running", "node-a")
	if l.GetPlacement().GetNode() != "node-a" {
		t.Fatalf("lease not placed: %v", l)
	}
	if err := p.reg.Drain(ctx, operator, "node-a", "maintenance", 10*time.Minute); err != nil {
		t.Fatal(err)
	}
	if n := len(p.reg.ConnectedNodes()); n != 0 {
		t.Fatalf("a draining node takes leases (%d schedulable)", n)
	}
	if later := p.create(t, "later", "node-a"); later.GetPlacement() != nil {
		t.Fatalf("placed on a draining node: %v", later.GetPlacement())
	}
	if err := p.reg.SweepDrains(ctx); err != nil {
		t.Fatal(err)
	}
	if got := p.phase(t, l.GetId()); got.GetPhase() != leasev1.Phase_PHASE_SCHEDULED {
		t.Fatalf("before the deadline the lease is %v", got.GetPhase())
	}
	clk.Add(11 * time.Minute)
	if err := p.reg.SweepDrains(ctx); err != nil {
		t.Fatal(err)
	}
	got := p.phase(t, l.GetId())
	if got.GetPhase() != leasev1.Phase_PHASE_TERMINATING || !strings.Contains(got.GetReason(), "drained: maintenance") {
		t.Fatalf("after the deadline: %v %q", got.GetPhase(), got.GetReason())
	}
	st, err := p.reg.State(ctx, "node-a")
	if err != nil || !st.DrainDone || !st.Cordoned {
		t.Fatalf("node state %+v, %v", st, err)
	}
	es, err := audit.List(ctx, p.st, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]bool{"node.drain": false, "lease.cancel": false, "node.drained": false}
	for _, e := range es {
		if _, ok := want[e.Action]; ok {
			want[e.Action] = true
		}
	}
	for a, seen := range want {
		if !seen {
			t.Errorf("no %s audit entry", a)
		}
	}
	// A second sweep does nothing more; uncordoning ends the drain.
	if err := p.reg.SweepDrains(ctx); err != nil {
		t.Fatal(err)
	}
	if err := p.reg.Cordon(ctx, operator, "node-a", false, "done"); err != nil {
		t.Fatal(err)
	}
	if st, _ := p.reg.State(ctx, "node-a"); !st.DrainDeadline.IsZero() || st.Cordoned {
		t.Fatalf("after uncordon: %+v", st)
	}
	if err := p.reg.Drain(ctx, operator, "node-a", "", 8*24*time.Hour); !errors.Is(err, errs.ErrInvalidArgument) {
		t.Fatalf("a drain over the maximum: %v", err)
	}
	if err := p.reg.Drain(ctx, operator, "node-z", "", time.Minute); !errors.Is(err, errs.ErrNotFound) {
		t.Fatalf("a drain of an unknown node: %v", err)
	}
}

// TestCordonedGPUGetsNoNewLease: a cordoned GPU is left out of placement
// while the node's other GPUs take leases; uncordoned it takes them again.
func TestCordonedGPUGetsNoNewLease(t *testing.T) {
	ctx := context.Background()
	clk := &clock{t: time.Now()}
	p := newPlane(t, openStore(t), clk)
	if _, err := p.reg.Connect(ctx, "node-a", peerA, "", "test", inventory("GPU-0", "GPU-1")); err != nil {
		t.Fatal(err)
	}
	if err := p.reg.CordonGPU(ctx, operator, "node-a", "GPU-0", true, "xid 79"); err != nil {
		t.Fatal(err)
	}
	for i := range 7 {
		if l := p.create(t, "k"+string(rune('a'+i)), "node-a"); l.GetPlacement().GetGpuUuid() != "GPU-1" {
			t.Fatalf("lease %d placed on %q, want GPU-1", i, l.GetPlacement().GetGpuUuid())
		}
	}
	if l := p.create(t, "full", "node-a"); l.GetPlacement() != nil {
		t.Fatalf("placed on the cordoned GPU: %v", l.GetPlacement())
	}
	if err := p.reg.CordonGPU(ctx, operator, "node-a", "GPU-9", true, ""); !errors.Is(err, errs.ErrNotFound) {
		t.Fatalf("cordon of an unknown GPU: %v", err)
	}
	if err := p.reg.CordonGPU(ctx, operator, "node-a", "GPU-0", false, "reset"); err != nil {
		t.Fatal(err)
	}
	if l := p.create(t, "again", "node-a"); l.GetPlacement().GetGpuUuid() != "GPU-0" {
		t.Fatalf("after uncordon placed on %q, want GPU-0", l.GetPlacement().GetGpuUuid())
	}
	es, err := audit.List(ctx, p.st, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	var cordons, refused int
	for _, e := range es {
		if e.Resource == "node/node-a/gpu/GPU-0" {
			cordons++
		}
		if e.Resource == "node/node-a/gpu/GPU-9" && e.Outcome == "failure" {
			refused++
		}
	}
	if cordons != 2 || refused != 1 {
		t.Fatalf("gpu cordon entries %d (want 2), refused %d (want 1)", cordons, refused)
	}
}
