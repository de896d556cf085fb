// Package auditlog is the audit log's format and its proofs: the canonical
// entry encoding, RFC 6962 Merkle tree hashing, checkpoints in the C2SP
// signed-note form signed with Ed25519, and inclusion and consistency
// proofs that a third party can check offline with nothing but the entries,
// a checkpoint and a trusted public key.
//
// The tree is the only integrity structure. The log used to link entries in
// a SHA-256 hash chain; that was dropped rather than kept alongside: a chain
// head is not signed, so whoever can rewrite the log can re-seal it
// (journald's sealed logs, CVE-2023-31439), and everything the chain could
// show (no entry changed, removed or reordered since the last stored head)
// the tree shows too, plus what a chain cannot: a signed checkpoint commits
// to every earlier entry, and a log of any size proves one entry (inclusion)
// or that it only grew (consistency) in O(log n) hashes. Keeping both would
// mean two structures to update in every append and to check in every
// verification, with no guarantee the second adds.
//
// Hashing and proofs are github.com/transparency-dev/merkle; signed notes
// are golang.org/x/mod/sumdb/note. This package never stores anything: it
// encodes, hashes, signs and checks.
package auditlog

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/transparency-dev/merkle/rfc6962"
)

// Outcomes.
const (
	OutcomeSuccess = "success"
	OutcomeFailure = "failure"
	OutcomeDenied  = "denied"
)

// HashSize is the size of a leaf, node or root hash.
const HashSize = sha256.Size

// ErrTampered reports an entry, checkpoint or proof that does not match
// what was committed to. Errors of this class name the entry or checkpoint.
var ErrTampered = errors.New("audit log tampered")

// Entry is one privileged operation.
type Entry struct {
	// Seq is the entry's position, from 1; its leaf index is Seq-1.
	Seq       uint64            `json:"seq"`
	Time      time.Time         `json:"time"`
	Actor     string            `json:"actor"`  // SPIFFE ID or token subject
	Tenant    string            `json:"tenant"` // empty for fleet operations
	Action    string            `json:"action"` // e.g. "lease.create"
	Resource  string            `json:"resource"`
	Outcome   string            `json:"outcome"`
	Reason    string            `json:"reason"`
	RequestID string            `json:"request_id"`
	TraceID   string            `json:"trace_id,omitempty"`
	Details   map[string]string `json:"details"`
}

// canonicalEntry fixes the field order of the encoding. trace_id is
// omitted when empty, so entries without one encode exactly as they did
// before the field existed.
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
	TraceID   string            `json:"trace_id,omitempty"`
	Details   map[string]string `json:"details"`
}

// Canonical is the deterministic encoding of the entry: JSON with a fixed
// field order, sorted detail keys, the time in UTC RFC 3339 with
// nanoseconds. encoding/json escapes the same way every time. It is both
// the stored form and the Merkle leaf's data.
func (e Entry) Canonical() []byte {
	if b, ok := e.appendCanonicalFast(make([]byte, 0, 320)); ok {
		return b
	}
	return e.canonicalJSON()
}

// canonicalJSON is the definition of the encoding; appendCanonicalFast
// must produce the same bytes (FuzzCanonical checks).
func (e Entry) canonicalJSON() []byte {
	d := e.Details
	if d == nil {
		d = map[string]string{}
	}
	b, err := json.Marshal(canonicalEntry{
		Seq: e.Seq, Time: e.Time.UTC().Format(time.RFC3339Nano), Actor: e.Actor, Tenant: e.Tenant,
		Action: e.Action, Resource: e.Resource, Outcome: e.Outcome, Reason: e.Reason,
		RequestID: e.RequestID, TraceID: e.TraceID, Details: d,
	})
	if err != nil {
		// Only strings, numbers and maps of strings: cannot fail.
		panic(fmt.Sprintf("auditlog: canonical encoding: %v", err))
	}
	return b
}

// Encode is the stored form of an entry: its canonical encoding.
func Encode(e Entry) []byte { return e.Canonical() }

// Decode parses one stored entry. It rejects unknown fields, trailing data
// and any encoding that is not canonical, so the bytes a verifier hashes
// are exactly the bytes Encode would write for the entry it shows.
func Decode(b []byte) (Entry, error) {
	if e, ok := fastDecode(b); ok {
		return e, nil
	}
	var c canonicalEntry
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		return Entry{}, fmt.Errorf("decode audit entry: %w", err)
	}
	if dec.More() {
		return Entry{}, errors.New("decode audit entry: trailing data")
	}
	t, err := time.Parse(time.RFC3339Nano, c.Time)
	if err != nil {
		return Entry{}, fmt.Errorf("decode audit entry: time: %w", err)
	}
	e := Entry{Seq: c.Seq, Time: t.UTC(), Actor: c.Actor, Tenant: c.Tenant, Action: c.Action,
		Resource: c.Resource, Outcome: c.Outcome, Reason: c.Reason, RequestID: c.RequestID,
		TraceID: c.TraceID, Details: c.Details}
	if !bytes.Equal(e.Canonical(), b) {
		return Entry{}, fmt.Errorf("decode audit entry %d: not in canonical form", c.Seq)
	}
	return e, nil
}

// hasher is the RFC 6962 SHA-256 tree hasher.
var hasher = rfc6962.DefaultHasher

// LeafHash is the RFC 6962 leaf hash of an entry's canonical encoding:
// SHA-256(0x00 || canonical).
func LeafHash(canonical []byte) []byte { return hasher.HashLeaf(canonical) }

// NodeHash is the RFC 6962 interior node hash: SHA-256(0x01 || l || r).
func NodeHash(l, r []byte) []byte { return hasher.HashChildren(l, r) }

// EmptyRoot is the root hash of the empty tree: SHA-256 of nothing.
func EmptyRoot() []byte { return hasher.EmptyRoot() }
