package store_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"runtime"
	"sync"
	"testing"

	berrors "go.etcd.io/bbolt/errors"

	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/controlplane/store/storetest"
)

// Concurrent updates share commits; one that fails after writing leaves
// nothing behind and gets its own error, and every other commits: the
// group is rolled back and committed again without it. Every function
// sees the writes of those that ran before it in its group (a counter
// incremented by all of them ends exact).
func TestBoltGroupCommitIsolatesAFailedUpdate(t *testing.T) {
	st := storetest.OpenBoltStore(t)
	ctx := context.Background()
	errBoom := errors.New("boom")
	const n = 300
	errsOut := concurrently(n, func(i int) error {
		return st.Update(ctx, func(tx store.Tx) error {
			if err := tx.Put(store.BucketMeta, fmt.Sprintf("k%03d", i), []byte("v")); err != nil {
				return err
			}
			if err := tx.Put(store.BucketIdempotency, fmt.Sprintf("c\x00k%03d", i), []byte("v")); err != nil {
				return err
			}
			if i%10 == 0 {
				return fmt.Errorf("update %d: %w", i, errBoom) // after writing
			}
			_, err := store.NextU64(tx, "counter")
			return err
		})
	}, nil)
	err := st.View(ctx, func(tx store.Tx) error {
		for i := range n {
			_, err := tx.Get(store.BucketMeta, fmt.Sprintf("k%03d", i))
			if _, ierr := tx.Get(store.BucketIdempotency, fmt.Sprintf("c\x00k%03d", i)); (ierr == nil) != (err == nil) {
				t.Errorf("update %d: its idempotency record reads %v where its meta key reads %v", i, ierr, err)
			}
			switch {
			case i%10 == 0 && !errors.Is(errsOut[i], errBoom):
				t.Errorf("update %d returned %v, want its own error", i, errsOut[i])
			case i%10 == 0 && !errors.Is(err, store.ErrNotFound):
				t.Errorf("failed update %d left its write behind", i)
			case i%10 != 0 && (errsOut[i] != nil || err != nil):
				t.Errorf("update %d: %v, read %v; want committed", i, errsOut[i], err)
			}
		}
		c, err := store.GetU64(tx, "counter")
		if err != nil || c != n-n/10 {
			t.Errorf("counter = %d, %v; want %d", c, err, n-n/10)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// A function that panics re-raises the panic in its own caller; the
// writers grouped with it commit, and the store keeps committing.
func TestBoltGroupCommitPanicStaysWithItsCaller(t *testing.T) {
	st := storetest.OpenBoltStore(t)
	ctx := context.Background()
	const n = 50
	var wg sync.WaitGroup
	panics := make([]any, n)
	errsOut := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { panics[i] = recover() }()
			errsOut[i] = st.Update(ctx, func(tx store.Tx) error {
				if err := tx.Put(store.BucketMeta, fmt.Sprintf("p%02d", i), []byte("v")); err != nil {
					return err
				}
				if i == 7 {
					panic("boom")
				}
				return nil
			})
		}()
	}
	wg.Wait()
	for i := range n {
		switch {
		case i == 7 && panics[i] != "boom":
			t.Errorf("the panicking update's caller got %v, want its panic", panics[i])
		case i != 7 && (panics[i] != nil || errsOut[i] != nil):
			t.Errorf("update %d: panic %v, err %v", i, panics[i], errsOut[i])
		}
	}
	err := st.Update(ctx, func(tx store.Tx) error { return tx.Put(store.BucketMeta, "after", []byte("v")) })
	if err != nil {
		t.Fatalf("an update after the panic: %v", err)
	}
	err = st.View(ctx, func(tx store.Tx) error {
		if _, err := tx.Get(store.BucketMeta, "p07"); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("the panicking update's write was kept: %v", err)
		}
		for i := range n {
			if _, err := tx.Get(store.BucketMeta, fmt.Sprintf("p%02d", i)); i != 7 && err != nil {
				t.Errorf("update %d lost: %v", i, err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// Close commits what is queued and refuses what comes after; no writer
// is left waiting. Each update either committed (and is in the file when
// it is opened again) or failed with bbolt's ErrDatabaseNotOpen.
func TestBoltCloseDrainsTheQueue(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.db")
	st, err := store.OpenBolt(path, store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	const n = 200
	errsOut := concurrently(n, func(i int) error {
		return st.Update(ctx, func(tx store.Tx) error {
			return tx.Put(store.BucketMeta, fmt.Sprintf("c%03d", i), []byte("v"))
		})
	}, func(i int) {
		if i == n/2 {
			if err := st.Close(); err != nil {
				t.Error(err)
			}
		}
	})
	if err := st.Close(); err != nil {
		t.Fatalf("a second Close: %v", err)
	}
	if err := st.Update(ctx, func(store.Tx) error { return nil }); !errors.Is(err, berrors.ErrDatabaseNotOpen) {
		t.Fatalf("Update after Close = %v, want ErrDatabaseNotOpen", err)
	}
	st, err = store.OpenBolt(path, store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	refused := 0
	err = st.View(ctx, func(tx store.Tx) error {
		for i := range n {
			_, err := tx.Get(store.BucketMeta, fmt.Sprintf("c%03d", i))
			switch {
			case errsOut[i] == nil && err != nil:
				t.Errorf("update %d was acknowledged but is not in the file: %v", i, err)
			case errsOut[i] != nil && !errors.Is(errsOut[i], berrors.ErrDatabaseNotOpen):
				t.Errorf("update %d: %v, want committed or ErrDatabaseNotOpen", i, errsOut[i])
			case errsOut[i] != nil && !errors.Is(err, store.ErrNotFound):
				t.Errorf("refused update %d is in the file", i)
			case errsOut[i] != nil:
				refused++
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if refused == 0 {
		t.Error("no update came after Close: the test did not test refusal")
	}
}

// A function that ends its goroutine (runtime.Goexit, as t.FailNow does)
// ends the committer's: its writers get an error instead of waiting
// forever, nothing of the group is kept, and the store commits on.
func TestBoltUpdateThatExitsItsGoroutineFailsItsGroup(t *testing.T) {
	st := storetest.OpenBoltStore(t)
	ctx := context.Background()
	err := st.Update(ctx, func(tx store.Tx) error {
		if err := tx.Put(store.BucketMeta, "exited", []byte("v")); err != nil {
			return err
		}
		runtime.Goexit()
		return nil
	})
	if err == nil {
		t.Fatal("an update whose function called runtime.Goexit succeeded")
	}
	if err := st.Update(ctx, func(tx store.Tx) error { return tx.Put(store.BucketMeta, "after", []byte("v")) }); err != nil {
		t.Fatalf("an update after the exit: %v", err)
	}
	err = st.View(ctx, func(tx store.Tx) error {
		if _, err := tx.Get(store.BucketMeta, "exited"); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("the exited update's write was kept: %v", err)
		}
		_, err := tx.Get(store.BucketMeta, "after")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}

// concurrently runs update(0..n-1), each on a goroutine of its own, calls
// after(i) once update i has started (if after is set), and returns their
// errors.
func concurrently(n int, update func(i int) error, after func(i int)) []error {
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { errs[i] = update(i) })
		if after != nil {
			after(i)
		}
	}
	wg.Wait()
	return errs
}
