package fleet_test

import (
	"context"
	"fmt"
	"maps"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/controlplane/fleet"
	"github.com/gpuaas/gpuaas/controlplane/lease"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// board is the presence keys of a replica set (etcd's, in the daemon).
type board struct {
	mu     sync.Mutex
	held   map[string]string // node -> replica
	leader string
}

// member is one replica's view of the board (fleet.Presence).
type member struct {
	b  *board
	id string
}

func (m member) Claim(_ context.Context, node string) error {
	m.b.mu.Lock()
	defer m.b.mu.Unlock()
	m.b.held[node] = m.id
	return nil
}

func (m member) Release(_ context.Context, node string) error {
	m.b.mu.Lock()
	defer m.b.mu.Unlock()
	if m.b.held[node] == m.id {
		delete(m.b.held, node)
	}
	return nil
}

func (m member) Present(context.Context) (map[string]string, error) {
	m.b.mu.Lock()
	defer m.b.mu.Unlock()
	return maps.Clone(m.b.held), nil
}

func (m member) IsLeader() bool {
	m.b.mu.Lock()
	defer m.b.mu.Unlock()
	return m.b.leader == m.id
}

func (b *board) lead(id string) {
	b.mu.Lock()
	b.leader = id
	b.mu.Unlock()
}

// replicas is two planes (registry + lease service) on one store and one
// clock, each a replica on one board; "a" leads.
func replicas(t *testing.T) (a, b *plane, bd *board) {
	st := openStore(t)
	clk := &clock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	bd = &board{held: map[string]string{}, leader: "a"}
	a, b = newPlane(t, st, clk), newPlane(t, st, clk)
	a.reg.SetPresence(member{bd, "a"})
	b.reg.SetPresence(member{bd, "b"})
	return a, b, bd
}

func sweep(t *testing.T, p *plane) []string {
	t.Helper()
	down, err := p.reg.Sweep(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return down
}

// A replica places leases on nodes another replica holds, and stops when
// that replica cordons them.
func TestReplicaPlacesOnNodesAnotherReplicaHolds(t *testing.T) {
	ctx := context.Background()
	a, b, bd := replicas(t)
	connect(t, a.reg, "node-a", peerA, "v1", inventory("GPU-a0"))
	connect(t, b.reg, "node-b", "spiffe://gpuaas.test/gpuaas/agent/node-b", "v1", inventory("GPU-b0"))
	if bd.held["node-a"] != "a" || bd.held["node-b"] != "b" {
		t.Fatalf("presence %v, want node-a on a, node-b on b", bd.held)
	}
	if got := connectedIDs(b.reg); len(got) != 1 {
		t.Fatalf("before a sweep b places on %v, want only its own node", got)
	}
	sweep(t, b)
	got := connectedIDs(b.reg)
	if len(got) != 2 || len(got["node-a"].GPUs) != 1 || got["node-a"].GPUs[0].GetUuid() != "GPU-a0" {
		t.Fatalf("b places on %v, want node-a (from the store) and node-b", got)
	}
	l := b.create(t, "k1", "node-a")
	if l.GetPhase() != leasev1.Phase_PHASE_SCHEDULED || l.GetPlacement().GetGpuUuid() != "GPU-a0" {
		t.Fatalf("lease made on b for node-a: %s on %v", l.GetPhase(), l.GetPlacement())
	}
	// Replica a cordons its node; b sees it at its next refresh.
	if err := a.reg.Cordon(ctx, operator, "node-a", true, "maintenance"); err != nil {
		t.Fatal(err)
	}
	a.clk.Add(2 * time.Second)
	sweep(t, b)
	if got := connectedIDs(b.reg); len(got) != 1 || got["node-b"].ID == "" {
		t.Fatalf("after a cordoned node-a, b places on %v", got)
	}
	nodes, err := b.reg.Nodes(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		if !n.GetConnected() {
			t.Errorf("b shows %s not connected", n.GetId())
		}
	}
}

// A node that leaves a replica is timed by the leader, not by the replica
// it left: it is declared down only if no replica holds it for TTL +
// grace, and not if it moved to another replica.
func TestLeaderDeclaresNodesNoReplicaHoldsDown(t *testing.T) {
	ctx := context.Background()
	a, b, bd := replicas(t)
	sb := connect(t, b.reg, "node-b", "spiffe://gpuaas.test/gpuaas/agent/node-b", "v1", inventory("GPU-b0"))
	sc := connect(t, b.reg, "node-c", "spiffe://gpuaas.test/gpuaas/agent/node-c", "v1", inventory("GPU-c0"))
	onB := b.create(t, "k1", "node-b")
	sweep(t, a) // the leader starts watching
	// node-c moves from b to a; node-b leaves b and comes back nowhere.
	b.reg.Disconnect(ctx, sc)
	sc = connect(t, a.reg, "node-c", "spiffe://gpuaas.test/gpuaas/agent/node-c", "v1", inventory("GPU-c0"))
	b.reg.Disconnect(ctx, sb)
	if _, ok := bd.held["node-b"]; ok {
		t.Fatal("node-b's presence outlived its session")
	}
	ttl := liveness.TTL(2) + liveness.Grace
	for elapsed := time.Duration(0); elapsed <= ttl; elapsed += time.Second {
		if down := append(sweep(t, a), sweep(t, b)...); len(down) != 0 {
			t.Fatalf("at +%v: down %v, want none before TTL+grace", elapsed, down)
		}
		a.clk.Add(time.Second)
		if err := a.reg.Seen(ctx, sc, nil); err != nil { // node-c beats
			t.Fatal(err)
		}
	}
	if down := sweep(t, b); len(down) != 0 {
		t.Fatalf("the replica node-b left declared %v down; that is the leader's call", down)
	}
	down := sweep(t, a)
	if fmt.Sprint(down) != "[node-b]" {
		t.Fatalf("leader declared %v down, want [node-b]", down)
	}
	st, err := a.reg.State(ctx, "node-b")
	if err != nil || st.State != fleet.StateDown || !strings.Contains(st.Reason, "no replica has held") {
		t.Fatalf("node-b state %+v, %v", st, err)
	}
	if got := b.phase(t, onB.GetId()); got.GetPhase() != leasev1.Phase_PHASE_LOST {
		t.Fatalf("lease on node-b is %s, want LOST", got.GetPhase())
	}
	if st, _ := a.reg.State(ctx, "node-c"); st.State == fleet.StateDown {
		t.Fatal("node-c, which moved to the leader, was declared down")
	}
}

// A node silent on the replica holding it is declared down by that
// replica, leader or not, and its presence goes.
func TestReplicaDeclaresItsSilentSessionDown(t *testing.T) {
	_, b, bd := replicas(t)
	connect(t, b.reg, "node-b", "spiffe://gpuaas.test/gpuaas/agent/node-b", "v1", inventory("GPU-b0"))
	b.clk.Add(liveness.TTL(1) + liveness.Grace + time.Second)
	if down := sweep(t, b); fmt.Sprint(down) != "[node-b]" {
		t.Fatalf("down %v, want [node-b]", down)
	}
	if _, ok := bd.held["node-b"]; ok {
		t.Fatal("the silent node is still present")
	}
}

// A new leader gives nodes no replica holds the failover TTL, counted
// from its takeover; a replica that stops leading stops declaring.
func TestNewLeaderGivesAbsentNodesTheFailoverTTL(t *testing.T) {
	ctx := context.Background()
	a, b, bd := replicas(t)
	sb := connect(t, b.reg, "node-b", "spiffe://gpuaas.test/gpuaas/agent/node-b", "v1", inventory("GPU-b0"))
	b.reg.Disconnect(ctx, sb) // node-b is known, up, and held by no one
	bd.lead("b")
	sweep(t, a) // a is not the leader
	sweep(t, b) // b takes over
	b.clk.Add(liveness.FailoverTTL - time.Second)
	if down := append(sweep(t, a), sweep(t, b)...); len(down) != 0 {
		t.Fatalf("down %v before the failover TTL", down)
	}
	b.clk.Add(2 * time.Second)
	if down := sweep(t, a); len(down) != 0 {
		t.Fatalf("a, not leading, declared %v down", down)
	}
	down := sweep(t, b)
	if fmt.Sprint(down) != "[node-b]" {
		t.Fatalf("down %v after the failover TTL, want [node-b]", down)
	}
	st, _ := b.reg.State(ctx, "node-b")
	if !strings.Contains(st.Reason, "leader change") {
		t.Fatalf("reason %q", st.Reason)
	}
}

var _ lease.Fleet = (*fleet.Registry)(nil)
