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
	"google.golang.org/grpc/stats"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gpuaas/gpuaas/controlplane/lease"
	"github.com/gpuaas/gpuaas/pkg/identity"
	"github.com/gpuaas/gpuaas/pkg/sanitize"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// BenchmarkEdgeRejectVsServe is the server's work for one GetLease after
// the transport decoded it, on the production path (the edge's stats
// handler and unary interceptor with a denial auditor and rate limiter,
// the sanitizing logger at info level, LeaseServer on bbolt): refusing a
// call without credentials versus serving an operator's. Both sides enter
// as a served call does: a peer (TLS, with or without a client
// certificate), the incoming metadata every gRPC client sends, a server
// transport stream (so the request-id header is set on both), and the
// edge's stats handler tagging the call and seeing its header and end.
// test/security's BenchmarkRejectVsServe measures the same through a real
// gRPC server.
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
	sh := &transportRefusals{denials: a.Denials}
	for _, c := range []struct {
		name string
		ctx  context.Context
		ok   bool
	}{{"reject-unauthenticated", servedCall(noPeer(), info.FullMethod), false}, {"serve-GetLease", servedCall(svidPeer(b, ca, opID), info.FullMethod), true}} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				// As grpc-go's server does for each call (handleStream,
				// processUnaryRPC) with a stats handler installed.
				ctx := sh.TagRPC(c.ctx, &stats.RPCTagInfo{FullMethodName: info.FullMethod})
				sh.HandleRPC(ctx, &stats.InHeader{FullMethod: info.FullMethod, Header: clientHeaders})
				_, err := unary(ctx, req, info, handler)
				if (err == nil) != c.ok {
					b.Fatal(err)
				}
				sh.HandleRPC(ctx, &stats.End{Error: err})
			}
		})
	}
}

// clientHeaders are the headers a grpc-go client sends.
var clientHeaders = metadata.MD{
	":authority":   {"controlplane.gpuaas.test:8443"},
	"content-type": {"application/grpc"},
	"user-agent":   {"grpc-go/1.79.0"},
	"te":           {"trailers"},
}

// servedCall is ctx as gRPC hands it to the stats handler: the headers a
// grpc-go client sends, and a transport stream.
func servedCall(ctx context.Context, method string) context.Context {
	return grpc.NewContextWithServerTransportStream(metadata.NewIncomingContext(ctx, clientHeaders), &benchStream{method: method})
}

// benchStream is a grpc.ServerTransportStream that keeps nothing.
type benchStream struct{ method string }

func (s *benchStream) Method() string                  { return s.method }
func (s *benchStream) SetHeader(metadata.MD) error     { return nil }
func (s *benchStream) SendHeader(metadata.MD) error    { return nil }
func (s *benchStream) SetTrailer(md metadata.MD) error { return nil }
