package lease

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/controlplane/store/storetest"
	"github.com/gpuaas/gpuaas/pkg/errs"
)

func TestLeaseIDsSortByTimeAndStayApart(t *testing.T) {
	base := time.Date(2026, 11, 29, 10, 0, 0, 0, time.UTC)
	seen := map[string]bool{}
	prev := ""
	for i := range 2000 {
		// Ten ids per millisecond: later milliseconds sort later, and no
		// id repeats.
		id := leaseIDAt(base.Add(time.Duration(i/10) * time.Millisecond))
		if !leaseRE.MatchString(id) {
			t.Fatalf("id %q does not match %s", id, leaseRE)
		}
		if seen[id] {
			t.Fatalf("id %q made twice", id)
		}
		seen[id] = true
		if i%10 == 0 && prev != "" && id <= prev {
			t.Fatalf("id %q made a millisecond after %q sorts before it", id, prev)
		}
		prev = id
	}
	// The same millisecond in two ids shares the time prefix (48 bits,
	// the first 9 characters after "l-"), the rest is random.
	a, b := leaseIDAt(base), leaseIDAt(base)
	if a[:2+9] != b[:2+9] || a == b {
		t.Fatalf("ids of one millisecond: %q %q", a, b)
	}
}

func TestCreateNeverOverwritesALeaseOnAnIDCollision(t *testing.T) {
	storetest.Each(t, testCreateNeverOverwritesALeaseOnAnIDCollision)
}

func testCreateNeverOverwritesALeaseOnAnIDCollision(t *testing.T) {
	f := newFixture(t, h200("node-a", 1))
	ctx := context.Background()
	fixed := leaseIDAt(f.clk.Now())
	f.svc.newID = func(time.Time) string { return fixed }
	first, err := f.svc.Create(ctx, operator, req("k1", "1g.18gb"))
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.svc.Create(ctx, operator, req("k2", "2g.35gb"))
	if !errors.Is(err, errs.ErrAborted) || errs.ReasonOf(err) != "LEASE_ID_COLLISION" {
		t.Fatalf("second create on the same id: %v, want Aborted LEASE_ID_COLLISION", err)
	}
	got, err := f.svc.Get(ctx, operator, fixed)
	if err != nil || got.GetSpec().GetGpu().GetMigProfile() != "1g.18gb" || got.GetRevision() != first.GetRevision() {
		t.Fatalf("first lease after the collision: %v, %v", got, err)
	}
	if n, e := f.counts(t); n != 1 || e != 1 {
		t.Fatalf("leases=%d audit=%d, want 1 and 1", n, e)
	}
	// Nothing of the refused call stayed: its key is free for a retry.
	f.svc.newID = leaseIDAt
	if _, err := f.svc.Create(ctx, operator, req("k2", "2g.35gb")); err != nil {
		t.Fatalf("retry after the collision: %v", err)
	}
}
