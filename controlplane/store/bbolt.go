package store

// bbolt schema (version 1). One file, one writer process.
//
//   meta
//     schema_version   uint64 big-endian; 1
//     revision         uint64 big-endian; bumped by every lease change
//     audit_head       32-byte hash of the last audit entry
//     audit_seq        uint64 big-endian; sequence of the last audit entry
//   leases             lease id -> gpuaas.lease.v1.Lease, protobuf
//   idempotency        caller + "\x00" + key -> {lease id, request hash}, JSON
//   audit              %020d sequence -> auditlog.Entry, canonical JSON; append-only
//   nodes              node id -> gpuaas.node.v1.Node, protobuf
//
// Upgrades run in Open, in one transaction, from the stored version to
// SchemaVersion; a file from a newer binary is refused.

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// SchemaVersion is the bbolt schema this binary writes.
const SchemaVersion = 1

const keySchemaVersion = "schema_version"

// BoltOptions tunes the bbolt backend.
type BoltOptions struct {
	// OpenTimeout bounds the wait for the file lock (default 1s), so two
	// daemons can never share a data file.
	OpenTimeout time.Duration
}

// Bolt is the embedded bbolt backend.
type Bolt struct {
	db *bolt.DB
}

var _ Store = (*Bolt)(nil)

// OpenBolt opens (creating if needed) the store at path.
func OpenBolt(path string, opts BoltOptions) (*Bolt, error) {
	if opts.OpenTimeout == 0 {
		opts.OpenTimeout = time.Second
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: opts.OpenTimeout, NoFreelistSync: false})
	if err != nil {
		if errors.Is(err, berrors.ErrTimeout) {
			return nil, fmt.Errorf("open store %s: %w", path, ErrLocked)
		}
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range Buckets {
			if _, err := tx.CreateBucketIfNotExists([]byte(b)); err != nil {
				return err
			}
		}
		return migrate(tx.Bucket([]byte(BucketMeta)))
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	return &Bolt{db: db}, nil
}

// migrate brings meta to SchemaVersion. Version 0 is a new file.
func migrate(meta *bolt.Bucket) error {
	var v uint64
	if raw := meta.Get([]byte(keySchemaVersion)); raw != nil {
		if len(raw) != 8 {
			return fmt.Errorf("%w: schema_version is %d bytes", ErrSchema, len(raw))
		}
		v = binary.BigEndian.Uint64(raw)
	}
	if v > SchemaVersion {
		return fmt.Errorf("%w: file has schema %d, this binary supports up to %d", ErrSchema, v, SchemaVersion)
	}
	// Future upgrades go here, one step per version: if v == 1 { ...; v = 2 }.
	return meta.Put([]byte(keySchemaVersion), U64(SchemaVersion))
}

// View implements Store.
func (b *Bolt) View(ctx context.Context, fn func(Tx) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return b.db.View(func(tx *bolt.Tx) error { return fn(boltTx{tx}) })
}

// Update implements Store. Concurrent updates are committed together
// (bbolt's Batch), one fsync for many writers.
func (b *Bolt) Update(ctx context.Context, fn func(Tx) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return b.db.Batch(func(tx *bolt.Tx) error { return fn(boltTx{tx}) })
}

// Close implements Store.
func (b *Bolt) Close() error { return b.db.Close() }

type boltTx struct{ tx *bolt.Tx }

func (t boltTx) bucket(name string) (*bolt.Bucket, error) {
	bk := t.tx.Bucket([]byte(name))
	if bk == nil {
		return nil, fmt.Errorf("%w: %q", ErrUnknownBucket, name)
	}
	return bk, nil
}

func (t boltTx) Get(bucket, key string) ([]byte, error) {
	bk, err := t.bucket(bucket)
	if err != nil {
		return nil, err
	}
	v := bk.Get([]byte(key))
	if v == nil {
		return nil, fmt.Errorf("%s/%s: %w", bucket, key, ErrNotFound)
	}
	return bytes.Clone(v), nil
}

func (t boltTx) Put(bucket, key string, value []byte) error {
	bk, err := t.bucket(bucket)
	if err != nil {
		return err
	}
	return bk.Put([]byte(key), value)
}

func (t boltTx) Delete(bucket, key string) error {
	bk, err := t.bucket(bucket)
	if err != nil {
		return err
	}
	return bk.Delete([]byte(key))
}

func (t boltTx) Scan(bucket, prefix string, reverse bool, fn func(string, []byte) error) error {
	bk, err := t.bucket(bucket)
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
		k, v = c.Seek(prefixEnd(p))
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
