package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/lease"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/errs"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

// MaxDrainDeadline is the longest a drain may let leases run.
const MaxDrainDeadline = 7 * 24 * time.Hour

// LeaseDrainer is what a drain needs of the lease service: the leases on
// a node, and a way to cancel one.
type LeaseDrainer interface {
	LiveOn(ctx context.Context, node string) ([]*leasev1.Lease, error)
	Cancel(ctx context.Context, c lease.Caller, id, reason string) (*leasev1.Lease, error)
}

var _ LeaseDrainer = (*lease.Service)(nil)

// nodeChange runs change on node's state in one transaction with its audit
// entry e (the caller's action on the node). A node never seen is audited
// as a failure and is NotFound; the entry is owed whatever the outcome.
func (r *Registry) nodeChange(ctx context.Context, node string, e auditlog.Entry, change func(tx store.Tx, st *NodeState, n *nodev1.Node) error) error {
	e = audit.FromContext(ctx, e)
	missing := false
	err := r.st.Update(ctx, func(tx store.Tx) error {
		missing = false
		raw, err := tx.Get(store.BucketNodes, node)
		if errors.Is(err, store.ErrNotFound) {
			missing = true
			f := e
			f.Outcome, f.Reason = auditlog.OutcomeFailure, "node not found"
			_, err := audit.Append(tx, f)
			return err
		}
		if err != nil {
			return err
		}
		n := &nodev1.Node{}
		if err := proto.Unmarshal(raw, n); err != nil {
			return fmt.Errorf("decode node %s: %w", node, err)
		}
		st, err := getState(tx, node)
		if err != nil {
			return err
		}
		if err := change(tx, &st, n); err != nil {
			return err
		}
		if err := putState(tx, node, st); err != nil {
			return err
		}
		_, err = audit.Append(tx, e)
		return err
	})
	if err != nil {
		return err
	}
	if missing {
		return errs.NotFound("NODE_NOT_FOUND", "node %s not found", node)
	}
	return nil
}

// CordonGPU stops new leases from being placed on one GPU of node (its
// running lease stays), audited as node.cordon (node.uncordon) on
// node/NODE/gpu/UUID. A GPU the node never reported is NotFound.
func (r *Registry) CordonGPU(ctx context.Context, c lease.Caller, node, gpu string, cordon bool, reason string) error {
	if len(reason) > 256 {
		return errs.InvalidArgument("reason", "at most 256 characters")
	}
	if gpu == "" || len(gpu) > 128 {
		return errs.InvalidArgument("gpu_uuid", "1-128 characters required")
	}
	if err := r.loadCordonsOnce(ctx); err != nil {
		return err
	}
	action := "node.cordon"
	if !cordon {
		action = "node.uncordon"
	}
	e := auditlog.Entry{Time: r.now(), Actor: c.ID, Action: action, Resource: "node/" + node + "/gpu/" + gpu,
		Outcome: auditlog.OutcomeSuccess, Reason: reason, RequestID: c.RequestID}
	err := r.nodeChange(ctx, node, e, func(_ store.Tx, st *NodeState, n *nodev1.Node) error {
		found := false
		for _, g := range n.GetInventory().GetGpus() {
			found = found || g.GetUuid() == gpu
		}
		if !found {
			return errs.NotFound("GPU_NOT_FOUND", "node %s has no GPU %s", node, gpu)
		}
		if cordon {
			if st.CordonedGPUs == nil {
				st.CordonedGPUs = map[string]string{}
			}
			st.CordonedGPUs[gpu] = reason
		} else {
			delete(st.CordonedGPUs, gpu)
		}
		return nil
	})
	if err != nil {
		if errors.Is(err, errs.ErrNotFound) && errs.ReasonOf(err) == "GPU_NOT_FOUND" {
			// The refusal is audited too.
			e.Outcome, e.Reason = auditlog.OutcomeFailure, "gpu not found"
			if aerr := r.st.Update(ctx, func(tx store.Tx) error { _, err := audit.Append(tx, audit.FromContext(ctx, e)); return err }); aerr != nil {
				return aerr
			}
		}
		return err
	}
	r.mu.Lock()
	if cordon {
		if r.cordonedGPUs[node] == nil {
			r.cordonedGPUs[node] = map[string]bool{}
		}
		r.cordonedGPUs[node][gpu] = true
	} else {
		delete(r.cordonedGPUs[node], gpu)
	}
	r.mu.Unlock()
	r.changed()
	r.log.Info("gpu cordon changed", "node", node, "gpu", gpu, "cordoned", cordon, "by", c.ID)
	return nil
}

// Drain cordons node and sets a deadline at which the leases still running
// there are cancelled (SweepDrains), audited as node.drain. A deadline of 0
// cancels them at once. Uncordoning the node ends the drain.
func (r *Registry) Drain(ctx context.Context, c lease.Caller, node, reason string, deadline time.Duration) error {
	if len(reason) > 256 {
		return errs.InvalidArgument("reason", "at most 256 characters")
	}
	if deadline < 0 || deadline > MaxDrainDeadline {
		return errs.InvalidArgument("deadline", "must be between 0 and %s", MaxDrainDeadline)
	}
	if err := r.loadCordonsOnce(ctx); err != nil {
		return err
	}
	now := r.now()
	at := now.Add(deadline)
	e := auditlog.Entry{Time: now, Actor: c.ID, Action: "node.drain", Resource: "node/" + node, Outcome: auditlog.OutcomeSuccess,
		Reason: reason, RequestID: c.RequestID, Details: map[string]string{"deadline": at.UTC().Format(time.RFC3339)}}
	err := r.nodeChange(ctx, node, e, func(_ store.Tx, st *NodeState, _ *nodev1.Node) error {
		if !st.Cordoned {
			st.Cordoned, st.CordonReason, st.CordonedBy, st.CordonedAt = true, "drain: "+reason, c.ID, now
		}
		st.DrainDeadline, st.DrainReason, st.DrainDone = at, reason, false
		return nil
	})
	if err != nil {
		return err
	}
	r.setCordoned(node, true)
	r.log.Info("node draining", "node", node, "deadline", at, "by", c.ID)
	if deadline == 0 {
		return r.SweepDrains(ctx)
	}
	return nil
}

// SweepDrains cancels the leases of every node whose drain deadline has
// passed (as the control plane, reason "drained: ..."), then records the
// drain done (node.drained). RunLiveness calls it every tick.
func (r *Registry) SweepDrains(ctx context.Context) error {
	d, ok := r.leases.(LeaseDrainer)
	if !ok {
		return nil
	}
	now := r.now()
	due := map[string]NodeState{}
	err := r.st.View(ctx, func(tx store.Tx) error {
		return tx.Scan(store.BucketNodeState, "", false, func(k string, v []byte) error {
			var st NodeState
			if err := json.Unmarshal(v, &st); err != nil {
				return fmt.Errorf("decode node state %s: %w", k, err)
			}
			if !st.DrainDeadline.IsZero() && !st.DrainDone && !now.Before(st.DrainDeadline) {
				due[k] = st
			}
			return nil
		})
	})
	if err != nil {
		return err
	}
	for node, st := range due {
		live, err := d.LiveOn(ctx, node)
		if err != nil {
			return err
		}
		cancelled := 0
		for _, l := range live {
			if _, err := d.Cancel(ctx, lease.System, l.GetId(), "drained: "+st.DrainReason); err != nil {
				return fmt.Errorf("drain %s: cancel %s: %w", node, l.GetId(), err)
			}
			cancelled++
		}
		err = r.st.Update(ctx, func(tx store.Tx) error {
			cur, err := getState(tx, node)
			if err != nil || !cur.DrainDeadline.Equal(st.DrainDeadline) || cur.DrainDone {
				return err // uncordoned or re-drained meanwhile
			}
			cur.DrainDone = true
			if err := putState(tx, node, cur); err != nil {
				return err
			}
			_, err = audit.Append(tx, auditlog.Entry{Time: now, Actor: lease.System.ID, Action: "node.drained", Resource: "node/" + node,
				Outcome: auditlog.OutcomeSuccess, Reason: st.DrainReason, Details: map[string]string{"cancelled": fmt.Sprint(cancelled)}})
			return err
		})
		if err != nil {
			return err
		}
		r.log.Info("node drained", "node", node, "cancelled", cancelled)
	}
	return nil
}
