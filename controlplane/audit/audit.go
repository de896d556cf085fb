// Package audit is the control plane's audit log: every privileged
// operation appends one entry in the same store transaction as its state
// change (contract 1). Entries are never updated or deleted; Verify checks
// the whole chain.
package audit

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
)

const (
	keyHead = "audit_head"
	keySeq  = "audit_seq"
)

// Key is the store key of the entry with the sequence number.
func Key(seq uint64) string { return fmt.Sprintf("%020d", seq) }

// Append seals e after the current head and stores it inside tx. The caller
// commits it together with the state change it records. Time defaults to
// now.
func Append(tx store.Tx, e auditlog.Entry) (auditlog.Entry, error) {
	seq, err := store.NextU64(tx, keySeq)
	if err != nil {
		return e, fmt.Errorf("append audit entry: %w", err)
	}
	head, err := tx.Get(store.BucketMeta, keyHead)
	if errors.Is(err, store.ErrNotFound) {
		head = nil
	} else if err != nil {
		return e, fmt.Errorf("append audit entry: %w", err)
	}
	e.Seq = seq
	if e.Time.IsZero() {
		e.Time = time.Now()
	}
	e.Time = e.Time.UTC()
	auditlog.Seal(head, &e)
	h, _ := hex.DecodeString(e.Hash)
	if err := tx.Put(store.BucketMeta, keyHead, h); err != nil {
		return e, fmt.Errorf("append audit entry: %w", err)
	}
	if err := tx.Put(store.BucketAudit, Key(seq), auditlog.Encode(e)); err != nil {
		return e, fmt.Errorf("append audit entry: %w", err)
	}
	return e, nil
}

// Result is the outcome of a verification.
type Result struct {
	Entries uint64
	Head    string // hex hash of the last entry
}

// Verify checks every stored entry in order and that the stored head
// matches the last one. The error names the first bad entry.
func Verify(ctx context.Context, s store.Store) (Result, error) {
	var res Result
	err := s.View(ctx, func(tx store.Tx) error {
		v := auditlog.NewVerifier()
		err := tx.Scan(store.BucketAudit, "", false, func(k string, val []byte) error {
			e, err := auditlog.Decode(val)
			if err != nil {
				return fmt.Errorf("audit entry %s: %w", k, err)
			}
			if k != Key(e.Seq) {
				return fmt.Errorf("%w: entry stored at %s claims sequence %d", auditlog.ErrTampered, k, e.Seq)
			}
			return v.Add(e)
		})
		if err != nil {
			return err
		}
		seq, err := store.GetU64(tx, keySeq)
		if err != nil {
			return err
		}
		if seq != v.Count() {
			return fmt.Errorf("%w: head says %d entries, found %d", auditlog.ErrTampered, seq, v.Count())
		}
		if seq > 0 {
			head, err := tx.Get(store.BucketMeta, keyHead)
			if err != nil {
				return err
			}
			if hex.EncodeToString(head) != hex.EncodeToString(v.Head()) {
				return fmt.Errorf("%w: stored head does not match entry %d", auditlog.ErrTampered, seq)
			}
		}
		res = Result{Entries: v.Count(), Head: hex.EncodeToString(v.Head())}
		return nil
	})
	return res, err
}

// List returns entries with sequence numbers after `after`, at most limit.
func List(ctx context.Context, s store.Store, after uint64, limit int) ([]auditlog.Entry, error) {
	var out []auditlog.Entry
	err := s.View(ctx, func(tx store.Tx) error {
		return tx.Scan(store.BucketAudit, "", false, func(k string, val []byte) error {
			e, err := auditlog.Decode(val)
			if err != nil {
				return err
			}
			if e.Seq <= after {
				return nil
			}
			out = append(out, e)
			if limit > 0 && len(out) >= limit {
				return store.ErrStopScan
			}
			return nil
		})
	})
	return out, err
}
