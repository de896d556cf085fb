package store

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"runtime"
	"slices"
	"testing"

	bolt "go.etcd.io/bbolt"
)

func randomKey(r *rand.Rand) string {
	return fmt.Sprintf("caller\x00%016x%016x", r.Uint64(), r.Uint64())
}

// rawLog reads a logged bucket's log and keyed records straight from the
// file.
func rawLog(t *testing.T, path, bucket string) (seqs []uint64, keys []string, keyed int) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.View(func(tx *bolt.Tx) error {
		err := tx.Bucket([]byte(loggedBuckets[bucket])).ForEach(func(k, v []byte) error {
			seq, key, _, err := decodeLogRecord(k, v)
			seqs, keys = append(seqs, seq), append(keys, string(key))
			return err
		})
		if err != nil {
			return err
		}
		keyed = tx.Bucket([]byte(bucket)).Stats().KeyN
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return seqs, keys, keyed
}

// Records under random keys are appended to the log in the order they
// were written, one sequence after another: a commit's new records share
// the log's last pages instead of one leaf each.
func TestLoggedBucketAppendsInWriteOrder(t *testing.T) {
	s, path := openTemp(t)
	ctx := context.Background()
	r := rand.New(rand.NewPCG(1, 2))
	var written []string
	for range 5 {
		err := s.Update(ctx, func(tx Tx) error {
			for range 100 {
				k := randomKey(r)
				written = append(written, k)
				if err := tx.Put(BucketIdempotency, k, []byte("v-"+k)); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	s.Close()
	seqs, keys, keyed := rawLog(t, path, BucketIdempotency)
	if keyed != 0 {
		t.Errorf("%d records keyed by their key, want all in the log", keyed)
	}
	for i, seq := range seqs {
		if seq != uint64(i+1) {
			t.Fatalf("log sequence %d is %d, want %d: not appended", i, seq, i+1)
		}
	}
	if !slices.Equal(keys, written) {
		t.Fatalf("log holds %d keys not in write order (want %d)", len(keys), len(written))
	}
}

// A logged bucket keeps the Tx contract: reads see the transaction's own
// writes; a Put of an existing key replaces its value in place; a
// deleted key is gone and may be written again; Scan is in key order
// both ways; and all of it reads the same after the store is reopened
// (the directory is rebuilt from the log).
func TestLoggedBucketKeepsTheTxContract(t *testing.T) {
	s, path := openTemp(t)
	ctx := context.Background()
	r := rand.New(rand.NewPCG(3, 4))
	want := map[string]string{}
	var order []string
	for i := range 300 {
		k := randomKey(r)
		want[k] = fmt.Sprint("v", i)
		order = append(order, k)
	}
	// The keys bbolt refuses in its own buckets.
	for _, k := range []string{"", string(make([]byte, bolt.MaxKeySize+1))} {
		if err := s.Update(ctx, func(tx Tx) error { return tx.Put(BucketIdempotency, k, []byte("v")) }); err == nil {
			t.Errorf("a %d-byte key was accepted", len(k))
		}
	}
	err := s.Update(ctx, func(tx Tx) error {
		for _, k := range order {
			if err := tx.Put(BucketIdempotency, k, []byte(want[k])); err != nil {
				return err
			}
			if v, err := tx.Get(BucketIdempotency, k); err != nil || string(v) != want[k] {
				return fmt.Errorf("own write %q read back as %q, %v", k, v, err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// Overwrite a third, delete a third and write a tenth of those again.
	err = s.Update(ctx, func(tx Tx) error {
		for i, k := range order {
			switch {
			case i%3 == 0:
				want[k] = "new " + want[k]
				if err := tx.Put(BucketIdempotency, k, []byte(want[k])); err != nil {
					return err
				}
			case i%3 == 1:
				delete(want, k)
				if err := tx.Delete(BucketIdempotency, k); err != nil {
					return err
				}
				if _, err := tx.Get(BucketIdempotency, k); !errors.Is(err, ErrNotFound) {
					return fmt.Errorf("deleted %q reads %v", k, err)
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	err = s.Update(ctx, func(tx Tx) error {
		for i := 1; i < len(order); i += 30 {
			want[order[i]] = "again"
			if err := tx.Put(BucketIdempotency, order[i], []byte("again")); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	check := func(s *Bolt) {
		t.Helper()
		err := s.View(ctx, func(tx Tx) error {
			for _, k := range order {
				v, err := tx.Get(BucketIdempotency, k)
				w, ok := want[k]
				switch {
				case ok && (err != nil || string(v) != w):
					t.Errorf("%q = %q, %v; want %q", k, v, err, w)
				case !ok && !errors.Is(err, ErrNotFound):
					t.Errorf("deleted %q = %q, %v", k, v, err)
				}
			}
			var keys []string
			for _, k := range order {
				if _, ok := want[k]; ok {
					keys = append(keys, k)
				}
			}
			slices.Sort(keys)
			for _, reverse := range []bool{false, true} {
				var got []string
				err := tx.Scan(BucketIdempotency, "caller\x00", reverse, func(k string, v []byte) error {
					if string(v) != want[k] {
						t.Errorf("scan: %q = %q, want %q", k, v, want[k])
					}
					got = append(got, k)
					return nil
				})
				if err != nil {
					return err
				}
				if reverse {
					slices.Reverse(got)
				}
				if !slices.Equal(got, keys) {
					t.Errorf("scan (reverse %v) gave %d keys, want the %d live ones in order", reverse, len(got), len(keys))
				}
			}
			n := 0
			err := tx.Scan(BucketIdempotency, "", false, func(string, []byte) error {
				n++
				if n == 7 {
					return ErrStopScan
				}
				return nil
			})
			if err != nil || n != 7 {
				t.Errorf("scan stopped after %d, %v; want 7, nil", n, err)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	check(s)
	s.Close()
	s2, err := OpenBolt(path, BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	check(s2)
}

// A write that does not commit leaves nothing in the directory, and its
// sequence is never given to another record.
func TestLoggedBucketRollbackLeavesNothing(t *testing.T) {
	s, _ := openTemp(t)
	ctx := context.Background()
	l := s.logs[BucketIdempotency]
	errBoom := errors.New("boom")
	err := s.Update(ctx, func(tx Tx) error {
		if err := tx.Put(BucketIdempotency, "caller\x00k", []byte("v")); err != nil {
			return err
		}
		return errBoom
	})
	if !errors.Is(err, errBoom) {
		t.Fatalf("update = %v, want its error", err)
	}
	if got := l.places(l.hash([]byte("caller\x00k")), nil); len(got) != 0 {
		t.Fatalf("rolled back write left directory entries %v", got)
	}
	err = s.Update(ctx, func(tx Tx) error { return tx.Put(BucketIdempotency, "caller\x00k", []byte("v2")) })
	if err != nil {
		t.Fatal(err)
	}
	got := l.places(l.hash([]byte("caller\x00k")), nil)
	if len(got) != 1 || got[0] != 2 {
		t.Fatalf("directory = %v, want the one committed record at sequence 2", got)
	}
}

// A reader keeps its snapshot: a record written, deleted or written
// again after it began is seen as it was when it began, though the
// directory has moved on.
func TestLoggedBucketReadersKeepTheirSnapshot(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.db")
	// Room for the writes below without a remap, which would wait for
	// the open reader.
	s, err := OpenBolt(path, BoltOptions{InitialMmapSize: 64 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	put := func(k, v string) {
		t.Helper()
		if err := s.Update(ctx, func(tx Tx) error { return tx.Put(BucketIdempotency, k, []byte(v)) }); err != nil {
			t.Fatal(err)
		}
	}
	put("c\x00kept", "old")
	put("c\x00gone", "old")
	rtx, err := s.db.Begin(false)
	if err != nil {
		t.Fatal(err)
	}
	defer rtx.Rollback()
	old := boltTx{tx: rtx, logs: s.logs}
	err = s.Update(ctx, func(tx Tx) error {
		if err := tx.Delete(BucketIdempotency, "c\x00kept"); err != nil {
			return err
		}
		if err := tx.Put(BucketIdempotency, "c\x00kept", []byte("new")); err != nil {
			return err
		}
		if err := tx.Delete(BucketIdempotency, "c\x00gone"); err != nil {
			return err
		}
		return tx.Put(BucketIdempotency, "c\x00born", []byte("new"))
	})
	if err != nil {
		t.Fatal(err)
	}
	// reads checks what a reader sees: "" for not found.
	reads := func(who string, tx Tx, want map[string]string) {
		t.Helper()
		for k, w := range want {
			v, err := tx.Get(BucketIdempotency, k)
			if w == "" {
				if !errors.Is(err, ErrNotFound) {
					t.Errorf("%s reader: %q = %q, %v; want not found", who, k, v, err)
				}
			} else if err != nil || string(v) != w {
				t.Errorf("%s reader: %q = %q, %v; want %q", who, k, v, err, w)
			}
		}
	}
	reads("old", old, map[string]string{"c\x00kept": "old", "c\x00gone": "old", "c\x00born": ""})
	err = s.View(ctx, func(tx Tx) error {
		reads("new", tx, map[string]string{"c\x00kept": "new", "c\x00gone": "", "c\x00born": "new"})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// Keys whose hashes collide share a directory slot; each is found by its
// own record, and taking one out leaves the others.
func TestKeyLogDirectoryHoldsCollisions(t *testing.T) {
	l := &keyLog{one: map[uint64]uint64{}}
	l.add(7, 1)
	l.add(7, 5)
	l.add(7, 9)
	l.add(8, 2)
	if got := l.places(7, nil); !slices.Equal(got, []uint64{9, 5, 1}) {
		t.Fatalf("places(7) = %v, want newest first [9 5 1]", got)
	}
	l.remove(7, 5)
	if got := l.places(7, nil); !slices.Equal(got, []uint64{9, 1}) {
		t.Fatalf("after removing 5: %v", got)
	}
	l.remove(7, 9)
	if got := l.places(7, nil); !slices.Equal(got, []uint64{1}) || len(l.more) != 0 {
		t.Fatalf("after removing 9: %v (more %v)", got, l.more)
	}
	l.remove(7, 4) // not there: nothing changes
	l.remove(7, 1)
	if got := l.places(7, nil); len(got) != 0 {
		t.Fatalf("after removing all: %v", got)
	}
	if got := l.places(8, nil); !slices.Equal(got, []uint64{2}) {
		t.Fatalf("places(8) = %v", got)
	}
}

// A log record is read back as written, and a damaged one is an error,
// never a panic (it comes from the file).
func FuzzDecodeLogRecord(f *testing.F) {
	f.Add(binary.BigEndian.AppendUint64(nil, 1), encodeLogRecord("caller\x00key", []byte(`{"lease_id":"l-1"}`)))
	f.Add([]byte{1, 2, 3}, []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01})
	f.Add(binary.BigEndian.AppendUint64(nil, 2), []byte{9, 'a'})
	f.Fuzz(func(t *testing.T, k, v []byte) {
		seq, key, value, err := decodeLogRecord(k, v)
		if err != nil {
			return
		}
		if seq != binary.BigEndian.Uint64(k) {
			t.Fatalf("sequence %d from key %x", seq, k)
		}
		if !bytes.Equal(encodeLogRecord(string(key), value), v) {
			t.Fatalf("record %x decodes to %q, %q, which encode differently", v, key, value)
		}
	})
}

// BenchmarkOpenLoggedBucket opens a store holding 200,000 idempotency
// records: the time to rebuild the directory at open, and the memory it
// keeps per record.
func BenchmarkOpenLoggedBucket(b *testing.B) {
	const n = 200_000
	path := filepath.Join(b.TempDir(), "state.db")
	s, err := OpenBolt(path, BoltOptions{})
	if err != nil {
		b.Fatal(err)
	}
	r := rand.New(rand.NewPCG(5, 6))
	rec := []byte(`{"lease_id":"l-06h2ecrgq45k2op03ckk","body_hash":"` + string(bytes.Repeat([]byte("ab"), 32)) + `"}`)
	for done := 0; done < n; done += 2000 {
		err := s.Update(context.Background(), func(tx Tx) error {
			for range 2000 {
				if err := tx.Put(BucketIdempotency, "spiffe://gpuaas.test/platform/alice\x00"+randomKey(r), rec); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
	}
	s.Close()
	var before, after runtime.MemStats
	b.ResetTimer()
	for range b.N {
		runtime.GC()
		runtime.ReadMemStats(&before)
		s, err := OpenBolt(path, BoltOptions{})
		if err != nil {
			b.Fatal(err)
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/n, "heap-B/record")
		runtime.KeepAlive(s)
		s.Close()
	}
}
