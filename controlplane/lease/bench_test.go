package lease

import (
	"context"
	"fmt"
	"testing"
)

// BenchmarkCreateLease measures CreateLease end to end through the bbolt
// store: validation, idempotency record, placement over the live leases,
// the lease row and its audit entry in one durable transaction.
func BenchmarkCreateLease(b *testing.B) {
	var nodes []NodeView
	for i := 0; i < 64; i++ {
		nodes = append(nodes, h200(fmt.Sprintf("node-%03d", i), 8))
	}
	f := newFixture(b, nodes...)
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := f.svc.Create(ctx, operator, req(fmt.Sprint("k", i), "1g.18gb")); err != nil {
			b.Fatal(err)
		}
	}
}
