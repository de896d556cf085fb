// Package auditlog is the audit log's entry format and its verification.
//
// An entry is encoded canonically (JSON with a fixed field order, sorted
// detail keys, UTC times) so any party can recompute its hash. Entries are
// linked in a hash chain: hash(n) = SHA-256(0x00 || hash(n-1) || canonical(n)),
// with an all-zero hash before the first entry. Whoever holds the entries can
// verify that none was changed, removed or reordered. This package never
// stores anything; it only encodes and checks.
package auditlog

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// Outcomes.
const (
	OutcomeSuccess = "success"
	OutcomeFailure = "failure"
	OutcomeDenied  = "denied"
)

// HashSize is the size of an entry hash.
const HashSize = sha256.Size

// Entry is one privileged operation.
type Entry struct {
	Seq       uint64            `json:"seq"`
	Time      time.Time         `json:"time"`
	Actor     string            `json:"actor"`  // SPIFFE ID or token subject
	Tenant    string            `json:"tenant"` // empty for fleet operations
	Action    string            `json:"action"` // e.g. "lease.create"
	Resource  string            `json:"resource"`
	Outcome   string            `json:"outcome"`
	Reason    string            `json:"reason"`
	RequestID string            `json:"request_id"`
	Details   map[string]string `json:"details"`
	// PrevHash and Hash are hex; Hash covers every field above and PrevHash.
	PrevHash string `json:"prev_hash"`
	Hash     string `json:"hash"`
}

// ErrTampered reports an entry whose hash, link or sequence is wrong.
var ErrTampered = errors.New("audit log tampered")

type canonicalEntry struct {
	Seq       uint64            `json:"seq"`
	Time      string            `json:"time"`
	Actor     string            `json:"actor"`
	Tenant    string            `json:"tenant"`
	Action    string            `json:"action"`
	Resource  string            `json:"resource"`
	Outcome   string            `json:"outcome"`
	Reason    string            `json:"reason"`
	RequestID string            `json:"request_id"`
	Details   map[string]string `json:"details"`
}

// Canonical is the deterministic encoding of the entry's content (without
// its hashes). encoding/json writes struct fields in order and map keys
// sorted, and escapes HTML the same way every time.
func (e Entry) Canonical() []byte {
	d := e.Details
	if d == nil {
		d = map[string]string{}
	}
	b, err := json.Marshal(canonicalEntry{
		Seq: e.Seq, Time: e.Time.UTC().Format(time.RFC3339Nano), Actor: e.Actor, Tenant: e.Tenant,
		Action: e.Action, Resource: e.Resource, Outcome: e.Outcome, Reason: e.Reason,
		RequestID: e.RequestID, Details: d,
	})
	if err != nil {
		// Only strings, numbers and maps of strings: cannot fail.
		panic(fmt.Sprintf("auditlog: canonical encoding: %v", err))
	}
	return b
}

// ChainHash computes the entry's hash from the previous entry's hash.
func ChainHash(prev []byte, e Entry) []byte {
	h := sha256.New()
	h.Write([]byte{0})
	h.Write(prev)
	h.Write(e.Canonical())
	return h.Sum(nil)
}

// Seal fills in PrevHash and Hash, linking e after prev (nil for the first
// entry).
func Seal(prev []byte, e *Entry) {
	if prev == nil {
		prev = make([]byte, HashSize)
	}
	e.PrevHash = hex.EncodeToString(prev)
	e.Hash = hex.EncodeToString(ChainHash(prev, *e))
}

// Verifier checks a stream of entries in order.
type Verifier struct {
	next uint64
	head []byte
}

// NewVerifier starts a verification at the first entry (seq 1).
func NewVerifier() *Verifier { return &Verifier{next: 1, head: make([]byte, HashSize)} }

// Add checks the next entry. The error names the entry's sequence number.
func (v *Verifier) Add(e Entry) error {
	if e.Seq != v.next {
		return fmt.Errorf("%w: entry %d: expected sequence %d", ErrTampered, e.Seq, v.next)
	}
	prev, err := hex.DecodeString(e.PrevHash)
	if err != nil || !bytes.Equal(prev, v.head) {
		return fmt.Errorf("%w: entry %d: previous hash does not link to entry %d", ErrTampered, e.Seq, e.Seq-1)
	}
	want := ChainHash(v.head, e)
	got, err := hex.DecodeString(e.Hash)
	if err != nil || !bytes.Equal(got, want) {
		return fmt.Errorf("%w: entry %d: content does not match its hash", ErrTampered, e.Seq)
	}
	v.head = want
	v.next++
	return nil
}

// Count is the number of entries verified so far.
func (v *Verifier) Count() uint64 { return v.next - 1 }

// Head is the hash of the last verified entry (all zero before the first).
func (v *Verifier) Head() []byte { return append([]byte(nil), v.head...) }

// Decode parses one stored entry, rejecting unknown fields.
func Decode(b []byte) (Entry, error) {
	var e Entry
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&e); err != nil {
		return Entry{}, fmt.Errorf("decode audit entry: %w", err)
	}
	if dec.More() {
		return Entry{}, errors.New("decode audit entry: trailing data")
	}
	return e, nil
}

// Encode is the stored form of a sealed entry.
func Encode(e Entry) []byte {
	b, err := json.Marshal(e)
	if err != nil {
		panic(fmt.Sprintf("auditlog: encode: %v", err))
	}
	return b
}
