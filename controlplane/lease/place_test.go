package lease

import (
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/gpuaas/gpuaas/pkg/errs"
	"github.com/gpuaas/gpuaas/pkg/mig"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

// randomNodes is a fleet of random models (and now and then a GPU of no
// known model), some GPUs unhealthy or without MIG, some with partitions
// the node reports, in random node and GPU order.
func randomNodes(r *rand.Rand) []NodeView {
	models := mig.Models()
	var nodes []NodeView
	for n := range 1 + r.IntN(6) {
		node := NodeView{ID: fmt.Sprintf("node-%02d", r.IntN(40)+100*n)}
		for i := range 1 + r.IntN(8) {
			m := models[r.IntN(len(models))]
			g := &nodev1.Gpu{Index: uint32(i), Uuid: fmt.Sprintf("GPU-%s-%d", node.ID, i), Model: m.Name, PciDeviceId: m.PCIDeviceID, MigCapable: true, MigEnabled: r.IntN(10) != 0, Unhealthy: r.IntN(10) == 0}
			if r.IntN(15) == 0 {
				g.Model, g.PciDeviceId = "NVIDIA T4", 0x1eb8
			}
			var in []mig.Instance
			for range r.IntN(3) {
				p := m.Profiles[r.IntN(len(m.Profiles))]
				at := mig.Placement{Start: p.Starts[r.IntN(len(p.Starts))], Size: p.MemorySlots}
				if m.Check(in, p.ID, at) == nil {
					in = append(in, mig.Instance{Profile: p.ID, Placement: at})
					g.Instances = append(g.Instances, &nodev1.MigInstance{ProfileId: int32(p.ID), Start: uint32(at.Start), Size: uint32(at.Size)})
				}
			}
			node.GPUs = append(node.GPUs, g)
		}
		r.Shuffle(len(node.GPUs), func(i, j int) { node.GPUs[i], node.GPUs[j] = node.GPUs[j], node.GPUs[i] })
		nodes = append(nodes, node)
	}
	r.Shuffle(len(nodes), func(i, j int) { nodes[i], nodes[j] = nodes[j], nodes[i] })
	return nodes
}

var placeProfiles = []string{"1g.18gb", "1g.35gb", "2g.35gb", "3g.71gb", "4g.71gb", "7g.141gb", "1g.10gb", "1g.20gb", "2g.20gb", "3g.40gb", "7g.80gb", "1g.6gb", "4g.24gb", "5g.1tb"}

func randomGPURequest(r *rand.Rand, nodes []NodeView) *leasev1.GpuRequest {
	req := &leasev1.GpuRequest{Kind: &leasev1.GpuRequest_MigProfile{MigProfile: placeProfiles[r.IntN(len(placeProfiles))]}}
	switch r.IntN(8) {
	case 0:
		req.Node = nodes[r.IntN(len(nodes))].ID
	case 1:
		req.GpuModel = nodes[0].GPUs[0].GetModel()
	case 2:
		req.Kind = nil // whole GPU
	}
	return req
}

// samePlacement compares the placer's answer with Place's: the same
// placement, or (placer finding none) Place's error.
func samePlacement(t *testing.T, step string, got *leasev1.Placement, ok bool, want *leasev1.Placement, werr error) {
	t.Helper()
	if werr != nil {
		if ok {
			t.Fatalf("%s: placer placed %v, Place says %v", step, got, werr)
		}
		return
	}
	if !ok || !proto.Equal(got, want) {
		t.Fatalf("%s: placer = %v (%v), Place = %v", step, got, ok, want)
	}
}

// TestPlacer_AgreesWithPlace is the placer's property: on random fleets,
// partitions held and requests, a state built from the index, and every
// state derived from it create after create, decides exactly as Place
// over the same nodes and held partitions.
func TestPlacer_AgreesWithPlace(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for iter := range 300 {
		nodes := randomNodes(r)
		var p placer
		view := p.view(nodes)
		held := map[string][]mig.Instance{}
		st := p.build(view, fmt.Sprint(iter, "/0"), held)
		for step := range 40 {
			req := randomGPURequest(r, nodes)
			got, ok := st.place(req)
			want, werr := Place(nodes, held, req)
			name := fmt.Sprintf("iteration %d step %d (%v)", iter, step, req)
			samePlacement(t, name, got, ok, want, werr)
			// placeOrRefuse gives Place's answer, errors included, the
			// second time from its memo.
			for range 2 {
				pl, err := st.placeOrRefuse(nodes, req)
				if fmt.Sprint(err) != fmt.Sprint(werr) || !proto.Equal(pl, want) {
					t.Fatalf("%s: placeOrRefuse = %v, %v; Place = %v, %v", name, pl, err, want, werr)
				}
			}
			if werr != nil {
				if !errors.Is(werr, errs.ErrResourceExhausted) && !errors.Is(werr, errs.ErrUnimplemented) {
					t.Fatalf("%s: Place = %v", name, werr)
				}
				continue
			}
			// Create's step: the index now holds the partition.
			in := instanceOf(want)
			// (A new map: the states share the ones they were given.)
			held = maps.Clone(held)
			held[want.GetGpuUuid()] = append(slices.Clip(held[want.GetGpuUuid()]), in)
			tok := fmt.Sprint(iter, "/", step+1)
			p.derive(st, tok, want.GetGpuUuid(), in)
			st = p.state(view, tok)
			if st == nil {
				t.Fatalf("%s: derived state not cached", name)
			}
			if h := st.held(); !heldEqual(h, held) {
				t.Fatalf("%s: derived held %v, want %v", name, h, held)
			}
			// Each class's lowest GPU index, kept by derive, is what a
			// walk over the GPUs finds.
			wantFirst := map[*gpuClass]int{}
			for i := range view.gpus {
				if _, ok := wantFirst[st.classOf(i)]; !ok {
					wantFirst[st.classOf(i)] = i
				}
			}
			if !maps.Equal(st.first, wantFirst) {
				t.Fatalf("%s: derived first %v, want %v", name, st.first, wantFirst)
			}
		}
		// The same nodes in another order are the same view.
		shuffled := slices.Clone(nodes)
		r.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
		if p.view(shuffled) != view {
			t.Fatalf("iteration %d: reordered nodes got a new view", iter)
		}
	}
}

func heldEqual(a, b map[string][]mig.Instance) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if !slices.Equal(v, b[k]) {
			return false
		}
	}
	return true
}

// TestPlacer_ViewFollowsTheFleet: a changed fleet (a GPU turning
// unhealthy, a reported partition) gets a new view, and placement sees
// the change.
func TestPlacer_ViewFollowsTheFleet(t *testing.T) {
	nodes := []NodeView{h200("node-a", 1), h200("node-b", 1)}
	var p placer
	v1 := p.view(nodes)
	req := &leasev1.GpuRequest{Kind: &leasev1.GpuRequest_MigProfile{MigProfile: "7g.141gb"}}
	got, ok := p.build(v1, "t1", nil).place(req)
	if !ok || got.GetNode() != "node-a" {
		t.Fatalf("place = %v, %v; want node-a", got, ok)
	}
	sick := proto.Clone(nodes[0].GPUs[0]).(*nodev1.Gpu)
	sick.Unhealthy = true
	changed := []NodeView{{ID: "node-a", GPUs: []*nodev1.Gpu{sick}}, nodes[1]}
	v2 := p.view(changed)
	if v2 == v1 {
		t.Fatal("an unhealthy GPU did not change the view")
	}
	got, ok = p.build(v2, "t1", nil).place(req)
	if !ok || got.GetNode() != "node-b" {
		t.Fatalf("place = %v, %v; want node-b", got, ok)
	}
	busy := proto.Clone(nodes[1].GPUs[0]).(*nodev1.Gpu)
	busy.Instances = []*nodev1.MigInstance{{ProfileId: int32(mig.Profile1g), Start: 6, Size: 1}}
	v3 := p.view([]NodeView{{ID: "node-a", GPUs: []*nodev1.Gpu{sick}}, {ID: "node-b", GPUs: []*nodev1.Gpu{busy}}})
	if got, ok := p.build(v3, "t1", nil).place(req); ok {
		t.Fatalf("placed %v on a fleet with no room for a 7g", got)
	}
	// The very slice a view was built from gets that view back (a fleet
	// hands it out again only while unchanged, see Fleet).
	if p.view(nodes) != v1 {
		t.Fatal("the slice v1 was built from got another view")
	}
	// A list the fleet rebuilt with the same content is matched to v1
	// once, then known by identity: creates after it skip the match.
	rebuilt := slices.Clone(nodes)
	if p.view(rebuilt) != v1 {
		t.Fatal("a rebuilt, unchanged list got another view")
	}
	if !v1.builtFrom(rebuilt) {
		t.Fatal("a list matched to v1 is not then known by identity")
	}
	// A message changed in place is a changed fleet too, in the next
	// list the fleet hands out.
	nodes[0].GPUs[0].MigEnabled = false
	if p.view(slices.Clone(nodes)) == v1 {
		t.Fatal("a GPU changed in place kept its old view")
	}
}

// TestPlacer_CachesAreBounded: views, states and classes stay within
// their bounds however many fleets and tokens pass.
func TestPlacer_CachesAreBounded(t *testing.T) {
	var p placer
	for i := range 3 * viewCacheSize {
		v := p.view([]NodeView{h200(fmt.Sprint("node-", i), 2)})
		for j := range stateCacheSize {
			p.build(v, fmt.Sprint(i, "/", j), nil)
		}
	}
	if n := len(*p.views.Load()); n > viewCacheSize {
		t.Errorf("%d views cached, bound %d", n, viewCacheSize)
	}
	if len(p.states) > stateCacheSize || len(p.sorder) > stateCacheSize {
		t.Errorf("%d states cached, bound %d", len(p.states), stateCacheSize)
	}
	if p.state(p.view([]NodeView{h200("node-0", 2)}), "0/0") != nil {
		t.Error("an evicted state is still served")
	}
}

// BenchmarkPlacement is one create's placement on 64 nodes of 8 H200s
// with 1,000 partitions held, as Create does it inside its transaction:
// Place over the nodes (before the placer), and the placer's state lookup,
// decision and derivation of the next state.
func BenchmarkPlacement(b *testing.B) {
	var nodes []NodeView
	for i := range 64 {
		nodes = append(nodes, h200(fmt.Sprintf("node-%03d", i), 8))
	}
	held := map[string][]mig.Instance{}
	gpu := &leasev1.GpuRequest{Kind: &leasev1.GpuRequest_MigProfile{MigProfile: "1g.18gb"}}
	for range 1000 {
		p, err := Place(nodes, held, gpu)
		if err != nil {
			b.Fatal(err)
		}
		held[p.GetGpuUuid()] = append(held[p.GetGpuUuid()], instanceOf(p))
	}
	b.Run("Place", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := Place(nodes, held, gpu); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("placer", func(b *testing.B) {
		var p placer
		view := p.view(nodes)
		st := p.build(view, "t", held)
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			pl, ok := st.place(gpu)
			if !ok {
				b.Fatal("no placement")
			}
			// Derive and drop: the state stays at 1,000 held.
			i++
			p.derive(st, fmt.Sprint("t", i%stateCacheSize), pl.GetGpuUuid(), instanceOf(pl))
		}
	})
	b.Run("view", func(b *testing.B) {
		var p placer
		p.view(nodes)
		b.ReportAllocs()
		for b.Loop() {
			p.view(nodes)
		}
	})
}
