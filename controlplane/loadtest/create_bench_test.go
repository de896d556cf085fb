package loadtest

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gpuaas/gpuaas/controlplane/api"
	"github.com/gpuaas/gpuaas/controlplane/fleet"
	"github.com/gpuaas/gpuaas/controlplane/lease"
	"github.com/gpuaas/gpuaas/controlplane/metrics"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/controlplane/store/storetest"
	"github.com/gpuaas/gpuaas/pkg/heapfloor"
	"github.com/gpuaas/gpuaas/pkg/identity"
	"github.com/gpuaas/gpuaas/pkg/sanitize"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

// edge is the control plane's gRPC edge on loopback.
type edge struct {
	addr string
	pki  *identity.DevPKI
}

func source(tb testing.TB, pki *identity.DevPKI, f identity.SVIDFiles) *identity.FileSource {
	tb.Helper()
	src, err := identity.NewFileSource(context.Background(), identity.FileSourceConfig{CertPath: f.CertPath, KeyPath: f.KeyPath, BundlePath: pki.BundlePath, TrustDomain: pki.TrustDomain})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { src.Close() })
	return src
}

// startEdge serves the lease API over st as the daemon does
// (controlplane/cmd/gpuaas-controlplane run): the store instrumented, RPC
// metrics outermost, the authorizer with its rate limiter, denial auditor,
// transport-refusal stats handler and tracer, the edge limits, and info
// logging through the sanitizing, correlating handler (to io.Discard), and
// the daemon's default GC heap floor (pkg/heapfloor);
// with nodes GPU hosts connected (8 H200s each, in the fleet registry as
// agents' sessions put them).
func startEdge(tb testing.TB, st store.Store, nodes int) *edge {
	tb.Helper()
	dir := tb.TempDir()
	pki, err := identity.WriteDevPKI(filepath.Join(dir, "pki"), identity.DevPKIOptions{TrustDomain: "gpuaas.test", Operators: []string{"alice"}})
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	tb.Cleanup(cancel)
	tb.Cleanup(heapfloor.Start(heapfloor.DefaultMiB << 20).Stop)
	log := slog.New(api.CorrelatedHandler(sanitize.Logger(io.Discard, slog.LevelInfo, true).Handler()))
	reg := prometheus.NewRegistry()
	st, err = metrics.InstrumentStore(st, reg)
	if err != nil {
		tb.Fatal(err)
	}
	rpcMetrics, err := metrics.NewRPC(reg)
	if err != nil {
		tb.Fatal(err)
	}
	leases := lease.New(lease.Options{Store: st, Logger: log})
	fl := fleet.NewRegistry(st, fleet.Options{Logger: log, Leases: leases})
	leases.SetFleet(fl)
	for i := 0; i < nodes; i++ {
		inv := &nodev1.Inventory{DriverVersion: "550.90.07"}
		for g := 0; g < 8; g++ {
			inv.Gpus = append(inv.Gpus, &nodev1.Gpu{Index: uint32(g), Uuid: fmt.Sprintf("GPU-%03d-%d", i, g), Model: "NVIDIA H200", PciDeviceId: 0x2335, MigCapable: true, MigEnabled: true})
		}
		node := fmt.Sprintf("node-%03d", i)
		if _, err := fl.Connect(ctx, node, "spiffe://gpuaas.test/gpuaas/agent/"+node, "127.0.0.1:1", "bench", inv); err != nil {
			tb.Fatal(err)
		}
	}
	denials := api.NewDenialAuditor(st, api.DenialOptions{Window: time.Minute, Log: log})
	go denials.Run(ctx)
	tp, err := api.NewTracerProvider(ctx, api.TracingConfig{}, "gpuaas-controlplane")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { tp.Shutdown(context.Background()) })
	authz := api.Authorizer{
		Tracer: tp, TrustDomain: pki.TrustDomain, Denials: denials,
		// One platform identity drives all the load: its bucket is set
		// above the rate measured, as an operator would for the platform.
		Limiter: api.NewRateLimiter(api.RateLimitOptions{PerSecond: 1e6, Burst: 1e6}),
	}
	opts := []grpc.ServerOption{
		grpc.Creds(api.ServerCredentials(source(tb, pki, pki.ControlPlane), identity.AuthorizeKinds(pki.TrustDomain, identity.PeerAgent, identity.PeerOperator),
			api.TLSOptions{TrustDomain: pki.TrustDomain, Denials: denials})),
		grpc.ChainUnaryInterceptor(rpcMetrics.Unary),
		grpc.ChainStreamInterceptor(rpcMetrics.Stream),
	}
	opts = append(opts, authz.ServerOptions(log)...)
	opts = append(opts, api.Limits{}.ServerOptions()...)
	srv := grpc.NewServer(opts...)
	leasev1.RegisterLeaseServiceServer(srv, &api.LeaseServer{Leases: leases, Store: st, Log: log})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	go srv.Serve(lis)
	tb.Cleanup(srv.Stop)
	return &edge{addr: lis.Addr().String(), pki: pki}
}

// BenchmarkCreateLeaseGRPC drives CreateLease through the real gRPC API
// (mTLS, authorizer, lease server; the lease row, its index row and its
// audit entry in one durable transaction) from concurrent clients on conns
// connections, on each backend, with 256 hosts of 8 H200s connected. It
// reports creates/s, the p99 latency one client sees, and the CPU time of
// the whole process (clients included) per create. bbolt runs at three
// client counts: a group commit takes what queued while the last one ran,
// so more clients trade latency for throughput, and the target is a rate
// at a p99. The last bbolt runs start with 200,000 idempotency records, as
// a store that has served for a while holds, at 64 and 96 clients, and
// with time-ordered keys (UUIDv7) at 64: before store schema 5 each
// random key landed on a page of its own in a larger index, and only
// UUIDv7 keys appended; now records are appended whatever the key.
func BenchmarkCreateLeaseGRPC(b *testing.B) {
	for _, be := range storetest.Backends {
		counts := []int{64}
		if be == storetest.Bolt {
			counts = []int{64, 96, 128}
		}
		for _, workers := range counts {
			benchCreateLeaseGRPC(b, fmt.Sprintf("%s/clients=%d", be, workers), be, workers, 0, randomKey)
		}
	}
	benchCreateLeaseGRPC(b, "bolt/clients=64/idempotency=200000", storetest.Bolt, 64, 200_000, randomKey)
	benchCreateLeaseGRPC(b, "bolt/clients=96/idempotency=200000", storetest.Bolt, 96, 200_000, randomKey)
	benchCreateLeaseGRPC(b, "bolt/clients=64/idempotency=200000/keys=uuidv7", storetest.Bolt, 64, 200_000, uuidv7Key)
}

// randomKey is an idempotency key as a random request id (UUIDv4 and the
// like) is: each lands on a page of its own in the index.
func randomKey() string { return fmt.Sprintf("%016x%016x", rand.Uint64(), rand.Uint64()) }

// uuidv7Key is a time-ordered request id (RFC 9562 UUIDv7).
func uuidv7Key() string { return uuid.Must(uuid.NewV7()).String() }

func benchCreateLeaseGRPC(b *testing.B, name string, be storetest.Backend, workers, records int, key func() string) {
	b.Run(name, func(b *testing.B) {
		st := storetest.Open(b, be)
		e := startEdge(b, st, 256)
		alice, err := identity.OperatorID(e.pki.TrustDomain, "alice")
		if err != nil {
			b.Fatal(err)
		}
		seedIdempotency(b, st, alice.String(), records, key)
		src := source(b, e.pki, e.pki.Operators["alice"])
		var clients []leasev1.LeaseServiceClient
		for i := 0; i < conns; i++ {
			conn, err := grpc.NewClient(e.addr, grpc.WithTransportCredentials(identity.ClientCredentials(src, tlsconfig.AuthorizeID(identity.ControlPlaneID(e.pki.TrustDomain)))))
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { conn.Close() })
			clients = append(clients, leasev1.NewLeaseServiceClient(conn))
		}
		ctx := context.Background()
		var lat storetest.Latencies
		var wg sync.WaitGroup
		var left atomic.Int64
		left.Store(int64(b.N))
		b.ResetTimer()
		cpu0 := cpuTime()
		start := time.Now()
		for w := 0; w < workers; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				lc := clients[w%len(clients)]
				var mine []time.Duration
				for left.Add(-1) >= 0 {
					req := &leasev1.CreateLeaseRequest{IdempotencyKey: key(), Spec: &leasev1.LeaseSpec{
						Tenant:   "acme",
						Gpu:      &leasev1.GpuRequest{Kind: &leasev1.GpuRequest_MigProfile{MigProfile: "1g.18gb"}},
						Workload: &leasev1.Workload{Image: "localhost/gpuaas/busybox:demo"},
						Duration: durationpb.New(time.Hour),
					}}
					t0 := time.Now()
					if _, err := lc.CreateLease(ctx, req); err != nil {
						b.Error(err)
						return
					}
					mine = append(mine, time.Since(t0))
				}
				lat.Add(mine)
			}()
		}
		wg.Wait()
		elapsed := time.Since(start)
		cpu := cpuTime() - cpu0
		b.StopTimer()
		if n := lat.Report(b, elapsed); n > 0 {
			b.ReportMetric(float64(cpu.Microseconds())/float64(n), "cpu-µs/create")
		}
	})
}

// seedIdempotency stores n idempotency records under keys of caller (a
// SPIFFE ID), as the lease service keys and encodes them, 2,000 per
// commit.
func seedIdempotency(b *testing.B, st store.Store, caller string, n int, key func() string) {
	b.Helper()
	caller += "\x00"
	rec := []byte(`{"lease_id":"l-06h2ecrgq45k2op03ckk","body_hash":"` + strings.Repeat("ab", 32) + `"}`)
	for done := 0; done < n; {
		batch := min(2000, n-done)
		err := st.Update(context.Background(), func(tx store.Tx) error {
			for range batch {
				if err := tx.Put(store.BucketIdempotency, caller+key(), rec); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
		done += batch
	}
}

// conns is how many connections the clients share: two platform
// instances, each with one gRPC connection, as gRPC advises (a channel per
// target, calls multiplexed on it). Spread over 8 connections the same
// load costs about a tenth more CPU per create (fewer responses share each
// write on both sides) and runs a tenth slower (docs/benchmarks.md).
const conns = 2

// cpuTime is the CPU time (user and system) this process has used: the
// load's clients and the control plane share the machine's cores.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
