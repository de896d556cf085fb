package fleet_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/gpuaas/gpuaas/controlplane/fleet"
	"github.com/gpuaas/gpuaas/controlplane/lease"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/errs"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

func openStore(t testing.TB) *store.Bolt {
	t.Helper()
	st, err := store.OpenBolt(filepath.Join(t.TempDir(), "state.db"), store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

// h200 is one MIG-enabled H200 as an agent reports it.
func h200(uuid string) *nodev1.Gpu {
	return &nodev1.Gpu{Uuid: uuid, Model: "NVIDIA H200", PciDeviceId: 0x2335, MemoryMib: 143771, MigCapable: true, MigEnabled: true}
}

func inventory(uuids ...string) *nodev1.Inventory {
	inv := &nodev1.Inventory{DriverVersion: "550.90.07"}
	for i, u := range uuids {
		g := h200(u)
		g.Index = uint32(i)
		inv.Gpus = append(inv.Gpus, g)
	}
	return inv
}

const peerA = "spiffe://gpuaas.test/gpuaas/agent/node-a"

// storedNode reads the node record the registry persisted.
func storedNode(t *testing.T, st store.Store, id string) *nodev1.Node {
	t.Helper()
	n := &nodev1.Node{}
	err := st.View(context.Background(), func(tx store.Tx) error {
		raw, err := tx.Get(store.BucketNodes, id)
		if err != nil {
			return err
		}
		return proto.Unmarshal(raw, n)
	})
	if err != nil {
		t.Fatalf("stored node %s: %v", id, err)
	}
	return n
}

func connect(t *testing.T, r *fleet.Registry, node, peer, version string, inv *nodev1.Inventory) *fleet.Session {
	t.Helper()
	s, err := r.Connect(context.Background(), node, peer, "10.0.0.1:5000", version, inv)
	if err != nil {
		t.Fatalf("connect %s: %v", node, err)
	}
	return s
}

func connectedIDs(r *fleet.Registry) map[string]lease.NodeView {
	out := map[string]lease.NodeView{}
	for _, n := range r.ConnectedNodes() {
		out[n.ID] = n
	}
	return out
}

func pendingWakes(s *fleet.Session) int { return len(s.Wake) }

func TestConnectRegistersTheSessionAndPersistsTheNode(t *testing.T) {
	st := openStore(t)
	r := fleet.New(st, nil)
	inv := inventory("GPU-a0")
	s := connect(t, r, "node-a", peerA, "v1", inv)

	if s.Node != "node-a" || s.PeerID != peerA || s.AgentVersion != "v1" || s.ConnectedAt.IsZero() {
		t.Errorf("session = %+v", s)
	}
	got := connectedIDs(r)
	if len(got) != 1 || len(got["node-a"].GPUs) != 1 || !proto.Equal(got["node-a"].GPUs[0], inv.GetGpus()[0]) {
		t.Fatalf("ConnectedNodes = %v, want node-a with its GPU", got)
	}
	n := storedNode(t, st, "node-a")
	if n.GetId() != "node-a" || !proto.Equal(n.GetInventory(), inv) || n.GetLastSeen() == nil {
		t.Fatalf("persisted node = %v, want node-a with its inventory and last seen", n)
	}

	// A second registry on the same store (a restarted control plane)
	// knows the node, but not as connected.
	nodes, err := fleet.New(st, nil).Nodes(context.Background(), nil)
	if err != nil || len(nodes) != 1 || nodes[0].GetConnected() || nodes[0].GetSession() != nil || !proto.Equal(nodes[0].GetInventory(), inv) {
		t.Fatalf("after restart Nodes = %v, %v; want node-a, disconnected, with its last inventory", nodes, err)
	}
}

func TestConnectThatCannotPersistRegistersNothing(t *testing.T) {
	st := openStore(t)
	r := fleet.New(st, nil)
	st.Close()
	s, err := r.Connect(context.Background(), "node-a", peerA, "10.0.0.1:5000", "v1", inventory("GPU-a0"))
	if err == nil || s != nil {
		t.Fatalf("Connect on a closed store = %v, %v; want an error and no session", s, err)
	}
	if got := r.ConnectedNodes(); len(got) != 0 {
		t.Fatalf("ConnectedNodes = %v after a failed connect, want none", got)
	}
}

func TestASecondConnectReplacesTheFirstSession(t *testing.T) {
	ctx := context.Background()
	r := fleet.New(openStore(t), nil)
	first := connect(t, r, "node-a", peerA, "v1", inventory("GPU-a0"))
	second := connect(t, r, "node-a", peerA, "v2", inventory("GPU-a0", "GPU-a1"))

	select {
	case <-first.Replaced:
	default:
		t.Fatal("the first session's Replaced is still open after a newer session connected")
	}
	select {
	case <-second.Replaced:
		t.Fatal("the newer session's Replaced is closed")
	default:
	}

	// The replaced session ending must not take the new one with it.
	r.Disconnect(ctx, first)
	if got := connectedIDs(r); len(got["node-a"].GPUs) != 2 {
		t.Fatalf("after the old session disconnected ConnectedNodes = %v, want node-a with the new session's 2 GPUs", got)
	}
	n, err := r.Node(ctx, "node-a", nil)
	if err != nil || !n.GetConnected() || n.GetSession().GetAgentVersion() != "v2" {
		t.Fatalf("Node = %v, %v; want connected with the v2 session", n, err)
	}
	r.Notify("node-a")
	if pendingWakes(second) != 1 || pendingWakes(first) != 0 {
		t.Fatalf("Notify woke first=%d second=%d; want only the current session", pendingWakes(first), pendingWakes(second))
	}

	r.Disconnect(ctx, second)
	if got := r.ConnectedNodes(); len(got) != 0 {
		t.Fatalf("after the current session disconnected ConnectedNodes = %v, want none", got)
	}
}

func TestConcurrentConnectsLeaveExactlyOneCurrentSession(t *testing.T) {
	r := fleet.New(openStore(t), nil)
	const n = 16
	sessions := make([]*fleet.Session, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			s, err := r.Connect(context.Background(), "node-a", fmt.Sprintf("%s#%d", peerA, i), "10.0.0.1:5000", "v1", inventory("GPU-a0"))
			if err != nil {
				t.Error(err)
			}
			sessions[i] = s
		})
	}
	wg.Wait()
	node, err := r.Node(context.Background(), "node-a", nil)
	if err != nil {
		t.Fatal(err)
	}
	open := 0
	for _, s := range sessions {
		select {
		case <-s.Replaced:
		default:
			open++
			if s.PeerID != node.GetSession().GetPeerId() {
				t.Errorf("the session left open (%s) is not the node's current one (%s)", s.PeerID, node.GetSession().GetPeerId())
			}
		}
	}
	if open != 1 {
		t.Fatalf("%d sessions not replaced, want exactly 1", open)
	}
}

func TestNotifyCoalescesAndIgnoresUnknownNodes(t *testing.T) {
	ctx := context.Background()
	r := fleet.New(openStore(t), nil)
	a := connect(t, r, "node-a", peerA, "v1", inventory("GPU-a0"))
	b := connect(t, r, "node-b", "spiffe://gpuaas.test/gpuaas/agent/node-b", "v1", inventory("GPU-b0"))

	notified := make(chan struct{})
	go func() {
		defer close(notified)
		for range 100 {
			r.Notify("node-a")
		}
	}()
	select {
	case <-notified:
	case <-time.After(10 * time.Second):
		t.Fatal("Notify blocked on a session nobody is reading")
	}
	if pendingWakes(a) != 1 {
		t.Fatalf("100 notifies left %d pending wakes, want 1", pendingWakes(a))
	}
	if pendingWakes(b) != 0 {
		t.Fatalf("notifying node-a woke node-b")
	}
	<-a.Wake
	if pendingWakes(a) != 0 {
		t.Fatal("a wake is still pending after the one wake was taken")
	}

	r.Notify("node-unknown") // must neither block nor panic nor wake anyone
	r.Notify("")
	if pendingWakes(a) != 0 || pendingWakes(b) != 0 {
		t.Fatal("notifying an unknown node woke a connected one")
	}
	r.Disconnect(ctx, b)
	r.Notify("node-b")
	if pendingWakes(b) != 0 {
		t.Fatal("a disconnected session was woken")
	}
}

func TestConnectedNodesListsOnlyConnectedNodesWithTheirGPUs(t *testing.T) {
	ctx := context.Background()
	r := fleet.New(openStore(t), nil)
	connect(t, r, "node-a", peerA, "v1", inventory("GPU-a0", "GPU-a1"))
	b := connect(t, r, "node-b", "spiffe://gpuaas.test/gpuaas/agent/node-b", "v1", inventory("GPU-b0"))
	connect(t, r, "node-c", "spiffe://gpuaas.test/gpuaas/agent/node-c", "v1", &nodev1.Inventory{})
	r.Disconnect(ctx, b)

	got := connectedIDs(r)
	if len(got) != 2 {
		t.Fatalf("ConnectedNodes = %v, want node-a and node-c", got)
	}
	if a := got["node-a"]; len(a.GPUs) != 2 || a.GPUs[0].GetUuid() != "GPU-a0" || a.GPUs[1].GetUuid() != "GPU-a1" {
		t.Errorf("node-a GPUs = %v", a.GPUs)
	}
	if c, ok := got["node-c"]; !ok || len(c.GPUs) != 0 {
		t.Errorf("node-c = %v, %v; want connected with no GPUs", c, ok)
	}
}

func TestSeenUpdatesLivenessAndInventory(t *testing.T) {
	ctx := context.Background()
	st := openStore(t)
	r := fleet.New(st, nil)
	s := connect(t, r, "node-a", peerA, "v1", inventory("GPU-a0"))
	before, err := r.Node(ctx, "node-a", nil)
	if err != nil {
		t.Fatal(err)
	}

	// A heartbeat (no inventory) keeps the inventory.
	if err := r.Seen(ctx, s, nil); err != nil {
		t.Fatal(err)
	}
	if got := connectedIDs(r)["node-a"]; len(got.GPUs) != 1 {
		t.Fatalf("after a heartbeat GPUs = %v, want the inventory kept", got.GPUs)
	}

	// An observed report with a fresh inventory replaces it, live and stored.
	fresh := inventory("GPU-a0")
	fresh.Gpus[0].Instances = []*nodev1.MigInstance{{ProfileId: 9, Start: 0, Size: 4, MigUuid: "MIG-a0-1"}}
	if err := r.Seen(ctx, s, fresh); err != nil {
		t.Fatal(err)
	}
	after, err := r.Node(ctx, "node-a", nil)
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(after.GetInventory(), fresh) {
		t.Fatalf("live inventory = %v, want %v", after.GetInventory(), fresh)
	}
	if after.GetLastSeen().AsTime().Before(before.GetLastSeen().AsTime()) {
		t.Errorf("last seen went back from %v to %v", before.GetLastSeen().AsTime(), after.GetLastSeen().AsTime())
	}
	if !proto.Equal(storedNode(t, st, "node-a").GetInventory(), fresh) {
		t.Fatal("the fresh inventory was not persisted")
	}
	r.Disconnect(ctx, s)
	if n, _ := r.Node(ctx, "node-a", nil); n.GetConnected() || !proto.Equal(n.GetInventory(), fresh) {
		t.Fatalf("after disconnect Node = %v, want disconnected with the fresh inventory", n)
	}
}

func TestNodesMergeStoredAndLiveNodesWithCapacityFromLiveLeases(t *testing.T) {
	ctx := context.Background()
	r := fleet.New(openStore(t), nil)
	const gpuA = "GPU-a0"
	connect(t, r, "node-a", peerA, "v1.4.0", inventory(gpuA))
	b := connect(t, r, "node-b", "spiffe://gpuaas.test/gpuaas/agent/node-b", "v1.3.9", inventory("GPU-b0"))
	r.Disconnect(ctx, b)

	// A 3g lease placed by the real scheduler on node-a.
	placement, err := lease.Place(r.ConnectedNodes(), nil, &leasev1.GpuRequest{Kind: &leasev1.GpuRequest_MigProfile{MigProfile: "3g.71gb"}})
	if err != nil || placement.GetNode() != "node-a" || placement.GetGpuUuid() != gpuA {
		t.Fatalf("place 3g.71gb = %v, %v", placement, err)
	}
	live := []*leasev1.Lease{{Id: "l-aaaaaaaaaaaaaaaaaaaa", Phase: leasev1.Phase_PHASE_RUNNING, Placement: placement}}

	free3g := func(n *nodev1.Node) (uint32, bool) {
		for _, c := range n.GetCapacity() {
			if c.GetGpuUuid() != gpuA {
				continue
			}
			for _, p := range c.GetProfiles() {
				if p.GetName() == "3g.71gb" {
					return p.GetFree(), true
				}
			}
		}
		return 0, false
	}

	idle, err := r.Nodes(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if f, ok := free3g(idle[0]); !ok || f != 2 {
		t.Fatalf("an idle H200 has %d (found %v) 3g.71gb free, want 2", f, ok)
	}

	nodes, err := r.Nodes(ctx, live)
	if err != nil {
		t.Fatal(err)
	}
	if len(nodes) != 2 || nodes[0].GetId() != "node-a" || nodes[1].GetId() != "node-b" {
		t.Fatalf("Nodes = %v, want node-a, node-b in id order", nodes)
	}
	a, bn := nodes[0], nodes[1]
	if !a.GetConnected() || a.GetSession().GetPeerId() != peerA || a.GetSession().GetAgentVersion() != "v1.4.0" ||
		a.GetSession().GetRemoteAddr() != "10.0.0.1:5000" || a.GetSession().GetConnectTime() == nil {
		t.Errorf("node-a = connected %v session %v; want the live session", a.GetConnected(), a.GetSession())
	}
	if a.GetLeaseCount() != 1 {
		t.Errorf("node-a lease count = %d, want 1", a.GetLeaseCount())
	}
	if f, _ := free3g(a); f != 1 {
		t.Errorf("node-a 3g.71gb free = %d with one 3g lease, want 1", f)
	}
	if len(a.GetCapacity()) != 1 || a.GetCapacity()[0].GetLeases() != 1 {
		t.Errorf("node-a capacity = %v, want one GPU holding one lease", a.GetCapacity())
	}
	if bn.GetConnected() || bn.GetSession() != nil || bn.GetLeaseCount() != 0 || len(bn.GetInventory().GetGpus()) != 1 {
		t.Errorf("node-b = %v, want disconnected, no session, no leases, its stored GPU", bn)
	}

	one, err := r.Node(ctx, "node-a", live)
	if err != nil || !proto.Equal(one, a) {
		t.Fatalf("Node(node-a) = %v, %v; want what Nodes reports for it", one, err)
	}
}

func TestNodeOfAnUnknownIDIsNotFound(t *testing.T) {
	r := fleet.New(openStore(t), nil)
	connect(t, r, "node-a", peerA, "v1", inventory("GPU-a0"))
	_, err := r.Node(context.Background(), "node-z", nil)
	if !errors.Is(err, errs.ErrNotFound) || errs.ReasonOf(err) != "NODE_NOT_FOUND" {
		t.Fatalf("Node(node-z) = %v, want not found (NODE_NOT_FOUND)", err)
	}
}

// TestConnectedNodesFollowsEveryChange: ConnectedNodes hands out one
// shared list until something it describes changes, and every kind of
// change shows in the next call.
func TestConnectedNodesFollowsEveryChange(t *testing.T) {
	ctx := context.Background()
	r := fleet.New(openStore(t), nil)
	list := func() string {
		var out []string
		for _, n := range r.ConnectedNodes() {
			var gpus []string
			for _, g := range n.GPUs {
				gpus = append(gpus, g.GetUuid())
				if g.GetUnhealthy() {
					gpus[len(gpus)-1] += "!"
				}
			}
			out = append(out, n.ID+"["+strings.Join(gpus, " ")+"]")
		}
		sort.Strings(out)
		return strings.Join(out, " ")
	}
	expect := func(step, want string) {
		t.Helper()
		if got := list(); got != want {
			t.Fatalf("%s: connected %q, want %q", step, got, want)
		}
	}
	a, err := r.Connect(ctx, "node-a", peerA, "", "test", inventory("GPU-a0", "GPU-a1"))
	if err != nil {
		t.Fatal(err)
	}
	expect("connect a", "node-a[GPU-a0 GPU-a1]")
	b, err := r.Connect(ctx, "node-b", "spiffe://gpuaas.test/gpuaas/agent/node-b", "", "test", inventory("GPU-b0"))
	if err != nil {
		t.Fatal(err)
	}
	expect("connect b", "node-a[GPU-a0 GPU-a1] node-b[GPU-b0]")
	first, again := r.ConnectedNodes(), r.ConnectedNodes()
	if &first[0] != &again[0] {
		t.Fatal("an unchanged fleet built its list again")
	}
	// A heartbeat with the same inventory keeps the list; a changed one
	// does not.
	if err := r.Seen(ctx, a, inventory("GPU-a0", "GPU-a1")); err != nil {
		t.Fatal(err)
	}
	if again := r.ConnectedNodes(); &first[0] != &again[0] {
		t.Fatal("an identical inventory built the list again")
	}
	sick := inventory("GPU-a0", "GPU-a1")
	sick.Gpus[1].Unhealthy = true
	if err := r.Seen(ctx, a, sick); err != nil {
		t.Fatal(err)
	}
	expect("a GPU turns unhealthy", "node-a[GPU-a0 GPU-a1!] node-b[GPU-b0]")
	if err := r.CordonGPU(ctx, operator, "node-a", "GPU-a0", true, "test"); err != nil {
		t.Fatal(err)
	}
	expect("cordon GPU-a0", "node-a[GPU-a1!] node-b[GPU-b0]")
	if err := r.Cordon(ctx, operator, "node-b", true, "test"); err != nil {
		t.Fatal(err)
	}
	expect("cordon node-b", "node-a[GPU-a1!]")
	if err := r.Cordon(ctx, operator, "node-b", false, "test"); err != nil {
		t.Fatal(err)
	}
	if err := r.CordonGPU(ctx, operator, "node-a", "GPU-a0", false, "test"); err != nil {
		t.Fatal(err)
	}
	expect("uncordon both", "node-a[GPU-a0 GPU-a1!] node-b[GPU-b0]")
	r.Disconnect(ctx, b)
	expect("disconnect b", "node-a[GPU-a0 GPU-a1!]")
	a2, err := r.Connect(ctx, "node-a", peerA, "", "test", inventory("GPU-a0"))
	if err != nil {
		t.Fatal(err)
	}
	expect("a reconnects with one GPU", "node-a[GPU-a0]")
	r.Disconnect(ctx, a) // the replaced session: no change
	expect("the old session of a leaves", "node-a[GPU-a0]")
	r.Disconnect(ctx, a2)
	expect("a leaves", "")
}

// TestConnectedNodesOneBuildPerChange: callers that find the list stale
// at the same moment (a crowd of creates after a change) all get the one
// list a single build made, so the placer knows it by identity.
func TestConnectedNodesOneBuildPerChange(t *testing.T) {
	ctx := context.Background()
	r := fleet.New(openStore(t), nil)
	for i := range 16 {
		node := fmt.Sprintf("node-%02d", i)
		if _, err := r.Connect(ctx, node, "spiffe://gpuaas.test/gpuaas/agent/"+node, "", "test", inventory("GPU-"+node)); err != nil {
			t.Fatal(err)
		}
	}
	for round := range 20 {
		lists := make([][]lease.NodeView, 32)
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i := range lists {
			wg.Go(func() {
				<-start
				lists[i] = r.ConnectedNodes()
			})
		}
		close(start)
		wg.Wait()
		for i, l := range lists {
			if len(l) != 16 {
				t.Fatalf("round %d: caller %d got %d nodes, want 16", round, i, len(l))
			}
			if &l[0] != &lists[0][0] {
				t.Fatalf("round %d: callers %d and 0 got lists of their own", round, i)
			}
		}
		// Two changes that cancel out: the next round's callers find
		// the list stale, and all 16 nodes in it.
		for _, on := range []bool{true, false} {
			if err := r.Cordon(ctx, operator, "node-00", on, "test"); err != nil {
				t.Fatal(err)
			}
		}
	}
}
