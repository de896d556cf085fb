// Package store is the control plane's state store: short transactions over
// keyed records in named buckets, with prefix scans. bbolt is the embedded
// default; an etcd backend (for HA) implements the same interface.
//
// A store never interprets values; the lease, fleet and audit packages own
// their encodings. Nothing outside an Update transaction may change state,
// so a state change and its audit entry always commit together.
package store

import (
	"context"
	"errors"
)

// Buckets. Every bucket a backend holds is listed here.
const (
	BucketMeta        = "meta"        // schema_version, revision, audit head
	BucketLeases      = "leases"      // lease id -> gpuaas.lease.v1.Lease (proto)
	BucketIdempotency = "idempotency" // caller \x00 key -> idempotency record (JSON)
	BucketAudit       = "audit"       // %020d seq -> auditlog.Entry (JSON)
	BucketNodes       = "nodes"       // node id -> node record (proto)
	// BucketAuditCheckpoints: %020d tree size -> signed checkpoint (note).
	BucketAuditCheckpoints = "audit_checkpoints"
	// BucketAuditForward: forwarder delivery state (last delivered size,
	// checkpoint, batch ids).
	BucketAuditForward = "audit_forward"
	// BucketAllocations indexes the partitions live leases hold, so that
	// placement reads only them: gpu uuid + "/" + lease id -> allocation
	// (binary, see bbolt.go). Written only by the lease service, in the transaction that
	// changes the lease.
	BucketAllocations = "allocations"
	// BucketNodeState: node id -> the control plane's verdict on a node
	// (liveness, cordon), JSON. Written only by the fleet.
	BucketNodeState = "node_state"
	// BucketAttestation: node id -> the node's attestation state (latest
	// verdict, the signed report it judged, counts), JSON. Written only by
	// the fleet.
	BucketAttestation = "attestation"
	// BucketAttestationHistory: node id + "/" + %020d sequence -> one
	// verdict, JSON; the fleet keeps the newest 100 per node.
	BucketAttestationHistory = "attestation_history"
	// BucketLedger: the usage ledger (controlplane/lease, ledger.go):
	// "e/%020d" -> one lease's usage (JSON), "l/" + lease id -> its
	// sequence. Append-only.
	BucketLedger = "ledger"
)

// Buckets is every bucket, created when a store is opened.
var Buckets = []string{BucketMeta, BucketLeases, BucketIdempotency, BucketAudit, BucketNodes, BucketAuditCheckpoints, BucketAuditForward, BucketAllocations, BucketNodeState, BucketAttestation, BucketAttestationHistory, BucketLedger}

func knownBucket(name string) bool {
	for _, b := range Buckets {
		if b == name {
			return true
		}
	}
	return false
}

// Errors.
var (
	// ErrNotFound: no value at the key.
	ErrNotFound = errors.New("store: key not found")
	// ErrLocked: another process holds the store.
	ErrLocked = errors.New("store: locked by another process")
	// ErrSchema: the store's schema is newer than this binary or corrupt.
	ErrSchema = errors.New("store: unsupported schema")
	// ErrUnknownBucket: a bucket not in Buckets.
	ErrUnknownBucket = errors.New("store: unknown bucket")
	// ErrStopScan may be returned by a Scan callback to stop early without
	// an error.
	ErrStopScan = errors.New("store: stop scan")
	// ErrCorrupt: the state file is not a readable store.
	ErrCorrupt = errors.New("store: corrupt or not a gpuaas state file")
	// ErrConflict: an optimistic transaction kept conflicting with
	// concurrent writers (etcd) and ran out of attempts.
	ErrConflict = errors.New("store: transaction conflicted with concurrent writers")
	// ErrTooLarge: a transaction has more operations than the backend
	// accepts in one atomic commit (etcd's --max-txn-ops). Callers keep
	// transactions small: one lease and its audit entry, chunks of a sweep.
	ErrTooLarge = errors.New("store: transaction too large")
	// ErrReadOnly: a write inside View.
	ErrReadOnly = errors.New("store: write in a read-only transaction")
)

// missingKey is ErrNotFound naming the key. A create reads two keys it
// expects to be absent; fmt.Errorf cost more than the read.
type missingKey struct{ bucket, key string }

func notFound(bucket, key string) error { return &missingKey{bucket, key} }

func (e *missingKey) Error() string { return e.bucket + "/" + e.key + ": " + ErrNotFound.Error() }
func (e *missingKey) Unwrap() error { return ErrNotFound }

// Store runs transactions. Implementations are safe for concurrent use.
type Store interface {
	// View runs fn in a read-only transaction.
	View(ctx context.Context, fn func(Tx) error) error
	// Update runs fn in a read-write transaction and commits durably if fn
	// returns nil. fn may be called more than once (group commit retries,
	// optimistic conflicts on etcd), so it must not have side effects
	// outside the transaction. It may run on another goroutine than the
	// caller's (bbolt's committer), so it must return: no runtime.Goexit
	// (t.FailNow in tests). Transactions are serializable: an Update
	// that commits saw no write committed after its reads.
	Update(ctx context.Context, fn func(Tx) error) error
	Close() error
}

// Key names one record.
type Key struct{ Bucket, Key string }

// UpdateReading is st.Update for a function known to read keys: a store
// that runs concurrent Updates in one transaction (etcd) reads the keys of
// the whole batch in one round trip before running its functions, instead
// of one round trip per read as each function reaches it. fn still reads
// them through its Tx and sees them as the transaction does (its
// batch-mates' writes included). Other stores just Update.
func UpdateReading(ctx context.Context, st Store, keys []Key, fn func(Tx) error) error {
	if r, ok := st.(ReadAheadStore); ok {
		return r.UpdateReading(ctx, keys, fn)
	}
	return st.Update(ctx, fn)
}

// ReadAheadStore is a Store that can read an Update's keys ahead of it
// (UpdateReading). Wrappers of a Store implement it by passing keys on.
type ReadAheadStore interface {
	Store
	UpdateReading(ctx context.Context, keys []Key, fn func(Tx) error) error
}

// Tx is one transaction. Values returned are copies, valid after the
// transaction ends; values given to Put are copied. Reads see the
// transaction's own writes. Keys are non-empty.
type Tx interface {
	Get(bucket, key string) ([]byte, error)
	Put(bucket, key string, value []byte) error
	Delete(bucket, key string) error
	// Scan calls fn for each key with the prefix, in key order. Reverse
	// scans in descending order.
	Scan(bucket, prefix string, reverse bool, fn func(key string, value []byte) error) error
}
