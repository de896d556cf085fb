package store

// etcd layout, under the deployment's key prefix P (e.g. "/gpuaas/prod/"):
//
//   P + "b/" + bucket + "/" + key   the record: the same buckets, keys and
//                                   values as the bbolt schema (bbolt.go),
//                                   including meta/schema_version
//   P + "d/" + bucket               delete marker: rewritten by every
//                                   transaction that deletes in the bucket
//
// Transactions are optimistic. Reads happen at one revision R (the first
// read is linearizable and fixes R; later reads use WithRev(R)); writes are
// buffered; the commit is one etcd Txn whose If holds, for every key read,
// mod_revision == the one seen (0 for a key that was absent) and, for every
// prefix scanned, mod_revision < R+1 over the scanned range. etcd range
// compares see only keys that exist, so they catch inserts and updates but
// not deletes; the delete marker closes that gap: a scan in an Update also
// reads its bucket's marker, and a delete in the bucket rewrites it. When the
// If fails the transaction is rerun from scratch with a fresh revision,
// after a jittered backoff, a bounded number of times (ErrConflict).
//
// Group commit: this process's Updates queue, and while one etcd Txn is in
// flight the next batch gathers. A batch runs its functions one after
// another against one transaction (each sees the writes of those before it;
// a function that fails has its writes undone and its error delivered only
// once the batch commits, since the error may rest on reads the commit
// validates) and commits them in one Txn: one Raft round and one fsync for
// many Updates. A conflict reruns the whole batch.
//
// Large transactions: etcd refuses a Txn with more compares or operations
// than --max-txn-ops (default 128). Splitting one would break atomicity, so
// a transaction over the limit fails with ErrTooLarge before anything is
// sent; callers keep transactions small (the lease service commits sweeps in
// chunks).

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// EtcdOptions tunes the etcd backend.
type EtcdOptions struct {
	// Prefix separates deployments sharing one etcd cluster; required.
	// A trailing "/" is added if missing. With etcd RBAC the control
	// plane's role is confined to this prefix.
	Prefix string
	// MaxTxnOps is the server's --max-txn-ops (default 128).
	MaxTxnOps int
	// MaxAttempts bounds how often a conflicting Update is rerun
	// (default 16).
	MaxAttempts int
	// Backoff is the first retry delay, doubled per attempt up to 100 times
	// it and jittered (default 1ms).
	Backoff time.Duration
	// Timeout bounds a View or Update whose context has no deadline
	// (default 10s).
	Timeout time.Duration
	// PageSize is how many keys one range request of a scan fetches
	// (default 512).
	PageSize int
}

// Etcd is the replicated backend over an etcd cluster.
type Etcd struct {
	cli    *clientv3.Client
	opts   EtcdOptions
	closed chan struct{}
	// ownsClient: Close closes cli (Open dialled it).
	ownsClient bool

	// Updates queue here and run in batches, one batch at a time: they
	// would conflict on the shared counters anyway, and queueing locally is
	// cheaper than retrying. Conflicts then come only from other replicas.
	mu      sync.Mutex
	queue   []*etcdCall
	running bool
}

// maxBatch bounds the Updates one batch runs.
const maxBatch = 64

type etcdCall struct {
	ctx  context.Context
	fn   func(Tx) error
	err  error
	done chan struct{}
	// ahead are etcd keys fn will read (UpdateReading): the batch reads
	// them all in one round trip before running its functions.
	ahead []string
}

var _ ReadAheadStore = (*Etcd)(nil)

// OpenEtcd checks the schema under opts.Prefix (recording it on a new
// deployment) and returns the store. The caller owns cli (endpoints, TLS,
// credentials) and closes it after the store.
func OpenEtcd(ctx context.Context, cli *clientv3.Client, opts EtcdOptions) (*Etcd, error) {
	if cli == nil {
		return nil, errors.New("open etcd store: no client")
	}
	if opts.Prefix == "" {
		return nil, errors.New("open etcd store: a key prefix is required")
	}
	if !strings.HasSuffix(opts.Prefix, "/") {
		opts.Prefix += "/"
	}
	if opts.MaxTxnOps <= 0 {
		opts.MaxTxnOps = 128
	}
	if opts.MaxAttempts <= 0 {
		opts.MaxAttempts = 16
	}
	if opts.Backoff <= 0 {
		opts.Backoff = time.Millisecond
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 10 * time.Second
	}
	if opts.PageSize <= 0 {
		opts.PageSize = 512
	}
	s := &Etcd{cli: cli, opts: opts, closed: make(chan struct{})}
	err := s.Update(ctx, func(tx Tx) error {
		raw, err := tx.Get(BucketMeta, keySchemaVersion)
		var v uint64
		switch {
		case errors.Is(err, ErrNotFound):
		case err != nil:
			return err
		default:
			if v, err = schemaVersion(raw); err != nil {
				return err
			}
		}
		if v == SchemaVersion {
			return nil
		}
		// Buckets need no creation on etcd, so every upgrade so far only
		// records the version.
		return tx.Put(BucketMeta, keySchemaVersion, U64(SchemaVersion))
	})
	if err != nil {
		return nil, fmt.Errorf("open etcd store at %s: %w", opts.Prefix, err)
	}
	return s, nil
}

// Close implements Store. It closes the client only if Open dialled it.
func (s *Etcd) Close() error {
	select {
	case <-s.closed:
		return nil
	default:
		close(s.closed)
	}
	if s.ownsClient {
		return s.cli.Close()
	}
	return nil
}

var errClosed = errors.New("store: closed")

func (s *Etcd) begin(ctx context.Context) (context.Context, context.CancelFunc, error) {
	select {
	case <-s.closed:
		return nil, nil, errClosed
	default:
	}
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}
	if _, ok := ctx.Deadline(); ok {
		ctx, cancel := context.WithCancel(ctx)
		return ctx, cancel, nil
	}
	ctx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
	return ctx, cancel, nil
}

// View implements Store: fn reads at one revision. If that revision is
// compacted while fn still reads, fn gets an error wrapping
// rpctypes.ErrCompacted (View does not rerun fn: unlike Update's, a View's
// fn may collect results as it goes).
func (s *Etcd) View(ctx context.Context, fn func(Tx) error) error {
	ctx, cancel, err := s.begin(ctx)
	if err != nil {
		return err
	}
	defer cancel()
	return fn(s.newTx(ctx, false))
}

// Update implements Store. It joins the next batch (see the layout comment)
// and returns when that batch has committed or failed. If ctx ends before
// the batch reaches fn, fn is not run and ctx's error is returned; fn's
// reads use ctx; once fn has run, Update waits for the batch's commit,
// which is bounded by Timeout.
func (s *Etcd) Update(ctx context.Context, fn func(Tx) error) error {
	return s.UpdateReading(ctx, nil, fn)
}

// UpdateReading implements ReadAheadStore: Update, with keys read for the
// whole batch before its functions run.
func (s *Etcd) UpdateReading(ctx context.Context, keys []Key, fn func(Tx) error) error {
	var ahead []string
	for _, k := range keys {
		if knownBucket(k.Bucket) && k.Key != "" {
			ahead = append(ahead, s.bucketPrefix(k.Bucket)+k.Key)
		}
	}
	ctx, cancel, err := s.begin(ctx)
	if err != nil {
		return err
	}
	defer cancel()
	c := &etcdCall{ctx: ctx, fn: fn, done: make(chan struct{}), ahead: ahead}
	s.mu.Lock()
	s.queue = append(s.queue, c)
	if !s.running {
		s.running = true
		go s.drain()
	}
	s.mu.Unlock()
	<-c.done
	return c.err
}

// drain runs queued Updates in batches until the queue is empty.
func (s *Etcd) drain() {
	for {
		s.mu.Lock()
		n := min(len(s.queue), maxBatch)
		if n == 0 {
			s.running = false
			s.mu.Unlock()
			return
		}
		batch := s.queue[:n:n]
		s.queue = s.queue[n:]
		s.mu.Unlock()
		deferred := s.runBatch(batch)
		if len(deferred) > 0 {
			s.mu.Lock()
			s.queue = append(deferred, s.queue...)
			s.mu.Unlock()
		}
	}
}

// runBatch runs calls in one transaction and delivers their results. Calls
// that did not fit etcd's operation limit beside the others are returned,
// to run in the next batch.
func (s *Etcd) runBatch(calls []*etcdCall) (deferred []*etcdCall) {
	finish := func(c *etcdCall, err error) {
		c.err = err
		close(c.done)
	}
	backoff := s.opts.Backoff
	for attempt := 1; ; attempt++ {
		ctx, cancel := context.WithTimeout(context.Background(), s.opts.Timeout)
		tx := s.newTx(ctx, true)
		tx.readAhead(calls)
		results := make(map[*etcdCall]error, len(calls))
		var ran []*etcdCall
		deferred = deferred[:0]
		rerun := false
		for _, c := range calls {
			if err := c.ctx.Err(); err != nil {
				finish(c, err)
				continue
			}
			m := tx.mark()
			tx.ctx = c.ctx
			err := c.fn(tx)
			tx.ctx = ctx
			if errors.Is(err, rpctypes.ErrCompacted) {
				rerun = true
				break
			}
			if err != nil {
				tx.rollback(m, true)
				results[c], ran = err, append(ran, c)
				continue
			}
			if cmps, ops := tx.size(); max(cmps, ops) > s.opts.MaxTxnOps {
				tx.rollback(m, false)
				if m.empty() {
					results[c], ran = fmt.Errorf("%w: %d compares and %d writes, etcd accepts %d", ErrTooLarge, cmps, ops, s.opts.MaxTxnOps), append(ran, c)
				} else {
					deferred = append(deferred, c)
				}
				continue
			}
			ran = append(ran, c)
		}
		var ok bool
		var err error
		if !rerun {
			ok, err = tx.commit()
		}
		cancel()
		switch {
		case err != nil:
			for _, c := range ran {
				finish(c, err)
			}
			return deferred
		case ok:
			for _, c := range ran {
				finish(c, results[c])
			}
			return deferred
		}
		// A conflict, or a revision compacted under a read: rerun every
		// call not finished yet (those deferred too: the new revision may
		// change what fits).
		var next []*etcdCall
		for _, c := range calls {
			select {
			case <-c.done:
			default:
				next = append(next, c)
			}
		}
		if attempt >= s.opts.MaxAttempts {
			for _, c := range next {
				finish(c, fmt.Errorf("%w: gave up after %d attempts", ErrConflict, attempt))
			}
			return nil
		}
		calls, deferred = next, nil
		time.Sleep(backoff/2 + rand.N(backoff/2+1))
		backoff = min(2*backoff, 100*s.opts.Backoff)
	}
}

func (s *Etcd) bucketPrefix(bucket string) string { return s.opts.Prefix + "b/" + bucket + "/" }
func (s *Etcd) markerKey(bucket string) string    { return s.opts.Prefix + "d/" + bucket }

type etcdWrite struct {
	val []byte
	del bool
}

type keyRange struct{ start, end string }

type scanKey struct {
	start, end string
	reverse    bool
}

type etcdTx struct {
	s     *Etcd
	ctx   context.Context
	write bool
	rev   int64 // snapshot revision; 0 until the first read

	reads   map[string]int64 // key -> mod revision seen (0: absent)
	ranges  []keyRange
	writes  map[string]etcdWrite
	deleted map[string]bool // buckets with deletes

	// Reads at the snapshot revision, cached for the batch's later
	// functions (an Update only): point reads (nil: absent) and whole
	// scans.
	cache map[string]*mvccpb.KeyValue
	scans map[scanKey][]*mvccpb.KeyValue

	// Undo logs for rollback to a mark.
	undo    []undoWrite
	readLog []string
	delLog  []string
}

type undoWrite struct {
	key  string
	prev etcdWrite
	had  bool
}

// txMark is a savepoint: the lengths of the logs.
type txMark struct{ writes, reads, ranges, deleted int }

func (m txMark) empty() bool { return m == txMark{} }

func (s *Etcd) newTx(ctx context.Context, write bool) *etcdTx {
	t := &etcdTx{s: s, ctx: ctx, write: write}
	if write {
		t.reads, t.writes, t.deleted = map[string]int64{}, map[string]etcdWrite{}, map[string]bool{}
		t.cache, t.scans = map[string]*mvccpb.KeyValue{}, map[scanKey][]*mvccpb.KeyValue{}
	}
	return t
}

func (t *etcdTx) mark() txMark {
	return txMark{len(t.undo), len(t.readLog), len(t.ranges), len(t.delLog)}
}

// rollback undoes the writes made after m and, unless keepReads, forgets
// the reads. A failed function keeps its reads: its error is delivered
// only if they still hold at commit.
func (t *etcdTx) rollback(m txMark, keepReads bool) {
	for i := len(t.undo) - 1; i >= m.writes; i-- {
		u := t.undo[i]
		if u.had {
			t.writes[u.key] = u.prev
		} else {
			delete(t.writes, u.key)
		}
	}
	t.undo = t.undo[:m.writes]
	for _, b := range t.delLog[m.deleted:] {
		delete(t.deleted, b)
	}
	t.delLog = t.delLog[:m.deleted]
	if keepReads {
		return
	}
	for _, k := range t.readLog[m.reads:] {
		delete(t.reads, k)
	}
	t.readLog = t.readLog[:m.reads]
	t.ranges = t.ranges[:m.ranges]
}

// size is the commit's compares and operations.
func (t *etcdTx) size() (cmps, ops int) {
	return len(t.reads) + len(t.ranges), len(t.writes) + len(t.deleted)
}

func (t *etcdTx) check(bucket string) error {
	if !knownBucket(bucket) {
		return fmt.Errorf("%w: %q", ErrUnknownBucket, bucket)
	}
	return nil
}

// get reads at the snapshot revision, fixing it on the first read.
//
// Reads after the first are serializable: the revision is fixed, so the
// member need not confirm leadership (a linearizable read costs a Raft
// round). A member that has not applied the revision yet answers
// ErrFutureRev; the read is then repeated linearizably.
func (t *etcdTx) get(key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	var resp *clientv3.GetResponse
	var err error
	if t.rev != 0 {
		opts = append(opts, clientv3.WithRev(t.rev))
		resp, err = t.s.cli.Get(t.ctx, key, append(opts, clientv3.WithSerializable())...)
		if errors.Is(err, rpctypes.ErrFutureRev) {
			resp, err = t.s.cli.Get(t.ctx, key, opts...)
		}
	} else {
		resp, err = t.s.cli.Get(t.ctx, key, opts...)
	}
	if err != nil {
		return nil, fmt.Errorf("etcd read %q: %w", key, err)
	}
	if t.rev == 0 {
		t.rev = resp.Header.Revision
	}
	return resp, nil
}

// readAhead reads the keys the calls named (UpdateReading) into the
// cache, in as few round trips as etcd's operation limit allows, fixing
// the snapshot revision if no read has. It is only a cache fill: if it
// fails, each function reads for itself and meets the error there.
func (t *etcdTx) readAhead(calls []*etcdCall) {
	var keys []string
	seen := map[string]bool{}
	for _, c := range calls {
		for _, k := range c.ahead {
			if _, cached := t.cache[k]; !cached && !seen[k] {
				seen[k] = true
				keys = append(keys, k)
			}
		}
	}
	for len(keys) > 0 {
		n := min(len(keys), t.s.opts.MaxTxnOps)
		chunk := keys[:n]
		keys = keys[n:]
		ops := make([]clientv3.Op, len(chunk))
		for i, k := range chunk {
			if t.rev != 0 {
				ops[i] = clientv3.OpGet(k, clientv3.WithRev(t.rev))
			} else {
				ops[i] = clientv3.OpGet(k)
			}
		}
		resp, err := t.s.cli.Txn(t.ctx).Then(ops...).Commit()
		if err != nil || len(resp.Responses) != len(chunk) {
			return
		}
		if t.rev == 0 {
			t.rev = resp.Header.Revision
		}
		for i, k := range chunk {
			var kv *mvccpb.KeyValue
			if r := resp.Responses[i].GetResponseRange(); r != nil && len(r.Kvs) > 0 {
				kv = r.Kvs[0]
			}
			t.cache[k] = kv
		}
	}
}

// getRecorded reads one key and, in an Update, records it for the commit's
// compares.
func (t *etcdTx) getRecorded(key string) ([]byte, bool, error) {
	if t.write {
		if w, ok := t.writes[key]; ok {
			return w.val, !w.del, nil
		}
	}
	kv, cached := t.cache[key]
	if !cached {
		resp, err := t.get(key)
		if err != nil {
			return nil, false, err
		}
		if len(resp.Kvs) > 0 {
			kv = resp.Kvs[0]
		}
		if t.write {
			t.cache[key] = kv
		}
	}
	if t.write {
		if _, seen := t.reads[key]; !seen {
			if kv != nil {
				t.reads[key] = kv.ModRevision
			} else {
				t.reads[key] = 0
			}
			t.readLog = append(t.readLog, key)
		}
	}
	if kv == nil {
		return nil, false, nil
	}
	return kv.Value, true, nil
}

func (t *etcdTx) Get(bucket, key string) ([]byte, error) {
	if err := t.check(bucket); err != nil {
		return nil, err
	}
	v, ok, err := t.getRecorded(t.s.bucketPrefix(bucket) + key)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, notFound(bucket, key)
	}
	return bytes.Clone(v), nil
}

func (t *etcdTx) Put(bucket, key string, value []byte) error {
	if err := t.check(bucket); err != nil {
		return err
	}
	if !t.write {
		return ErrReadOnly
	}
	if key == "" {
		return fmt.Errorf("put in %s: empty key", bucket)
	}
	v := bytes.Clone(value)
	if v == nil {
		v = []byte{}
	}
	t.setWrite(t.s.bucketPrefix(bucket)+key, etcdWrite{val: v})
	return nil
}

func (t *etcdTx) Delete(bucket, key string) error {
	if err := t.check(bucket); err != nil {
		return err
	}
	if !t.write {
		return ErrReadOnly
	}
	if key == "" {
		return fmt.Errorf("delete in %s: empty key", bucket)
	}
	t.setWrite(t.s.bucketPrefix(bucket)+key, etcdWrite{del: true})
	if !t.deleted[bucket] {
		t.deleted[bucket] = true
		t.delLog = append(t.delLog, bucket)
	}
	return nil
}

func (t *etcdTx) setWrite(key string, w etcdWrite) {
	prev, had := t.writes[key]
	t.undo = append(t.undo, undoWrite{key, prev, had})
	t.writes[key] = w
}

type bufferedKV struct {
	key string
	w   etcdWrite
}

func (t *etcdTx) Scan(bucket, prefix string, reverse bool, fn func(string, []byte) error) error {
	if err := t.check(bucket); err != nil {
		return err
	}
	base := t.s.bucketPrefix(bucket)
	start := base + prefix
	end := clientv3.GetPrefixRangeEnd(start)
	var buf []bufferedKV
	if t.write {
		// A delete in the bucket by another writer must fail this
		// transaction's commit: read the marker, so its compare is there.
		if _, _, err := t.getRecorded(t.s.markerKey(bucket)); err != nil {
			return err
		}
		for k, w := range t.writes {
			if k >= start && k < end {
				buf = append(buf, bufferedKV{k, w})
			}
		}
	}
	// before: a comes strictly before b in scan order.
	before := func(a, b string) bool {
		if reverse {
			return a > b
		}
		return a < b
	}
	sort.Slice(buf, func(i, j int) bool { return before(buf[i].key, buf[j].key) })

	var (
		kvs      []*mvccpb.KeyValue
		i, bi    int
		more     = true
		from, to = start, end
		last     string
		stopped  bool
		sk       = scanKey{start, end, reverse}
		all      []*mvccpb.KeyValue // every page, to cache
	)
	if t.write {
		if c, ok := t.scans[sk]; ok {
			kvs, more = c, false
		}
	}
	fetched := more
	for {
		if i >= len(kvs) && more {
			opts := []clientv3.OpOption{clientv3.WithRange(to), clientv3.WithLimit(int64(t.s.opts.PageSize))}
			if reverse {
				opts = append(opts, clientv3.WithSort(clientv3.SortByKey, clientv3.SortDescend))
			} else {
				opts = append(opts, clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend))
			}
			resp, err := t.get(from, opts...)
			if err != nil {
				return err
			}
			kvs, i, more = resp.Kvs, 0, resp.More && len(resp.Kvs) > 0
			if t.write {
				all = append(all, kvs...)
			}
			if n := len(kvs); n > 0 {
				if reverse {
					to = string(kvs[n-1].Key)
				} else {
					from = string(kvs[n-1].Key) + "\x00"
				}
			}
		}
		var key string
		var val []byte
		switch {
		case bi < len(buf) && (i >= len(kvs) || !before(string(kvs[i].Key), buf[bi].key)):
			if i < len(kvs) && string(kvs[i].Key) == buf[bi].key {
				i++ // the transaction's own write replaces the stored value
			}
			b := buf[bi]
			bi++
			if b.w.del {
				continue
			}
			key, val = b.key, b.w.val
		case i < len(kvs):
			key, val = string(kvs[i].Key), kvs[i].Value
			i++
		default:
			goto done
		}
		last = key
		if err := fn(strings.TrimPrefix(key, base), bytes.Clone(val)); err != nil {
			if errors.Is(err, ErrStopScan) {
				stopped = true
				goto done
			}
			return err
		}
	}
done:
	if t.write && fetched && !stopped {
		t.scans[sk] = all
	}
	if t.write && t.rev != 0 {
		r := keyRange{start, end}
		if stopped {
			// Only what was read matters.
			if reverse {
				r.start = last
			} else {
				r.end = last + "\x00"
			}
		}
		t.ranges = append(t.ranges, r)
	}
	return nil
}

// commit sends the buffered writes guarded by the read set; false means a
// conflict.
func (t *etcdTx) commit() (bool, error) {
	if len(t.writes) == 0 && len(t.deleted) == 0 {
		return true, nil
	}
	cmps := make([]clientv3.Cmp, 0, len(t.reads)+len(t.ranges))
	for k, rev := range t.reads {
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(k), "=", rev))
	}
	for _, r := range t.ranges {
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(r.start), "<", t.rev+1).WithRange(r.end))
	}
	ops := make([]clientv3.Op, 0, len(t.writes)+len(t.deleted))
	for k, w := range t.writes {
		if w.del {
			ops = append(ops, clientv3.OpDelete(k))
		} else {
			ops = append(ops, clientv3.OpPut(k, string(w.val)))
		}
	}
	for b := range t.deleted {
		ops = append(ops, clientv3.OpPut(t.s.markerKey(b), ""))
	}
	if n := max(len(cmps), len(ops)); n > t.s.opts.MaxTxnOps {
		return false, fmt.Errorf("%w: %d compares and %d writes, etcd accepts %d", ErrTooLarge, len(cmps), len(ops), t.s.opts.MaxTxnOps)
	}
	resp, err := t.s.cli.Txn(t.ctx).If(cmps...).Then(ops...).Commit()
	if err != nil {
		if errors.Is(err, rpctypes.ErrTooManyOps) {
			return false, fmt.Errorf("%w: %d compares and %d writes: %w", ErrTooLarge, len(cmps), len(ops), err)
		}
		// The outcome is unknown; a rerun would be safe (the compares
		// fail if it applied) but the caller decides.
		return false, fmt.Errorf("etcd commit: %w", err)
	}
	return resp.Succeeded, nil
}

// Prefix is the deployment's key prefix.
func (s *Etcd) Prefix() string { return s.opts.Prefix }

// Client is the etcd client the store uses.
func (s *Etcd) Client() *clientv3.Client { return s.cli }

// Change is one committed write to a bucket, as WatchBucket reports it.
type Change struct {
	Key string
	// Value is the new value; nil when the key was deleted.
	Value []byte
	// Revision is the etcd revision of the commit.
	Revision int64
}

// WatchBucket calls fn with every write committed to bucket after this
// call, by any process sharing the store, in commit order, until ctx ends.
// It resumes after a broken watch from the last revision it delivered; if
// etcd compacted past that revision (changes were lost), it returns an
// error wrapping rpctypes.ErrCompacted and the caller resynchronises from
// a fresh read. A replica uses it to learn of changes other replicas made.
func (s *Etcd) WatchBucket(ctx context.Context, bucket string, fn func(Change)) error {
	if !knownBucket(bucket) {
		return fmt.Errorf("%w: %s", ErrUnknownBucket, bucket)
	}
	prefix := s.bucketPrefix(bucket)
	// The revision after which changes are delivered: the store's current
	// one, so nothing committed after the call is missed.
	resp, err := s.cli.Get(ctx, prefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		return fmt.Errorf("watch %s: %w", bucket, err)
	}
	next := resp.Header.Revision + 1
	for {
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		wch := s.cli.Watch(wctx, prefix, clientv3.WithPrefix(), clientv3.WithRev(next))
		for wr := range wch {
			if err := wr.Err(); err != nil {
				cancel()
				if errors.Is(err, rpctypes.ErrCompacted) {
					return fmt.Errorf("watch %s from revision %d: %w", bucket, next, err)
				}
				break // resume from next
			}
			for _, ev := range wr.Events {
				c := Change{Key: strings.TrimPrefix(string(ev.Kv.Key), prefix), Revision: ev.Kv.ModRevision}
				if ev.Type == mvccpb.PUT {
					c.Value = bytes.Clone(ev.Kv.Value)
				}
				fn(c)
				next = ev.Kv.ModRevision + 1
			}
		}
		cancel()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-s.closed:
			return errClosed
		case <-time.After(100 * time.Millisecond):
		}
	}
}
