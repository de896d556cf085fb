package auditlog

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"

	"golang.org/x/mod/sumdb/note"
)

// Verifier recomputes a log's tree from its entries, in order, and checks
// checkpoints against it. A checkpoint whose root equals the recomputed
// root at its size commits to exactly these entries; two checkpoints that
// both match are consistent by construction (a stronger check than a
// consistency proof, which a verifier holding the entries does not need).
type Verifier struct {
	tree *Tree
	// prev is the last checkpoint checked, for rollback and fork errors.
	prev *Checkpoint
}

// NewVerifier starts at the empty log; the first entry must have Seq 1.
func NewVerifier() *Verifier { return &Verifier{tree: NewTree()} }

// ResumeVerifier continues a log whose first tree.Size() entries were
// verified earlier.
func ResumeVerifier(tree *Tree) *Verifier { return &Verifier{tree: tree.Clone()} }

// Add checks the next stored entry: canonical, in sequence. The error names
// the entry.
func (v *Verifier) Add(raw []byte) (Entry, error) {
	want := v.tree.Size() + 1
	e, err := Decode(raw)
	if err != nil {
		return Entry{}, fmt.Errorf("%w: entry %d: %v", ErrTampered, want, err)
	}
	if e.Seq != want {
		return Entry{}, fmt.Errorf("%w: entry %d: found sequence %d (an entry removed, reordered or inserted)", ErrTampered, want, e.Seq)
	}
	v.tree.Append(LeafHash(raw), nil)
	return e, nil
}

// AddAll checks the next entries like Add, decoding and hashing them on
// every CPU; the tree is still built in order. The error names the first
// bad entry.
func (v *Verifier) AddAll(raws [][]byte) error {
	base := v.tree.Size() + 1
	leaves := make([][]byte, len(raws))
	errs := make([]error, len(raws))
	workers := min(runtime.GOMAXPROCS(0), (len(raws)+255)/256)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < len(raws); i += workers {
				want := base + uint64(i)
				seq, ok := fastCheck(raws[i])
				if !ok {
					e, err := Decode(raws[i])
					if err != nil {
						errs[i] = fmt.Errorf("%w: entry %d: %v", ErrTampered, want, err)
						continue
					}
					seq = e.Seq
				}
				if seq != want {
					errs[i] = fmt.Errorf("%w: entry %d: found sequence %d (an entry removed, reordered or inserted)", ErrTampered, want, seq)
					continue
				}
				leaves[i] = LeafHash(raws[i])
			}
		}()
	}
	wg.Wait()
	for i, h := range leaves {
		if errs[i] != nil {
			return errs[i]
		}
		v.tree.Append(h, nil)
	}
	return nil
}

// Size is the number of entries added.
func (v *Verifier) Size() uint64 { return v.tree.Size() }

// Root is the root of the entries added.
func (v *Verifier) Root() []byte { return v.tree.Root() }

// Tree is a copy of the recomputed tree's compact range.
func (v *Verifier) Tree() *Tree { return v.tree.Clone() }

// Check compares a checkpoint taken at the current size with the
// recomputed root, and with the previous checkpoint checked.
func (v *Verifier) Check(c Checkpoint) error {
	if c.Size != v.tree.Size() {
		return fmt.Errorf("check %s: verifier is at size %d", c, v.tree.Size())
	}
	if p := v.prev; p != nil && p.Origin != c.Origin {
		return fmt.Errorf("%w: %s has origin %q, the earlier %s has %q", ErrInconsistent, c, c.Origin, p, p.Origin)
	}
	if !bytes.Equal(c.Root, v.tree.Root()) {
		return fmt.Errorf("%w: %s does not match the root recomputed from entries 1..%d (an entry up to %d was changed, or the checkpoint replaced)", ErrTampered, c, c.Size, c.Size)
	}
	v.prev = &c
	return nil
}

// InclusionBundle is an entry with everything a third party needs to check
// that it is in the log: the entry's canonical encoding, its leaf index, an
// audit path and a signed checkpoint whose tree contains it.
type InclusionBundle struct {
	Seq       uint64 `json:"seq"`
	LeafIndex uint64 `json:"leaf_index"`
	TreeSize  uint64 `json:"tree_size"`
	// Entry is the canonical encoding, as a JSON string so it survives
	// pretty-printing byte for byte.
	Entry    string   `json:"entry"`
	LeafHash string   `json:"leaf_hash"` // base64
	Hashes   []string `json:"hashes"`    // base64 audit path, leaf to root
	// Checkpoint is the signed note for tree_size.
	Checkpoint string `json:"checkpoint"`
}

// MaxBundleSize bounds an inclusion bundle read from outside.
const MaxBundleSize = 1 << 20

// NewInclusionBundle assembles a bundle.
func NewInclusionBundle(raw []byte, seq, size uint64, path [][]byte, signedCheckpoint []byte) InclusionBundle {
	b := InclusionBundle{Seq: seq, LeafIndex: seq - 1, TreeSize: size, Entry: string(raw),
		LeafHash: base64.StdEncoding.EncodeToString(LeafHash(raw)), Checkpoint: string(signedCheckpoint), Hashes: []string{}}
	for _, h := range path {
		b.Hashes = append(b.Hashes, base64.StdEncoding.EncodeToString(h))
	}
	return b
}

// ParseInclusionBundle decodes a bundle from JSON, rejecting unknown
// fields.
func ParseInclusionBundle(data []byte) (InclusionBundle, error) {
	if len(data) > MaxBundleSize {
		return InclusionBundle{}, fmt.Errorf("parse inclusion proof: %d bytes", len(data))
	}
	var b InclusionBundle
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&b); err != nil {
		return InclusionBundle{}, fmt.Errorf("parse inclusion proof: %w", err)
	}
	if dec.More() {
		return InclusionBundle{}, errors.New("parse inclusion proof: trailing data")
	}
	return b, nil
}

// Verify checks the bundle: the checkpoint is signed by a trusted key (and
// is for origin, if not empty), the entry is canonical with the bundle's
// sequence, its leaf hash is the one claimed, and the audit path leads from
// it to the checkpoint's root. It returns the proven entry and checkpoint.
func (b InclusionBundle) Verify(origin string, trusted note.Verifiers) (Entry, Checkpoint, error) {
	c, err := Open([]byte(b.Checkpoint), origin, trusted)
	if err != nil {
		return Entry{}, Checkpoint{}, fmt.Errorf("inclusion proof of entry %d: %w", b.Seq, err)
	}
	if c.Size != b.TreeSize {
		return Entry{}, c, fmt.Errorf("%w: inclusion proof of entry %d: tree_size %d but the checkpoint is for size %d", ErrTampered, b.Seq, b.TreeSize, c.Size)
	}
	e, err := Decode([]byte(b.Entry))
	if err != nil {
		return Entry{}, c, fmt.Errorf("%w: inclusion proof of entry %d: %v", ErrTampered, b.Seq, err)
	}
	if e.Seq != b.Seq || b.Seq == 0 || b.LeafIndex != b.Seq-1 {
		return Entry{}, c, fmt.Errorf("%w: inclusion proof of entry %d: entry has sequence %d, leaf index %d", ErrTampered, b.Seq, e.Seq, b.LeafIndex)
	}
	leaf := LeafHash([]byte(b.Entry))
	if b.LeafHash != base64.StdEncoding.EncodeToString(leaf) {
		return Entry{}, c, fmt.Errorf("%w: inclusion proof of entry %d: leaf_hash is not the hash of the entry", ErrTampered, b.Seq)
	}
	path := make([][]byte, len(b.Hashes))
	for i, h := range b.Hashes {
		if path[i], err = base64.StdEncoding.DecodeString(h); err != nil || len(path[i]) != HashSize {
			return Entry{}, c, fmt.Errorf("inclusion proof of entry %d: hash %d is not a base64 %d-byte hash", b.Seq, i, HashSize)
		}
	}
	if err := VerifyInclusion(b.LeafIndex, b.TreeSize, leaf, path, c.Root); err != nil {
		return Entry{}, c, fmt.Errorf("entry %d against %s: %w", b.Seq, c, err)
	}
	return e, c, nil
}

// Describe is a one-line summary of an entry for operators.
func (e Entry) Describe() string {
	var b strings.Builder
	fmt.Fprintf(&b, "#%d %s %s %s %s %s", e.Seq, e.Time.UTC().Format("2006-01-02T15:04:05.000Z"), e.Actor, e.Action, e.Resource, e.Outcome)
	if e.Reason != "" {
		fmt.Fprintf(&b, " (%s)", e.Reason)
	}
	return b.String()
}
