package store

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/maphash"
	"slices"
	"strings"
	"sync"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// A logged bucket is a bucket whose keys arrive in no order (the
// platform's idempotency keys: random request ids), kept by bbolt as a
// log with an in-memory directory, as etcd keeps its own keys: each
// record is appended under a sequence (so a commit's new records share
// the log's last page, where a B+tree keyed by random keys gave each its
// own leaf, and a commit wrote one page per create), and a directory in
// memory maps a hash of the key to the sequences that may hold it.
//
// The directory only narrows the search: a record is found when the
// snapshot the transaction reads holds, at one of the key's sequences, a
// record naming that key. So an entry for a record a transaction has not
// committed, or has deleted, or a hash collision, is harmless: a reader
// of an older snapshot finds the record there, a newer one does not.
// Entries are added while the writing transaction runs, before its
// commit makes the record visible, and removed again if its functions
// fail; sequences are not reused while the store is open. Deleting a
// record leaves its entry until the store is next opened (nothing
// deletes idempotency records today).
//
// Records a version 4 file holds stay in the bucket itself, keyed by
// their key, and are read, overwritten and deleted there. The directory
// is rebuilt from the log when the store opens: one read of every
// record, ~24 bytes of memory each.
type keyLog struct {
	log  []byte // the bbolt bucket holding the log
	seed maphash.Seed

	// A read-only open reads the directory when a transaction first
	// reads the bucket (once: nothing writes the file meanwhile).
	lazy    bool
	once    sync.Once
	loadErr error

	mu sync.RWMutex
	// one maps a key hash to its sequence; more, the hashes that have
	// several (a deleted and re-added key, a collision), newest first.
	one  map[uint64]uint64
	more map[uint64][]uint64
	next uint64 // the next sequence to allocate
}

// logSchema is the schema version that added the logs.
const logSchema = 5

// loggedBuckets are the logged buckets and their logs' bbolt names.
var loggedBuckets = map[string]string{BucketIdempotency: BucketIdempotency + ".log"}

// keyLogs are a store's logged buckets by name.
type keyLogs map[string]*keyLog

// newKeyLogs are empty directories; lazy ones are read from the first
// transaction that reads their bucket (read-only opens).
func newKeyLogs(lazy bool) keyLogs {
	logs := keyLogs{}
	for name, log := range loggedBuckets {
		logs[name] = &keyLog{log: []byte(log), seed: maphash.MakeSeed(), one: map[uint64]uint64{}, next: 1, lazy: lazy}
	}
	return logs
}

// loadKeyLogs reads every log of tx into a directory.
func loadKeyLogs(tx *bolt.Tx) (keyLogs, error) {
	logs := newKeyLogs(false)
	for _, l := range logs {
		if err := l.load(tx); err != nil {
			return nil, err
		}
	}
	return logs, nil
}

// load reads the log into the directory. A file of schema 5 or later
// without its log is damaged; an older one has none yet.
func (l *keyLog) load(tx *bolt.Tx) error {
	bk := tx.Bucket(l.log)
	if bk == nil {
		meta := tx.Bucket([]byte(BucketMeta))
		if meta == nil {
			return nil
		}
		v, err := storedVersion(meta)
		if err == nil && v >= logSchema {
			err = fmt.Errorf("%w: bucket %s missing at schema %d", ErrCorrupt, l.log, v)
		}
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return bk.ForEach(func(k, v []byte) error {
		seq, key, _, err := decodeLogRecord(k, v)
		if err != nil {
			return fmt.Errorf("%w: bucket %s: %w", ErrCorrupt, l.log, err)
		}
		l.add(l.hash(key), seq)
		l.next = max(l.next, seq+1)
		return nil
	})
}

// A log record: the sequence, 8 bytes big-endian, as its bbolt key; the
// key's length (uvarint), the key and the value as its bbolt value.
func encodeLogRecord(key string, value []byte) []byte {
	b := make([]byte, 0, binary.MaxVarintLen32+len(key)+len(value))
	b = binary.AppendUvarint(b, uint64(len(key)))
	b = append(b, key...)
	return append(b, value...)
}

func decodeLogRecord(k, v []byte) (seq uint64, key, value []byte, err error) {
	if len(k) != 8 {
		return 0, nil, nil, fmt.Errorf("log key %x is not an 8-byte sequence", k)
	}
	n, w := binary.Uvarint(v)
	var canonical [binary.MaxVarintLen64]byte
	if w <= 0 || n > uint64(len(v)-w) || binary.PutUvarint(canonical[:], n) != w {
		return 0, nil, nil, fmt.Errorf("log record %d: bad key length", binary.BigEndian.Uint64(k))
	}
	return binary.BigEndian.Uint64(k), v[w : w+int(n)], v[w+int(n):], nil
}

func (l *keyLog) hash(key []byte) uint64 { return maphash.Bytes(l.seed, key) }

// hashString is hash of a key held as a string (maphash hashes both alike).
func (l *keyLog) hashString(key string) uint64 { return maphash.String(l.seed, key) }

// add records seq as a place of hash h, newest first. Callers hold mu
// (or own l alone).
func (l *keyLog) add(h, seq uint64) {
	if seqs, ok := l.more[h]; ok {
		l.more[h] = append([]uint64{seq}, seqs...)
		return
	}
	old, ok := l.one[h]
	if !ok {
		l.one[h] = seq
		return
	}
	delete(l.one, h)
	if l.more == nil {
		l.more = map[uint64][]uint64{}
	}
	l.more[h] = []uint64{seq, old}
}

// remove forgets seq as a place of hash h.
func (l *keyLog) remove(h, seq uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if s, ok := l.one[h]; ok {
		if s == seq {
			delete(l.one, h)
		}
		return
	}
	seqs := slices.DeleteFunc(l.more[h], func(s uint64) bool { return s == seq })
	switch len(seqs) {
	case 0:
		delete(l.more, h)
	case 1:
		delete(l.more, h)
		l.one[h] = seqs[0]
	default:
		l.more[h] = seqs
	}
}

// places appends the sequences that may hold hash h to buf.
func (l *keyLog) places(h uint64, buf []uint64) []uint64 {
	l.mu.RLock()
	defer l.mu.RUnlock()
	if s, ok := l.one[h]; ok {
		return append(buf, s)
	}
	return append(buf, l.more[h]...)
}

// allocate takes a new sequence for hash h and records it.
func (l *keyLog) allocate(h uint64) uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	seq := l.next
	l.next++
	l.add(h, seq)
	return seq
}

// logAdd is one directory entry a write transaction added.
type logAdd struct {
	l      *keyLog
	h, seq uint64
}

// logJournal is what one write transaction added to the directories,
// undone if it does not commit.
type logJournal struct{ added []logAdd }

func (j *logJournal) undo() {
	for _, a := range j.added {
		a.l.remove(a.h, a.seq)
	}
	j.added = j.added[:0]
}

// logTx is a logged bucket inside one transaction.
type logTx struct {
	l       *keyLog
	log     *bolt.Bucket // nil: a read-only open of a file older than the log
	keyed   *bolt.Bucket // version 4's records; nil when absent (lenient)
	journal *logJournal  // nil in a read-only transaction
}

// logged is bucket name as a logged bucket in t; ok is false for the
// other buckets.
func (t boltTx) logged(name string) (lt logTx, ok bool, err error) {
	l := t.logs[name]
	if l == nil {
		return logTx{}, false, nil
	}
	if l.lazy {
		l.once.Do(func() { l.loadErr = boltSafe(func() error { return l.load(t.tx) }) })
		if l.loadErr != nil {
			return logTx{}, true, l.loadErr
		}
	}
	lt = logTx{l: l, log: t.tx.Bucket(l.log), keyed: t.tx.Bucket([]byte(name)), journal: t.journal}
	if (lt.log == nil || lt.keyed == nil) && !t.lenient {
		return logTx{}, true, fmt.Errorf("%w: bucket %s or its log is missing", ErrCorrupt, name)
	}
	if lt.log != nil && t.tx.Writable() {
		lt.log.FillPercent = appendFill
	}
	return lt, true, nil
}

// find returns the sequence and value of key (whose hash is h) in the
// log, or 0 and nil.
func (t logTx) find(key string, h uint64) (uint64, []byte, error) {
	if t.log == nil {
		return 0, nil, nil
	}
	var buf [2]uint64
	for _, seq := range t.l.places(h, buf[:0]) {
		k := binary.BigEndian.AppendUint64(nil, seq)
		v := t.log.Get(k)
		if v == nil {
			continue
		}
		_, rk, rv, err := decodeLogRecord(k, v)
		if err != nil {
			return 0, nil, fmt.Errorf("%w: bucket %s: %w", ErrCorrupt, t.l.log, err)
		}
		if string(rk) == key {
			return seq, rv, nil
		}
	}
	return 0, nil, nil
}

func (t logTx) get(key string) ([]byte, error) {
	if _, v, err := t.find(key, t.l.hashString(key)); v != nil || err != nil {
		return v, err
	}
	if t.keyed != nil {
		return t.keyed.Get([]byte(key)), nil
	}
	return nil, nil
}

func (t logTx) put(key string, value []byte) error {
	// The keys bbolt refuses in its own buckets are refused here too.
	switch {
	case key == "":
		return berrors.ErrKeyRequired
	case len(key) > bolt.MaxKeySize:
		return berrors.ErrKeyTooLarge
	}
	h := t.l.hashString(key)
	seq, v, err := t.find(key, h)
	if err != nil {
		return err
	}
	if v != nil {
		return t.log.Put(binary.BigEndian.AppendUint64(nil, seq), encodeLogRecord(key, value))
	}
	if t.keyed.Get([]byte(key)) != nil {
		return t.keyed.Put([]byte(key), bytes.Clone(value))
	}
	seq = t.l.allocate(h)
	t.journal.added = append(t.journal.added, logAdd{t.l, h, seq})
	return t.log.Put(binary.BigEndian.AppendUint64(nil, seq), encodeLogRecord(key, value))
}

func (t logTx) delete(key string) error {
	seq, v, err := t.find(key, t.l.hashString(key))
	if err != nil {
		return err
	}
	if v != nil {
		return t.log.Delete(binary.BigEndian.AppendUint64(nil, seq))
	}
	return t.keyed.Delete([]byte(key))
}

// scan reads the whole log (its records are in no key order) and the
// keyed records with the prefix, and calls fn in key order. Nothing in
// the daemon scans a logged bucket; it is here so that the bucket keeps
// the Tx contract.
func (t logTx) scan(prefix string, reverse bool, fn func(string, []byte) error) error {
	type kv struct {
		k string
		v []byte
	}
	var all []kv
	if t.log != nil {
		err := t.log.ForEach(func(k, v []byte) error {
			_, rk, rv, err := decodeLogRecord(k, v)
			if err != nil {
				return fmt.Errorf("%w: bucket %s: %w", ErrCorrupt, t.l.log, err)
			}
			if bytes.HasPrefix(rk, []byte(prefix)) {
				all = append(all, kv{string(rk), bytes.Clone(rv)})
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	if t.keyed != nil {
		c := t.keyed.Cursor()
		for k, v := c.Seek([]byte(prefix)); k != nil && bytes.HasPrefix(k, []byte(prefix)); k, v = c.Next() {
			all = append(all, kv{string(k), bytes.Clone(v)})
		}
	}
	slices.SortFunc(all, func(a, b kv) int { return strings.Compare(a.k, b.k) })
	if reverse {
		slices.Reverse(all)
	}
	for _, r := range all {
		if err := fn(r.k, r.v); err != nil {
			if errors.Is(err, ErrStopScan) {
				return nil
			}
			return err
		}
	}
	return nil
}
