package api

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gpuaas/gpuaas/controlplane/lease"
	"github.com/gpuaas/gpuaas/pkg/identity"
	"github.com/gpuaas/gpuaas/pkg/sanitize"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// BenchmarkEdgeRejectVsServe is the server's work for one GetLease after
// the transport decoded it, on the production path (the edge's unary
// interceptor with a denial auditor and rate limiter, the sanitizing
// logger at info level, LeaseServer on bbolt): refusing a call without
// credentials versus serving an operator's. Both sides enter the
// interceptor the same way a served call does: a peer (TLS, with or
// without a client certificate), the incoming metadata every gRPC client
// sends, and a server transport stream (so the request-id header is set
// on both). test/security's BenchmarkRejectVsServe measures the same
// through a real gRPC server.
func BenchmarkEdgeRejectVsServe(b *testing.B) {
	st := openStore(b)
	td := spiffeid.RequireTrustDomainFromString("gpuaas.test")
	ca, err := identity.NewCA(td, time.Hour)
	if err != nil {
		b.Fatal(err)
	}
	opID, _ := identity.OperatorID(td, "alice")
	log := sanitize.Logger(io.Discard, slog.LevelInfo, true)
	leases := lease.New(lease.Options{Store: st, Logger: log})
	l, err := leases.Create(context.Background(), lease.Caller{ID: "seed"}, &leasev1.CreateLeaseRequest{IdempotencyKey: "k", Spec: &leasev1.LeaseSpec{
		Tenant: "acme", Gpu: &leasev1.GpuRequest{Kind: &leasev1.GpuRequest_MigProfile{MigProfile: "1g.18gb"}},
		Workload: &leasev1.Workload{Image: "img"}, Duration: durationpb.New(time.Hour)}})
	if err != nil {
		b.Fatal(err)
	}
	srv := &LeaseServer{Leases: leases}
	a := Authorizer{TrustDomain: td, Limiter: NewRateLimiter(RateLimitOptions{PerSecond: 1e9, Burst: 1e9}),
		Denials: NewDenialAuditor(st, DenialOptions{}), UnaryTimeout: DefaultUnaryTimeout}
	unary := a.Unary(log)
	info := &grpc.UnaryServerInfo{FullMethod: "/gpuaas.lease.v1.LeaseService/GetLease"}
	handler := func(ctx context.Context, req any) (any, error) {
		return srv.GetLease(ctx, req.(*leasev1.GetLeaseRequest))
	}
	req := &leasev1.GetLeaseRequest{Id: l.GetId()}
	for _, c := range []struct {
		name string
		ctx  context.Context
		ok   bool
	}{{"reject-unauthenticated", servedCall(noPeer(), info.FullMethod), false}, {"serve-GetLease", servedCall(svidPeer(b, ca, opID), info.FullMethod), true}} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := unary(c.ctx, req, info, handler); (err == nil) != c.ok {
					b.Fatal(err)
				}
			}
		})
	}
}

// servedCall is ctx as gRPC hands it to a unary interceptor: the headers
// a grpc-go client sends, and a transport stream.
func servedCall(ctx context.Context, method string) context.Context {
	md := metadata.MD{
		":authority":   {"controlplane.gpuaas.test:8443"},
		"content-type": {"application/grpc"},
		"user-agent":   {"grpc-go/1.79.0"},
		"te":           {"trailers"},
	}
	return grpc.NewContextWithServerTransportStream(metadata.NewIncomingContext(ctx, md), &benchStream{method: method})
}

// benchStream is a grpc.ServerTransportStream that keeps nothing.
type benchStream struct{ method string }

func (s *benchStream) Method() string                  { return s.method }
func (s *benchStream) SetHeader(metadata.MD) error     { return nil }
func (s *benchStream) SendHeader(metadata.MD) error    { return nil }
func (s *benchStream) SetTrailer(md metadata.MD) error { return nil }
