package lease

import (
	"maps"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/gpuaas/gpuaas/pkg/mig"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

// The placer makes Create's placement cheap inside the serialized store
// transaction, with exactly Place's decisions:
//
//   - a fleetView is the connected nodes as Place walks them (sorted, model
//     resolved, reported partitions decoded). It is built outside the
//     transaction and cached by the nodes' content, so an unchanged fleet
//     is walked once;
//   - a placeState is a view combined with the partitions the allocation
//     index holds at one index token: per GPU, its gpuClass (model,
//     eligibility and set of partitions, what Place deduplicates GPUs by).
//     A create derives the state at the token it leaves from the state it
//     read by changing one GPU, so a stream of creates never rebuilds it;
//   - a gpuClass memoizes the planner's choice per profile
//     (mig.ChooseOn), so placing costs a walk over the GPUs' classes and
//     one memo read per distinct class.
//
// A request no GPU can take falls back to Place itself, for its exact
// error, which the state memoizes.

// placer holds the caches; the zero value is ready.
type placer struct {
	mu sync.Mutex
	// views, newest first, is replaced as a whole (under mu), never
	// changed: every create reads it without the lock the committing
	// transaction holds while it derives states.
	views   atomic.Pointer[[]*fleetView]
	states  map[stateID]*placeState
	sorder  []stateID
	classes map[string]*gpuClass
}

const (
	viewCacheSize  = 8
	stateCacheSize = 64
	// maxClasses bounds the interned classes; past it the table starts
	// again (states keep their classes, which stay correct).
	maxClasses = 1 << 16
	// maxHeldDeltas bounds the partitions a state adds to its held map
	// before it folds them into a map of its own.
	maxHeldDeltas = 64
)

// viewGPU is one GPU Place considers.
type viewGPU struct {
	node, uuid string
	// modelName is the GPU's reported model, model its MIG model.
	modelName string
	model     mig.Model
	eligible  bool
	// reported are the partitions the node reports.
	reported []mig.Instance
}

// fleetView is the connected nodes in Place's order: nodes by id, GPUs by
// index, GPUs of unknown models left out. It copies what it needs of the
// nodes' messages and is never modified, but for from.
type fleetView struct {
	gpus   []viewGPU
	byUUID map[string][]int
	// src is what it was built from, by node id; nil if it cannot be
	// matched (node ids were not unique).
	src map[string]*srcNode
	// from is the last slice it was built from or matched: the fleet
	// hands out the same slice only while it is unchanged (Fleet), and a
	// list it rebuilt with the same content is matched once, then
	// recognised by identity.
	from atomic.Pointer[[]NodeView]
}

// builtFrom reports whether nodes is the very slice v was built from or
// last matched.
func (v *fleetView) builtFrom(nodes []NodeView) bool {
	from := v.from.Load()
	return v.src != nil && from != nil && len(nodes) > 0 && len(nodes) == len(*from) && &nodes[0] == &(*from)[0]
}

// gpuClass is a GPU state as Place deduplicates it (stateKey): GPUs of one
// class get the same choice from the planner.
type gpuClass struct {
	state mig.GPUState
	memo  sync.Map // profile name -> choice
}

type choice struct {
	c  mig.Choice
	ok bool
}

// choose is the planner's choice for profile on the class, memoized.
func (c *gpuClass) choose(profile string) (mig.Choice, bool) {
	if v, ok := c.memo.Load(profile); ok {
		ch := v.(choice)
		return ch.c, ch.ok
	}
	ch, ok := mig.ChooseOn(c.state, mig.Request{ProfileName: profile})
	c.memo.Store(profile, choice{ch, ok})
	return ch, ok
}

type stateID struct {
	view  *fleetView
	token string
}

// heldDelta is one partition a create added to the index, after those
// prev added (n in all).
type heldDelta struct {
	prev *heldDelta
	n    int
	gpu  string
	in   mig.Instance
}

// classChunk is how many GPUs' classes a placeState keeps per chunk.
const classChunk = 64

// classOf is view GPU i's class.
func (st *placeState) classOf(i int) *gpuClass { return st.class[i/classChunk][i%classChunk] }

// placeState is a view with the index's partitions at one token. It is
// never modified once cached, except for its lazily folded held map.
type placeState struct {
	view *fleetView
	// class is per view GPU (its instances are the GPU's held and
	// reported partitions), in chunks of classChunk GPUs, so that a
	// derived state copies one chunk, not all.
	class [][]*gpuClass
	// first is each class's lowest GPU index: place weighs the classes,
	// not every GPU (a fleet of thousands of GPUs has tens of classes).
	first map[*gpuClass]int

	// The index's partitions by GPU UUID: heldBase plus the deltas
	// heldAdd chains (newest first, at most maxHeldDeltas).
	heldMu   sync.Mutex
	heldBase map[string][]mig.Instance
	heldAdd  *heldDelta

	// refused memoizes Place's error per request the state cannot take
	// (at most maxRefusals): a refused create leaves the index, and so
	// the state, as it was.
	refused  sync.Map // refusalKey -> error
	nrefused atomic.Int32
}

// maxRefusals bounds a state's memo of refusals (requests name nodes and
// models freely).
const maxRefusals = 64

type refusalKey struct{ profile, node, model string }

// placeOrRefuse is place, and when no GPU can take the request, Place's
// error for it (nodes are those the state's view was built from).
func (st *placeState) placeOrRefuse(nodes []NodeView, req *leasev1.GpuRequest) (*leasev1.Placement, error) {
	if pl, ok := st.place(req); ok {
		return pl, nil
	}
	k := refusalKey{req.GetMigProfile(), req.GetNode(), req.GetGpuModel()}
	if err, ok := st.refused.Load(k); ok {
		return nil, err.(error)
	}
	pl, err := Place(nodes, st.held(), req)
	if err != nil && st.nrefused.Add(1) <= maxRefusals {
		st.refused.Store(k, err)
	}
	return pl, err
}

// held returns the index's partitions by GPU UUID (shared: not to be
// modified).
func (st *placeState) held() map[string][]mig.Instance {
	st.heldMu.Lock()
	defer st.heldMu.Unlock()
	if st.heldAdd != nil {
		deltas := make([]*heldDelta, 0, st.heldAdd.n)
		for d := st.heldAdd; d != nil; d = d.prev {
			deltas = append(deltas, d)
		}
		h := make(map[string][]mig.Instance, len(st.heldBase)+len(deltas))
		for k, v := range st.heldBase {
			h[k] = v
		}
		for _, d := range slices.Backward(deltas) {
			h[d.gpu] = append(slices.Clip(h[d.gpu]), d.in)
		}
		st.heldBase, st.heldAdd = h, nil
	}
	return st.heldBase
}

// srcGPU is everything Place reads of a reported GPU.
type srcGPU struct {
	uuid, model           string
	pci, index            uint32
	migEnabled, unhealthy bool
	inst                  []srcInstance
}

type srcInstance struct {
	profile     int32
	start, size uint32
}

type srcNode struct {
	id   string
	pos  int // in the view's src
	gpus []srcGPU
}

func srcOf(n NodeView) srcNode {
	out := srcNode{id: n.ID, gpus: make([]srcGPU, len(n.GPUs))}
	for i, g := range n.GPUs {
		sg := srcGPU{uuid: g.GetUuid(), model: g.GetModel(), pci: g.GetPciDeviceId(), index: g.GetIndex(), migEnabled: g.GetMigEnabled(), unhealthy: g.GetUnhealthy()}
		for _, in := range g.GetInstances() {
			sg.inst = append(sg.inst, srcInstance{in.GetProfileId(), in.GetStart(), in.GetSize()})
		}
		out.gpus[i] = sg
	}
	return out
}

// matches reports whether nodes (in any order) are what v was built
// from, in everything Place reads.
func (v *fleetView) matches(nodes []NodeView) bool {
	if v.src == nil || len(nodes) != len(v.src) {
		return false
	}
	seen := make([]bool, len(nodes))
	for _, n := range nodes {
		sn, ok := v.src[n.ID]
		if !ok || seen[sn.pos] || len(n.GPUs) != len(sn.gpus) {
			return false
		}
		seen[sn.pos] = true
		for j, g := range n.GPUs {
			sg := &sn.gpus[j]
			if g.GetUuid() != sg.uuid || g.GetModel() != sg.model || g.GetPciDeviceId() != sg.pci || g.GetIndex() != sg.index ||
				g.GetMigEnabled() != sg.migEnabled || g.GetUnhealthy() != sg.unhealthy || len(g.GetInstances()) != len(sg.inst) {
				return false
			}
			for k, in := range g.GetInstances() {
				if (srcInstance{in.GetProfileId(), in.GetStart(), in.GetSize()}) != sg.inst[k] {
					return false
				}
			}
		}
	}
	return true
}

func byID(a, b NodeView) int {
	switch {
	case a.ID < b.ID:
		return -1
	case a.ID > b.ID:
		return 1
	}
	return 0
}

// view returns the cached view of nodes, building it if needed.
func (p *placer) view(nodes []NodeView) *fleetView {
	var views []*fleetView
	if vs := p.views.Load(); vs != nil {
		views = *vs
	}
	for _, v := range views {
		if v.builtFrom(nodes) {
			return v
		}
		if v.matches(nodes) {
			v.adopt(nodes)
			return v
		}
	}
	return p.newView(nodes)
}

// adopt makes nodes, a list v matches, the one v is known by. (A function
// of its own: the pointer it stores would otherwise put every caller's
// list header on the heap, the identity hit on every create included.)
func (v *fleetView) adopt(nodes []NodeView) { v.from.Store(&nodes) }

// newView builds and caches the view of nodes.
func (p *placer) newView(nodes []NodeView) *fleetView {
	sorted := slices.Clone(nodes)
	slices.SortFunc(sorted, byID)
	v := &fleetView{byUUID: map[string][]int{}, src: map[string]*srcNode{}}
	v.adopt(nodes)
	for i, n := range sorted {
		if _, dup := v.src[n.ID]; dup || v.src == nil {
			v.src = nil // two nodes of one id: never matched again
		} else {
			sn := srcOf(n)
			sn.pos = i
			v.src[n.ID] = &sn
		}
		gpus := slices.Clone(n.GPUs)
		slices.SortStableFunc(gpus, func(a, b *nodev1.Gpu) int {
			switch {
			case a.GetIndex() < b.GetIndex():
				return -1
			case a.GetIndex() > b.GetIndex():
				return 1
			}
			return 0
		})
		for _, g := range gpus {
			model, ok := modelOf(g)
			if !ok {
				continue
			}
			v.byUUID[g.GetUuid()] = append(v.byUUID[g.GetUuid()], len(v.gpus))
			v.gpus = append(v.gpus, viewGPU{
				node: n.ID, uuid: g.GetUuid(), modelName: g.GetModel(), model: model,
				eligible: g.GetMigEnabled() && !g.GetUnhealthy(), reported: reportedOn(g),
			})
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	// The newest first; the list is replaced, never changed, so readers
	// may walk a copy of it unlocked.
	views := make([]*fleetView, 0, viewCacheSize)
	views = append(views, v)
	if vs := p.views.Load(); vs != nil {
		for _, old := range *vs {
			if len(views) < viewCacheSize {
				views = append(views, old)
			}
		}
	}
	p.views.Store(&views)
	return v
}

// classLocked interns the class of a GPU state.
func (p *placer) classLocked(model mig.Model, eligible bool, inst []mig.Instance) *gpuClass {
	k := stateKey(model.Name, eligible, inst)
	if c, ok := p.classes[k]; ok {
		return c
	}
	if p.classes == nil || len(p.classes) >= maxClasses {
		p.classes = map[string]*gpuClass{}
	}
	c := &gpuClass{state: mig.GPUState{Model: model, Instances: slices.Clone(inst), Eligible: eligible}}
	p.classes[k] = c
	return c
}

// state returns the cached state of view at token, or nil.
func (p *placer) state(view *fleetView, token string) *placeState {
	if token == "" {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.states[stateID{view, token}]
}

// heldAt returns the index's partitions at token if a cached state knows
// them.
func (p *placer) heldAt(token string) (map[string][]mig.Instance, bool) {
	if token == "" {
		return nil, false
	}
	p.mu.Lock()
	var st *placeState
	for id, s := range p.states {
		if id.token == token {
			st = s
			break
		}
	}
	p.mu.Unlock()
	if st == nil {
		return nil, false
	}
	return st.held(), true
}

func (p *placer) putLocked(id stateID, st *placeState) {
	if id.token == "" {
		return
	}
	if _, ok := p.states[id]; ok {
		return
	}
	if p.states == nil {
		p.states = map[stateID]*placeState{}
	}
	if len(p.sorder) == stateCacheSize {
		delete(p.states, p.sorder[0])
		p.sorder = p.sorder[1:]
	}
	p.states[id] = st
	p.sorder = append(p.sorder, id)
}

// build makes (and caches) the state of view with the index's partitions
// held at token.
func (p *placer) build(view *fleetView, token string, held map[string][]mig.Instance) *placeState {
	st := &placeState{view: view, heldBase: held}
	inst := make([][]mig.Instance, len(view.gpus))
	for i, g := range view.gpus {
		inst[i] = union(held[g.uuid], g.reported)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	st.first = map[*gpuClass]int{}
	for i, g := range view.gpus {
		if i%classChunk == 0 {
			st.class = append(st.class, make([]*gpuClass, 0, classChunk))
		}
		c := p.classLocked(g.model, g.eligible, inst[i])
		st.class[i/classChunk] = append(st.class[i/classChunk], c)
		if _, ok := st.first[c]; !ok {
			st.first[c] = i
		}
	}
	p.putLocked(stateID{view, token}, st)
	return st
}

// derive caches, at token, st with one more partition held on gpu: the
// index after a create placed there.
func (p *placer) derive(st *placeState, token, gpu string, in mig.Instance) {
	next := &placeState{view: st.view, class: slices.Clone(st.class), first: maps.Clone(st.first)}
	n := 1
	st.heldMu.Lock()
	if st.heldAdd != nil {
		n += st.heldAdd.n
	}
	next.heldBase, next.heldAdd = st.heldBase, &heldDelta{prev: st.heldAdd, n: n, gpu: gpu, in: in}
	st.heldMu.Unlock()
	if n > maxHeldDeltas {
		next.held()
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, i := range st.view.byUUID[gpu] {
		inst := st.classOf(i).state.Instances
		if slices.Contains(inst, in) {
			continue
		}
		g := &st.view.gpus[i]
		chunk := &next.class[i/classChunk]
		if &(*chunk)[0] == &st.class[i/classChunk][0] {
			*chunk = slices.Clone(*chunk)
		}
		old := next.classOf(i)
		c := p.classLocked(g.model, g.eligible, append(slices.Clip(inst), in))
		(*chunk)[i%classChunk] = c
		next.moved(i, old, c)
	}
	p.putLocked(stateID{st.view, token}, next)
}

// moved keeps first right after GPU i went from class old to c (st.class
// already says c). Placement fills GPUs from the lowest index of a class,
// so the next GPU of old is usually a step away.
func (st *placeState) moved(i int, old, c *gpuClass) {
	if old == c {
		return
	}
	if f, ok := st.first[c]; !ok || i < f {
		st.first[c] = i
	}
	if st.first[old] != i {
		return
	}
	delete(st.first, old)
	for j := i + 1; j < len(st.view.gpus); j++ {
		if st.classOf(j) == old {
			st.first[old] = j
			return
		}
	}
}

// place is Place's decision on the state; ok is false when no GPU can
// take the request (Place then says why).
func (st *placeState) place(req *leasev1.GpuRequest) (*leasev1.Placement, bool) {
	profile := req.GetMigProfile()
	if profile == "" {
		return nil, false
	}
	if req.GetNode() == "" && req.GetGpuModel() == "" {
		return st.placeAny(profile)
	}
	var (
		best   mig.Choice
		bestAt = -1
		last   *gpuClass
		seen   map[*gpuClass]bool
	)
	for i := range st.view.gpus {
		g := &st.view.gpus[i]
		if req.GetNode() != "" && req.GetNode() != g.node {
			continue
		}
		if req.GetGpuModel() != "" && req.GetGpuModel() != g.modelName {
			continue
		}
		// GPUs of one class get the same choice and a tie goes to the
		// lower index, so only the first of each class can win.
		c := st.classOf(i)
		if c == last {
			continue
		}
		last = c
		if seen[c] {
			continue
		}
		if seen == nil {
			seen = map[*gpuClass]bool{}
		}
		seen[c] = true
		ch, ok := c.choose(profile)
		if ok && (bestAt < 0 || ch.Before(best)) {
			best, bestAt = ch, i
		}
	}
	return st.placement(best, bestAt)
}

// placeAny is place without node or model constraints: the same decision
// as the walk over every GPU (each class weighed at its lowest index, in
// index order, a tie to the lower index), over the classes alone.
func (st *placeState) placeAny(profile string) (*leasev1.Placement, bool) {
	var at [64]int
	order := at[:0]
	for _, i := range st.first {
		order = append(order, i)
	}
	slices.Sort(order)
	var (
		best   mig.Choice
		bestAt = -1
	)
	for _, i := range order {
		ch, ok := st.classOf(i).choose(profile)
		if ok && (bestAt < 0 || ch.Before(best)) {
			best, bestAt = ch, i
		}
	}
	return st.placement(best, bestAt)
}

// placement is the decision best on view GPU at; none if at < 0.
func (st *placeState) placement(best mig.Choice, at int) (*leasev1.Placement, bool) {
	if at < 0 {
		return nil, false
	}
	g := &st.view.gpus[at]
	return &leasev1.Placement{
		Node: g.node, GpuUuid: g.uuid, GpuModel: g.modelName, MigProfile: best.ProfileName,
		ProfileId: int32(best.Profile), Start: uint32(best.Placement.Start), Size: uint32(best.Placement.Size),
	}, true
}
