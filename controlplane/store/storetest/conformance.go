package storetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/gpuaas/gpuaas/controlplane/store"
)

// Suite is what the conformance suite needs of a backend.
type Suite struct {
	// Open returns a fresh, empty store for one subtest.
	Open func(t *testing.T) store.Store
	// Replica, if set, returns a second handle on the same data, as another
	// control-plane replica would hold (etcd). The conflict subtests need
	// it; a single-process backend (bbolt) leaves it nil.
	Replica func(t *testing.T, s store.Store) store.Store
}

// Run runs the conformance suite: every backend must pass all of it.
func Run(t *testing.T, su Suite) {
	ctx := context.Background()
	put := func(t *testing.T, s store.Store, bucket string, kv ...string) {
		t.Helper()
		err := s.Update(ctx, func(tx store.Tx) error {
			for i := 0; i+1 < len(kv); i += 2 {
				if err := tx.Put(bucket, kv[i], []byte(kv[i+1])); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	get := func(t *testing.T, s store.Store, bucket, key string) (string, error) {
		t.Helper()
		var v []byte
		err := s.View(ctx, func(tx store.Tx) error {
			var err error
			v, err = tx.Get(bucket, key)
			return err
		})
		return string(v), err
	}
	scan := func(t *testing.T, s store.Store, bucket, prefix string, reverse bool) []string {
		t.Helper()
		var got []string
		err := s.View(ctx, func(tx store.Tx) error {
			return tx.Scan(bucket, prefix, reverse, func(k string, v []byte) error {
				got = append(got, k+"="+string(v))
				return nil
			})
		})
		if err != nil {
			t.Fatal(err)
		}
		return got
	}

	t.Run("get put overwrite delete", func(t *testing.T) {
		s := su.Open(t)
		if _, err := get(t, s, store.BucketLeases, "l1"); !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("get of a missing key: %v, want ErrNotFound", err)
		}
		put(t, s, store.BucketLeases, "l1", "v1")
		put(t, s, store.BucketLeases, "l1", "v2")
		if v, err := get(t, s, store.BucketLeases, "l1"); err != nil || v != "v2" {
			t.Fatalf("get = %q, %v; want v2", v, err)
		}
		// The same key in another bucket is another record.
		if _, err := get(t, s, store.BucketNodes, "l1"); !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("key leaked across buckets: %v", err)
		}
		err := s.Update(ctx, func(tx store.Tx) error {
			if err := tx.Delete(store.BucketLeases, "l1"); err != nil {
				return err
			}
			return tx.Delete(store.BucketLeases, "never-there")
		})
		if err != nil {
			t.Fatalf("delete: %v", err)
		}
		if _, err := get(t, s, store.BucketLeases, "l1"); !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("get after delete: %v, want ErrNotFound", err)
		}
		put(t, s, store.BucketLeases, "empty", "")
		if v, err := get(t, s, store.BucketLeases, "empty"); err != nil || v != "" {
			t.Fatalf("empty value = %q, %v", v, err)
		}
		if err := s.Update(ctx, func(tx store.Tx) error { return tx.Put(store.BucketLeases, "", []byte("x")) }); err == nil {
			t.Fatal("put with an empty key succeeded")
		}
	})

	t.Run("unknown bucket", func(t *testing.T) {
		s := su.Open(t)
		ops := map[string]func(tx store.Tx) error{
			"get":    func(tx store.Tx) error { _, err := tx.Get("bogus", "k"); return err },
			"put":    func(tx store.Tx) error { return tx.Put("bogus", "k", nil) },
			"delete": func(tx store.Tx) error { return tx.Delete("bogus", "k") },
			"scan":   func(tx store.Tx) error { return tx.Scan("bogus", "", false, func(string, []byte) error { return nil }) },
		}
		for name, op := range ops {
			if err := s.Update(ctx, op); !errors.Is(err, store.ErrUnknownBucket) {
				t.Errorf("%s: %v, want ErrUnknownBucket", name, err)
			}
		}
	})

	t.Run("write in a view is refused", func(t *testing.T) {
		s := su.Open(t)
		err := s.View(ctx, func(tx store.Tx) error { return tx.Put(store.BucketLeases, "k", []byte("v")) })
		if err == nil {
			t.Fatal("Put inside View succeeded")
		}
		if _, err := get(t, s, store.BucketLeases, "k"); !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("a write inside View is visible: %v", err)
		}
	})

	t.Run("cancelled context", func(t *testing.T) {
		s := su.Open(t)
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		if err := s.Update(cctx, func(tx store.Tx) error { return tx.Put(store.BucketLeases, "k", nil) }); !errors.Is(err, context.Canceled) {
			t.Errorf("Update: %v, want context.Canceled", err)
		}
		if err := s.View(cctx, func(tx store.Tx) error { return nil }); !errors.Is(err, context.Canceled) {
			t.Errorf("View: %v, want context.Canceled", err)
		}
	})

	t.Run("scan prefix forward and reverse", func(t *testing.T) {
		s := su.Open(t)
		put(t, s, store.BucketNodes, "a/1", "1", "a/2", "2", "a/3", "3", "b/1", "x", "a0", "x", "a/\x00", "lo", "a/\xff", "hi", "a", "x")
		put(t, s, store.BucketLeases, "a/9", "other bucket")
		if got := fmt.Sprintf("%q", scan(t, s, store.BucketNodes, "a/", false)); got != `["a/\x00=lo" "a/1=1" "a/2=2" "a/3=3" "a/\xff=hi"]` {
			t.Errorf("forward = %s", got)
		}
		if got := fmt.Sprintf("%q", scan(t, s, store.BucketNodes, "a/", true)); got != `["a/\xff=hi" "a/3=3" "a/2=2" "a/1=1" "a/\x00=lo"]` {
			t.Errorf("reverse = %s", got)
		}
		if got := len(scan(t, s, store.BucketNodes, "", false)); got != 8 {
			t.Errorf("whole bucket = %d keys, want 8", got)
		}
		if got := scan(t, s, store.BucketNodes, "zz", true); len(got) != 0 {
			t.Errorf("empty prefix range = %v", got)
		}
	})

	t.Run("scan many keys", func(t *testing.T) {
		s := su.Open(t)
		// More than one page of a paged backend, in several transactions.
		const n = 1300
		for lo := 0; lo < n; lo += 100 {
			err := s.Update(ctx, func(tx store.Tx) error {
				for i := lo; i < lo+100 && i < n; i++ {
					if err := tx.Put(store.BucketAudit, fmt.Sprintf("%020d", i), []byte(fmt.Sprint(i))); err != nil {
						return err
					}
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		}
		for _, rev := range []bool{false, true} {
			got := scan(t, s, store.BucketAudit, "", rev)
			if len(got) != n {
				t.Fatalf("reverse=%v: %d keys, want %d", rev, len(got), n)
			}
			for i, kv := range got {
				want := i
				if rev {
					want = n - 1 - i
				}
				if kv != fmt.Sprintf("%020d=%d", want, want) {
					t.Fatalf("reverse=%v: key %d is %s", rev, i, kv)
				}
			}
		}
	})

	t.Run("stop scan and scan errors", func(t *testing.T) {
		s := su.Open(t)
		put(t, s, store.BucketNodes, "k1", "1", "k2", "2", "k3", "3")
		for _, rev := range []bool{false, true} {
			var got []string
			err := s.View(ctx, func(tx store.Tx) error {
				return tx.Scan(store.BucketNodes, "k", rev, func(k string, _ []byte) error {
					got = append(got, k)
					if len(got) == 2 {
						return store.ErrStopScan
					}
					return nil
				})
			})
			want := "[k1 k2]"
			if rev {
				want = "[k3 k2]"
			}
			if err != nil || fmt.Sprint(got) != want {
				t.Errorf("reverse=%v: %v, %v; want %s and no error", rev, got, err, want)
			}
		}
		boom := errors.New("boom")
		err := s.View(ctx, func(tx store.Tx) error {
			return tx.Scan(store.BucketNodes, "", false, func(string, []byte) error { return boom })
		})
		if !errors.Is(err, boom) {
			t.Errorf("callback error = %v, want boom", err)
		}
	})

	t.Run("reads see the transaction's own writes", func(t *testing.T) {
		s := su.Open(t)
		put(t, s, store.BucketNodes, "n/1", "old", "n/2", "two", "n/4", "four")
		var got []string
		err := s.Update(ctx, func(tx store.Tx) error {
			got = got[:0]
			if err := tx.Put(store.BucketNodes, "n/1", []byte("new")); err != nil {
				return err
			}
			if err := tx.Put(store.BucketNodes, "n/3", []byte("three")); err != nil {
				return err
			}
			if err := tx.Delete(store.BucketNodes, "n/2"); err != nil {
				return err
			}
			if v, err := tx.Get(store.BucketNodes, "n/1"); err != nil || string(v) != "new" {
				return fmt.Errorf("get own write = %q, %v", v, err)
			}
			if _, err := tx.Get(store.BucketNodes, "n/2"); !errors.Is(err, store.ErrNotFound) {
				return fmt.Errorf("get own delete = %v", err)
			}
			for _, rev := range []bool{false, true} {
				if err := tx.Scan(store.BucketNodes, "n/", rev, func(k string, v []byte) error {
					got = append(got, k+"="+string(v))
					return nil
				}); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if fmt.Sprint(got) != "[n/1=new n/3=three n/4=four n/4=four n/3=three n/1=new]" {
			t.Fatalf("scans inside the update = %v", got)
		}
	})

	t.Run("an error in fn commits nothing", func(t *testing.T) {
		s := su.Open(t)
		put(t, s, store.BucketLeases, "keep", "v")
		boom := errors.New("boom")
		err := s.Update(ctx, func(tx store.Tx) error {
			for _, k := range []string{"half1", "half2"} {
				if err := tx.Put(store.BucketLeases, k, []byte("x")); err != nil {
					return err
				}
			}
			if err := tx.Put(store.BucketAudit, "entry", []byte("x")); err != nil {
				return err
			}
			if err := tx.Delete(store.BucketLeases, "keep"); err != nil {
				return err
			}
			return fmt.Errorf("wrapped: %w", boom)
		})
		if !errors.Is(err, boom) {
			t.Fatalf("err = %v, want boom", err)
		}
		if got := scan(t, s, store.BucketLeases, "", false); fmt.Sprint(got) != "[keep=v]" {
			t.Fatalf("leases after a failed update = %v", got)
		}
		if got := scan(t, s, store.BucketAudit, "", false); len(got) != 0 {
			t.Fatalf("audit after a failed update = %v", got)
		}
	})

	t.Run("values are copies", func(t *testing.T) {
		s := su.Open(t)
		src := []byte("original")
		err := s.Update(ctx, func(tx store.Tx) error {
			if err := tx.Put(store.BucketLeases, "k", src); err != nil {
				return err
			}
			copy(src, "XXXXXXXX") // the caller reuses its buffer before commit
			v, err := tx.Get(store.BucketLeases, "k")
			if err != nil {
				return err
			}
			copy(v, "YYYYYYYY")
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		var kept []byte
		err = s.View(ctx, func(tx store.Tx) error {
			v, err := tx.Get(store.BucketLeases, "k")
			kept = v
			return err
		})
		if err != nil || string(kept) != "original" {
			t.Fatalf("stored value = %q, %v; want original", kept, err)
		}
		var scanned [][]byte
		s.View(ctx, func(tx store.Tx) error {
			return tx.Scan(store.BucketLeases, "", false, func(_ string, v []byte) error {
				scanned = append(scanned, v)
				return nil
			})
		})
		copy(kept, "ZZZZZZZZ")
		for _, v := range scanned {
			copy(v, "WWWWWWWW")
		}
		if v, err := get(t, s, store.BucketLeases, "k"); v != "original" || err != nil {
			t.Fatalf("value after mutating returned slices = %q, %v", v, err)
		}
	})

	// concurrentCounts runs 8 x 25 updates at once (update(w, i) makes
	// one), then wants the counter key and the records under prefix of
	// the idempotency bucket both at 200.
	concurrentCounts := func(t *testing.T, s store.Store, counter, prefix string, update func(w, i int) error) {
		t.Helper()
		const workers, each = 8, 25
		var wg sync.WaitGroup
		for w := 0; w < workers; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < each; i++ {
					if err := update(w, i); err != nil {
						t.Error(err)
						return
					}
				}
			}()
		}
		wg.Wait()
		var v uint64
		var n int
		err := s.View(ctx, func(tx store.Tx) error {
			var err error
			if v, err = store.GetU64(tx, counter); err != nil {
				return err
			}
			return tx.Scan(store.BucketIdempotency, prefix, false, func(string, []byte) error { n++; return nil })
		})
		if err != nil || v != workers*each || n != workers*each {
			t.Fatalf("counter = %d, records = %d, err = %v; want %d each", v, n, err, workers*each)
		}
	}

	t.Run("concurrent updates lose nothing", func(t *testing.T) {
		s := su.Open(t)
		concurrentCounts(t, s, "ctr", "r/", func(int, int) error {
			return s.Update(ctx, func(tx store.Tx) error {
				if _, err := store.NextU64(tx, "ctr"); err != nil {
					return err
				}
				// A read-modify-write over a scan as well: a record count
				// that must equal the counter.
				n := 0
				if err := tx.Scan(store.BucketIdempotency, "r/", false, func(string, []byte) error { n++; return nil }); err != nil {
					return err
				}
				return tx.Put(store.BucketIdempotency, fmt.Sprintf("r/%05d", n), []byte{1})
			})
		})
	})

	t.Run("updates reading ahead see their batch-mates' writes and lose nothing", func(t *testing.T) {
		s := su.Open(t)
		// Every update reads the same record ahead and increments it, and
		// reads its own absent key ahead and creates it: the read-ahead
		// values must never stand in for what an earlier function of the
		// same transaction wrote.
		concurrentCounts(t, s, "shared", "own/", func(w, i int) error {
			own := fmt.Sprintf("own/%d/%d", w, i)
			keys := []store.Key{{Bucket: store.BucketMeta, Key: "shared"}, {Bucket: store.BucketIdempotency, Key: own}, {Bucket: "no-such-bucket", Key: "x"}}
			return store.UpdateReading(ctx, s, keys, func(tx store.Tx) error {
				if _, err := tx.Get(store.BucketIdempotency, own); !errors.Is(err, store.ErrNotFound) {
					return fmt.Errorf("own key before it was written: %v", err)
				}
				if _, err := store.NextU64(tx, "shared"); err != nil {
					return err
				}
				return tx.Put(store.BucketIdempotency, own, []byte{1})
			})
		})
	})

	t.Run("a failing update among concurrent ones fails alone", func(t *testing.T) {
		s := su.Open(t)
		boom := errors.New("boom")
		const n = 24
		errs := make([]error, n)
		var wg sync.WaitGroup
		for i := 0; i < n; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs[i] = s.Update(ctx, func(tx store.Tx) error {
					if _, err := store.NextU64(tx, "ctr"); err != nil {
						return err
					}
					if err := tx.Put(store.BucketLeases, fmt.Sprintf("k%02d", i), []byte{1}); err != nil {
						return err
					}
					if i%3 == 0 {
						return fmt.Errorf("update %d: %w", i, boom)
					}
					return nil
				})
			}()
		}
		wg.Wait()
		ok := 0
		for i, err := range errs {
			_, gerr := get(t, s, store.BucketLeases, fmt.Sprintf("k%02d", i))
			switch {
			case i%3 == 0 && (!errors.Is(err, boom) || !errors.Is(gerr, store.ErrNotFound)):
				t.Errorf("update %d: err %v, its write %v; want boom and nothing written", i, err, gerr)
			case i%3 != 0 && (err != nil || gerr != nil):
				t.Errorf("update %d: err %v, its write %v; want committed", i, err, gerr)
			case i%3 != 0:
				ok++
			}
		}
		var v uint64
		s.View(ctx, func(tx store.Tx) error { v, _ = store.GetU64(tx, "ctr"); return nil })
		if v != uint64(ok) {
			t.Fatalf("counter = %d, want %d: a failed update's increment leaked", v, ok)
		}
	})

	t.Run("concurrent updates too large to commit together all commit", func(t *testing.T) {
		s := su.Open(t)
		// 12 updates of 40 writes each: no more than 3 fit one etcd
		// transaction (128 operations).
		const n, each = 12, 40
		var wg sync.WaitGroup
		for i := 0; i < n; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				err := s.Update(ctx, func(tx store.Tx) error {
					for j := 0; j < each; j++ {
						if err := tx.Put(store.BucketAudit, fmt.Sprintf("%02d-%02d", i, j), []byte{1}); err != nil {
							return err
						}
					}
					return nil
				})
				if err != nil {
					t.Error(err)
				}
			}()
		}
		wg.Wait()
		if got := len(scan(t, s, store.BucketAudit, "", false)); got != n*each {
			t.Fatalf("%d records, want %d", got, n*each)
		}
	})

	t.Run("a view reads one consistent state while writes happen", func(t *testing.T) {
		s := su.Open(t)
		put(t, s, store.BucketMeta, "x/a", "0", "x/b", "0")
		stop := make(chan struct{})
		var wg sync.WaitGroup
		var writes atomic.Int64
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 1; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				v := []byte(fmt.Sprint(i))
				err := s.Update(ctx, func(tx store.Tx) error {
					if err := tx.Put(store.BucketMeta, "x/a", v); err != nil {
						return err
					}
					return tx.Put(store.BucketMeta, "x/b", v)
				})
				if err != nil {
					t.Error(err)
					return
				}
				writes.Add(1)
			}
		}()
		for r := 0; r < 50 || writes.Load() < 5; r++ {
			err := s.View(ctx, func(tx store.Tx) error {
				a, err := tx.Get(store.BucketMeta, "x/a")
				if err != nil {
					return err
				}
				// Give the writer time to commit between the two reads.
				for i := 0; i < 3; i++ {
					if err := tx.Scan(store.BucketMeta, "x/", false, func(string, []byte) error { return nil }); err != nil {
						return err
					}
				}
				b, err := tx.Get(store.BucketMeta, "x/b")
				if err != nil {
					return err
				}
				var scanned []string
				if err := tx.Scan(store.BucketMeta, "x/", false, func(_ string, v []byte) error {
					scanned = append(scanned, string(v))
					return nil
				}); err != nil {
					return err
				}
				if !bytes.Equal(a, b) || fmt.Sprint(scanned) != fmt.Sprintf("[%s %s]", a, a) {
					return fmt.Errorf("torn read: a=%s b=%s scan=%v", a, b, scanned)
				}
				return nil
			})
			if err != nil {
				close(stop)
				wg.Wait()
				t.Fatal(err)
			}
		}
		close(stop)
		wg.Wait()
	})

	if su.Replica == nil {
		return
	}

	// conflictReruns: another replica's write to a key fn read (ahead or
	// not) between the read and the commit reruns fn on the new value.
	conflictReruns := func(t *testing.T, ahead []store.Key) {
		s := su.Open(t)
		other := su.Replica(t, s)
		put(t, s, store.BucketMeta, "k", "0")
		calls := 0
		err := store.UpdateReading(ctx, s, ahead, func(tx store.Tx) error {
			calls++
			v, err := tx.Get(store.BucketMeta, "k")
			if err != nil {
				return err
			}
			if err := tx.Put(store.BucketMeta, "seen", v); err != nil {
				return err
			}
			if calls == 1 {
				put(t, other, store.BucketMeta, "k", "1")
			}
			return tx.Put(store.BucketMeta, "k", append(v, '+'))
		})
		if err != nil || calls != 2 {
			t.Fatalf("update: calls=%d err=%v; want 2 calls", calls, err)
		}
		if k, _ := get(t, s, store.BucketMeta, "k"); k != "1+" {
			t.Fatalf("k = %q, want 1+ (the other replica's write kept)", k)
		}
		if seen, _ := get(t, s, store.BucketMeta, "seen"); seen != "1" {
			t.Fatalf("seen = %q: the first attempt's writes leaked", seen)
		}
	}
	for _, ahead := range [][]store.Key{nil, {{Bucket: store.BucketMeta, Key: "k"}}} {
		name := "a conflicting write by another replica reruns fn"
		if ahead != nil {
			name += ", the key read ahead"
		}
		t.Run(name, func(t *testing.T) { conflictReruns(t, ahead) })
	}

	for _, tc := range []struct {
		name     string
		conflict func(t *testing.T, other store.Store)
	}{
		{"insert", func(t *testing.T, o store.Store) { put(t, o, store.BucketNodes, "p/2", "new") }},
		{"update", func(t *testing.T, o store.Store) { put(t, o, store.BucketNodes, "p/1", "changed") }},
		{"delete", func(t *testing.T, o store.Store) {
			if err := o.Update(ctx, func(tx store.Tx) error { return tx.Delete(store.BucketNodes, "p/1") }); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run("an "+tc.name+" in a scanned range by another replica reruns fn", func(t *testing.T) {
			s := su.Open(t)
			other := su.Replica(t, s)
			put(t, s, store.BucketNodes, "p/1", "v", "q/1", "outside")
			calls := 0
			var counts []int
			err := s.Update(ctx, func(tx store.Tx) error {
				calls++
				n := 0
				if err := tx.Scan(store.BucketNodes, "p/", false, func(string, []byte) error { n++; return nil }); err != nil {
					return err
				}
				counts = append(counts, n)
				if calls == 1 {
					tc.conflict(t, other)
				}
				return tx.Put(store.BucketMeta, "count", []byte(fmt.Sprint(n)))
			})
			if err != nil || calls != 2 {
				t.Fatalf("calls=%d counts=%v err=%v; want a rerun", calls, counts, err)
			}
		})
	}

	t.Run("a write outside what was read does not conflict", func(t *testing.T) {
		s := su.Open(t)
		other := su.Replica(t, s)
		put(t, s, store.BucketNodes, "p/1", "v")
		calls := 0
		err := s.Update(ctx, func(tx store.Tx) error {
			calls++
			if err := tx.Scan(store.BucketNodes, "p/", false, func(string, []byte) error { return nil }); err != nil {
				return err
			}
			if calls == 1 {
				put(t, other, store.BucketNodes, "q/1", "elsewhere")
				put(t, other, store.BucketLeases, "p/1", "other bucket")
			}
			return tx.Put(store.BucketNodes, "p/2", nil)
		})
		if err != nil || calls != 1 {
			t.Fatalf("calls=%d err=%v; want one call", calls, err)
		}
	})

	t.Run("endless conflicts give up with ErrConflict", func(t *testing.T) {
		s := su.Open(t)
		other := su.Replica(t, s)
		put(t, s, store.BucketMeta, "k", "0")
		calls := 0
		err := s.Update(ctx, func(tx store.Tx) error {
			calls++
			if _, err := tx.Get(store.BucketMeta, "k"); err != nil {
				return err
			}
			put(t, other, store.BucketMeta, "k", fmt.Sprint(calls))
			return tx.Put(store.BucketMeta, "mine", []byte("x"))
		})
		if !errors.Is(err, store.ErrConflict) || calls < 2 {
			t.Fatalf("err = %v after %d calls, want ErrConflict after retries", err, calls)
		}
		if _, err := get(t, s, store.BucketMeta, "mine"); !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("a transaction that never committed left a write: %v", err)
		}
	})
}
