package security

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/gpuaas/gpuaas/controlplane/api"
	"github.com/gpuaas/gpuaas/pkg/authn"
	"github.com/gpuaas/gpuaas/pkg/authn/authntest"
	"github.com/gpuaas/gpuaas/pkg/errs"
	"github.com/gpuaas/gpuaas/pkg/identity"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

const (
	rpcGetLease    = "rpc:/gpuaas.lease.v1.LeaseService/GetLease"
	rpcCreateLease = "rpc:/gpuaas.lease.v1.LeaseService/CreateLease"
	rpcCancelLease = "rpc:/gpuaas.lease.v1.LeaseService/CancelLease"
	rpcListLeases  = "rpc:/gpuaas.lease.v1.LeaseService/ListLeases"
	rpcHandshake   = "rpc:tls.handshake"
)

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// wantRefused checks err's code and reason (reason "" for any).
func wantRefused(t *testing.T, err error, code codes.Code, reason string) {
	t.Helper()
	if status.Code(err) != code {
		t.Fatalf("err = %v, want code %s", err, code)
	}
	if reason != "" && errs.ReasonOf(errs.FromStatus(err)) != reason {
		t.Fatalf("err = %v (reason %q), want reason %s", err, errs.ReasonOf(errs.FromStatus(err)), reason)
	}
}

func TestAttackNoClientCertificate(t *testing.T) {
	r := newRig(t, rigOptions{})
	victim := r.seedLease(t, "acme")
	before := r.snapshot(t)
	conn := r.dialNoCert(t)
	lc := leasev1.NewLeaseServiceClient(conn)
	_, err := lc.GetLease(ctxT(t), &leasev1.GetLeaseRequest{Id: victim.GetId()})
	wantRefused(t, err, codes.Unauthenticated, "NO_CREDENTIALS")
	_, err = lc.CreateLease(ctxT(t), createReq("k", "acme"))
	wantRefused(t, err, codes.Unauthenticated, "NO_CREDENTIALS")
	stream, err := agentv1.NewAgentServiceClient(conn).Session(ctxT(t))
	if err == nil {
		_, err = stream.Recv()
	}
	wantRefused(t, err, codes.Unauthenticated, "NO_CREDENTIALS")
	e := r.denial(t, rpcGetLease, "NO_CREDENTIALS")
	if e.Actor != api.UnauthenticatedActor || e.Details["peer"] != "127.0.0.1" {
		t.Fatalf("audit entry = %+v", e)
	}
	r.denial(t, "rpc:/gpuaas.agent.v1.AgentService/Session", "NO_CREDENTIALS")
	if after := r.snapshot(t); after != before {
		t.Fatalf("state changed:\n%s\n%s", before, after)
	}
}

// TestAttackNoClientCertificateOnAnMTLSListener: where mTLS is required
// the handshake itself refuses a client without a certificate, and that is
// audited too.
func TestAttackNoClientCertificateOnAnMTLSListener(t *testing.T) {
	r := newRig(t, rigOptions{mtlsOnly: true})
	before := r.snapshot(t)
	_, err := leasev1.NewLeaseServiceClient(r.dialNoCert(t)).CreateLease(ctxT(t), createReq("k", "acme"))
	wantRefused(t, err, codes.Unavailable, "")
	if e := r.denial(t, rpcHandshake, "NO_CLIENT_CERTIFICATE"); e.Actor != api.UnauthenticatedActor || e.Details["peer"] != "127.0.0.1" {
		t.Fatalf("audit entry = %+v", e)
	}
	if after := r.snapshot(t); after != before {
		t.Fatalf("state changed:\n%s\n%s", before, after)
	}
	// Operators with an SVID still get in.
	op := leasev1.NewLeaseServiceClient(r.dialSVID(t, r.svidSource(t, r.pki.Operators["alice"])))
	if _, err := op.ListLeases(ctxT(t), &leasev1.ListLeasesRequest{}); err != nil {
		t.Fatalf("operator on the mTLS listener: %v", err)
	}
}

// handshakeRefused dials with src and checks the TLS handshake is refused
// (the client sees Unavailable) and audited with reason, naming claimed.
func handshakeRefused(t *testing.T, r *rig, src identity.Source, claimed spiffeid.ID, reason string) {
	t.Helper()
	before := r.snapshot(t)
	_, err := leasev1.NewLeaseServiceClient(r.dialSVID(t, src)).CreateLease(ctxT(t), createReq("k", "acme"))
	wantRefused(t, err, codes.Unavailable, "")
	e := r.denial(t, rpcHandshake, reason)
	if e.Actor != api.UnauthenticatedActor || e.Details["claimed_id"] != claimed.String() || e.Details["code"] != codes.Unauthenticated.String() {
		t.Fatalf("audit entry = %+v", e)
	}
	if after := r.snapshot(t); after != before {
		t.Fatalf("state changed:\n%s\n%s", before, after)
	}
}

func TestAttackCertificateFromAnotherCA(t *testing.T) {
	r := newRig(t, rigOptions{})
	rogue, err := identity.NewCA(r.td, time.Hour) // same trust domain, not in the bundle
	if err != nil {
		t.Fatal(err)
	}
	id := r.pki.Operators["alice"].ID
	svid, err := rogue.IssueSVID(id, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	handshakeRefused(t, r, identity.StaticSource{SVID: svid, Bundle: r.pki.CA.Bundle()}, id, "UNTRUSTED_CERTIFICATE")
}

func TestAttackExpiredSVID(t *testing.T) {
	r := newRig(t, rigOptions{})
	id := r.pki.Operators["alice"].ID
	svid, err := r.pki.CA.IssueSVID(id, time.Now().Add(-2*time.Hour), time.Now().Add(-time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	handshakeRefused(t, r, identity.StaticSource{SVID: svid, Bundle: r.pki.CA.Bundle()}, id, "CERTIFICATE_EXPIRED")
}

func TestAttackWrongTrustDomain(t *testing.T) {
	r := newRig(t, rigOptions{})
	evil, err := identity.NewCA(spiffeid.RequireTrustDomainFromString("evil.test"), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	id, _ := identity.OperatorID(evil.TrustDomain, "alice")
	svid, err := evil.IssueSVID(id, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	handshakeRefused(t, r, identity.StaticSource{SVID: svid, Bundle: r.pki.CA.Bundle()}, id, "FOREIGN_TRUST_DOMAIN")
}

func TestAttackAgentCallsLeaseService(t *testing.T) {
	r := newRig(t, rigOptions{})
	victim := r.seedLease(t, "acme")
	before := r.snapshot(t)
	agent := r.pki.Agents["node-a"]
	conn := r.dialSVID(t, r.svidSource(t, agent))
	_, err := leasev1.NewLeaseServiceClient(conn).CancelLease(ctxT(t), &leasev1.CancelLeaseRequest{Id: victim.GetId()})
	wantRefused(t, err, codes.PermissionDenied, "NOT_AN_OPERATOR")
	_, err = nodev1.NewNodeServiceClient(conn).ListNodes(ctxT(t), &nodev1.ListNodesRequest{})
	wantRefused(t, err, codes.PermissionDenied, "NOT_AN_OPERATOR")
	if e := r.denial(t, rpcCancelLease, "NOT_AN_OPERATOR"); e.Actor != agent.ID.String() {
		t.Fatalf("audit actor = %q, want the agent's ID", e.Actor)
	}
	if after := r.snapshot(t); after != before {
		t.Fatalf("state changed:\n%s\n%s", before, after)
	}
}

// TestAttackForgedTokens presents tokens that must not authenticate.
func TestAttackForgedTokens(t *testing.T) {
	r := newRig(t, rigOptions{})
	victim := r.seedLease(t, "acme")
	lc := leasev1.NewLeaseServiceClient(r.dialNoCert(t))
	now := time.Now()
	good := func(map[string]any) map[string]any {
		return r.claims("mallory", map[string]any{"tenant": "acme", "scope": "lease:read lease:write"})
	}
	with := func(extra map[string]any) map[string]any {
		c := good(nil)
		for k, v := range extra {
			c[k] = v
		}
		return c
	}
	unpublished := authntest.NewKey("rsa-1", "RS256")
	cases := []struct{ name, token, reason string }{
		{"alg none", authntest.Raw(map[string]any{"alg": "none", "kid": "rsa-1", "typ": "JWT"}, good(nil), nil), "TOKEN_ALG_NOT_ALLOWED"},
		{"HS256 signed with the RSA public key", authntest.HS256(map[string]any{"kid": "rsa-1", "typ": "JWT"}, good(nil), r.key.PublicPEM()), "TOKEN_ALG_NOT_ALLOWED"},
		{"expired", r.key.Sign(with(map[string]any{"iat": now.Add(-3 * time.Hour).Unix(), "nbf": now.Add(-3 * time.Hour).Unix(), "exp": now.Add(-2 * time.Hour).Unix()})), "TOKEN_EXPIRED"},
		{"wrong issuer", r.key.Sign(with(map[string]any{"iss": "https://evil.example"})), "TOKEN_ISSUER_INVALID"},
		{"wrong audience", r.key.Sign(with(map[string]any{"aud": "another-service"})), "TOKEN_AUDIENCE_INVALID"},
		{"unknown kid", r.key.SignWithHeader(map[string]any{"kid": "attacker-kid"}, good(nil)), "TOKEN_KID_UNKNOWN"},
		{"signed by another key with our kid", unpublished.Sign(good(nil)), "TOKEN_SIGNATURE_INVALID"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := r.snapshot(t)
			_, err := lc.CancelLease(bearer(ctxT(t), c.token), &leasev1.CancelLeaseRequest{Id: victim.GetId()})
			wantRefused(t, err, codes.Unauthenticated, c.reason)
			if e := r.denial(t, rpcCancelLease, c.reason); e.Actor != api.UnauthenticatedActor {
				t.Fatalf("audit actor = %q", e.Actor)
			}
			if after := r.snapshot(t); after != before {
				t.Fatalf("state changed:\n%s\n%s", before, after)
			}
		})
	}
	// A flood of unknown kids fetched the key set at most twice (the
	// first load, and one refresh for the first unknown kid).
	if n := r.idp.Fetches.Load(); n > 2 {
		t.Fatalf("%d key set fetches", n)
	}
}

func TestAttackTokenWithoutTheScope(t *testing.T) {
	r := newRig(t, rigOptions{})
	victim := r.seedLease(t, "acme")
	before := r.snapshot(t)
	lc := leasev1.NewLeaseServiceClient(r.dialNoCert(t))
	reader := r.token("bob", "acme", string(authn.ScopeLeaseRead))
	if _, err := lc.GetLease(bearer(ctxT(t), reader), &leasev1.GetLeaseRequest{Id: victim.GetId()}); err != nil {
		t.Fatalf("a reader cannot read its tenant's lease: %v", err)
	}
	_, err := lc.CancelLease(bearer(ctxT(t), reader), &leasev1.CancelLeaseRequest{Id: victim.GetId()})
	wantRefused(t, err, codes.PermissionDenied, "MISSING_SCOPE")
	_, err = lc.CreateLease(bearer(ctxT(t), reader), createReq("k", "acme"))
	wantRefused(t, err, codes.PermissionDenied, "MISSING_SCOPE")
	_, err = nodev1.NewNodeServiceClient(r.dialNoCert(t)).ListNodes(bearer(ctxT(t), reader), &nodev1.ListNodesRequest{})
	wantRefused(t, err, codes.PermissionDenied, "MISSING_SCOPE")
	if e := r.denial(t, rpcCancelLease, "MISSING_SCOPE"); e.Actor != "oidc:bob" || e.Tenant != "acme" {
		t.Fatalf("audit entry = %+v", e)
	}
	if after := r.snapshot(t); after != before {
		t.Fatalf("state changed:\n%s\n%s", before, after)
	}
}

// TestAttackCrossTenant: a caller of tenant acme reads, cancels, extends
// and lists tenant globex's leases. Another tenant's lease is NotFound,
// like a missing one; lists are confined.
func TestAttackCrossTenant(t *testing.T) {
	r := newRig(t, rigOptions{})
	own := r.seedLease(t, "acme")
	theirs := r.seedLease(t, "globex")
	before := r.snapshot(t)
	lc := leasev1.NewLeaseServiceClient(r.dialNoCert(t))
	tok := r.token("bob", "acme", string(authn.ScopeLeaseRead), string(authn.ScopeLeaseWrite))
	ctx := bearer(ctxT(t), tok)

	_, err := lc.GetLease(ctx, &leasev1.GetLeaseRequest{Id: theirs.GetId()})
	wantRefused(t, err, codes.NotFound, "LEASE_NOT_FOUND")
	_, missing := lc.GetLease(ctx, &leasev1.GetLeaseRequest{Id: "l-aaaaaaaaaaaaaaaaaaaa"})
	if status.Convert(err).Message() != strings.Replace(status.Convert(missing).Message(), "l-aaaaaaaaaaaaaaaaaaaa", theirs.GetId(), 1) {
		t.Fatalf("another tenant's lease is distinguishable from a missing one: %v vs %v", err, missing)
	}
	_, err = lc.CancelLease(ctx, &leasev1.CancelLeaseRequest{Id: theirs.GetId()})
	wantRefused(t, err, codes.NotFound, "LEASE_NOT_FOUND")
	_, err = lc.CreateLease(ctx, createReq("k", "globex"))
	wantRefused(t, err, codes.PermissionDenied, "TENANT_MISMATCH")
	_, err = lc.ListLeases(ctx, &leasev1.ListLeasesRequest{Tenant: "globex"})
	wantRefused(t, err, codes.PermissionDenied, "TENANT_MISMATCH")
	list, err := lc.ListLeases(ctx, &leasev1.ListLeasesRequest{})
	if err != nil || len(list.GetLeases()) != 1 || list.GetLeases()[0].GetId() != own.GetId() {
		t.Fatalf("list of tenant acme = %v %v, want only %s", list, err, own.GetId())
	}
	// Watching: another tenant explicitly is refused; an unfiltered watch
	// streams only the caller's tenant.
	wctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	ws, err := lc.WatchLeases(wctx, &leasev1.WatchLeasesRequest{Tenant: "globex"})
	if err == nil {
		_, err = ws.Recv()
	}
	wantRefused(t, err, codes.PermissionDenied, "TENANT_MISMATCH")
	ws, err = lc.WatchLeases(wctx, &leasev1.WatchLeasesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	first, err := ws.Recv()
	if err != nil || first.GetLease().GetId() != own.GetId() {
		t.Fatalf("first watched lease = %v %v, want %s", first, err, own.GetId())
	}
	cancel()
	for {
		m, err := ws.Recv()
		if err != nil {
			break
		}
		if m.GetLease().GetSpec().GetTenant() != "acme" {
			t.Fatalf("watch leaked tenant %s's lease %s", m.GetLease().GetSpec().GetTenant(), m.GetLease().GetId())
		}
	}
	if after := r.snapshot(t); after != before {
		t.Fatalf("state changed:\n%s\n%s", before, after)
	}
	// Every refusal is audited: the PermissionDenied ones by the edge
	// (a handler's denial), the NotFound ones because the lease service
	// marks them authn.ErrOtherTenant.
	for _, d := range []struct{ resource, reason string }{
		{rpcCreateLease, "TENANT_MISMATCH"},
		{rpcListLeases, "TENANT_MISMATCH"},
		{"rpc:/gpuaas.lease.v1.LeaseService/WatchLeases", "TENANT_MISMATCH"},
		{rpcGetLease, "OTHER_TENANT"},
		{rpcCancelLease, "OTHER_TENANT"},
	} {
		if e := r.denial(t, d.resource, d.reason); e.Actor != "oidc:bob" || e.Tenant != "acme" {
			t.Fatalf("audit entry = %+v", e)
		}
	}
}

// TestPlatformCallersSeeEveryTenant: an allowlisted operator SVID and an
// admin token are platform admins.
func TestPlatformCallersSeeEveryTenant(t *testing.T) {
	r := newRig(t, rigOptions{})
	theirs := r.seedLease(t, "globex")
	op := leasev1.NewLeaseServiceClient(r.dialSVID(t, r.svidSource(t, r.pki.Operators["alice"])))
	if _, err := op.GetLease(ctxT(t), &leasev1.GetLeaseRequest{Id: theirs.GetId()}); err != nil {
		t.Fatalf("operator svid: %v", err)
	}
	admin := r.token("root", "acme", adminScope)
	lc := leasev1.NewLeaseServiceClient(r.dialNoCert(t))
	if _, err := lc.GetLease(bearer(ctxT(t), admin), &leasev1.GetLeaseRequest{Id: theirs.GetId()}); err != nil {
		t.Fatalf("admin token: %v", err)
	}
	if _, err := nodev1.NewNodeServiceClient(r.dialNoCert(t)).ListNodes(bearer(ctxT(t), admin), &nodev1.ListNodesRequest{}); err != nil {
		t.Fatalf("admin token on nodes: %v", err)
	}
}

func TestAttackBurstOverTheRateLimit(t *testing.T) {
	r := newRig(t, rigOptions{rate: api.RateLimitOptions{PerSecond: 0.01, Burst: 5}})
	victim := r.seedLease(t, "acme")
	before := r.snapshot(t)
	lc := leasev1.NewLeaseServiceClient(r.dialNoCert(t))
	tok := r.token("bob", "acme", string(authn.ScopeLeaseRead))
	ok, limited := 0, 0
	var trailer metadata.MD
	for range 20 {
		var tr metadata.MD
		_, err := lc.GetLease(bearer(ctxT(t), tok), &leasev1.GetLeaseRequest{Id: victim.GetId()}, grpc.Trailer(&tr))
		switch status.Code(err) {
		case codes.OK:
			ok++
		case codes.ResourceExhausted:
			limited++
			wantRefused(t, err, codes.ResourceExhausted, "RATE_LIMITED")
			trailer = tr
		default:
			t.Fatalf("unexpected: %v", err)
		}
	}
	if ok != 5 || limited != 15 {
		t.Fatalf("%d served, %d limited; want 5 and 15 (burst 5)", ok, limited)
	}
	if ra := trailer["retry-after"]; len(ra) != 1 || ra[0] == "0" || ra[0] == "" {
		t.Fatalf("retry-after trailer = %v", trailer)
	}
	// Another identity is not limited by bob's burst.
	if _, err := lc.GetLease(bearer(ctxT(t), r.token("carol", "acme", "lease:read")), &leasev1.GetLeaseRequest{Id: victim.GetId()}); err != nil {
		t.Fatalf("another identity: %v", err)
	}
	if e := r.denial(t, rpcGetLease, "RATE_LIMITED"); e.Actor != "oidc:bob" {
		t.Fatalf("audit entry = %+v", e)
	}
	if after := r.snapshot(t); after != before {
		t.Fatalf("state changed:\n%s\n%s", before, after)
	}
}

func TestAttackOversizedRequest(t *testing.T) {
	r := newRig(t, rigOptions{limits: api.Limits{MaxRecvMsgSize: 64 << 10}})
	before := r.snapshot(t)
	lc := leasev1.NewLeaseServiceClient(r.dialSVID(t, r.svidSource(t, r.pki.Operators["alice"])))
	req := createReq("big", "acme")
	req.Spec.Workload.Env = map[string]string{"BLOB": strings.Repeat("x", 256<<10)}
	_, err := lc.CreateLease(ctxT(t), req)
	wantRefused(t, err, codes.ResourceExhausted, "")
	if e := r.denial(t, rpcCreateLease, "REQUEST_TOO_LARGE"); e.Details["peer"] != "127.0.0.1" {
		t.Fatalf("audit entry = %+v", e)
	}
	if after := r.snapshot(t); after != before {
		t.Fatalf("state changed:\n%s\n%s", before, after)
	}
}

// TestUnauthenticatedCallsNeverReachTheStore: refusing a call costs no
// store transaction (the denial auditor writes later, in batches, within
// its budget).
func TestUnauthenticatedCallsNeverReachTheStore(t *testing.T) {
	r := newRig(t, rigOptions{})
	victim := r.seedLease(t, "acme")
	views, updates := r.counted.views.Load(), r.counted.updates.Load()
	conn := r.dialNoCert(t)
	lc := leasev1.NewLeaseServiceClient(conn)
	forged := authntest.Raw(map[string]any{"alg": "none", "kid": "rsa-1"}, r.claims("x", nil), nil)
	for range 50 {
		_, err := lc.GetLease(ctxT(t), &leasev1.GetLeaseRequest{Id: victim.GetId()})
		wantRefused(t, err, codes.Unauthenticated, "NO_CREDENTIALS")
		_, err = lc.CreateLease(bearer(ctxT(t), forged), createReq("k", "acme"))
		wantRefused(t, err, codes.Unauthenticated, "TOKEN_ALG_NOT_ALLOWED")
		_, err = nodev1.NewNodeServiceClient(conn).ListNodes(ctxT(t), &nodev1.ListNodesRequest{})
		wantRefused(t, err, codes.Unauthenticated, "NO_CREDENTIALS")
	}
	if v, u := r.counted.views.Load()-views, r.counted.updates.Load()-updates; v != 0 || u != 0 {
		t.Fatalf("refused calls ran %d read and %d write transactions", v, u)
	}
	// ...and the flood is audited within budget.
	if err := r.denials.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	denied, suppressed := 0, 0
	for _, e := range r.entries(t) {
		switch e.Action {
		case api.ActionDenied:
			denied++
		case api.ActionDeniedSuppressed:
			suppressed++
		}
	}
	if denied != api.DefaultDenialsPerIdentity || suppressed != 1 {
		t.Fatalf("%d denial entries and %d summaries for 150 refusals from one peer; want %d and 1", denied, suppressed, api.DefaultDenialsPerIdentity)
	}
}
