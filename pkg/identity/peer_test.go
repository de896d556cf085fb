package identity_test

import (
	"context"
	"errors"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffegrpc/grpccredentials"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/gpuaas/gpuaas/pkg/identity"
)

// peerRecorder is a pair of interceptors that record PeerID for each call.
type peerRecorder struct {
	mu   sync.Mutex
	ids  []spiffeid.ID
	errs []error
}

func (r *peerRecorder) record(ctx context.Context) {
	id, err := identity.PeerID(ctx)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ids = append(r.ids, id)
	r.errs = append(r.errs, err)
}

func (r *peerRecorder) unary(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	r.record(ctx)
	return h(ctx, req)
}

func (r *peerRecorder) stream(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	r.record(ss.Context())
	return h(srv, ss)
}

// startServer serves the gRPC health service on loopback.
func startServer(t *testing.T, opts ...grpc.ServerOption) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer(opts...)
	healthpb.RegisterHealthServer(s, health.NewServer())
	go func() { _ = s.Serve(ln) }()
	t.Cleanup(s.Stop)
	return ln.Addr().String()
}

func dial(t *testing.T, addr string, opt grpc.DialOption) healthpb.HealthClient {
	t.Helper()
	conn, err := grpc.NewClient("passthrough:///"+addr, opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return healthpb.NewHealthClient(conn)
}

func TestPeerID_GRPC(t *testing.T) {
	pki := devPKI(t)
	bundle := pki.CA.Bundle()
	rec := &peerRecorder{}
	addr := startServer(t,
		grpc.Creds(identity.ServerCredentials(static(t, pki.ControlPlane, bundle), identity.AuthorizeKinds(td, identity.PeerAgent))),
		grpc.UnaryInterceptor(rec.unary),
		grpc.StreamInterceptor(rec.stream))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	agent := dial(t, addr, grpc.WithTransportCredentials(
		identity.ClientCredentials(static(t, pki.Agents["n2"], bundle), tlsconfig.AuthorizeID(identity.ControlPlaneID(td)))))
	if _, err := agent.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatalf("unary call: %v", err)
	}
	stream, err := agent.Watch(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err != nil {
		t.Fatalf("stream call: %v", err)
	}

	rec.mu.Lock()
	ids, errs := append([]spiffeid.ID(nil), rec.ids...), append([]error(nil), rec.errs...)
	rec.mu.Unlock()
	if len(ids) != 2 {
		t.Fatalf("recorded %d calls, want 2", len(ids))
	}
	for i, id := range ids {
		if errs[i] != nil {
			t.Fatalf("call %d: PeerID: %v", i, errs[i])
		}
		if id != pki.Agents["n2"].ID {
			t.Errorf("call %d: PeerID = %s, want %s", i, id, pki.Agents["n2"].ID)
		}
		if node, ok := identity.ParseAgentNode(id); !ok || node != "n2" {
			t.Errorf("call %d: node %q, %v", i, node, ok)
		}
	}

	// An operator is refused by the connection authorizer before any RPC.
	op := dial(t, addr, grpc.WithTransportCredentials(
		identity.ClientCredentials(static(t, pki.Operators["alice"], bundle), tlsconfig.AuthorizeID(identity.ControlPlaneID(td)))))
	_, err = op.Check(ctx, &healthpb.HealthCheckRequest{})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("operator call: %v, want Unavailable", err)
	}
	rec.mu.Lock()
	if len(rec.ids) != 2 {
		t.Errorf("a refused peer reached the handler")
	}
	rec.mu.Unlock()
}

// PeerID also understands go-spiffe's own gRPC credentials, whose auth info
// wraps the TLS state.
func TestPeerID_GoSpiffeCredentials(t *testing.T) {
	pki := devPKI(t)
	bundle := pki.CA.Bundle()
	cp := static(t, pki.ControlPlane, bundle)
	rec := &peerRecorder{}
	addr := startServer(t,
		grpc.Creds(grpccredentials.MTLSServerCredentials(cp, cp, identity.AuthorizeKinds(td, identity.PeerOperator))),
		grpc.UnaryInterceptor(rec.unary))
	op := static(t, pki.Operators["alice"], bundle)
	c := dial(t, addr, grpc.WithTransportCredentials(identity.ClientCredentials(op, tlsconfig.AuthorizeID(identity.ControlPlaneID(td)))))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatal(err)
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if len(rec.ids) != 1 || rec.errs[0] != nil || rec.ids[0] != pki.Operators["alice"].ID {
		t.Fatalf("PeerID = %v, %v; want %s", rec.ids, rec.errs, pki.Operators["alice"].ID)
	}
}

func TestPeerID_WithoutVerifiedPeer(t *testing.T) {
	if _, err := identity.PeerID(context.Background()); !errors.Is(err, identity.ErrNoPeerIdentity) {
		t.Errorf("no peer: %v", err)
	}
	ctx := peer.NewContext(context.Background(), &peer.Peer{Addr: &net.TCPAddr{}})
	if _, err := identity.PeerID(ctx); !errors.Is(err, identity.ErrNoPeerIdentity) {
		t.Errorf("peer without auth info: %v", err)
	}

	// A real call over an insecure connection has a peer but no identity.
	rec := &peerRecorder{}
	addr := startServer(t, grpc.UnaryInterceptor(rec.unary))
	c := dial(t, addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	ctx2, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Check(ctx2, &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatal(err)
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if len(rec.errs) != 1 || !errors.Is(rec.errs[0], identity.ErrNoPeerIdentity) {
		t.Errorf("insecure call: %v", rec.errs)
	}
}
