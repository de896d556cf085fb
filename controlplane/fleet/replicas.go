package fleet

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/gpuaas/gpuaas/controlplane/store"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

// Presence is the fleet's part in replicated mode (*replica.Replica): which
// replica holds which node's session, and whether this one leads.
type Presence interface {
	// Claim records that this replica holds node's session.
	Claim(ctx context.Context, node string) error
	// Release removes this replica's claim on node, if it still has it.
	Release(ctx context.Context, node string) error
	// Present returns every node some replica holds, with that replica.
	Present(ctx context.Context) (map[string]string, error)
	IsLeader() bool
}

// haState is the registry's view of the replicated fleet. Guarded by
// Registry.mu.
type haState struct {
	// present is every node some replica holds, as last read.
	present map[string]string
	// remote is the inventory of the present nodes other replicas hold,
	// from their node records: placement here may use them.
	remote   map[string][]*nodev1.Gpu
	remoteAt time.Time

	// The leader's watch over nodes no replica holds.
	leading bool
	// known: nodes up (not down) that the leader watches.
	known map[string]bool
	// absent: when each known node no replica holds is declared down.
	absent map[string]time.Time
}

// SetPresence switches the registry to replicated mode. Call it before the
// first session. Each replica then:
//   - claims the nodes it holds sessions for, and releases them when the
//     session ends;
//   - declares down a node whose session it holds and that went silent
//     (as in single mode), and leaves a node that disconnects to the
//     leader, since it may already be connected to another replica;
//   - places leases on every present node, its own and other replicas'
//     (their inventories and attestation verdicts read from the store,
//     cordons too, at most once a second);
//   - when it leads, declares down a node no replica has held for TTL +
//     grace, or, for nodes absent when it took over, for the failover TTL.
func (r *Registry) SetPresence(p Presence) {
	r.mu.Lock()
	r.presence = p
	r.mu.Unlock()
}

// remoteRefresh is how stale the view of other replicas' nodes may be.
const remoteRefresh = time.Second

// sweepReplicated is Sweep in replicated mode.
func (r *Registry) sweepReplicated(ctx context.Context) ([]string, error) {
	now := r.now()
	// Silent sessions this replica holds.
	downed, errsOut := r.sweepDeadlines(ctx, now)
	present, err := r.presence.Present(ctx)
	if err != nil {
		return downed, errors.Join(append(errsOut, err)...)
	}
	r.mu.Lock()
	r.ha.present = present
	r.mu.Unlock()
	if err := r.refreshRemote(ctx, present, now); err != nil {
		errsOut = append(errsOut, fmt.Errorf("read other replicas' nodes: %w", err))
	}
	if !r.presence.IsLeader() {
		r.mu.Lock()
		r.ha.leading, r.ha.known, r.ha.absent = false, nil, nil
		r.mu.Unlock()
		return downed, errors.Join(errsOut...)
	}
	more, err := r.sweepAbsent(ctx, present, now)
	downed = append(downed, more...)
	if err != nil {
		errsOut = append(errsOut, err)
	}
	return downed, errors.Join(errsOut...)
}

// sweepAbsent is the leader's part: nodes no replica holds.
func (r *Registry) sweepAbsent(ctx context.Context, present map[string]string, now time.Time) ([]string, error) {
	r.mu.Lock()
	takeover := !r.ha.leading
	r.mu.Unlock()
	if takeover {
		// Every node up in the store is watched from now; those no
		// replica holds get the failover TTL, as after a restart.
		known, err := r.upNodes(ctx)
		if err != nil {
			return nil, fmt.Errorf("load nodes at takeover: %w", err)
		}
		r.mu.Lock()
		r.ha.leading, r.ha.known, r.ha.absent = true, known, map[string]time.Time{}
		r.started = now
		for n := range known {
			if present[n] == "" {
				r.ha.absent[n] = now.Add(r.live.FailoverTTL)
			}
		}
		r.mu.Unlock()
		r.log.Info("leader watching the fleet", "nodes", len(known), "absent", len(r.ha.absent))
	}
	r.mu.Lock()
	ttl := r.live.TTL(r.fleetSizeLocked()) + r.live.Grace
	for n := range present {
		r.ha.known[n] = true
		delete(r.ha.absent, n)
	}
	var due []string
	for n := range r.ha.known {
		if present[n] != "" {
			continue
		}
		d, ok := r.ha.absent[n]
		if !ok {
			r.ha.absent[n] = now.Add(ttl)
			continue
		}
		if now.After(d) {
			due = append(due, n)
		}
	}
	r.mu.Unlock()
	if len(due) == 0 {
		return nil, nil
	}
	// A node may have reconnected since the read.
	fresh, err := r.presence.Present(ctx)
	if err != nil {
		return nil, err
	}
	sort.Strings(due)
	var downed []string
	var errsOut []error
	for _, n := range due {
		if fresh[n] != "" {
			continue
		}
		r.mu.Lock()
		d := r.ha.absent[n]
		r.mu.Unlock()
		reason := fmt.Sprintf("no replica has held a session of node %s since before %s", n, d.Add(-ttl).UTC().Format(time.RFC3339))
		if d.Equal(r.started.Add(r.live.FailoverTTL)) {
			reason = fmt.Sprintf("node %s did not reconnect within %s of a control-plane leader change", n, r.live.FailoverTTL)
		}
		if err := r.recordDown(ctx, n, reason, now); err != nil {
			errsOut = append(errsOut, fmt.Errorf("node %s: %w", n, err))
			continue
		}
		r.mu.Lock()
		delete(r.ha.known, n)
		delete(r.ha.absent, n)
		r.mu.Unlock()
		downed = append(downed, n)
		if err := r.loseLeases(ctx, n, reason); err != nil {
			errsOut = append(errsOut, fmt.Errorf("node %s: %w", n, err))
		}
	}
	return downed, errors.Join(errsOut...)
}

// refreshRemote reads, at most once per remoteRefresh, what placement needs
// of the present nodes other replicas hold: inventory, attestation verdict,
// and every node's cordons (another replica may have changed them).
func (r *Registry) refreshRemote(ctx context.Context, present map[string]string, now time.Time) error {
	r.mu.Lock()
	if now.Sub(r.ha.remoteAt) < remoteRefresh {
		r.mu.Unlock()
		return nil
	}
	var others []string
	for n := range present {
		if r.sessions[n] == nil {
			others = append(others, n)
		}
	}
	attest := r.attest
	r.mu.Unlock()
	remote := make(map[string][]*nodev1.Gpu, len(others))
	verdicts := map[string]AttestationRecord{}
	err := r.st.View(ctx, func(tx store.Tx) error {
		for _, n := range others {
			raw, err := tx.Get(store.BucketNodes, n)
			if errors.Is(err, store.ErrNotFound) {
				continue
			}
			if err != nil {
				return err
			}
			var rec nodev1.Node
			if err := proto.Unmarshal(raw, &rec); err != nil {
				return fmt.Errorf("decode node %s: %w", n, err)
			}
			remote[n] = rec.GetInventory().GetGpus()
			if attest != nil {
				v, err := getAttestation(tx, n)
				if err != nil {
					return err
				}
				verdicts[n] = v
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	if err := r.loadCordons(ctx); err != nil {
		return err
	}
	if attest != nil {
		attest.setRemote(verdicts)
	}
	r.mu.Lock()
	r.ha.remote, r.ha.remoteAt = remote, now
	r.mu.Unlock()
	r.changed()
	return nil
}

// setRemote takes the latest verdicts on nodes other replicas hold and
// challenge: their sessions are judged there.
func (a *Attestor) setRemote(recs map[string]AttestationRecord) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for n, rec := range recs {
		na := a.node(n)
		na.status, na.reportTime = rec.Latest.Status, rec.Latest.ReportTime
	}
	a.reg.changed()
}

// NotifyAll wakes every session this replica holds: each agent is sent
// its desired state again.
func (r *Registry) NotifyAll() {
	r.mu.Lock()
	nodes := make([]string, 0, len(r.sessions))
	for n := range r.sessions {
		nodes = append(nodes, n)
	}
	r.mu.Unlock()
	for _, n := range nodes {
		r.Notify(n)
	}
}
