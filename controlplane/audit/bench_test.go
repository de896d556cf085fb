package audit

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
)

// BenchmarkAppendDurable measures the transactional outbox as the lease
// service uses it: each operation writes a state change (a 200-byte lease
// row) and appends its audit entry in the same transaction, committed
// durably (bbolt fsync). Reported as entries/s.
//
//   - group-commit: 1024 concurrent callers, one operation per
//     store.Update; the store commits them together (bbolt Batch, default
//     MaxBatchSize 1000, MaxBatchDelay 10ms).
//   - batch-1000: one caller, 1000 operations per transaction (a single caller also waits out the 10ms batch delay).
func BenchmarkAppendDurable(b *testing.B) {
	row := make([]byte, 200)
	op := func(tx store.Tx, i int64) error {
		if err := tx.Put(store.BucketLeases, fmt.Sprintf("l-%020d", i), row); err != nil {
			return err
		}
		_, err := Append(tx, auditlog.Entry{Time: time.Unix(1700000000, 0), Actor: "spiffe://gpuaas.test/gpuaas/operator/alice",
			Tenant: "acme", Action: "lease.create", Resource: fmt.Sprintf("lease/l-%d", i), Outcome: auditlog.OutcomeSuccess,
			RequestID: "req", Details: map[string]string{"node": "gpu-host-17", "profile": "1g.18gb"}})
		return err
	}
	b.Run("group-commit", func(b *testing.B) {
		s := openStore(b)
		var n atomic.Int64
		b.SetParallelism(512)
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				i := n.Add(1)
				if err := s.Update(context.Background(), func(tx store.Tx) error { return op(tx, i) }); err != nil {
					b.Error(err)
					return
				}
			}
		})
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "entries/s")
	})
	b.Run("batch-1000", func(b *testing.B) {
		s := openStore(b)
		b.ResetTimer()
		for i := 0; i < b.N; i += 1000 {
			err := s.Update(context.Background(), func(tx store.Tx) error {
				for j := i; j < min(i+1000, b.N); j++ {
					if err := op(tx, int64(j)); err != nil {
						return err
					}
				}
				return nil
			})
			if err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "entries/s")
	})
}

// storeOf100k is a bbolt store of 100,000 entries with one checkpoint.
func storeOf100k(b *testing.B) (*store.Bolt, keys) {
	s := openStore(b)
	const n = 100_000
	ctx := context.Background()
	for i := 0; i < n; i += 5000 {
		err := s.Update(ctx, func(tx store.Tx) error {
			for j := 0; j < 5000; j++ {
				if _, err := Append(tx, auditlog.Entry{Time: time.Unix(1700000000, 0), Actor: "a", Action: "lease.create",
					Resource: fmt.Sprintf("lease/%d", i+j), Outcome: auditlog.OutcomeSuccess}); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
	}
	k := newKeys(b, testOrigin)
	mustCheckpoint(b, newCheckpointer(b, s, k))
	return s, k
}

// BenchmarkInclusionProofStore measures Prove on a bbolt store of 100,000
// entries: O(log n) node reads in one read transaction, plus encoding.
func BenchmarkInclusionProofStore(b *testing.B) {
	const n = 100_000
	s, _ := storeOf100k(b)
	ctx := context.Background()
	b.ResetTimer()
	var i uint64
	for b.Loop() {
		i++
		if _, err := Prove(ctx, s, 1+(i*7919)%n); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkVerifyStore measures Verify end to end on a bbolt file of
// 100,000 entries: read every entry (blocks of 10^4, one read transaction
// each), check it is canonical and in sequence, rebuild the tree, check the
// checkpoint's signature and root. Reported as entries/s.
func BenchmarkVerifyStore(b *testing.B) {
	s, k := storeOf100k(b)
	ctx := context.Background()
	b.ResetTimer()
	for b.Loop() {
		res, err := Verify(ctx, s, VerifyOptions{Trusted: k.trusted})
		if err != nil || res.Entries != 100_000 {
			b.Fatal(res, err)
		}
	}
	b.ReportMetric(float64(100_000*b.N)/b.Elapsed().Seconds(), "entries/s")
}
