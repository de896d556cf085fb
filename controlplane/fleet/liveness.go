package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/lease"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/errs"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// Liveness is how the control plane decides a node is dead, after Nomad:
// each node must be heard from within a TTL that grows with the fleet so
// that the whole fleet's heartbeats stay under a rate, plus a grace period;
// after a control-plane start every known node gets a longer failover TTL
// to reconnect before it is declared down.
type Liveness struct {
	// MinTTL is the TTL of a small fleet (default 10s).
	MinTTL time.Duration
	// MaxHeartbeatsPerSecond caps the fleet's total heartbeat rate: the TTL
	// is at least nodes / MaxHeartbeatsPerSecond seconds (default 50).
	MaxHeartbeatsPerSecond float64
	// Grace is added to every TTL before a node is declared down, for
	// network delay and a slow agent (default 10s).
	Grace time.Duration
	// FailoverTTL is the time every node known from the store gets to
	// reconnect after the control plane starts (default 5m).
	FailoverTTL time.Duration
}

func (l Liveness) withDefaults() Liveness {
	if l.MinTTL <= 0 {
		l.MinTTL = 10 * time.Second
	}
	if l.MaxHeartbeatsPerSecond <= 0 {
		l.MaxHeartbeatsPerSecond = 50
	}
	if l.Grace < 0 {
		l.Grace = 0
	} else if l.Grace == 0 {
		l.Grace = 10 * time.Second
	}
	if l.FailoverTTL <= 0 {
		l.FailoverTTL = 5 * time.Minute
	}
	return l
}

// TTL is the heartbeat TTL for a fleet of n nodes.
func (l Liveness) TTL(n int) time.Duration {
	l = l.withDefaults()
	scaled := time.Duration(float64(n) / l.MaxHeartbeatsPerSecond * float64(time.Second))
	return max(l.MinTTL, scaled)
}

// LeaseLoser is what the fleet needs of the lease service when a node dies
// (*lease.Service implements it).
type LeaseLoser interface {
	NodeLost(ctx context.Context, node, reason string) ([]*leasev1.Lease, error)
}

var _ LeaseLoser = (*lease.Service)(nil)

// Node states in node_state.
const (
	StateUp   = "up"
	StateDown = "down"
)

// NodeState is the control plane's verdict on a node, persisted in the
// node_state bucket.
type NodeState struct {
	State        string    `json:"state"`
	Since        time.Time `json:"since"`
	Reason       string    `json:"reason,omitempty"`
	Cordoned     bool      `json:"cordoned,omitempty"`
	CordonReason string    `json:"cordon_reason,omitempty"`
	CordonedBy   string    `json:"cordoned_by,omitempty"`
	CordonedAt   time.Time `json:"cordoned_at,omitzero"`
	// CordonedGPUs are GPUs cordoned one by one: uuid -> reason.
	CordonedGPUs map[string]string `json:"cordoned_gpus,omitempty"`
	// A drain: when the leases still running are cancelled, why, and
	// whether that was done.
	DrainDeadline time.Time `json:"drain_deadline,omitzero"`
	DrainReason   string    `json:"drain_reason,omitempty"`
	DrainDone     bool      `json:"drain_done,omitempty"`
}

func getState(tx store.Tx, node string) (NodeState, error) {
	raw, err := tx.Get(store.BucketNodeState, node)
	if errors.Is(err, store.ErrNotFound) {
		return NodeState{State: StateUp}, nil
	}
	if err != nil {
		return NodeState{}, err
	}
	var st NodeState
	if err := json.Unmarshal(raw, &st); err != nil {
		return NodeState{}, fmt.Errorf("decode node state %s: %w", node, err)
	}
	return st, nil
}

func putState(tx store.Tx, node string, st NodeState) error {
	raw, err := json.Marshal(st)
	if err != nil {
		return err
	}
	return tx.Put(store.BucketNodeState, node, raw)
}

// HeartbeatTTL is the TTL for the fleet's current size: a node not heard
// from for HeartbeatTTL + Grace is declared down.
func (r *Registry) HeartbeatTTL() time.Duration {
	r.mu.Lock()
	n := r.fleetSizeLocked()
	r.mu.Unlock()
	return r.live.TTL(n)
}

// fleetSizeLocked is the number of nodes with a session: this process's,
// or in replicated mode every replica's as last read. Callers hold r.mu.
func (r *Registry) fleetSizeLocked() int { return max(len(r.sessions), len(r.ha.present)) }

// HeartbeatInterval is how often an agent should send a heartbeat: half
// the TTL, so one lost heartbeat never kills a node.
func (r *Registry) HeartbeatInterval() time.Duration { return r.HeartbeatTTL() / 2 }

// Advertise returns the heartbeat interval to send s's agent now and
// records it: until the agent is told otherwise, its node's deadline is at
// least two such intervals (plus grace) after each heartbeat, so a fleet
// that shrinks (a shorter TTL) never kills a node still beating at the
// interval it was given.
func (r *Registry) Advertise(s *Session) time.Duration {
	d := r.HeartbeatInterval()
	s.advertised.Store(int64(d))
	return d
}

// touchLocked moves node's deadline to now + TTL + grace. Callers hold
// r.mu.
func (r *Registry) touchLocked(node string, now time.Time) {
	ttl := r.live.TTL(r.fleetSizeLocked())
	if s := r.sessions[node]; s != nil {
		ttl = max(ttl, 2*time.Duration(s.advertised.Load()))
	}
	r.deadline[node] = now.Add(ttl + r.live.Grace)
}

// restore gives every node the store knows and no session has claimed yet
// the failover TTL, counted from the registry's start, once.
func (r *Registry) restore(ctx context.Context) error {
	r.mu.Lock()
	done := r.restored
	r.mu.Unlock()
	if done {
		return nil
	}
	up, err := r.upNodes(ctx)
	if err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.restored {
		return nil
	}
	for n := range up {
		if _, ok := r.deadline[n]; !ok {
			r.deadline[n] = r.started.Add(r.live.FailoverTTL)
		}
	}
	r.restored = true
	return nil
}

// upNodes is every node the store knows that is not down.
func (r *Registry) upNodes(ctx context.Context) (map[string]bool, error) {
	known := map[string]bool{}
	err := r.st.View(ctx, func(tx store.Tx) error {
		if err := tx.Scan(store.BucketNodes, "", false, func(k string, _ []byte) error {
			known[k] = true
			return nil
		}); err != nil {
			return err
		}
		return tx.Scan(store.BucketNodeState, "", false, func(k string, v []byte) error {
			var st NodeState
			if err := json.Unmarshal(v, &st); err != nil {
				return fmt.Errorf("decode node state %s: %w", k, err)
			}
			if st.State == StateDown {
				delete(known, k)
			}
			return nil
		})
	})
	return known, err
}

// Sweep declares down every node whose deadline has passed: its node state
// becomes down with the reason (audited as node.down), its session is
// ended, and its leases that have not ended become LOST (lease.NodeLost;
// they are not rescheduled). The daemon calls it periodically (RunLiveness);
// the first call also starts the failover TTL of nodes known from the
// store. It returns the nodes it declared down.
func (r *Registry) Sweep(ctx context.Context) ([]string, error) {
	if r.presence != nil {
		return r.sweepReplicated(ctx)
	}
	if err := r.restore(ctx); err != nil {
		return nil, fmt.Errorf("restore node liveness: %w", err)
	}
	downed, errsOut := r.sweepDeadlines(ctx, r.now())
	return downed, errors.Join(errsOut...)
}

// sweepDeadlines declares down every node whose deadline has passed.
func (r *Registry) sweepDeadlines(ctx context.Context, now time.Time) (downed []string, errsOut []error) {
	r.mu.Lock()
	var due []string
	for n, d := range r.deadline {
		if now.After(d) {
			due = append(due, n)
		}
	}
	r.mu.Unlock()
	sort.Strings(due)
	for _, n := range due {
		ok, err := r.markDown(ctx, n, now)
		if err != nil {
			errsOut = append(errsOut, fmt.Errorf("node %s: %w", n, err))
			continue
		}
		if ok {
			downed = append(downed, n)
		}
	}
	return downed, errsOut
}

func (r *Registry) markDown(ctx context.Context, node string, now time.Time) (bool, error) {
	r.mu.Lock()
	d, tracked := r.deadline[node]
	if !tracked || !now.After(d) {
		// Heard from since the sweep looked.
		r.mu.Unlock()
		return false, nil
	}
	var lastSeen time.Time
	s := r.sessions[node]
	if s != nil {
		s.mu.Lock()
		lastSeen = s.lastSeen
		s.mu.Unlock()
	}
	r.mu.Unlock()

	reason := fmt.Sprintf("no heartbeat from node %s before %s", node, d.UTC().Format(time.RFC3339))
	if !lastSeen.IsZero() {
		reason = fmt.Sprintf("no heartbeat from node %s since %s (deadline %s)", node, lastSeen.UTC().Format(time.RFC3339), d.UTC().Format(time.RFC3339))
	} else if d.Equal(r.started.Add(r.live.FailoverTTL)) {
		reason = fmt.Sprintf("node %s did not reconnect within %s of a control-plane start", node, r.live.FailoverTTL)
	}
	if err := r.recordDown(ctx, node, reason, now); err != nil {
		return false, err
	}
	r.mu.Lock()
	if cur := r.deadline[node]; cur.Equal(d) {
		delete(r.deadline, node)
	}
	ended := s != nil && r.sessions[node] == s
	if ended {
		delete(r.sessions, node)
		close(s.Replaced) // ends the silent session; the agent reconnects
	}
	r.mu.Unlock()
	if ended {
		r.changed()
	}
	if ended && r.presence != nil {
		if err := r.presence.Release(ctx, node); err != nil {
			r.log.Warn("release presence of a node declared down", "node", node, "err", err)
		}
	}
	return true, r.loseLeases(ctx, node, reason)
}

// recordDown stores node's state as down with reason, audited as
// node.down by the control plane, in one transaction.
func (r *Registry) recordDown(ctx context.Context, node, reason string, now time.Time) error {
	return r.st.Update(ctx, func(tx store.Tx) error {
		st, err := getState(tx, node)
		if err != nil {
			return err
		}
		st.State, st.Since, st.Reason = StateDown, now, reason
		if err := putState(tx, node, st); err != nil {
			return err
		}
		_, err = audit.Append(tx, auditlog.Entry{Time: now, Actor: lease.System.ID, Action: "node.down", Resource: "node/" + node,
			Outcome: auditlog.OutcomeFailure, Reason: reason})
		return err
	})
}

// loseLeases marks the leases of a node just declared down LOST.
func (r *Registry) loseLeases(ctx context.Context, node, reason string) error {
	r.log.Warn("node down", "node", node, "reason", reason)
	if r.leases == nil {
		return nil
	}
	lost, err := r.leases.NodeLost(ctx, node, reason)
	if err != nil {
		return fmt.Errorf("mark leases lost: %w", err)
	}
	r.log.Warn("leases lost with their node", "node", node, "leases", len(lost))
	return nil
}

// RunLiveness calls Sweep every interval until ctx ends.
func (r *Registry) RunLiveness(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if _, err := r.Sweep(ctx); err != nil && ctx.Err() == nil {
				r.log.Error("liveness sweep failed", "err", err)
			}
			if r.presence != nil && !r.presence.IsLeader() {
				continue // drains are the leader's
			}
			if err := r.SweepDrains(ctx); err != nil && ctx.Err() == nil {
				r.log.Error("drain sweep failed", "err", err)
			}
		}
	}
}

// State returns the control plane's verdict on a node.
func (r *Registry) State(ctx context.Context, node string) (NodeState, error) {
	var st NodeState
	err := r.st.View(ctx, func(tx store.Tx) error {
		var err error
		st, err = getState(tx, node)
		return err
	})
	return st, err
}

// Cordon stops new leases from being placed on node (running ones stay),
// audited as node.cordon with the caller and reason; uncordon reverses it
// (node.uncordon). A node never seen is NotFound.
func (r *Registry) Cordon(ctx context.Context, c lease.Caller, node string, cordon bool, reason string) error {
	if len(reason) > 256 {
		return errs.InvalidArgument("reason", "at most 256 characters")
	}
	action := "node.cordon"
	if !cordon {
		action = "node.uncordon"
	}
	now := r.now()
	changed, missing := false, false
	err := r.st.Update(ctx, func(tx store.Tx) error {
		e := audit.FromContext(ctx, auditlog.Entry{Time: now, Actor: c.ID, Action: action, Resource: "node/" + node,
			Outcome: auditlog.OutcomeSuccess, Reason: reason, RequestID: c.RequestID})
		_, err := tx.Get(store.BucketNodes, node)
		missing = errors.Is(err, store.ErrNotFound)
		if missing {
			// The refusal is audited too: the entry is owed whatever the
			// outcome.
			e.Outcome, e.Reason = auditlog.OutcomeFailure, "node not found"
			_, err := audit.Append(tx, e)
			return err
		}
		if err != nil {
			return err
		}
		changed, err = cordonTx(tx, node, cordon, e)
		return err
	})
	if err != nil {
		return err
	}
	if missing {
		return errs.NotFound("NODE_NOT_FOUND", "node %s not found", node)
	}
	if changed {
		r.setCordoned(node, cordon)
		r.log.Info("node cordon changed", "node", node, "cordoned", cordon, "by", c.ID)
	}
	return nil
}

func (r *Registry) setCordoned(node string, cordon bool) {
	defer r.changed()
	r.mu.Lock()
	defer r.mu.Unlock()
	if cordon {
		r.cordoned[node] = true
	} else {
		delete(r.cordoned, node)
	}
}

// cordonTx cordons (or uncordons) node in tx and appends e, its audit
// entry, whether or not that changes anything (a repeated cordon is
// recorded with details["changed"]="false"). It reports whether the state
// changed; the caller updates r.cordoned once tx commits (setCordoned).
func cordonTx(tx store.Tx, node string, cordon bool, e auditlog.Entry) (bool, error) {
	st, err := getState(tx, node)
	if err != nil {
		return false, err
	}
	if st.Cordoned == cordon {
		if e.Details == nil {
			e.Details = map[string]string{}
		}
		e.Details["changed"] = "false"
		_, err := audit.Append(tx, e)
		return false, err
	}
	st.Cordoned = cordon
	if cordon {
		st.CordonReason, st.CordonedBy, st.CordonedAt = e.Reason, e.Actor, e.Time
	} else {
		// Uncordoning ends a drain too.
		st.CordonReason, st.CordonedBy, st.CordonedAt = "", "", time.Time{}
		st.DrainDeadline, st.DrainReason, st.DrainDone = time.Time{}, "", false
	}
	if err := putState(tx, node, st); err != nil {
		return false, err
	}
	_, err = audit.Append(tx, e)
	return err == nil, err
}

// loadCordons reads the cordoned nodes once, so ConnectedNodes (hot:
// every placement) never touches the store.
func (r *Registry) loadCordons(ctx context.Context) error {
	cordoned := map[string]bool{}
	gpus := map[string]map[string]bool{}
	err := r.st.View(ctx, func(tx store.Tx) error {
		return tx.Scan(store.BucketNodeState, "", false, func(k string, v []byte) error {
			var st NodeState
			if err := json.Unmarshal(v, &st); err != nil {
				return fmt.Errorf("decode node state %s: %w", k, err)
			}
			if st.Cordoned {
				cordoned[k] = true
			}
			for g := range st.CordonedGPUs {
				if gpus[k] == nil {
					gpus[k] = map[string]bool{}
				}
				gpus[k][g] = true
			}
			return nil
		})
	})
	if err != nil {
		return err
	}
	r.mu.Lock()
	r.cordoned, r.cordonedGPUs = cordoned, gpus
	r.mu.Unlock()
	r.changed()
	return nil
}
