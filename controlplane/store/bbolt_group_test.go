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
