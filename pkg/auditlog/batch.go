package auditlog

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"

	"golang.org/x/mod/sumdb/note"
)

// Batch is a contiguous run of entries delivered upstream: entries
// PrevSize+1 .. the checkpoint's size, the signed checkpoints at both ends
// and the consistency proof between them.
type Batch struct {
	ID             string
	PrevSize       uint64
	PrevCheckpoint []byte // signed note; nil when PrevSize is 0
	Entries        [][]byte
	Checkpoint     []byte // signed note
	Consistency    [][]byte
}

// BatchID is the deterministic id of the batch from (prev) to (next): the
// same on every retry and after a restart, different for anything else.
func BatchID(prev *Checkpoint, next Checkpoint) string {
	h := sha256.New()
	fmt.Fprintf(h, "gpuaas audit batch\n%s\n%d\n", next.Origin, next.Size)
	h.Write(next.Root)
	if prev != nil {
		fmt.Fprintf(h, "\n%d\n", prev.Size)
		h.Write(prev.Root)
	}
	return hex.EncodeToString(h.Sum(nil)[:16])
}

// VerifyBatch checks a batch against what the receiver holds: the tree of
// the first have.Size() entries and the last checkpoint it accepted (nil
// before the first). Every signature must be by a trusted key, the batch
// must start at have's size, its checkpoint must extend last (consistency
// proof) and its entries must hash to the checkpoint's root. It returns the
// new checkpoint and the tree after the batch; have is not changed.
func VerifyBatch(b Batch, origin string, trusted note.Verifiers, have *Tree, last *Checkpoint) (Checkpoint, *Tree, error) {
	next, err := Open(b.Checkpoint, origin, trusted)
	if err != nil {
		return Checkpoint{}, nil, fmt.Errorf("batch %s: %w", b.ID, err)
	}
	if last != nil {
		if err := CheckConsistent(last, next, nil); err != nil && next.Size <= last.Size {
			return next, nil, fmt.Errorf("batch %s: %w", b.ID, err)
		}
	}
	if b.PrevSize != have.Size() {
		return next, nil, fmt.Errorf("batch %s starts after entry %d, the receiver holds %d entries", b.ID, b.PrevSize, have.Size())
	}
	if last != nil {
		prev, err := Open(b.PrevCheckpoint, origin, trusted)
		if err != nil {
			return next, nil, fmt.Errorf("batch %s: previous checkpoint: %w", b.ID, err)
		}
		if prev.Size != last.Size || !bytes.Equal(prev.Root, last.Root) {
			return next, nil, fmt.Errorf("%w: fork: batch %s builds on %s, the receiver holds %s", ErrInconsistent, b.ID, prev, last)
		}
		if err := CheckConsistent(last, next, b.Consistency); err != nil {
			return next, nil, fmt.Errorf("batch %s: %w", b.ID, err)
		}
	}
	if want := next.Size - b.PrevSize; uint64(len(b.Entries)) != want {
		return next, nil, fmt.Errorf("%w: batch %s carries %d entries, %s needs %d after entry %d", ErrTampered, b.ID, len(b.Entries), next, want, b.PrevSize)
	}
	v := ResumeVerifier(have)
	if err := v.AddAll(b.Entries); err != nil {
		return next, nil, fmt.Errorf("batch %s: %w", b.ID, err)
	}
	if err := v.Check(next); err != nil {
		return next, nil, fmt.Errorf("batch %s: %w", b.ID, err)
	}
	if b.ID != BatchID(last, next) {
		return next, nil, fmt.Errorf("batch id %q is not the id of the batch from %d to %s", b.ID, b.PrevSize, next)
	}
	return next, v.Tree(), nil
}
