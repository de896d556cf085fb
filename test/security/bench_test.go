package security

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// serverTimer measures the time the server spends in the edge and the
// handler of each call (everything after the transport decoded it).
type serverTimer struct{ ns, calls atomic.Int64 }

func (s *serverTimer) intercept(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	start := time.Now()
	resp, err := h(ctx, req)
	s.ns.Add(int64(time.Since(start)))
	s.calls.Add(1)
	return resp, err
}

func (s *serverTimer) reset() { s.ns.Store(0); s.calls.Store(0) }

func (s *serverTimer) perCall() float64 {
	if n := s.calls.Load(); n > 0 {
		return float64(s.ns.Load()) / float64(n)
	}
	return 0
}

// BenchmarkRejectVsServe compares, through the real in-process gRPC server
// (TLS 1.3, the edge's interceptors, bbolt), rejecting an unauthenticated
// GetLease with serving an authenticated one (operator SVID; and a bearer
// token, whose verification is cached). ns/op is the client's round trip,
// which includes the same transport cost on both sides; server-ns/op is
// the server's work after the transport (edge + handler), the part a
// flood of unauthenticated calls can make it do.
func BenchmarkRejectVsServe(b *testing.B) {
	timer := &serverTimer{}
	r := newRig(b, rigOptions{interceptor: timer.intercept})
	l := r.seedLease(b, "acme")
	req := &leasev1.GetLeaseRequest{Id: l.GetId()}
	op := leasev1.NewLeaseServiceClient(r.dialSVID(b, r.svidSource(b, r.pki.Operators["alice"])))
	anon := leasev1.NewLeaseServiceClient(r.dialNoCert(b))
	tok := r.token("bob", "acme", "lease:read")
	run := func(b *testing.B, ctx context.Context, c leasev1.LeaseServiceClient, want codes.Code) {
		if _, err := c.GetLease(ctx, req); status.Code(err) != want {
			b.Fatalf("warm-up: %v", err)
		}
		timer.reset()
		b.ResetTimer()
		for b.Loop() {
			if _, err := c.GetLease(ctx, req); status.Code(err) != want {
				b.Fatal(err)
			}
		}
		b.ReportMetric(timer.perCall(), "server-ns/op")
	}
	b.Run("reject-unauthenticated", func(b *testing.B) { run(b, context.Background(), anon, codes.Unauthenticated) })
	b.Run("serve-GetLease-svid", func(b *testing.B) { run(b, context.Background(), op, codes.OK) })
	b.Run("serve-GetLease-token", func(b *testing.B) { run(b, bearer(context.Background(), tok), anon, codes.OK) })
}
