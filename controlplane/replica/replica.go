// Package replica runs a control plane as one of several replicas sharing an
// etcd store. Every replica serves every API and holds agent sessions; one,
// elected through etcd (go.etcd.io/etcd/client/v3/concurrency), is the
// leader and alone runs the fleet-wide timers: pending placement and lease
// expiry, the failover TTL of nodes no replica holds, drain deadlines, and
// audit checkpointing and forwarding.
//
// Correctness never rests on there being one leader: every state change is
// a serializable store transaction (revision compares), so a deposed leader
// still finishing a tick can only lose a conflict, never double-place or
// skip an audit entry. Leadership is for doing the timed work once.
//
// Each replica also publishes which nodes' sessions it holds: one key per
// node under PREFIX/presence/, bound to the replica's etcd lease, so that
// the keys of a replica that dies vanish with its lease and the leader
// counts its nodes' failover TTL from then.
//
// Keys, under the deployment's prefix P (beside the store's P/b/ and P/d/):
//
//	P + "election/" + lease id   the election (concurrency.Election)
//	P + "presence/" + node       the replica holding node's session (value:
//	                             replica id), bound to that replica's lease
package replica

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
)

// Options configure a replica.
type Options struct {
	// Client reaches the etcd cluster holding the store; Prefix is the
	// store's key prefix (store.Etcd.Prefix). Required.
	Client *clientv3.Client
	Prefix string
	// ID names this replica in the election and in presence keys
	// (default: host name and pid). Unique per replica.
	ID string
	// TTL is the replica's etcd lease TTL: how long after a replica dies
	// its leadership and its presence keys last (default 10s, at least 2s).
	TTL    time.Duration
	Logger *slog.Logger
}

// Replica is one control-plane replica's membership: its etcd session, its
// part in the election and the presence keys of the sessions it holds.
type Replica struct {
	o Options

	mu      sync.Mutex
	sess    *concurrency.Session // current etcd session; replaced when lost
	leader  bool
	claimed map[string]bool // nodes whose presence key this replica holds
}

// New opens the replica's first etcd session.
func New(ctx context.Context, o Options) (*Replica, error) {
	if o.Client == nil || o.Prefix == "" {
		return nil, errors.New("replica: an etcd client and the store's prefix are required")
	}
	if !strings.HasSuffix(o.Prefix, "/") {
		o.Prefix += "/"
	}
	if o.TTL == 0 {
		o.TTL = 10 * time.Second
	}
	if o.TTL < 2*time.Second {
		return nil, fmt.Errorf("replica: ttl %s is below 2s", o.TTL)
	}
	if o.ID == "" || strings.ContainsAny(o.ID, "/\n") {
		return nil, fmt.Errorf("replica: id %q must be non-empty, without '/' or newlines", o.ID)
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	r := &Replica{o: o, claimed: map[string]bool{}}
	sess, err := r.newSession(ctx)
	if err != nil {
		return nil, err
	}
	r.sess = sess
	return r, nil
}

// ID is the replica's id.
func (r *Replica) ID() string { return r.o.ID }

func (r *Replica) newSession(ctx context.Context) (*concurrency.Session, error) {
	ttl := int((r.o.TTL + time.Second - 1) / time.Second)
	sess, err := concurrency.NewSession(r.o.Client, concurrency.WithTTL(ttl), concurrency.WithContext(context.WithoutCancel(ctx)))
	if err != nil {
		return nil, fmt.Errorf("replica %s: etcd session: %w", r.o.ID, err)
	}
	return sess, nil
}

func (r *Replica) session() *concurrency.Session {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.sess
}

// IsLeader reports whether this replica holds the leadership now.
func (r *Replica) IsLeader() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.leader
}

func (r *Replica) setLeader(v bool) {
	r.mu.Lock()
	r.leader = v
	r.mu.Unlock()
}

// Leader returns the current leader's id ("" when there is none).
func (r *Replica) Leader(ctx context.Context) (string, error) {
	resp, err := concurrency.NewElection(r.session(), r.o.Prefix+"election/").Leader(ctx)
	if errors.Is(err, concurrency.ErrElectionNoLeader) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	return string(resp.Kvs[0].Value), nil
}

// Run campaigns for leadership until ctx ends. While this replica leads,
// lead runs with a context that ends when the leadership does (ctx ends,
// or the etcd session is lost: then another replica may already lead).
// Run returns only after lead has returned. A lost session is replaced and
// the presence keys of the sessions still held are written again under
// the new one.
func (r *Replica) Run(ctx context.Context, lead func(ctx context.Context)) {
	for ctx.Err() == nil {
		sess := r.session()
		el := concurrency.NewElection(sess, r.o.Prefix+"election/")
		cctx, cancel := context.WithCancel(ctx)
		go func() {
			select {
			case <-sess.Done():
			case <-cctx.Done():
			}
			cancel()
		}()
		err := el.Campaign(cctx, r.o.ID)
		if err == nil {
			r.o.Logger.Info("replica elected leader", "replica", r.o.ID)
			r.setLeader(true)
			lead(cctx)
			r.setLeader(false)
			if ctx.Err() == nil {
				r.o.Logger.Warn("replica lost the leadership", "replica", r.o.ID)
			}
			// Let another replica lead at once (a deposed leader whose
			// session is gone has nothing to resign).
			rctx, rcancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
			_ = el.Resign(rctx)
			rcancel()
		}
		cancel()
		if ctx.Err() != nil {
			return
		}
		select {
		case <-sess.Done():
			if err := r.renew(ctx); err != nil {
				r.o.Logger.Error("replica etcd session lost; retrying", "replica", r.o.ID, "err", err)
				select {
				case <-ctx.Done():
				case <-time.After(time.Second):
				}
			}
		default:
			if err != nil {
				r.o.Logger.Warn("campaign failed; retrying", "replica", r.o.ID, "err", err)
				select {
				case <-ctx.Done():
				case <-time.After(time.Second):
				}
			}
		}
	}
}

// renew replaces a lost session and writes the held presence keys again.
func (r *Replica) renew(ctx context.Context) error {
	sess, err := r.newSession(ctx)
	if err != nil {
		return err
	}
	r.mu.Lock()
	r.sess = sess
	nodes := make([]string, 0, len(r.claimed))
	for n := range r.claimed {
		nodes = append(nodes, n)
	}
	r.mu.Unlock()
	r.o.Logger.Warn("replica etcd session renewed", "replica", r.o.ID, "presence_keys", len(nodes))
	var errsOut []error
	for _, n := range nodes {
		if err := r.put(ctx, sess, n); err != nil {
			errsOut = append(errsOut, err)
		}
	}
	return errors.Join(errsOut...)
}

// Close resigns (if leading) by revoking the session: the leadership and
// every presence key go at once rather than after the TTL.
func (r *Replica) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_, err := r.o.Client.Revoke(ctx, r.session().Lease())
	return err
}

func (r *Replica) presenceKey(node string) string { return r.o.Prefix + "presence/" + node }

func (r *Replica) put(ctx context.Context, sess *concurrency.Session, node string) error {
	if _, err := r.o.Client.Put(ctx, r.presenceKey(node), r.o.ID, clientv3.WithLease(sess.Lease())); err != nil {
		return fmt.Errorf("presence of %s: %w", node, err)
	}
	return nil
}

// Claim records that this replica holds node's session (replacing another
// replica's claim: the agent moved).
func (r *Replica) Claim(ctx context.Context, node string) error {
	r.mu.Lock()
	r.claimed[node] = true
	sess := r.sess
	r.mu.Unlock()
	return r.put(ctx, sess, node)
}

// Release removes the presence key of node if it is still this replica's.
func (r *Replica) Release(ctx context.Context, node string) error {
	r.mu.Lock()
	delete(r.claimed, node)
	r.mu.Unlock()
	k := r.presenceKey(node)
	_, err := r.o.Client.Txn(ctx).If(clientv3.Compare(clientv3.Value(k), "=", r.o.ID)).Then(clientv3.OpDelete(k)).Commit()
	if err != nil {
		return fmt.Errorf("release presence of %s: %w", node, err)
	}
	return nil
}

// Present returns every node some replica holds a session for, with that
// replica's id.
func (r *Replica) Present(ctx context.Context) (map[string]string, error) {
	pfx := r.o.Prefix + "presence/"
	out := map[string]string{}
	key, end := pfx, clientv3.GetPrefixRangeEnd(pfx)
	for {
		resp, err := r.o.Client.Get(ctx, key, clientv3.WithRange(end), clientv3.WithLimit(1024))
		if err != nil {
			return nil, fmt.Errorf("read presence: %w", err)
		}
		for _, kv := range resp.Kvs {
			out[strings.TrimPrefix(string(kv.Key), pfx)] = string(kv.Value)
		}
		if !resp.More || len(resp.Kvs) == 0 {
			return out, nil
		}
		key = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}
