package api

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/peer"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/errs"
)

func discard() *slog.Logger { return slog.New(slog.DiscardHandler) }

func openStore(t testing.TB) *store.Bolt {
	t.Helper()
	st, err := store.OpenBolt(filepath.Join(t.TempDir(), "state.db"), store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

func auditEntries(t testing.TB, st store.Store) []auditlog.Entry {
	t.Helper()
	es, err := audit.List(context.Background(), st, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	return es
}

// fakeClock is a settable clock.
type fakeClock struct{ ns atomic.Int64 }

func newFakeClock() *fakeClock {
	c := &fakeClock{}
	c.ns.Store(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	return c
}
func (c *fakeClock) now() time.Time      { return time.Unix(0, c.ns.Load()) }
func (c *fakeClock) add(d time.Duration) { c.ns.Add(int64(d)) }

func TestRateLimiterIsATokenBucketPerIdentity(t *testing.T) {
	clk := newFakeClock()
	r := NewRateLimiter(RateLimitOptions{PerSecond: 2, Burst: 3, Now: clk.now})
	for i := range 3 {
		if ok, _ := r.Allow("alice"); !ok {
			t.Fatalf("call %d of the burst refused", i)
		}
	}
	ok, wait := r.Allow("alice")
	if ok || wait <= 0 || wait > 500*time.Millisecond {
		t.Fatalf("over the burst: ok=%v retry after %s, want refused and <= 500ms", ok, wait)
	}
	if ok, _ := r.Allow("bob"); !ok {
		t.Fatal("one identity's burst limited another")
	}
	clk.add(500 * time.Millisecond)
	if ok, _ := r.Allow("alice"); !ok {
		t.Fatal("no token after the refill interval")
	}
	if ok, _ := r.Allow("alice"); ok {
		t.Fatal("two tokens after one refill interval")
	}
}

func TestRateLimiterTracksBoundedIdentities(t *testing.T) {
	r := NewRateLimiter(RateLimitOptions{MaxIdentities: 100})
	for i := range 10000 {
		r.Allow("id-" + strconv.Itoa(i))
	}
	if n := r.Tracked(); n != 100 {
		t.Fatalf("%d identities tracked, want at most 100", n)
	}
}

// countingStore counts transactions.
type countingStore struct {
	store.Store
	views, updates atomic.Int64
}

func (c *countingStore) View(ctx context.Context, fn func(store.Tx) error) error {
	c.views.Add(1)
	return c.Store.View(ctx, fn)
}

func (c *countingStore) Update(ctx context.Context, fn func(store.Tx) error) error {
	c.updates.Add(1)
	return c.Store.Update(ctx, fn)
}

func TestDenialAuditIsBudgetedPerIdentity(t *testing.T) {
	st := &countingStore{Store: openStore(t)}
	clk := newFakeClock()
	d := NewDenialAuditor(st, DenialOptions{PerIdentity: 5, MaxPerWindow: 1000, Window: time.Minute, Now: clk.now})
	ctx := context.Background()
	deny := errs.PermissionDenied("MISSING_SCOPE", "no")
	for range 50 {
		d.Record(ctx, Denial{Actor: "oidc:mallory", Method: "/m", Err: deny})
	}
	d.Record(ctx, Denial{Actor: "oidc:bob", Method: "/m", Err: deny})
	if n := st.updates.Load() + st.views.Load(); n != 0 {
		t.Fatalf("Record touched the store %d times; it must only queue", n)
	}
	if err := d.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	es := auditEntries(t, st)
	counts := map[string]int{}
	var summary auditlog.Entry
	for _, e := range es {
		counts[e.Actor+" "+e.Action]++
		if e.Action == ActionDeniedSuppressed {
			summary = e
		}
	}
	if counts["oidc:mallory "+ActionDenied] != 5 || counts["oidc:bob "+ActionDenied] != 1 || counts["oidc:mallory "+ActionDeniedSuppressed] != 1 || len(es) != 7 {
		t.Fatalf("entries: %v", counts)
	}
	if summary.Details["suppressed"] != "45" || summary.Outcome != auditlog.OutcomeDenied {
		t.Fatalf("summary = %+v", summary)
	}
	if s := d.Stats(); s.Suppressed != 45 || s.Written != 7 {
		t.Fatalf("stats = %+v", s)
	}
	// A new window has a new budget.
	clk.add(time.Minute)
	d.Record(ctx, Denial{Actor: "oidc:mallory", Method: "/m", Err: deny})
	_ = d.Flush(ctx)
	if n := len(auditEntries(t, st)); n != 8 {
		t.Fatalf("%d entries after a new window, want 8", n)
	}
}

func TestDenialAuditIsBudgetedOverall(t *testing.T) {
	st := openStore(t)
	d := NewDenialAuditor(st, DenialOptions{PerIdentity: 5, MaxPerWindow: 20, MaxIdentities: 50, Now: newFakeClock().now})
	ctx := context.Background()
	// Many peers, one refusal each (an attacker rotating addresses).
	for i := range 500 {
		d.Record(ctx, Denial{Method: "/m", Err: errs.New(errs.ErrUnauthenticated, "NO_CREDENTIALS", "no"), Peer: fmt.Sprintf("10.0.%d.%d", i/250, i%250)})
	}
	if err := d.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	denied, summaries := 0, 0
	for _, e := range auditEntries(t, st) {
		switch e.Action {
		case ActionDenied:
			denied++
		case ActionDeniedSuppressed:
			summaries++
		}
	}
	if denied != 20 || summaries != 1 {
		t.Fatalf("%d single entries and %d summaries; want 20 and 1 (the global one)", denied, summaries)
	}
	if s := d.Stats(); s.Suppressed != 480 {
		t.Fatalf("stats = %+v", s)
	}
}

// TestDenialAuditBudgetsAnUnauthenticatedPeerByAddress: refusals without a
// verified identity are charged to the peer's IP address, however it
// arrives (the gRPC peer, an IPv4-mapped IPv6 address, or Denial.Peer),
// and the entries and the summary name that address.
func TestDenialAuditBudgetsAnUnauthenticatedPeerByAddress(t *testing.T) {
	st := openStore(t)
	d := NewDenialAuditor(st, DenialOptions{PerIdentity: 2, MaxPerWindow: 1000, Now: newFakeClock().now})
	noCreds := errs.New(errs.ErrUnauthenticated, "NO_CREDENTIALS", "no")
	viaPeer := peer.NewContext(context.Background(), &peer.Peer{Addr: &net.TCPAddr{IP: net.IPv4(192, 0, 2, 7), Port: 4000}})
	mapped := peer.NewContext(context.Background(), &peer.Peer{Addr: &net.TCPAddr{IP: net.ParseIP("::ffff:192.0.2.7"), Port: 4001}})
	other := peer.NewContext(context.Background(), &peer.Peer{Addr: &net.TCPAddr{IP: net.ParseIP("2001:db8::1"), Port: 4002}})
	for range 3 {
		d.Record(viaPeer, Denial{Method: "/m", Err: noCreds})
		d.Record(mapped, Denial{Method: "/m", Err: noCreds})
		d.Record(context.Background(), Denial{Method: "/m", Err: noCreds, Peer: "192.0.2.7"})
	}
	d.Record(other, Denial{Method: "/m", Err: noCreds})
	if err := d.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	var singles []string
	var summary auditlog.Entry
	for _, e := range auditEntries(t, st) {
		switch e.Action {
		case ActionDenied:
			if e.Actor != UnauthenticatedActor {
				t.Fatalf("actor %q", e.Actor)
			}
			singles = append(singles, e.Details["peer"])
		case ActionDeniedSuppressed:
			summary = e
		}
	}
	if fmt.Sprint(singles) != "[192.0.2.7 192.0.2.7 2001:db8::1]" {
		t.Fatalf("single entries for peers %v, want two for 192.0.2.7 and one for 2001:db8::1", singles)
	}
	if summary.Details["peer"] != "192.0.2.7" || summary.Details["suppressed"] != "7" || summary.Actor != UnauthenticatedActor {
		t.Fatalf("summary = %+v", summary)
	}
}
