package store

// bbolt schema (version 5). One file, one writer process.
//
//   meta
//     schema_version     uint64 big-endian; 5
//     revision           uint64 big-endian; bumped by every lease change
//     audit_head         32-byte hash of the last audit entry
//     audit_seq          uint64 big-endian; sequence of the last audit entry
//     ledger_seq         uint64 big-endian; sequence of the last usage entry
//     alloc_index        uint64 big-endian; 1 once the allocations bucket
//                        holds every live lease (the lease service builds it)
//   leases               lease id -> gpuaas.lease.v1.Lease, protobuf
//   idempotency.log      the idempotency records, a log (bbolt_log.go):
//                        uint64 big-endian sequence -> uvarint key length,
//                        key (caller + "\x00" + idempotency key), value
//                        ({lease id, request hash}, JSON); found through a
//                        directory in memory, rebuilt at open
//   idempotency          the records written before version 5, by key
//   audit                %020d sequence -> auditlog.Entry, canonical JSON; append-only;
//                        and the Merkle tree's nodes (controlplane/audit):
//                        "node/" + %020d last leaf + "/" + %02d level -> hash,
//                        "tree/" + %02d level + "/" + %020d index -> hash
//                        for nodes written before version 4
//   nodes                node id -> gpuaas.node.v1.Node, protobuf
//   audit_checkpoints    %020d tree size -> signed checkpoint (C2SP note text)
//   audit_forward        forwarder delivery state (owned by controlplane/audit)
//   allocations          gpu uuid + "/" + lease id -> the partition a live
//                        lease holds: version byte 1, profile id, start, size
//                        (4 bytes big-endian each), node id; one row per live
//                        lease (controlplane/lease, index.go)
//   node_state           node id -> {state, since, reason, cordoned, ...}, JSON
//   attestation          node id -> {latest verdict, signed report, counts,
//                        last success, last failure}, JSON (controlplane/fleet)
//   attestation_history  node id + "/" + %020d sequence -> one verdict, JSON;
//                        the newest 100 per node are kept
//   ledger               "e/%020d" -> one lease's usage entry, JSON;
//                        "l/" + lease id -> its sequence (controlplane/lease);
//                        append-only
//
// History: version 1 had meta, leases, idempotency, audit and nodes.
// Version 2 adds audit_checkpoints, audit_forward, allocations and
// node_state, all empty; the lease service fills allocations on first use.
// Version 3 adds attestation, attestation_history and ledger, empty.
// Version 4 keys new audit tree nodes by their last leaf ("node/"), so
// they append; the nodes already written stay where they are ("tree/")
// and are read there. Nothing is rewritten; a version 3 binary would not
// find the new nodes, so it refuses the file.
// Version 5 adds idempotency.log: new idempotency records are appended
// there, in the order they are written, instead of one leaf page per
// random key; the records already in idempotency stay, and are read
// there. A version 4 binary would not find the new records, so it
// refuses the file.
//
// Upgrades run in Open, in one transaction, from the stored version to
// SchemaVersion. An existing file is first checked read-only: a file from a
// newer binary, or one bbolt cannot read, is refused before anything is
// written.

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// SchemaVersion is the schema this binary writes.
const SchemaVersion = 5

const keySchemaVersion = "schema_version"

// BoltOptions tunes the bbolt backend.
type BoltOptions struct {
	// OpenTimeout bounds the wait for the file lock (default 1s), so two
	// daemons can never share a data file.
	OpenTimeout time.Duration
	// InitialMmapSize is bbolt's: while the file fits in it, a commit
	// never remaps, and so never waits for open read transactions.
	InitialMmapSize int
}

// Bolt is the embedded bbolt backend.
type Bolt struct {
	db       *bolt.DB
	readOnly bool
	logs     keyLogs // the logged buckets' directories (bbolt_log.go)

	// Group commit (Update): writers queue while a commit runs; the
	// committer's next commit takes them all.
	mu     sync.Mutex
	queue  []*boltCall
	closed bool
	wake   chan struct{} // one token: the queue may be non-empty
	// committed is closed when the committer has drained the queue
	// after Close and returned.
	committed chan struct{}
	closeOnce sync.Once
	closeErr  error
}

// boltCall is one queued Update.
type boltCall struct {
	fn  func(Tx) error
	err error
	// panicked is what fn panicked with: re-raised in its own caller,
	// as bbolt's Batch does, never in the committer.
	panicked any
	done     chan struct{} // closed when err is final
	finished bool          // done is closed (committer only)
}

// finish gives c its result (committer only).
func (c *boltCall) finish(err error) {
	c.err, c.finished = err, true
	close(c.done)
}

// maxGroup bounds the Updates one commit takes.
const maxGroup = 1000

var _ Store = (*Bolt)(nil)

// OpenBolt opens (creating if needed) the store at path, upgrading its
// schema.
func OpenBolt(path string, opts BoltOptions) (*Bolt, error) {
	if opts.OpenTimeout == 0 {
		opts.OpenTimeout = time.Second
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	if fi, err := os.Stat(path); err == nil && fi.Size() > 0 {
		if err := checkFile(path, opts.OpenTimeout); err != nil {
			return nil, fmt.Errorf("open store %s: %w", path, err)
		}
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: opts.OpenTimeout, InitialMmapSize: opts.InitialMmapSize})
	if err != nil {
		return nil, fmt.Errorf("open store %s: %w", path, classifyOpenError(err))
	}
	var logs keyLogs
	err = boltSafe(func() error {
		return db.Update(func(tx *bolt.Tx) error {
			from := uint64(0)
			if meta := tx.Bucket([]byte(BucketMeta)); meta != nil {
				var err error
				if from, err = storedVersion(meta); err != nil {
					return err
				}
			}
			if err := migrate(tx, from); err != nil {
				return err
			}
			logs, err = loadKeyLogs(tx)
			return err
		})
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	b := &Bolt{db: db, logs: logs, wake: make(chan struct{}, 1), committed: make(chan struct{})}
	go b.commitLoop()
	return b, nil
}

// OpenBoltReadOnly opens an existing store without writing to it: no
// schema upgrade, no bucket creation, a shared lock (ErrLocked while a
// control plane holds the file), Update refused with ErrReadOnly. It is
// how evidence is read (gpuaasctl audit verify): verifying a file never
// changes it. A bucket the file's schema predates reads as empty.
func OpenBoltReadOnly(path string, timeout time.Duration) (*Bolt, error) {
	if timeout == 0 {
		timeout = time.Second
	}
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	if err := checkFile(path, timeout); err != nil {
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	db, err := bolt.Open(path, 0o400, &bolt.Options{Timeout: timeout, ReadOnly: true})
	if err != nil {
		return nil, fmt.Errorf("open store %s: %w", path, classifyOpenError(err))
	}
	// The directories are read when a transaction first reads their
	// bucket: verifying the audit log neither waits for them nor
	// depends on the idempotency records being intact.
	return &Bolt{db: db, logs: newKeyLogs(true), readOnly: true}, nil
}

func classifyOpenError(err error) error {
	switch {
	case errors.Is(err, berrors.ErrTimeout):
		return ErrLocked
	case errors.Is(err, berrors.ErrInvalid), errors.Is(err, berrors.ErrChecksum),
		errors.Is(err, berrors.ErrVersionMismatch), errors.Is(err, berrors.ErrInvalidMapping):
		return fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	return err
}

// checkFile opens an existing file read-only (shared lock, no writes) and
// checks that bbolt can read it and that its schema is one this binary can
// upgrade.
func checkFile(path string, timeout time.Duration) error {
	return boltSafe(func() error {
		db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: timeout, ReadOnly: true})
		if err != nil {
			return classifyOpenError(err)
		}
		defer db.Close()
		return db.View(func(tx *bolt.Tx) error {
			// A truncated file: its meta page names pages past the end,
			// and touching them through the mmap is a SIGBUS, not a panic.
			fi, err := os.Stat(path)
			if err != nil {
				return err
			}
			if tx.Size() > fi.Size() {
				return fmt.Errorf("%w: the file is %d bytes but its meta page says %d (truncated)", ErrCorrupt, fi.Size(), tx.Size())
			}
			meta := tx.Bucket([]byte(BucketMeta))
			if meta == nil {
				return nil // version 0: only buckets will be created
			}
			_, err = storedVersion(meta)
			return err
		})
	})
}

// boltSafe turns a panic inside bbolt (a damaged page) into ErrCorrupt
// instead of crashing the daemon at start.
func boltSafe(fn func() error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%w: %v", ErrCorrupt, r)
		}
	}()
	return fn()
}

// schemaVersion decodes a stored schema_version, refusing one this binary
// does not know.
func schemaVersion(raw []byte) (uint64, error) {
	if len(raw) != 8 {
		return 0, fmt.Errorf("%w: schema_version is %d bytes, want 8", ErrSchema, len(raw))
	}
	v := binary.BigEndian.Uint64(raw)
	if v > SchemaVersion {
		return 0, fmt.Errorf("%w: the store has schema %d, this binary supports up to %d (refusing to downgrade)", ErrSchema, v, SchemaVersion)
	}
	return v, nil
}

// storedVersion is the file's schema; 0 for a pre-versioned file.
func storedVersion(meta *bolt.Bucket) (uint64, error) {
	raw := meta.Get([]byte(keySchemaVersion))
	if raw == nil {
		return 0, nil
	}
	return schemaVersion(raw)
}

// migrate brings a file at version v to SchemaVersion, one step per
// version, inside the caller's transaction.
func migrate(tx *bolt.Tx, v uint64) error {
	// 0 -> 1: a new or pre-versioned file gets the version 1 buckets.
	if v == 0 {
		for _, b := range []string{BucketMeta, BucketLeases, BucketIdempotency, BucketAudit, BucketNodes} {
			if _, err := tx.CreateBucketIfNotExists([]byte(b)); err != nil {
				return err
			}
		}
		v = 1
	}
	// 1 -> 2: audit checkpoints and forwarding state, the allocation index
	// and node state, all empty.
	if v == 1 {
		for _, b := range []string{BucketAuditCheckpoints, BucketAuditForward, BucketAllocations, BucketNodeState} {
			if _, err := tx.CreateBucketIfNotExists([]byte(b)); err != nil {
				return err
			}
		}
		v = 2
	}
	// 2 -> 3: attestation verdicts and the usage ledger, empty.
	if v == 2 {
		for _, b := range []string{BucketAttestation, BucketAttestationHistory, BucketLedger} {
			if _, err := tx.CreateBucketIfNotExists([]byte(b)); err != nil {
				return err
			}
		}
		v = 3
	}
	// 3 -> 4: audit tree nodes get new keys from now on; nothing moves.
	if v == 3 {
		v = 4
	}
	// 4 -> 5: new idempotency records go to a log; the keyed ones stay.
	if v == 4 {
		for _, log := range loggedBuckets {
			if _, err := tx.CreateBucketIfNotExists([]byte(log)); err != nil {
				return err
			}
		}
		v = 5
	}
	for _, b := range Buckets {
		if tx.Bucket([]byte(b)) == nil {
			return fmt.Errorf("%w: bucket %s missing at schema %d", ErrCorrupt, b, v)
		}
	}
	for _, b := range loggedBuckets {
		if tx.Bucket([]byte(b)) == nil {
			return fmt.Errorf("%w: bucket %s missing at schema %d", ErrCorrupt, b, v)
		}
	}
	return tx.Bucket([]byte(BucketMeta)).Put([]byte(keySchemaVersion), U64(SchemaVersion))
}

// View implements Store.
func (b *Bolt) View(ctx context.Context, fn func(Tx) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return b.db.View(func(tx *bolt.Tx) error { return fn(boltTx{tx: tx, lenient: b.readOnly, logs: b.logs}) })
}

// Update implements Store. Concurrent updates are committed together, one
// fsync for many writers, with no fixed delay: a lone writer commits at
// once, and the writers that arrive while a commit runs are committed
// together by the next one (so the group is as large as the disk is slow;
// bbolt's own Batch closes a group after a fixed delay whatever the
// commit's length, which under load made many small commits). The
// functions of a group run one after another in one transaction, each
// seeing the writes of those before it. If one fails, the transaction is
// rolled back: the failed function is run again alone (its error then
// stands on its own state) and the others are committed without it.
//
// One goroutine, the committer, runs every group: under load it goes from
// one commit to the next without waiting to be scheduled, where handing
// the queue to one of its writers cost a wake-up per commit (a millisecond
// on two busy cores, a fifth of a commit).
func (b *Bolt) Update(ctx context.Context, fn func(Tx) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if b.readOnly {
		return ErrReadOnly
	}
	c := &boltCall{fn: fn, done: make(chan struct{})}
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return berrors.ErrDatabaseNotOpen
	}
	b.queue = append(b.queue, c)
	b.mu.Unlock()
	select {
	case b.wake <- struct{}{}:
	default: // a token is already there
	}
	<-c.done
	return c.result()
}

// commitLoop is the committer: it commits the queue, a group at a time,
// until Close, and drains it before returning.
func (b *Bolt) commitLoop() {
	var group []*boltCall
	returned := false
	defer func() {
		if returned {
			close(b.committed)
			return
		}
		// An update function ended this goroutine (runtime.Goexit, as
		// t.FailNow does; a panic is recovered per function). bbolt has
		// rolled the transaction back: the group's unfinished writers get
		// an error, not a wait forever, and a new committer goes on.
		for _, c := range group {
			if !c.finished {
				c.finish(errUpdateExited)
			}
		}
		go b.commitLoop()
	}()
	for {
		b.mu.Lock()
		n := min(len(b.queue), maxGroup)
		group = b.queue[:n:n]
		b.queue = b.queue[n:]
		closed := b.closed
		b.mu.Unlock()
		if n > 0 {
			b.commitGroup(group)
			continue
		}
		if closed {
			returned = true
			return
		}
		<-b.wake
	}
}

// errUpdateExited: an update function ended the goroutine running it.
// Functions run on the store's committer goroutine and must return.
var errUpdateExited = errors.New("store: an update function called runtime.Goexit; its group was rolled back")

func (c *boltCall) result() error {
	if c.panicked != nil {
		panic(c.panicked)
	}
	return c.err
}

// errPanicked stands for a panic in a function while its group is rolled
// back; the function's caller gets the panic itself.
var errPanicked = errors.New("store: update function panicked")

// call runs c.fn in tx, turning a panic into errPanicked (recorded on c).
func (c *boltCall) call(tx boltTx) (err error) {
	defer func() {
		if p := recover(); p != nil {
			c.panicked, err = p, errPanicked
		}
	}()
	return c.fn(tx)
}

// update runs fn in one bbolt write transaction. If fn fails (or does
// not return), what it added to the logged buckets' directories is taken
// out again. Not if the commit fails: bbolt may have written the meta
// page before the failing sync, and then readers of the mmap see the
// transaction, whose records must stay findable; entries for records a
// failed commit did not make visible are harmless.
func (b *Bolt) update(fn func(boltTx) error) error {
	j := &logJournal{}
	fnOK := false
	defer func() {
		if !fnOK {
			j.undo()
		}
	}()
	return b.db.Update(func(tx *bolt.Tx) error {
		err := fn(boltTx{tx: tx, logs: b.logs, journal: j})
		fnOK = err == nil
		return err
	})
}

// commitGroup commits calls in one transaction, or, if one fails, that
// one alone and the rest together again.
func (b *Bolt) commitGroup(calls []*boltCall) {
	for len(calls) > 0 {
		failed := -1
		err := b.update(func(tx boltTx) error {
			for i, c := range calls {
				if err := c.call(tx); err != nil {
					failed = i
					return err
				}
			}
			return nil
		})
		if err == nil || failed < 0 || len(calls) == 1 {
			// Committed, or the commit itself failed (every writer
			// gets its error), or a lone writer's function failed.
			for _, c := range calls {
				c.finish(err)
			}
			return
		}
		f := calls[failed]
		f.panicked = nil
		f.finish(b.update(f.call))
		calls = append(calls[:failed:failed], calls[failed+1:]...)
	}
}

// Close implements Store: updates already queued are committed first,
// later ones fail with bbolt's ErrDatabaseNotOpen.
func (b *Bolt) Close() error {
	b.closeOnce.Do(func() {
		if !b.readOnly {
			b.mu.Lock()
			b.closed = true
			b.mu.Unlock()
			select {
			case b.wake <- struct{}{}:
			default:
			}
			<-b.committed
		}
		b.closeErr = b.db.Close()
	})
	return b.closeErr
}

// boltTx is a transaction; lenient (read-only opens of files an older
// schema wrote) reads a known bucket the file lacks as empty.
type boltTx struct {
	tx      *bolt.Tx
	lenient bool
	logs    keyLogs
	journal *logJournal // a write transaction's additions to logs
}

// errAbsentBucket: a known bucket an older file does not have (lenient).
var errAbsentBucket = errors.New("bucket absent from this file")

func (t boltTx) bucket(name string) (*bolt.Bucket, error) {
	bk := t.tx.Bucket([]byte(name))
	if bk == nil {
		if t.lenient && slices.Contains(Buckets, name) {
			return nil, errAbsentBucket
		}
		return nil, fmt.Errorf("%w: %q", ErrUnknownBucket, name)
	}
	if appendOrdered[name] {
		bk.FillPercent = appendFill
	}
	return bk, nil
}

// appendOrdered are the buckets whose new keys sort after the old ones
// (sequences, time-ordered lease ids). bbolt splits a full page in
// halves by default, right for random inserts; for appends that leaves
// every page half empty, and a commit writes twice the pages.
var appendOrdered = map[string]bool{BucketAudit: true, BucketLedger: true, BucketLeases: true, BucketAuditCheckpoints: true}

// appendFill is how full split pages of appendOrdered buckets are left:
// nearly full, with room for a lease row to grow by a transition or two.
const appendFill = 0.9

func (t boltTx) Get(bucket, key string) ([]byte, error) {
	if lt, ok, err := t.logged(bucket); ok || err != nil {
		if err != nil {
			return nil, err
		}
		v, err := lt.get(key)
		if err != nil {
			return nil, err
		}
		if v != nil {
			return bytes.Clone(v), nil
		}
		return nil, notFound(bucket, key)
	}
	bk, err := t.bucket(bucket)
	if errors.Is(err, errAbsentBucket) {
		return nil, notFound(bucket, key)
	}
	if err != nil {
		return nil, err
	}
	v := bk.Get([]byte(key))
	if v == nil {
		return nil, notFound(bucket, key)
	}
	return bytes.Clone(v), nil
}

func (t boltTx) Put(bucket, key string, value []byte) error {
	if !t.tx.Writable() {
		return ErrReadOnly
	}
	if lt, ok, err := t.logged(bucket); ok || err != nil {
		if err != nil {
			return err
		}
		return lt.put(key, value)
	}
	bk, err := t.bucket(bucket)
	if err != nil {
		return err
	}
	return bk.Put([]byte(key), bytes.Clone(value))
}

func (t boltTx) Delete(bucket, key string) error {
	if !t.tx.Writable() {
		return ErrReadOnly
	}
	if lt, ok, err := t.logged(bucket); ok || err != nil {
		if err != nil {
			return err
		}
		return lt.delete(key)
	}
	bk, err := t.bucket(bucket)
	if err != nil {
		return err
	}
	return bk.Delete([]byte(key))
}

func (t boltTx) Scan(bucket, prefix string, reverse bool, fn func(string, []byte) error) error {
	if lt, ok, err := t.logged(bucket); ok || err != nil {
		if err != nil {
			return err
		}
		return lt.scan(prefix, reverse, fn)
	}
	bk, err := t.bucket(bucket)
	if errors.Is(err, errAbsentBucket) {
		return nil
	}
	if err != nil {
		return err
	}
	c := bk.Cursor()
	p := []byte(prefix)
	var k, v []byte
	if !reverse {
		k, v = c.Seek(p)
	} else {
		// Position after the last key with the prefix.
		k, _ = c.Seek(prefixEnd(p))
		if k == nil {
			k, v = c.Last()
		} else {
			k, v = c.Prev()
		}
	}
	for k != nil && bytes.HasPrefix(k, p) {
		if err := fn(string(k), bytes.Clone(v)); err != nil {
			if errors.Is(err, ErrStopScan) {
				return nil
			}
			return err
		}
		if reverse {
			k, v = c.Prev()
		} else {
			k, v = c.Next()
		}
	}
	return nil
}

// prefixEnd is the smallest key greater than every key with the prefix.
func prefixEnd(p []byte) []byte {
	end := bytes.Clone(p)
	for i := len(end) - 1; i >= 0; i-- {
		if end[i] < 0xff {
			end[i]++
			return end[:i+1]
		}
	}
	return []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
}

// U64 encodes a counter the way meta stores it.
func U64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

// GetU64 reads a counter from meta; a missing key is 0.
func GetU64(tx Tx, key string) (uint64, error) {
	raw, err := tx.Get(BucketMeta, key)
	if errors.Is(err, ErrNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	if len(raw) != 8 {
		return 0, fmt.Errorf("meta/%s: %w: %d bytes", key, ErrSchema, len(raw))
	}
	return binary.BigEndian.Uint64(raw), nil
}

// NextU64 increments a meta counter and returns the new value.
func NextU64(tx Tx, key string) (uint64, error) {
	v, err := GetU64(tx, key)
	if err != nil {
		return 0, err
	}
	v++
	return v, tx.Put(BucketMeta, key, U64(v))
}
