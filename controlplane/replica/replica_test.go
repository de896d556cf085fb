package replica_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/gpuaas/gpuaas/controlplane/replica"
	"github.com/gpuaas/gpuaas/controlplane/store/storetest"
	"github.com/gpuaas/gpuaas/test/harness"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const prefix = "/gpuaas/test/"

func startEtcd(t *testing.T) *storetest.Etcd {
	t.Helper()
	e, err := storetest.StartEtcd(context.Background(), t.TempDir(), storetest.EtcdConfig{})
	if err != nil {
		harness.Require(t, fmt.Errorf("embedded etcd: %w", err))
	}
	t.Cleanup(func() { e.Close() })
	return e
}

// running is a replica whose Run loop goes until stop, counting its terms.
type running struct {
	*replica.Replica
	mu    sync.Mutex
	terms int
	stop  func()
}

func (r *running) Terms() int { r.mu.Lock(); defer r.mu.Unlock(); return r.terms }

func start(t *testing.T, e *storetest.Etcd, id string) *running {
	t.Helper()
	rep, err := replica.New(context.Background(), replica.Options{Client: e.Client, Prefix: prefix, ID: id, TTL: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	r := &running{Replica: rep}
	go func() {
		defer close(done)
		rep.Run(ctx, func(lctx context.Context) {
			r.mu.Lock()
			r.terms++
			r.mu.Unlock()
			<-lctx.Done()
		})
	}()
	var once sync.Once
	r.stop = func() {
		once.Do(func() {
			cancel()
			<-done
			_ = rep.Close()
		})
	}
	t.Cleanup(r.stop)
	return r
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within 20s: %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Exactly one replica leads; when it stops, another takes over and its
// lead function runs.
func TestOneLeaderAndTakeover(t *testing.T) {
	e := startEtcd(t)
	a, b := start(t, e, "a"), start(t, e, "b")
	eventually(t, "one leader", func() bool { return a.IsLeader() != b.IsLeader() })
	first, other := a, b
	if b.IsLeader() {
		first, other = b, a
	}
	time.Sleep(200 * time.Millisecond)
	if a.IsLeader() == b.IsLeader() {
		t.Fatal("two leaders or none")
	}
	id, err := other.Leader(context.Background())
	if err != nil || id != first.ID() {
		t.Fatalf("Leader() = %q, %v; want %q", id, err, first.ID())
	}
	first.stop()
	eventually(t, "the other replica leads", other.IsLeader)
	if other.Terms() != 1 {
		t.Fatalf("the new leader began %d terms, want 1", other.Terms())
	}
}

// Presence: a claim is visible to every replica; a release removes only
// the releaser's own claim (a node that moved keeps its new one); a
// replica's claims go with it.
func TestPresence(t *testing.T) {
	ctx := context.Background()
	e := startEtcd(t)
	a, b := start(t, e, "a"), start(t, e, "b")
	if err := a.Claim(ctx, "node-1"); err != nil {
		t.Fatal(err)
	}
	if err := a.Claim(ctx, "node-2"); err != nil {
		t.Fatal(err)
	}
	if err := b.Claim(ctx, "node-2"); err != nil { // node-2 moved to b
		t.Fatal(err)
	}
	if err := a.Release(ctx, "node-2"); err != nil { // a's late release
		t.Fatal(err)
	}
	got, err := b.Present(ctx)
	if err != nil || fmt.Sprint(got) != "map[node-1:a node-2:b]" {
		t.Fatalf("Present() = %v, %v", got, err)
	}
	a.stop() // revokes a's lease
	got, err = b.Present(ctx)
	if err != nil || fmt.Sprint(got) != "map[node-2:b]" {
		t.Fatalf("after a stopped: Present() = %v, %v", got, err)
	}
}

// A replica whose etcd lease is lost (expired while it was cut off)
// gives up the leadership, renews its session and writes its presence
// keys again.
func TestLostSessionIsRenewed(t *testing.T) {
	ctx := context.Background()
	e := startEtcd(t)
	a := start(t, e, "a")
	eventually(t, "a leads", a.IsLeader)
	if err := a.Claim(ctx, "node-1"); err != nil {
		t.Fatal(err)
	}
	// The lease expires as if a had been partitioned from etcd.
	leases, err := e.Client.Leases(ctx)
	if err != nil || len(leases.Leases) != 1 {
		t.Fatalf("leases %v, %v; want a's one", leases, err)
	}
	if _, err := e.Client.Revoke(ctx, leases.Leases[0].ID); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a leads a second term", func() bool { return a.Terms() == 2 && a.IsLeader() })
	eventually(t, "node-1 present again", func() bool {
		got, err := a.Present(ctx)
		return err == nil && got["node-1"] == "a"
	})
}

func TestOptionsAreChecked(t *testing.T) {
	e := startEtcd(t)
	for name, o := range map[string]replica.Options{
		"no client": {Prefix: prefix, ID: "a"},
		"no prefix": {Client: e.Client, ID: "a"},
		"no id":     {Client: e.Client, Prefix: prefix},
		"slash id":  {Client: e.Client, Prefix: prefix, ID: "a/b"},
		"short ttl": {Client: e.Client, Prefix: prefix, ID: "a", TTL: time.Second},
	} {
		if _, err := replica.New(context.Background(), o); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
