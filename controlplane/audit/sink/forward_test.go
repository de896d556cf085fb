package sink_test

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/audit/sink"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/errs"
	"github.com/gpuaas/gpuaas/pkg/identity"
	auditv1 "github.com/gpuaas/gpuaas/proto/gpuaas/audit/v1"
)

// faultySink is the sink as the network and a crashing control plane see
// it: down (nothing stored), or the batch stored and then the control plane
// killed before it records the acknowledgement (kill cancels the
// forwarder's context, as kill -9 ends the process).
type faultySink struct {
	s    *sink.Sink
	down bool
	// killAfterStore, when set, is called after a stored batch instead of
	// returning its acknowledgement.
	killAfterStore func()
}

func (f *faultySink) State(ctx context.Context, origin string) (uint64, []byte, error) {
	if f.down {
		return 0, nil, errs.New(errs.ErrUnavailable, "SINK_DOWN", "sink is down")
	}
	return f.s.State(origin)
}

func (f *faultySink) Deliver(ctx context.Context, b auditlog.Batch) (uint64, bool, error) {
	if f.down {
		return 0, false, errs.New(errs.ErrUnavailable, "SINK_DOWN", "sink is down")
	}
	size, dup, err := f.s.Deliver(ctx, b)
	if err == nil && f.killAfterStore != nil {
		f.killAfterStore()
		return 0, false, context.Canceled
	}
	return size, dup, err
}

// assertSinkHoldsLog checks the sink directory verifies and holds exactly
// the control plane's entries, once each, in order.
func assertSinkHoldsLog(t *testing.T, dir string, k keys, l *controlPlaneLog) {
	t.Helper()
	res, err := sink.VerifyDir(dir, origin, k.trusted)
	if err != nil {
		t.Fatalf("sink directory does not verify: %v", err)
	}
	if res.Entries != uint64(l.n) {
		t.Fatalf("sink holds %d entries, the log %d", res.Entries, l.n)
	}
	want, err := audit.ReadBatch(context.Background(), l.st, 0, l.n)
	if err != nil {
		t.Fatal(err)
	}
	// The sink's batches, replayed: the same bytes in the same order.
	s := openSink(t, dir, k)
	size, cp, _ := s.State(origin)
	c, _ := auditlog.ParseSigned(cp)
	if size != uint64(l.n) || c.Size != size {
		t.Fatalf("sink state %d / %s, want %d", size, c, l.n)
	}
	v := auditlog.NewVerifier()
	if err := v.AddAll(want.Entries); err != nil || !bytes.Equal(v.Root(), c.Root) {
		t.Fatalf("the sink's checkpoint root is not the root of the log's entries: %v", err)
	}
}

func TestForwarderDeliversExactlyOnceThroughCrashes(t *testing.T) {
	k := newKeys(t, origin)
	l := newLog(t, k)
	dir := t.TempDir()
	fs := &faultySink{s: openSink(t, dir, k)}
	rng := rand.New(rand.NewPCG(1, 2))
	kills, restarts, outages := 0, 0, 0
	for round := 0; round < 60; round++ {
		if rng.IntN(3) > 0 {
			l.grow(t, 1+rng.IntN(7), "alice")
		}
		if rng.IntN(6) == 0 {
			// Stop and restart the sink: it reloads from its directory.
			fs.s = openSink(t, dir, k)
			restarts++
		}
		fs.down = rng.IntN(8) == 0
		if fs.down {
			outages++
		}
		// A control plane process: a new forwarder on the same store.
		ctx, kill := context.WithCancel(context.Background())
		fs.killAfterStore = nil
		if rng.IntN(3) == 0 {
			fs.killAfterStore = kill
			kills++
		}
		f, err := audit.NewForwarder(audit.ForwarderOptions{Store: l.st, Sink: fs, Origin: origin, MaxBatch: 1 + rng.IntN(10)})
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Sync(ctx); err == nil {
			for range 1 + rng.IntN(4) {
				if _, err := f.Step(ctx); err != nil {
					break
				}
			}
		}
		kill()
	}
	if kills < 10 || restarts < 5 || outages < 3 {
		t.Fatalf("the schedule exercised too little: %d kills, %d sink restarts, %d outages", kills, restarts, outages)
	}
	// A last, undisturbed process drains the log.
	fs.down, fs.killAfterStore = false, nil
	reg := prometheus.NewRegistry()
	f, err := audit.NewForwarder(audit.ForwarderOptions{Store: l.st, Sink: fs, Origin: origin, MaxBatch: 5, Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := f.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	for {
		ok, err := f.Step(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			break
		}
	}
	assertSinkHoldsLog(t, dir, k, l)
	ctx2, cancel := context.WithCancel(ctx)
	cancel()
	f.Run(ctx2) // updates nothing, returns at once
	if n, err := testutil.GatherAndCount(reg, "gpuaas_audit_forward_batches_total"); err != nil || n == 0 {
		t.Fatalf("batch metric: %d %v", n, err)
	}
}

func TestForwarderRefusesASinkOnAFork(t *testing.T) {
	k := newKeys(t, origin)
	honest, fork := newLog(t, k), newLog(t, k)
	honest.grow(t, 4, "alice")
	fork.grow(t, 4, "mallory")
	dir := t.TempDir()
	s := openSink(t, dir, k)
	deliver(t, s, fork, 0)
	f, _ := audit.NewForwarder(audit.ForwarderOptions{Store: honest.st, Sink: &faultySink{s: s}, Origin: origin})
	err := f.Sync(context.Background())
	if !errors.Is(err, auditlog.ErrInconsistent) {
		t.Fatalf("sync with a sink holding a fork: %v", err)
	}
}

// TestForwardingOverMTLS runs the real transport: the sink's gRPC server
// with SPIFFE mTLS, stopped and restarted while the control plane's
// forwarder runs.
func TestForwardingOverMTLS(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("gpuaas.test")
	ca, err := identity.NewCA(td, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	svid := func(id spiffeid.ID) identity.StaticSource {
		s, err := ca.IssueSVID(id, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
		if err != nil {
			t.Fatal(err)
		}
		return identity.StaticSource{SVID: s, Bundle: ca.Bundle()}
	}
	sinkID := spiffeid.RequireFromPath(td, "/gpuaas/audit-sink")
	cpID := identity.ControlPlaneID(td)
	operatorID, _ := identity.OperatorID(td, "alice")

	k := newKeys(t, origin)
	l := newLog(t, k)
	dir := t.TempDir()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	serve := func(lis net.Listener) (*grpc.Server, chan struct{}) {
		srv := grpc.NewServer(grpc.Creds(identity.ServerCredentials(svid(sinkID), sink.AuthorizeSenders(cpID))))
		auditv1.RegisterAuditSinkServiceServer(srv, &sink.Server{Sink: openSink(t, dir, k)})
		done := make(chan struct{})
		go func() { srv.Serve(lis); close(done) }()
		return srv, done
	}
	srv, done := serve(lis)

	dial := func(src identity.StaticSource) *grpc.ClientConn {
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(identity.ClientCredentials(src, tlsconfig.AuthorizeID(sinkID))))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return conn
	}
	// Only the control plane may deliver.
	if _, _, err := audit.NewGRPCSink(dial(svid(operatorID))).State(context.Background(), origin); err == nil {
		t.Fatal("the sink served an operator's SVID")
	}
	f, err := audit.NewForwarder(audit.ForwarderOptions{Store: l.st, Sink: audit.NewGRPCSink(dial(svid(cpID))), Origin: origin,
		Poll: 10 * time.Millisecond, MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); f.Run(ctx) }()
	defer func() { cancel(); wg.Wait() }()

	waitDelivered := func(n int) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for {
			var d audit.Delivered
			l.st.View(context.Background(), func(tx store.Tx) error { d, err = audit.LoadDelivered(tx); return err })
			if d.Size == uint64(n) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("forwarder delivered %d of %d entries", d.Size, n)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	l.grow(t, 5, "alice")
	waitDelivered(5)
	srv.Stop()
	<-done
	l.grow(t, 3, "alice")
	l.grow(t, 4, "alice")
	lis2, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	srv2, done2 := serve(lis2)
	defer func() { srv2.Stop(); <-done2 }()
	waitDelivered(12)
	assertSinkHoldsLog(t, dir, k, l)
}
