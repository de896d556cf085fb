// Package audit is the control plane's audit log (DESIGN.md contracts 1
// and 2): every privileged operation appends one entry in the same store
// transaction as its state change; entries are never updated or deleted.
// The entries are the leaves of an RFC 6962 Merkle tree (pkg/auditlog);
// a Checkpointer signs checkpoints of it, Prove builds inclusion proofs
// against them, Verify recomputes the whole tree, and a Forwarder delivers
// signed batches to an upstream sink exactly once.
//
// It uses only store.Tx, so it works on every store backend. Store layout:
//
//	audit
//	  %020d seq                 entry, canonical JSON (auditlog.Encode); append-only
//	  node/%020d/%02d           the node's last leaf (0-based), its level >= 1
//	                            -> 32-byte hash of the perfect subtree node;
//	                            written once, when it completes, so the keys
//	                            only grow (store schema 4)
//	  tree/%02d/%020d           level, index -> the same, for nodes written
//	                            before schema 4 (read, never written)
//	meta
//	  audit_seq                 uint64 big-endian; sequence of the last entry
//	  audit_tree                the tree's compact range (auditlog.Tree binary)
//	audit_checkpoints
//	  %020d tree size           signed checkpoint (C2SP signed note)
//	audit_forward
//	  delivered                 forwarder state (JSON, see forward.go)
//
// Appending reads and writes O(log n) bytes and never reads earlier
// entries; proofs read O(log n) nodes (leaf hashes are recomputed from the
// entries, so level 0 is not stored twice).
package audit

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
)

const (
	keySeq  = "audit_seq"
	keyTree = "audit_tree"
	// nodePrefix is where node hashes live in the audit bucket, and
	// legacyNodePrefix where logs written before store schema 4 keep
	// theirs. Entry keys are digits, so they sort before both.
	nodePrefix       = "node/"
	legacyNodePrefix = "tree/"
)

// Key is the store key of the entry with the sequence number: %020d.
func Key(seq uint64) string {
	var b [20]byte
	return string(appendPadded(b[:0], seq, 20))
}

// nodeKey is node/%020d/%02d: the node's last leaf, then its level. A
// node is stored when its last leaf is appended, so the keys grow with
// the log and a commit's nodes share one tail page; keyed by level first
// (legacyNodeKey), every level's range had a tail page of its own, and a
// commit of a few dozen entries wrote about five of them.
func nodeKey(level uint, index uint64) string {
	b := make([]byte, 0, len(nodePrefix)+23)
	b = append(b, nodePrefix...)
	b = appendPadded(b, (index+1)<<level-1, 20)
	b = append(b, '/')
	return string(appendPadded(b, uint64(level), 2))
}

// legacyNodeKey is tree/%02d/%020d, where nodes written before store
// schema 4 are.
func legacyNodeKey(level uint, index uint64) string {
	b := make([]byte, 0, len(legacyNodePrefix)+23)
	b = append(b, legacyNodePrefix...)
	b = appendPadded(b, uint64(level), 2)
	b = append(b, '/')
	return string(appendPadded(b, index, 20))
}

func appendPadded(b []byte, v uint64, width int) []byte {
	var d [20]byte
	n := len(strconv.AppendUint(d[:0], v, 10))
	for ; n < width; n++ {
		b = append(b, '0')
	}
	return strconv.AppendUint(b, v, 10)
}

// Append assigns e the next sequence number, stores it inside tx and adds
// it to the tree. The caller commits it together with the state change it
// records. Time defaults to now.
func Append(tx store.Tx, e auditlog.Entry) (auditlog.Entry, error) {
	seq, err := store.NextU64(tx, keySeq)
	if err != nil {
		return e, fmt.Errorf("append audit entry: %w", err)
	}
	tree, err := loadTree(tx, seq-1)
	if err != nil {
		return e, fmt.Errorf("append audit entry %d: %w", seq, err)
	}
	e.Seq = seq
	if e.Time.IsZero() {
		e.Time = time.Now()
	}
	e.Time = e.Time.UTC()
	raw := auditlog.Encode(e)
	var putErr error
	tree.Append(auditlog.LeafHash(raw), func(level uint, index uint64, h []byte) {
		if level > 0 && putErr == nil {
			putErr = tx.Put(store.BucketAudit, nodeKey(level, index), h)
		}
	})
	if putErr != nil {
		return e, fmt.Errorf("append audit entry %d: %w", seq, putErr)
	}
	tb, _ := tree.MarshalBinary()
	if err := tx.Put(store.BucketMeta, keyTree, tb); err != nil {
		return e, fmt.Errorf("append audit entry %d: %w", seq, err)
	}
	if err := tx.Put(store.BucketAudit, Key(seq), raw); err != nil {
		return e, fmt.Errorf("append audit entry %d: %w", seq, err)
	}
	return e, nil
}

// Correlation names the call an entry records: the request id that also
// appears in the call's logs and errors, and the trace id of its span.
type Correlation struct {
	RequestID string
	TraceID   string
}

type correlationKey struct{}

// NewContext returns ctx carrying the correlation of the call it serves;
// the API edge sets it once per call.
func NewContext(ctx context.Context, c Correlation) context.Context {
	return context.WithValue(ctx, correlationKey{}, c)
}

// Slot holds the correlation of a call whose context is made before the
// correlation is known (a gRPC stats handler tags each call before the
// edge's interceptor gives it a request id). The edge fills it once, before
// anything reads it.
type Slot interface {
	Correlation() Correlation
	SetCorrelation(Correlation)
}

// IsSlotKey reports whether key is the one a context's Value answers with
// its Slot: a context type that is its own slot (a call's state embedding
// its parent context, made before the correlation is known) answers it,
// and CorrelationFrom then reads the slot.
func IsSlotKey(key any) bool {
	_, ok := key.(correlationKey)
	return ok
}

// SlotFrom returns the slot ctx carries, nil if none (or if NewContext set
// a correlation over it).
func SlotFrom(ctx context.Context) Slot {
	s, _ := ctx.Value(correlationKey{}).(Slot)
	return s
}

// CorrelationFrom returns the correlation ctx carries, zero if none.
func CorrelationFrom(ctx context.Context) Correlation {
	switch v := ctx.Value(correlationKey{}).(type) {
	case Correlation:
		return v
	case Slot:
		return v.Correlation()
	}
	return Correlation{}
}

// FromContext returns e with its RequestID and TraceID taken from the
// call ctx serves, where e does not set them. Every entry written while
// serving a call passes through it, so the entry can be found from the
// call's logs, errors and trace.
func FromContext(ctx context.Context, e auditlog.Entry) auditlog.Entry {
	c := CorrelationFrom(ctx)
	if e.RequestID == "" {
		e.RequestID = c.RequestID
	}
	if e.TraceID == "" {
		e.TraceID = c.TraceID
	}
	return e
}

// loadTree reads the stored compact range, which must be of size want.
func loadTree(tx store.Tx, want uint64) (*auditlog.Tree, error) {
	raw, err := tx.Get(store.BucketMeta, keyTree)
	if errors.Is(err, store.ErrNotFound) {
		if want != 0 {
			return nil, fmt.Errorf("%w: the log has %d entries but no tree state (written by a hash-chain version?)", auditlog.ErrTampered, want)
		}
		return auditlog.NewTree(), nil
	}
	if err != nil {
		return nil, err
	}
	t, err := auditlog.UnmarshalTree(raw)
	if err != nil {
		return nil, fmt.Errorf("%w: stored tree state: %v", auditlog.ErrTampered, err)
	}
	if t.Size() != want {
		return nil, fmt.Errorf("%w: stored tree has %d leaves, the sequence says %d", auditlog.ErrTampered, t.Size(), want)
	}
	return t, nil
}

// nodes reads tree nodes inside tx for proofs.
func nodes(tx store.Tx) auditlog.NodeReader {
	return func(level uint, index uint64) ([]byte, error) {
		if level == 0 {
			raw, err := tx.Get(store.BucketAudit, Key(index+1))
			if err != nil {
				return nil, fmt.Errorf("entry %d: %w", index+1, err)
			}
			return auditlog.LeafHash(raw), nil
		}
		h, err := tx.Get(store.BucketAudit, nodeKey(level, index))
		if errors.Is(err, store.ErrNotFound) {
			return tx.Get(store.BucketAudit, legacyNodeKey(level, index))
		}
		return h, err
	}
}

// Head is the log's current size and tree.
func Head(tx store.Tx) (uint64, *auditlog.Tree, error) {
	size, err := store.GetU64(tx, keySeq)
	if err != nil {
		return 0, nil, err
	}
	t, err := loadTree(tx, size)
	return size, t, err
}

// blockDigits groups entries in blocks of 10^4 for reads: the keys of a
// block share their first 16 digits, so one prefix scan (one short read
// transaction) covers one block.
const blockDigits = 4

// scanEntries calls fn with the raw entries from sequence from up to and
// including to (0: as far as they go), in order, one short read
// transaction per block. fn sees the key it was stored under; it may
// return store.ErrStopScan to end the whole scan.
func scanEntries(ctx context.Context, s store.Store, from, to uint64, fn func(key string, raw []byte) error) error {
	if from == 0 {
		from = 1
	}
	div := uint64(1)
	for range blockDigits {
		div *= 10
	}
	for block := from / div; ; block++ {
		if to != 0 && block*div > to {
			return nil
		}
		n := 0
		done := false
		err := s.View(ctx, func(tx store.Tx) error {
			n, done = 0, false
			prefix := fmt.Sprintf("%0*d", 20-blockDigits, block)
			return tx.Scan(store.BucketAudit, prefix, false, func(k string, v []byte) error {
				n++
				seq, _ := strconv.ParseUint(k, 10, 64)
				if seq < from {
					return nil
				}
				if to != 0 && seq > to {
					done = true
					return store.ErrStopScan
				}
				err := fn(k, v)
				if errors.Is(err, store.ErrStopScan) {
					done = true
				}
				return err
			})
		})
		if err != nil {
			return err
		}
		if done || (n == 0 && (to == 0 || block*div+div > to)) {
			return nil
		}
		if err := ctx.Err(); err != nil {
			return err
		}
	}
}

// List returns entries with sequence numbers after `after`, at most limit
// (0: all).
func List(ctx context.Context, s store.Store, after uint64, limit int) ([]auditlog.Entry, error) {
	var out []auditlog.Entry
	to := uint64(0)
	if limit > 0 {
		to = after + uint64(limit)
	}
	err := scanEntries(ctx, s, after+1, to, func(k string, raw []byte) error {
		e, err := auditlog.Decode(raw)
		if err != nil {
			return fmt.Errorf("audit entry %s: %w", k, err)
		}
		out = append(out, e)
		return nil
	})
	return out, err
}

// Tail returns the last n entries.
func Tail(ctx context.Context, s store.Store, n int) ([]auditlog.Entry, error) {
	var size uint64
	if err := s.View(ctx, func(tx store.Tx) error {
		var err error
		size, err = store.GetU64(tx, keySeq)
		return err
	}); err != nil {
		return nil, err
	}
	after := uint64(0)
	if uint64(n) < size {
		after = size - uint64(n)
	}
	return List(ctx, s, after, int(size-after))
}

// Filter selects entries for Search. Empty fields match everything; text
// fields match exactly, or by prefix when they end in "*".
type Filter struct {
	Actor, Action, Resource, Tenant, Outcome, RequestID string
	Since, Until                                        time.Time
	Limit                                               int
	// After skips the entries up to this sequence number.
	After uint64
}

func match(pattern, v string) bool {
	if pattern == "" {
		return true
	}
	if p, ok := strings.CutSuffix(pattern, "*"); ok {
		return strings.HasPrefix(v, p)
	}
	return v == pattern
}

// Matches reports whether e passes the filter.
func (f Filter) Matches(e auditlog.Entry) bool {
	return match(f.Actor, e.Actor) && match(f.Action, e.Action) && match(f.Resource, e.Resource) &&
		match(f.Tenant, e.Tenant) && match(f.Outcome, e.Outcome) && match(f.RequestID, e.RequestID) &&
		(f.Since.IsZero() || !e.Time.Before(f.Since)) && (f.Until.IsZero() || e.Time.Before(f.Until))
}

// Search returns the entries that match f, oldest first, at most f.Limit
// (0: all). It reads the whole log.
func Search(ctx context.Context, s store.Store, f Filter) ([]auditlog.Entry, error) {
	var out []auditlog.Entry
	err := scanEntries(ctx, s, f.After+1, 0, func(k string, raw []byte) error {
		e, err := auditlog.Decode(raw)
		if err != nil {
			return fmt.Errorf("audit entry %s: %w", k, err)
		}
		if f.Matches(e) {
			out = append(out, e)
			if f.Limit > 0 && len(out) >= f.Limit {
				return store.ErrStopScan
			}
		}
		return nil
	})
	return out, err
}
