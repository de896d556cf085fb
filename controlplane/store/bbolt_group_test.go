package store_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"

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
	var wg sync.WaitGroup
	errsOut := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errsOut[i] = st.Update(ctx, func(tx store.Tx) error {
				if err := tx.Put(store.BucketMeta, fmt.Sprintf("k%03d", i), []byte("v")); err != nil {
					return err
				}
				if i%10 == 0 {
					return fmt.Errorf("update %d: %w", i, errBoom) // after writing
				}
				_, err := store.NextU64(tx, "counter")
				return err
			})
		}()
	}
	wg.Wait()
	err := st.View(ctx, func(tx store.Tx) error {
		for i := range n {
			_, err := tx.Get(store.BucketMeta, fmt.Sprintf("k%03d", i))
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
