package lease

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/controlplane/store/storetest"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// seedLeases writes n existing leases straight into the store, in small
// transactions: a tenth of them (at most 1,000) live and placed, the rest
// terminated, as a control plane that has run for a while holds them.
func seedLeases(tb testing.TB, st store.Store, nodes []NodeView, n int) {
	tb.Helper()
	ctx := context.Background()
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	live := min(n/10, 1000)
	held := Allocations(nil)
	var batch []*leasev1.Lease
	flush := func() {
		err := st.Update(ctx, func(tx store.Tx) error {
			if err := ensureIndex(tx); err != nil {
				return err
			}
			for _, l := range batch {
				if err := putLease(tx, l, leasev1.Phase_PHASE_UNSPECIFIED, now); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			tb.Fatal(err)
		}
		batch = batch[:0]
	}
	for i := 0; i < n; i++ {
		r := req(fmt.Sprint("seed-", i), "1g.18gb")
		l := &leasev1.Lease{Id: leaseIDAt(now), Spec: r.GetSpec(), CreateTime: timestamppb.New(now), NotAfter: timestamppb.New(now.Add(time.Hour)), CreatedBy: operator.ID}
		p, err := Place(nodes, held, r.GetSpec().GetGpu())
		if err != nil {
			tb.Fatal(err)
		}
		l.Placement = p
		setPhase(l, leasev1.Phase_PHASE_PENDING, "accepted", now)
		setPhase(l, leasev1.Phase_PHASE_SCHEDULED, "placed", now)
		if i < live {
			held[p.GetGpuUuid()] = append(held[p.GetGpuUuid()], instanceOf(p))
			setPhase(l, leasev1.Phase_PHASE_RUNNING, "running", now)
		} else {
			setPhase(l, leasev1.Phase_PHASE_TERMINATED, "ended", now)
		}
		batch = append(batch, l)
		if len(batch) == 40 {
			flush()
		}
	}
	if len(batch) > 0 {
		flush()
	}
}

// BenchmarkCreateLease measures CreateLease through the service on each
// backend with 100, 1,000 and 10,000 existing leases: validation,
// idempotency record, placement over the allocation index, the lease row,
// its index row and its audit entry in one durable transaction. Creates run
// from 16 goroutines per CPU, so ns/op is the inverse of throughput;
// creates/s and the p99 latency of one create are reported too.
func BenchmarkCreateLease(b *testing.B) {
	var nodes []NodeView
	for i := 0; i < 64; i++ {
		nodes = append(nodes, h200(fmt.Sprintf("node-%03d", i), 8))
	}
	for _, be := range storetest.Backends {
		for _, existing := range []int{100, 1000, 10000} {
			b.Run(fmt.Sprintf("%s/existing=%d", be, existing), func(b *testing.B) {
				st := storetest.Open(b, be)
				seedLeases(b, st, nodes, existing)
				svc := New(Options{Store: st, Fleet: &fakeFleet{nodes: nodes}})
				ctx := context.Background()
				var seq atomic.Int64
				var lat storetest.Latencies
				b.SetParallelism(16)
				b.ReportAllocs()
				b.ResetTimer()
				start := time.Now()
				b.RunParallel(func(pb *testing.PB) {
					var mine []time.Duration
					for pb.Next() {
						t0 := time.Now()
						if _, err := svc.Create(ctx, operator, req(fmt.Sprint("k", seq.Add(1)), "1g.18gb")); err != nil {
							b.Error(err)
							return
						}
						mine = append(mine, time.Since(t0))
					}
					lat.Add(mine)
				})
				elapsed := time.Since(start)
				b.StopTimer()
				lat.Report(b, elapsed)
			})
		}
	}
}
