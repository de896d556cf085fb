// Package security attacks the control plane's edge (issue 6, DESIGN.md
// contracts 3 and 4): it runs the real gRPC server in process, with the
// real TLS credentials, interceptors, token verifier, rate limiter and
// denial auditor, a bbolt store and a local identity provider, and checks
// that every attack is refused with the right code, leaves the state as it
// was, and leaves an audit entry.
package security

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gpuaas/gpuaas/controlplane/api"
	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/fleet"
	"github.com/gpuaas/gpuaas/controlplane/lease"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/authn"
	"github.com/gpuaas/gpuaas/pkg/authn/authntest"
	"github.com/gpuaas/gpuaas/pkg/identity"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

const (
	audience   = "gpuaas-controlplane"
	adminScope = "gpuaas:admin"
)

// rigOptions tunes the edge of one rig.
type rigOptions struct {
	rate    api.RateLimitOptions
	limits  api.Limits
	denials api.DenialOptions
	// mtlsOnly requires a client certificate at the handshake (a listener
	// only agents and operator services use).
	mtlsOnly bool
	// log, if set, receives every log line of the servers (default:
	// discarded).
	log *slog.Logger
	// interceptor, if set, runs before the edge's own (benchmarks).
	interceptor grpc.UnaryServerInterceptor
}

// rig is an in-process control plane.
type rig struct {
	addr    string
	pki     *identity.DevPKI
	td      spiffeid.TrustDomain
	st      *store.Bolt
	counted *countingStore // what the servers use: counts their store work
	leases  *lease.Service
	idp     *authntest.Provider
	key     authntest.Key
	denials *api.DenialAuditor
}

// countingStore counts the transactions of the servers.
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

func newRig(t testing.TB, o rigOptions) *rig {
	t.Helper()
	dir := t.TempDir()
	pki, err := identity.WriteDevPKI(filepath.Join(dir, "pki"), identity.DevPKIOptions{TrustDomain: "gpuaas.test", Agents: []string{"node-a"}, Operators: []string{"alice"}})
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.OpenBolt(filepath.Join(dir, "state.db"), store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	counted := &countingStore{Store: st}
	log := o.log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	src, err := identity.NewFileSource(context.Background(), identity.FileSourceConfig{CertPath: pki.ControlPlane.CertPath, KeyPath: pki.ControlPlane.KeyPath, BundlePath: pki.BundlePath, TrustDomain: pki.TrustDomain})
	if err != nil {
		t.Fatal(err)
	}
	key := authntest.NewKey("rsa-1", "RS256")
	idp := authntest.NewProvider(key)
	verifier, err := authn.NewVerifier(authn.Config{Issuer: idp.Issuer, Audience: audience, HTTPClient: idp.Client(), AdminScope: adminScope})
	if err != nil {
		t.Fatal(err)
	}
	o.denials.Log = log
	denials := api.NewDenialAuditor(st, o.denials)
	if o.rate.PerSecond == 0 {
		o.rate = api.RateLimitOptions{PerSecond: 10000, Burst: 10000}
	}
	leases := lease.New(lease.Options{Store: counted, Logger: log})
	reg := fleet.New(counted, log)
	leases.SetFleet(reg)
	authz := api.Authorizer{TrustDomain: pki.TrustDomain, Tokens: verifier, Limiter: api.NewRateLimiter(o.rate), Denials: denials, UnaryTimeout: api.DefaultUnaryTimeout}
	opts := []grpc.ServerOption{grpc.Creds(api.ServerCredentials(src, identity.AuthorizeKinds(pki.TrustDomain, identity.PeerAgent, identity.PeerOperator),
		api.TLSOptions{TrustDomain: pki.TrustDomain, ClientCertOptional: !o.mtlsOnly, Denials: denials}))}
	if o.interceptor != nil {
		opts = append(opts, grpc.ChainUnaryInterceptor(o.interceptor))
	}
	opts = append(opts, authz.ServerOptions(log)...)
	opts = append(opts, o.limits.ServerOptions()...)
	srv := grpc.NewServer(opts...)
	logs := &api.LogRelay{}
	agentv1.RegisterAgentServiceServer(srv, &api.AgentServer{Fleet: reg, Leases: leases, Store: counted, Log: log, HelloTimeout: time.Second, Logs: logs})
	leasev1.RegisterLeaseServiceServer(srv, &api.LeaseServer{Leases: leases, Store: counted, Logs: logs, Log: log})
	nodev1.RegisterNodeServiceServer(srv, &api.NodeServer{Fleet: reg, Leases: leases})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	t.Cleanup(func() { srv.Stop(); idp.Close(); src.Close(); st.Close() })
	return &rig{addr: lis.Addr().String(), pki: pki, td: pki.TrustDomain, st: st, counted: counted, leases: leases, idp: idp, key: key, denials: denials}
}

// svidSource is a FileSource for one of the dev PKI's identities.
func (r *rig) svidSource(t testing.TB, f identity.SVIDFiles) identity.Source {
	t.Helper()
	src, err := identity.NewFileSource(context.Background(), identity.FileSourceConfig{CertPath: f.CertPath, KeyPath: f.KeyPath, BundlePath: r.pki.BundlePath, TrustDomain: r.td})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	return src
}

// dialSVID connects with mTLS, presenting src's SVID.
func (r *rig) dialSVID(t testing.TB, src identity.Source) *grpc.ClientConn {
	t.Helper()
	return r.dial(t, identity.ClientCredentials(src, tlsconfig.AuthorizeID(identity.ControlPlaneID(r.td))))
}

// dialNoCert connects with TLS 1.3, verifying the control plane's SVID but
// presenting no client certificate (a platform caller using tokens).
func (r *rig) dialNoCert(t testing.TB) *grpc.ClientConn {
	t.Helper()
	c := tlsconfig.TLSClientConfig(r.pki.CA.Bundle(), tlsconfig.AuthorizeID(identity.ControlPlaneID(r.td)))
	c.MinVersion = tls.VersionTLS13
	return r.dial(t, credentials.NewTLS(c))
}

func (r *rig) dial(t testing.TB, creds credentials.TransportCredentials) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(r.addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// claims is a valid claim set of the rig's IdP for sub.
func (r *rig) claims(sub string, extra map[string]any) map[string]any {
	return r.idp.Claims(audience, sub, extra)
}

// token is a valid token for sub in tenant with scopes.
func (r *rig) token(sub, tenant string, scopes ...string) string {
	extra := map[string]any{"scope": strings.Join(scopes, " ")}
	if tenant != "" {
		extra["tenant"] = tenant
	}
	return r.key.Sign(r.claims(sub, extra))
}

// bearer returns ctx sending tok as the call's bearer token.
func bearer(ctx context.Context, tok string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok)
}

func createReq(key, tenant string) *leasev1.CreateLeaseRequest {
	return &leasev1.CreateLeaseRequest{IdempotencyKey: key, Spec: &leasev1.LeaseSpec{
		Tenant: tenant, Gpu: &leasev1.GpuRequest{Kind: &leasev1.GpuRequest_MigProfile{MigProfile: "1g.18gb"}},
		Workload: &leasev1.Workload{Image: "img"}, Duration: durationpb.New(time.Hour),
	}}
}

// seedLease creates a lease of tenant as the platform (no RPC).
func (r *rig) seedLease(t testing.TB, tenant string) *leasev1.Lease {
	t.Helper()
	l, err := r.leases.Create(context.Background(), lease.Caller{ID: "test/seed"}, createReq("seed-"+tenant+fmt.Sprint(time.Now().UnixNano()), tenant))
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// snapshot is the lease state: every lease's id, phase, revision and
// not_after, and the audit log size without access denials.
func (r *rig) snapshot(t testing.TB) string {
	t.Helper()
	ls, _, err := r.leases.List(context.Background(), lease.Caller{ID: "test"}, &leasev1.ListLeasesRequest{PageSize: 1000})
	if err != nil {
		t.Fatal(err)
	}
	var rows []string
	for _, l := range ls {
		rows = append(rows, fmt.Sprintf("%s %s %d %s", l.GetId(), l.GetPhase(), l.GetRevision(), l.GetNotAfter().AsTime()))
	}
	slices.Sort(rows)
	n := 0
	for _, e := range r.entries(t) {
		if e.Action != api.ActionDenied && e.Action != api.ActionDeniedSuppressed {
			n++
		}
	}
	return fmt.Sprintf("%v audit=%d", rows, n)
}

func (r *rig) entries(t testing.TB) []auditlog.Entry {
	t.Helper()
	es, err := audit.List(context.Background(), r.st, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	return es
}

// denial waits (flushing the auditor) for an access.denied entry matching
// the resource and reason, and returns it.
func (r *rig) denial(t testing.TB, resource, reason string) auditlog.Entry {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if err := r.denials.Flush(context.Background()); err != nil {
			t.Fatal(err)
		}
		var seen []string
		for _, e := range r.entries(t) {
			if e.Action == api.ActionDenied && e.Resource == resource && e.Reason == reason && e.Outcome == auditlog.OutcomeDenied {
				return e
			}
			if e.Action == api.ActionDenied {
				seen = append(seen, e.Resource+" "+e.Reason)
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %s entry for %s with reason %s; denials seen: %v", api.ActionDenied, resource, reason, seen)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
