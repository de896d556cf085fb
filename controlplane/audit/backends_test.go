package audit

import (
	"context"
	"fmt"
	"sync"
	"testing"

	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/controlplane/store/storetest"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
)

// TestLogOnEveryBackend runs the log on bbolt and on etcd: concurrent
// appends in their own transactions, checkpoints, proofs, batches and
// verification use only store.Tx, so they must behave the same.
func TestLogOnEveryBackend(t *testing.T) {
	storetest.Each(t, func(t *testing.T) {
		s := storetest.Open(t, storetest.BackendOf(t))
		k := newKeys(t, testOrigin)
		c := newCheckpointer(t, s, k)
		ctx := context.Background()
		var wg sync.WaitGroup
		errc := make(chan error, 40)
		for w := 0; w < 4; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < 10; i++ {
					errc <- s.Update(ctx, func(tx store.Tx) error {
						if err := tx.Put(store.BucketLeases, fmt.Sprintf("l-%d-%d", w, i), []byte("x")); err != nil {
							return err
						}
						_, err := Append(tx, auditlog.Entry{Actor: fmt.Sprintf("w%d", w), Action: "lease.create",
							Resource: fmt.Sprintf("lease/l-%d-%d", w, i), Outcome: auditlog.OutcomeSuccess})
						return err
					})
				}
			}()
			if w == 1 {
				// A checkpoint while appends run (of whatever is committed).
				if _, _, err := c.Checkpoint(ctx); err != nil {
					t.Fatal(err)
				}
			}
		}
		wg.Wait()
		close(errc)
		for err := range errc {
			if err != nil {
				t.Fatal(err)
			}
		}
		mustCheckpoint(t, c)
		res, err := Verify(ctx, s, VerifyOptions{Trusted: k.trusted, Origin: testOrigin})
		if err != nil || res.Entries != 40 || res.Latest.Size != 40 {
			t.Fatalf("verify = %+v, %v", res, err)
		}
		b, err := Prove(ctx, s, 17)
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := b.Verify(testOrigin, k.trusted); err != nil {
			t.Fatal(err)
		}
		batch, err := ReadBatch(ctx, s, 0, 100)
		if err != nil || len(batch.Entries) != 40 {
			t.Fatalf("batch: %d entries, %v", len(batch.Entries), err)
		}
		if _, _, err := auditlog.VerifyBatch(batch, testOrigin, k.trusted, auditlog.NewTree(), nil); err != nil {
			t.Fatal(err)
		}
	})
}
