// Package fleet tracks the control plane's nodes: their live agent sessions,
// inventories, liveness (heartbeat TTLs that scale with the fleet, a node
// past its TTL declared down) and cordons. It answers the scheduler's
// "which nodes can take work" and wakes a node's session when its desired
// state changes. It never writes leases itself: a dead node's leases are
// marked lost by the lease service.
package fleet

import (
	"context"
	"errors"
	"log/slog"
	"maps"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/lease"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/errs"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

// Session is one connected agent.
type Session struct {
	Node         string
	PeerID       string
	RemoteAddr   string
	AgentVersion string
	ConnectedAt  time.Time

	mu        sync.Mutex
	inventory *nodev1.Inventory
	lastSeen  time.Time

	// Wake receives a value when the node's desired state may have changed
	// (coalesced: one pending wake at most).
	Wake chan struct{}
	// Replaced is closed when a newer session for the same node takes over.
	Replaced chan struct{}
	// advertised is the heartbeat interval last sent to the agent
	// (Advertise); its deadline is never shorter than two of them.
	advertised atomic.Int64
}

// Registry is the set of nodes and their sessions.
type Registry struct {
	st      store.Store
	log     *slog.Logger
	now     func() time.Time
	live    Liveness
	leases  LeaseLoser
	started time.Time

	mu       sync.Mutex
	sessions map[string]*Session
	// deadline is when each tracked node is declared down unless heard
	// from (liveness.go).
	deadline      map[string]time.Time
	restored      bool
	cordoned      map[string]bool
	cordonedGPUs  map[string]map[string]bool // node -> GPU uuid
	cordonsLoaded bool
	// attest, when set, decides which nodes are attested (attest.go).
	attest *Attestor
	// presence, when set, is replicated mode (replicas.go): sessions are
	// spread over replicas and the leader watches the whole fleet.
	presence Presence
	ha       haState

	// connected caches ConnectedNodes (read on every placement) until
	// viewGen moves: every change to what it reads (sessions,
	// inventories, cordons, attestation) calls changed.
	viewGen   atomic.Uint64
	connected atomic.Pointer[connectedView]
	// building is held while the list is rebuilt, so that callers that
	// find it stale at once wait for one build and share its list.
	building sync.Mutex
}

// connectedView is a ConnectedNodes result, shared by its callers and
// never modified.
type connectedView struct {
	gen uint64
	// until is when the first attested node in it turns stale by age
	// alone; zero if none can.
	until time.Time
	nodes []lease.NodeView
}

// changed invalidates the cached ConnectedNodes.
func (r *Registry) changed() { r.viewGen.Add(1) }

// Options configures a registry.
type Options struct {
	Logger *slog.Logger
	// Now is the clock (default time.Now); tests inject one.
	Now func() time.Time
	// Liveness sets heartbeat TTLs (zero fields take defaults).
	Liveness Liveness
	// Leases is told when a node dies; nil marks no lease lost.
	Leases LeaseLoser
}

// New returns an empty registry backed by st (node records persist there)
// with default liveness and no lease service.
func New(st store.Store, log *slog.Logger) *Registry {
	return NewRegistry(st, Options{Logger: log})
}

// NewRegistry returns an empty registry backed by st. Its start time,
// from which known nodes' failover TTL runs, is now.
func NewRegistry(st store.Store, opts Options) *Registry {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	return &Registry{st: st, log: opts.Logger, now: opts.Now, live: opts.Liveness.withDefaults(), leases: opts.Leases,
		started: opts.Now(), sessions: map[string]*Session{}, deadline: map[string]time.Time{}, cordoned: map[string]bool{}, cordonedGPUs: map[string]map[string]bool{}}
}

// SetLeases wires the lease service after construction (it needs the
// fleet too).
func (r *Registry) SetLeases(l LeaseLoser) { r.leases = l }

var _ lease.Fleet = (*Registry)(nil)

// Connect registers a session for node, replacing (and signalling) any
// older one.
func (r *Registry) Connect(ctx context.Context, node, peerID, remote, version string, inv *nodev1.Inventory) (*Session, error) {
	if err := r.loadCordonsOnce(ctx); err != nil {
		return nil, err
	}
	now := r.now()
	s := &Session{Node: node, PeerID: peerID, RemoteAddr: remote, AgentVersion: version, ConnectedAt: now,
		inventory: inv, lastSeen: now, Wake: make(chan struct{}, 1), Replaced: make(chan struct{})}
	if err := r.persistConnect(ctx, s); err != nil {
		return nil, err
	}
	if r.presence != nil {
		if err := r.presence.Claim(ctx, node); err != nil {
			return nil, err
		}
	}
	r.mu.Lock()
	if old := r.sessions[node]; old != nil {
		close(old.Replaced)
	}
	r.sessions[node] = s
	r.touchLocked(node, now)
	r.mu.Unlock()
	r.changed()
	r.log.Info("agent connected", "node", node, "peer", peerID, "remote", remote, "gpus", len(inv.GetGpus()))
	return s, nil
}

// loadCordonsOnce reads the cordons from the store the first time it is
// called; later changes keep the in-memory copy in step.
func (r *Registry) loadCordonsOnce(ctx context.Context) error {
	r.mu.Lock()
	loaded := r.cordonsLoaded
	r.mu.Unlock()
	if loaded {
		return nil
	}
	if err := r.loadCordons(ctx); err != nil {
		return err
	}
	r.mu.Lock()
	r.cordonsLoaded = true
	r.mu.Unlock()
	return nil
}

// Disconnect removes s if it is still the node's current session.
func (r *Registry) Disconnect(ctx context.Context, s *Session) {
	r.mu.Lock()
	current := r.sessions[s.Node] == s
	if current {
		delete(r.sessions, s.Node)
		if r.presence != nil {
			// The leader times the node from here on: it may
			// already be connected to another replica.
			delete(r.deadline, s.Node)
		}
	}
	r.mu.Unlock()
	if current {
		r.changed()
	}
	if current && r.presence != nil {
		if err := r.presence.Release(ctx, s.Node); err != nil {
			r.log.Warn("release presence on disconnect", "node", s.Node, "err", err)
		}
	}
	if current {
		if err := r.persist(ctx, s); err != nil {
			r.log.Warn("persist node on disconnect", "node", s.Node, "err", err)
		}
		r.log.Info("agent disconnected", "node", s.Node)
	}
}

// Seen records liveness and, if inv is not nil, a fresh inventory.
func (r *Registry) Seen(ctx context.Context, s *Session, inv *nodev1.Inventory) error {
	now := r.now()
	s.mu.Lock()
	s.lastSeen = now
	moved := false
	if inv != nil {
		moved = !proto.Equal(s.inventory, inv)
		s.inventory = inv
	}
	s.mu.Unlock()
	if moved {
		r.changed()
	}
	r.mu.Lock()
	if r.sessions[s.Node] == s {
		r.touchLocked(s.Node, now)
	}
	r.mu.Unlock()
	if inv != nil {
		return r.persist(ctx, s)
	}
	return nil
}

func (r *Registry) nodeRecord(s *Session) ([]byte, error) {
	s.mu.Lock()
	n := &nodev1.Node{Id: s.Node, Inventory: s.inventory, LastSeen: timestamppb.New(s.lastSeen)}
	s.mu.Unlock()
	return proto.Marshal(n)
}

func (r *Registry) persist(ctx context.Context, s *Session) error {
	raw, err := r.nodeRecord(s)
	if err != nil {
		return err
	}
	return r.st.Update(ctx, func(tx store.Tx) error { return tx.Put(store.BucketNodes, s.Node, raw) })
}

// persistConnect stores the node record and, for a node that was down,
// marks it up again (audited as node.up) in the same transaction.
func (r *Registry) persistConnect(ctx context.Context, s *Session) error {
	raw, err := r.nodeRecord(s)
	if err != nil {
		return err
	}
	return r.st.Update(ctx, func(tx store.Tx) error {
		if err := tx.Put(store.BucketNodes, s.Node, raw); err != nil {
			return err
		}
		st, err := getState(tx, s.Node)
		if err != nil || st.State != StateDown {
			return err
		}
		st.State, st.Since, st.Reason = StateUp, s.ConnectedAt, "agent reconnected"
		if err := putState(tx, s.Node, st); err != nil {
			return err
		}
		_, err = audit.Append(tx, auditlog.Entry{Time: s.ConnectedAt, Actor: s.PeerID, Action: "node.up", Resource: "node/" + s.Node,
			Outcome: auditlog.OutcomeSuccess, Reason: "agent reconnected after the node was declared down"})
		return err
	})
}

// ConnectedNodes implements lease.Fleet: the nodes with a session that are
// not cordoned and, with attestation enabled, whose attestation is PASS.
// The result is shared and must not be modified: it is built again only
// after a change (changed) or when an attestation in it ages out, so a
// placement on a large fleet neither walks it nor queues on the
// registry's lock.
func (r *Registry) ConnectedNodes() []lease.NodeView {
	now := r.now()
	if nodes, ok := r.cachedConnected(now); ok {
		return nodes
	}
	// One build for every caller that found the list stale: the lease
	// service's placer recognises an unchanged fleet by the list's
	// identity, and a crowd of creates after a change would otherwise
	// each walk the fleet and hand out lists of their own.
	r.building.Lock()
	defer r.building.Unlock()
	now = r.now() // the wait may have outlasted an attestation
	if nodes, ok := r.cachedConnected(now); ok {
		return nodes
	}
	// gen is read before the build: a change during it leaves the
	// stored view behind viewGen, and the next call builds again.
	gen := r.viewGen.Load()
	nodes, until := r.buildConnected(now)
	r.connected.Store(&connectedView{gen: gen, until: until, nodes: nodes})
	return nodes
}

// cachedConnected is the stored ConnectedNodes list, if it is current.
func (r *Registry) cachedConnected(now time.Time) ([]lease.NodeView, bool) {
	gen := r.viewGen.Load()
	if v := r.connected.Load(); v != nil && v.gen == gen && (v.until.IsZero() || now.Before(v.until)) {
		return v.nodes, true
	}
	return nil, false
}

// buildConnected walks the fleet for ConnectedNodes. It holds the
// registry's lock only to copy the session list: heartbeats (Seen) take
// the same lock, and a walk over a large fleet under it would delay them
// past their deadline.
func (r *Registry) buildConnected(now time.Time) ([]lease.NodeView, time.Time) {
	type cand struct {
		node string
		s    *Session      // a session this process holds, or
		gpus []*nodev1.Gpu // the inventory of a node another replica holds
		off  map[string]bool
	}
	r.mu.Lock()
	cands := make([]cand, 0, len(r.sessions)+len(r.ha.remote))
	add := func(c cand) {
		if r.cordoned[c.node] {
			return
		}
		if off := r.cordonedGPUs[c.node]; len(off) > 0 {
			c.off = maps.Clone(off)
		}
		cands = append(cands, c)
	}
	for _, s := range r.sessions {
		add(cand{node: s.Node, s: s})
	}
	for n, gpus := range r.ha.remote {
		if r.sessions[n] == nil {
			add(cand{node: n, gpus: gpus})
		}
	}
	attest := r.attest
	r.mu.Unlock()
	var ok map[string]bool
	var until time.Time
	if attest != nil {
		names := make([]string, len(cands))
		for i, c := range cands {
			names[i] = c.node
		}
		ok, until = attest.eligibleSet(names, now)
	}
	out := make([]lease.NodeView, 0, len(cands))
	for _, c := range cands {
		if attest != nil && !ok[c.node] {
			continue
		}
		gpus := c.gpus
		if c.s != nil {
			c.s.mu.Lock()
			gpus = c.s.inventory.GetGpus()
			c.s.mu.Unlock()
		}
		if len(c.off) > 0 {
			kept := make([]*nodev1.Gpu, 0, len(gpus))
			for _, g := range gpus {
				if !c.off[g.GetUuid()] {
					kept = append(kept, g)
				}
			}
			gpus = kept
		}
		out = append(out, lease.NodeView{ID: c.node, GPUs: gpus})
	}
	return out, until
}

// Notify implements lease.Fleet.
func (r *Registry) Notify(node string) {
	r.mu.Lock()
	s := r.sessions[node]
	r.mu.Unlock()
	if s == nil {
		return
	}
	select {
	case s.Wake <- struct{}{}:
	default:
	}
}

// Nodes lists every node ever seen, with live session and capacity; live
// is every live lease.
func (r *Registry) Nodes(ctx context.Context, live []*leasev1.Lease) ([]*nodev1.Node, error) {
	ns, _, err := r.NodesPage(ctx, "", 0, live)
	return ns, err
}

// NodesPage is one page of Nodes: at most limit nodes (0: every one) whose
// ids sort after after, in id order, and whether more follow.
func (r *Registry) NodesPage(ctx context.Context, after string, limit int, live []*leasev1.Lease) ([]*nodev1.Node, bool, error) {
	return r.describe(ctx, "", after, limit, live)
}

// Node returns one node; live holds (at least) the live leases placed on
// it. It reads only that node.
func (r *Registry) Node(ctx context.Context, id string, live []*leasev1.Lease) (*nodev1.Node, error) {
	ns, _, err := r.describe(ctx, id, "", 0, live)
	if err != nil {
		return nil, err
	}
	if len(ns) == 0 {
		return nil, errs.NotFound("NODE_NOT_FOUND", "node %s not found", id)
	}
	return ns[0], nil
}

// describe builds the view of node only, or of at most limit nodes (0:
// all) after after, and says whether more follow.
func (r *Registry) describe(ctx context.Context, only, after string, limit int, live []*leasev1.Lease) ([]*nodev1.Node, bool, error) {
	var out []*nodev1.Node
	more := false
	decode := func(v []byte) error {
		n := &nodev1.Node{}
		if err := proto.Unmarshal(v, n); err != nil {
			return err
		}
		out = append(out, n)
		return nil
	}
	err := r.st.View(ctx, func(tx store.Tx) error {
		if only != "" {
			v, err := tx.Get(store.BucketNodes, only)
			if errors.Is(err, store.ErrNotFound) {
				return nil
			}
			if err != nil {
				return err
			}
			return decode(v)
		}
		more = false
		out = out[:0]
		return tx.Scan(store.BucketNodes, "", false, func(k string, v []byte) error {
			if k <= after {
				return nil
			}
			if limit > 0 && len(out) == limit {
				more = true
				return store.ErrStopScan
			}
			return decode(v)
		})
	})
	if err != nil {
		return nil, false, err
	}
	r.mu.Lock()
	for _, n := range out {
		if s := r.sessions[n.GetId()]; s != nil {
			s.mu.Lock()
			n.Connected = true
			n.Inventory = s.inventory
			n.LastSeen = timestamppb.New(s.lastSeen)
			s.mu.Unlock()
			n.Session = &nodev1.Session{PeerId: s.PeerID, RemoteAddr: s.RemoteAddr, ConnectTime: timestamppb.New(s.ConnectedAt), AgentVersion: s.AgentVersion}
		} else if r.ha.present[n.GetId()] != "" {
			n.Connected = true // to another replica
		}
	}
	attest := r.attest
	r.mu.Unlock()
	states := map[string]NodeState{}
	err = r.st.View(ctx, func(tx store.Tx) error {
		for _, n := range out {
			st, err := getState(tx, n.GetId())
			if err != nil {
				return err
			}
			states[n.GetId()] = st
		}
		return nil
	})
	if err != nil {
		return nil, false, err
	}
	for _, n := range out {
		st := states[n.GetId()]
		n.Cordoned, n.CordonReason, n.CordonedBy, n.Down = st.Cordoned, st.CordonReason, st.CordonedBy, st.State == StateDown
		n.CordonedGpus = slices.Sorted(maps.Keys(st.CordonedGPUs))
		if !st.DrainDeadline.IsZero() {
			n.DrainDeadline = timestamppb.New(st.DrainDeadline)
		}
		if attest != nil {
			n.Attestation = AttestationStatusProto(attest.Status(n.GetId()))
		}
	}
	byNode := map[string][]*leasev1.Lease{}
	for _, l := range live {
		byNode[l.GetPlacement().GetNode()] = append(byNode[l.GetPlacement().GetNode()], l)
	}
	for _, n := range out {
		mine := byNode[n.GetId()]
		n.LeaseCount = uint32(len(mine))
		n.Capacity = lease.Capacity(lease.NodeView{ID: n.GetId(), GPUs: n.GetInventory().GetGpus()}, mine)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].GetId() < out[j].GetId() })
	return out, more, nil
}

// ErrReplaced is returned to a session superseded by a newer one.
var ErrReplaced = errors.New("session replaced by a newer one")
