package lease

import (
	"context"
	"fmt"
	"sync"
	"testing"

	"github.com/gpuaas/gpuaas/controlplane/store/storetest"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// TestManyConcurrentCreatesKeepTheIndexAndAuditExact: on every backend,
// many concurrent creates (grouped on bbolt, placed by the placer) never
// share a partition, fill the fleet exactly, leave the allocation index
// equal to the leases and write one audit entry each.
func TestManyConcurrentCreatesKeepTheIndexAndAuditExact(t *testing.T) {
	storetest.Each(t, testManyConcurrentCreatesKeepTheIndexAndAuditExact)
}

func testManyConcurrentCreatesKeepTheIndexAndAuditExact(t *testing.T) {
	f := newFixture(t, h200("node-a", 4), h200("node-b", 4))
	ctx := context.Background()
	const n = 70 // 56 1g slices
	var wg sync.WaitGroup
	results := make([]*leasev1.Lease, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l, err := f.svc.Create(ctx, operator, req(fmt.Sprint("k", i%60), "1g.18gb"))
			if err != nil {
				t.Error(err)
			}
			results[i] = l
		}()
	}
	wg.Wait()
	type slot struct {
		gpu   string
		start uint32
	}
	taken := map[slot]string{}
	ids := map[string]bool{}
	scheduled := 0
	for i, l := range results {
		if l == nil {
			t.FailNow()
		}
		if i >= 60 && l.GetId() != results[i-60].GetId() {
			t.Fatalf("the same idempotency key made two leases: %s and %s", l.GetId(), results[i-60].GetId())
		}
		if ids[l.GetId()] {
			continue
		}
		ids[l.GetId()] = true
		if l.GetPhase() != leasev1.Phase_PHASE_SCHEDULED {
			continue
		}
		scheduled++
		k := slot{l.GetPlacement().GetGpuUuid(), l.GetPlacement().GetStart()}
		if other, ok := taken[k]; ok {
			t.Fatalf("leases %s and %s share %v", other, l.GetId(), k)
		}
		taken[k] = l.GetId()
	}
	if len(ids) != 60 || scheduled != 56 {
		t.Fatalf("%d leases, %d scheduled; want 60 and 56", len(ids), scheduled)
	}
	if err := f.st.View(ctx, CheckIndex); err != nil {
		t.Fatal(err)
	}
	if leases, entries := f.counts(t); leases != 60 || entries != 60 {
		t.Fatalf("leases=%d audit entries=%d, want 60 and 60", leases, entries)
	}
}
