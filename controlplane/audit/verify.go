package audit

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"strconv"

	"golang.org/x/mod/sumdb/note"

	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
)

// Result is the outcome of a verification.
type Result struct {
	Entries     uint64
	Root        string // base64 root hash of the recomputed tree
	Checkpoints int    // stored checkpoints checked
	// SignaturesChecked is false when Verify ran without trusted keys: the
	// checkpoints' roots were compared with the tree, their signatures not.
	SignaturesChecked bool
	// Latest is the largest checkpoint, if any.
	Latest *auditlog.Checkpoint
}

// VerifyOptions configures Verify.
type VerifyOptions struct {
	// Trusted are the keys checkpoints must be signed with (any one of
	// them). Nil checks roots only and says so in the Result.
	Trusted note.Verifiers
	// Origin, if not empty, is the log every checkpoint must be for.
	Origin string
}

// Verify recomputes the tree from every stored entry, in order, and checks
// that each entry is canonical and in sequence, that the stored tree state
// matches, and that every stored checkpoint is signed by a trusted key and
// has the root of the recomputed tree at its size (so all checkpoints are
// consistent with each other and with the entries). Errors are
// auditlog.ErrTampered or auditlog.ErrUntrusted and name the first bad
// entry or checkpoint. It reads in short transactions, so it can run
// against a live store; entries appended meanwhile are not checked.
func Verify(ctx context.Context, s store.Store, opts ...VerifyOptions) (Result, error) {
	var o VerifyOptions
	if len(opts) > 0 {
		o = opts[0]
	}
	var size uint64
	var stored *auditlog.Tree
	var cps []auditlog.Checkpoint
	err := s.View(ctx, func(tx store.Tx) error {
		var err error
		if size, err = store.GetU64(tx, keySeq); err != nil {
			return err
		}
		err = tx.Scan(store.BucketAuditCheckpoints, "", false, func(k string, v []byte) error {
			var c auditlog.Checkpoint
			var err error
			if o.Trusted != nil {
				c, err = auditlog.Open(v, o.Origin, o.Trusted)
			} else {
				c, err = auditlog.ParseSigned(v)
			}
			if err != nil {
				return fmt.Errorf("stored checkpoint %s: %w", k, err)
			}
			if o.Origin != "" && c.Origin != o.Origin {
				return fmt.Errorf("%w: stored %s is for origin %q, want %q", auditlog.ErrUntrusted, c, c.Origin, o.Origin)
			}
			if k != Key(c.Size) {
				return fmt.Errorf("%w: %s is stored under key %s", auditlog.ErrTampered, c, k)
			}
			cps = append(cps, c)
			return nil
		})
		if err != nil {
			return err
		}
		if n := len(cps); n > 0 && cps[n-1].Size > size {
			return fmt.Errorf("%w: %s covers %d entries but the log holds %d: the log was truncated", auditlog.ErrTampered, cps[n-1], cps[n-1].Size, size)
		}
		stored, err = loadTree(tx, size)
		return err
	})
	if err != nil {
		return Result{}, err
	}
	res := Result{SignaturesChecked: o.Trusted != nil}
	if len(cps) > 0 {
		last := cps[len(cps)-1]
		res.Latest = &last
	}

	v := auditlog.NewVerifier()
	const chunk = 4096
	batch := make([][]byte, 0, chunk)
	next := 0 // index into cps
	flush := func() error {
		for len(batch) > 0 {
			// Stop at the next checkpoint's size to check it there.
			n := len(batch)
			if next < len(cps) && cps[next].Size < v.Size()+uint64(n) {
				n = int(cps[next].Size - v.Size())
			}
			if err := v.AddAll(batch[:n]); err != nil {
				return err
			}
			batch = batch[n:]
			if err := checkAt(v, cps, &next, &res); err != nil {
				return err
			}
		}
		batch = batch[:0]
		return nil
	}
	if err := checkAt(v, cps, &next, &res); err != nil {
		return res, err
	}
	err = scanEntries(ctx, s, 1, size, func(k string, raw []byte) error {
		want := v.Size() + uint64(len(batch)) + 1
		if k != Key(want) {
			seq, _ := strconv.ParseUint(k, 10, 64)
			if err := flush(); err != nil {
				return err
			}
			return fmt.Errorf("%w: entry %d: missing, the next stored entry is %d (an entry was deleted)", auditlog.ErrTampered, want, seq)
		}
		batch = append(batch, raw)
		if len(batch) == chunk {
			return flush()
		}
		return nil
	})
	if err == nil {
		err = flush()
	}
	if err != nil {
		return res, err
	}
	if v.Size() != size {
		return res, fmt.Errorf("%w: the sequence says %d entries, found %d (entry %d and later are missing)", auditlog.ErrTampered, size, v.Size(), v.Size()+1)
	}
	if next != len(cps) {
		return res, fmt.Errorf("%w: %s was not reached", auditlog.ErrTampered, cps[next])
	}
	if string(v.Root()) != string(stored.Root()) {
		return res, fmt.Errorf("%w: the stored tree state does not match the root recomputed from entries 1..%d", auditlog.ErrTampered, size)
	}
	res.Entries = v.Size()
	res.Root = base64.StdEncoding.EncodeToString(v.Root())
	return res, nil
}

// checkAt checks every checkpoint at the verifier's current size.
func checkAt(v *auditlog.Verifier, cps []auditlog.Checkpoint, next *int, res *Result) error {
	for *next < len(cps) && cps[*next].Size == v.Size() {
		if err := v.Check(cps[*next]); err != nil {
			return err
		}
		res.Checkpoints++
		*next++
	}
	return nil
}

// ErrNotCheckpointed: no signed checkpoint covers the entry yet.
var ErrNotCheckpointed = errors.New("no signed checkpoint covers the entry yet")

// Prove returns an inclusion proof of entry seq against the latest stored
// checkpoint, which a third party checks with auditlog.InclusionBundle's
// Verify and the log's public key.
func Prove(ctx context.Context, s store.Store, seq uint64) (auditlog.InclusionBundle, error) {
	var b auditlog.InclusionBundle
	err := s.View(ctx, func(tx store.Tx) error {
		var signed []byte
		err := tx.Scan(store.BucketAuditCheckpoints, "", true, func(_ string, v []byte) error {
			signed = v
			return store.ErrStopScan
		})
		if err != nil {
			return err
		}
		if signed == nil {
			return fmt.Errorf("prove entry %d: %w (no checkpoint at all)", seq, ErrNotCheckpointed)
		}
		c, err := auditlog.ParseSigned(signed)
		if err != nil {
			return fmt.Errorf("prove entry %d: latest checkpoint: %w", seq, err)
		}
		if seq == 0 || seq > c.Size {
			return fmt.Errorf("prove entry %d: %w (latest is %s)", seq, ErrNotCheckpointed, c)
		}
		raw, err := tx.Get(store.BucketAudit, Key(seq))
		if err != nil {
			return fmt.Errorf("prove entry %d: %w", seq, err)
		}
		path, err := auditlog.InclusionProof(seq-1, c.Size, nodes(tx))
		if err != nil {
			return fmt.Errorf("prove entry %d: %w", seq, err)
		}
		b = auditlog.NewInclusionBundle(raw, seq, c.Size, path, signed)
		return nil
	})
	return b, err
}
