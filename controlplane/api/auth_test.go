package api

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/gpuaas/gpuaas/pkg/authn"
	"github.com/gpuaas/gpuaas/pkg/errs"
	"github.com/gpuaas/gpuaas/pkg/identity"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	auditv1 "github.com/gpuaas/gpuaas/proto/gpuaas/audit/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

// servedProtos are the contracts the control plane serves; notServed are
// contracts of services it only calls.
var (
	servedProtos = []protoreflect.FileDescriptor{
		agentv1.File_gpuaas_agent_v1_agent_proto,
		leasev1.File_gpuaas_lease_v1_lease_proto,
		nodev1.File_gpuaas_node_v1_node_proto,
	}
	notServed = map[protoreflect.FullName]string{
		"gpuaas.audit.v1.AuditSinkService": "served by the upstream audit sink; the control plane is its client",
	}
	allProtos = append(slices.Clone(servedProtos), auditv1.File_gpuaas_audit_v1_audit_proto)
)

func rpcsOf(fds []protoreflect.FileDescriptor) []string {
	var out []string
	for _, fd := range fds {
		for i := 0; i < fd.Services().Len(); i++ {
			sd := fd.Services().Get(i)
			if _, skip := notServed[sd.FullName()]; skip {
				continue
			}
			for j := 0; j < sd.Methods().Len(); j++ {
				out = append(out, "/"+string(sd.FullName())+"/"+string(sd.Methods().Get(j).Name()))
			}
		}
	}
	return out
}

func TestEveryRPCHasAScope(t *testing.T) {
	rpcs := rpcsOf(allProtos)
	if len(rpcs) < 10 {
		t.Fatalf("only %d RPCs found in the descriptors", len(rpcs))
	}
	for _, m := range rpcs {
		acc, ok := methodRoles[m]
		if !ok {
			t.Errorf("%s is declared in proto/ but not in methodRoles (and docs/security/scopes.md): give it a role and a scope", m)
			continue
		}
		switch acc.Role {
		case RoleOperator:
			if !slices.Contains(authn.AllScopes, acc.Scope) {
				t.Errorf("%s: operator method with scope %q, not one of %v", m, acc.Scope, authn.AllScopes)
			}
		case RoleAgent:
			if acc.Scope != "" {
				t.Errorf("%s: agent method with a token scope %q; agents never use tokens", m, acc.Scope)
			}
		default:
			t.Errorf("%s: unknown role %d", m, acc.Role)
		}
	}
	for m := range methodRoles {
		if !slices.Contains(rpcs, m) {
			t.Errorf("methodRoles lists %s, which no served proto declares", m)
		}
	}
}

// docsTable reads the RPC table of docs/security/scopes.md.
func docsTable(t *testing.T) map[string][2]string {
	t.Helper()
	_, file, _, _ := runtime.Caller(0)
	path := filepath.Join(filepath.Dir(file), "..", "..", "docs", "security", "scopes.md")
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string][2]string{}
	in := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if strings.HasPrefix(line, "## ") {
			in = line == "## RPC table"
			continue
		}
		if !in || !strings.HasPrefix(line, "| `/") {
			continue
		}
		cells := strings.Split(strings.Trim(line, "|"), "|")
		if len(cells) != 3 {
			t.Fatalf("scopes.md: row %q does not have 3 cells", line)
		}
		for i := range cells {
			cells[i] = strings.Trim(strings.TrimSpace(cells[i]), "`")
		}
		if _, dup := out[cells[0]]; dup {
			t.Fatalf("scopes.md: %s listed twice", cells[0])
		}
		out[cells[0]] = [2]string{cells[1], cells[2]}
	}
	return out
}

func TestScopeTableMatchesDocs(t *testing.T) {
	doc := docsTable(t)
	for m, acc := range methodRoles {
		role, scope := "operator", string(acc.Scope)
		if acc.Role == RoleAgent {
			role, scope = "agent", "-"
		}
		got, ok := doc[m]
		if !ok {
			t.Errorf("%s is in methodRoles but not in docs/security/scopes.md", m)
			continue
		}
		if got != [2]string{role, scope} {
			t.Errorf("%s: docs say %v, methodRoles says [%s %s]", m, got, role, scope)
		}
	}
	for m := range doc {
		if _, ok := methodRoles[m]; !ok {
			t.Errorf("docs/security/scopes.md lists %s, which is not in methodRoles", m)
		}
	}
}

// fakeTokens is a TokenVerifier with a fixed set of tokens.
type fakeTokens map[string]authn.Principal

func (f fakeTokens) Verify(_ context.Context, tok string) (authn.Principal, error) {
	if p, ok := f[tok]; ok {
		return p, nil
	}
	return authn.Principal{}, errs.New(errs.ErrUnauthenticated, "TOKEN_SIGNATURE_INVALID", "bearer token signature is invalid")
}

// svidPeer returns a context whose gRPC peer presented an SVID for id.
func svidPeer(t testing.TB, ca *identity.CA, id spiffeid.ID) context.Context {
	t.Helper()
	svid, err := ca.IssueSVID(id, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	return peer.NewContext(context.Background(), &peer.Peer{
		Addr:     &net.TCPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 4000},
		AuthInfo: credentials.TLSInfo{State: tls.ConnectionState{HandshakeComplete: true, PeerCertificates: []*x509.Certificate{svid.Certificates[0]}}},
	})
}

func noPeer() context.Context {
	return peer.NewContext(context.Background(), &peer.Peer{Addr: &net.TCPAddr{IP: net.IPv4(10, 0, 0, 2), Port: 4001},
		AuthInfo: credentials.TLSInfo{State: tls.ConnectionState{HandshakeComplete: true}}})
}

func withBearer(ctx context.Context, vals ...string) context.Context {
	md := metadata.MD{}
	for _, v := range vals {
		md.Append("authorization", v)
	}
	return metadata.NewIncomingContext(ctx, md)
}

func TestAdmitDecisions(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("gpuaas.test")
	ca, err := identity.NewCA(td, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	foreign, err := identity.NewCA(spiffeid.RequireTrustDomainFromString("evil.test"), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	opID, _ := identity.OperatorID(td, "alice")
	agentID, _ := identity.AgentID(td, "node-a")
	foreignOp, _ := identity.OperatorID(foreign.TrustDomain, "alice")
	tokens := fakeTokens{
		"reader":   {Kind: authn.KindToken, Subject: "bob", Tenant: "acme", Scopes: []authn.Scope{authn.ScopeLeaseRead}},
		"notenant": {Kind: authn.KindToken, Subject: "carol", Scopes: []authn.Scope{authn.ScopeLeaseRead}},
		"admin":    {Kind: authn.KindToken, Subject: "root", Tenant: "acme", Admin: true},
	}
	a := Authorizer{TrustDomain: td, Tokens: tokens}
	const (
		get     = "/gpuaas.lease.v1.LeaseService/GetLease"
		create  = "/gpuaas.lease.v1.LeaseService/CreateLease"
		session = "/gpuaas.agent.v1.AgentService/Session"
	)
	cases := []struct {
		name, method string
		ctx          context.Context
		auth         Authorizer
		reason       string // "" = admitted
		id, tenant   string
	}{
		{"operator svid is a platform admin", create, svidPeer(t, ca, opID), a, "", opID.String(), ""},
		{"agent svid on the lease service", get, svidPeer(t, ca, agentID), a, "NOT_AN_OPERATOR", "", ""},
		{"operator svid on the agent session", session, svidPeer(t, ca, opID), a, "NOT_AN_AGENT", "", ""},
		{"agent on its session", session, svidPeer(t, ca, agentID), a, "", agentID.String(), ""},
		{"foreign trust domain", get, svidPeer(t, foreign, foreignOp), a, "FOREIGN_TRUST_DOMAIN", "", ""},
		{"no credentials", get, noPeer(), a, "NO_CREDENTIALS", "", ""},
		{"token with the scope", get, withBearer(noPeer(), "Bearer reader"), a, "", "oidc:bob", "acme"},
		{"token scheme is case-insensitive", get, withBearer(noPeer(), "bearer reader"), a, "", "oidc:bob", "acme"},
		{"token without the scope", create, withBearer(noPeer(), "Bearer reader"), a, "MISSING_SCOPE", "", ""},
		{"token without a tenant", get, withBearer(noPeer(), "Bearer notenant"), a, "NO_TENANT", "", ""},
		{"admin token sees every tenant", create, withBearer(noPeer(), "Bearer admin"), a, "", "oidc:root", ""},
		{"invalid token", get, withBearer(noPeer(), "Bearer forged"), a, "TOKEN_SIGNATURE_INVALID", "", ""},
		{"token wins over the svid", create, withBearer(svidPeer(t, ca, opID), "Bearer reader"), a, "MISSING_SCOPE", "", ""},
		{"token on the agent session", session, withBearer(svidPeer(t, ca, agentID), "Bearer admin"), a, "NOT_AN_AGENT", "", ""},
		{"two authorization headers", get, withBearer(noPeer(), "Bearer reader", "Bearer admin"), a, "TOKEN_MALFORMED", "", ""},
		{"basic auth", get, withBearer(noPeer(), "Basic dXNlcjpwYXNz"), a, "TOKEN_MALFORMED", "", ""},
		{"tokens not configured", get, withBearer(noPeer(), "Bearer reader"), Authorizer{TrustDomain: td}, "TOKENS_NOT_ACCEPTED", "", ""},
		{"unknown method", "/gpuaas.lease.v1.LeaseService/DropTables", svidPeer(t, ca, opID), a, "METHOD_NOT_ALLOWED", "", ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ctx, r := c.auth.admit(c.ctx, c.method, func(metadata.MD) {})
			if c.reason != "" {
				if r == nil || errs.ReasonOf(r.err) != c.reason {
					t.Fatalf("refusal = %+v, want reason %s", r, c.reason)
				}
				return
			}
			if r != nil {
				t.Fatalf("refused: %v (%s)", r.err, errs.ReasonOf(r.err))
			}
			caller, ok := CallerFrom(ctx)
			p, pok := authn.FromContext(ctx)
			if !ok || !pok || caller.ID != c.id || caller.Tenant != c.tenant || p.ID() != c.id {
				t.Fatalf("caller = %+v principal = %+v, want %s tenant %q", caller, p, c.id, c.tenant)
			}
		})
	}
}

func TestUnaryRefusesBeforeTheHandlerAndAuditsIt(t *testing.T) {
	st := openStore(t)
	d := NewDenialAuditor(st, DenialOptions{})
	a := Authorizer{TrustDomain: spiffeid.RequireTrustDomainFromString("gpuaas.test"), Denials: d}
	called := false
	_, err := a.Unary(discard())(noPeer(), nil, &grpc.UnaryServerInfo{FullMethod: "/gpuaas.lease.v1.LeaseService/GetLease"},
		func(context.Context, any) (any, error) { called = true; return nil, nil })
	if called {
		t.Fatal("the handler ran for an unauthenticated call")
	}
	if e := errs.FromStatus(err); !errors.Is(e, errs.ErrUnauthenticated) || errs.ReasonOf(e) != "NO_CREDENTIALS" {
		t.Fatalf("err = %v", err)
	}
	if err := d.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	es := auditEntries(t, st)
	if len(es) != 1 || es[0].Action != ActionDenied || es[0].Actor != UnauthenticatedActor || es[0].Reason != "NO_CREDENTIALS" ||
		es[0].Resource != "rpc:/gpuaas.lease.v1.LeaseService/GetLease" || es[0].Details["peer"] != "10.0.0.2" {
		t.Fatalf("audit = %+v", es)
	}
}

func TestUnaryGetsADefaultDeadline(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("gpuaas.test")
	ca, _ := identity.NewCA(td, time.Hour)
	opID, _ := identity.OperatorID(td, "alice")
	a := Authorizer{TrustDomain: td, UnaryTimeout: time.Minute}
	var left time.Duration
	handler := func(ctx context.Context, _ any) (any, error) {
		d, ok := ctx.Deadline()
		if !ok {
			return nil, errors.New("no deadline")
		}
		left = time.Until(d)
		return nil, nil
	}
	info := &grpc.UnaryServerInfo{FullMethod: "/gpuaas.lease.v1.LeaseService/GetLease"}
	if _, err := a.Unary(discard())(svidPeer(t, ca, opID), nil, info, handler); err != nil || left <= 0 || left > time.Minute {
		t.Fatalf("no deadline given: %v %s", err, left)
	}
	long, cancel := context.WithTimeout(svidPeer(t, ca, opID), time.Hour)
	defer cancel()
	if _, err := a.Unary(discard())(long, nil, info, handler); err != nil || left > time.Minute {
		t.Fatalf("an hour-long deadline was not capped: %v %s", err, left)
	}
}

// ctxStream is a grpc.ServerStream that only has a context.
type ctxStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s ctxStream) Context() context.Context     { return s.ctx }
func (s ctxStream) SetHeader(metadata.MD) error  { return nil }
func (s ctxStream) SetTrailer(metadata.MD)       {}
func (s ctxStream) SendHeader(metadata.MD) error { return nil }

// TestAStreamLivesNoLongerThanItsToken: a watch opened with a bearer token
// ends at the token's expiry with Unauthenticated TOKEN_EXPIRED, so a
// revoked-by-expiry caller cannot keep reading; an SVID's stream is not cut.
func TestAStreamLivesNoLongerThanItsToken(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("gpuaas.test")
	ca, err := identity.NewCA(td, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	opID, _ := identity.OperatorID(td, "alice")
	tokens := fakeTokens{"short": {Kind: authn.KindToken, Subject: "bob", Tenant: "acme", Scopes: []authn.Scope{authn.ScopeLeaseRead},
		Expiry: time.Now().Add(300 * time.Millisecond)}}
	a := Authorizer{TrustDomain: td, Tokens: tokens}
	info := &grpc.StreamServerInfo{FullMethod: "/gpuaas.lease.v1.LeaseService/WatchLeases", IsServerStream: true}
	// The handler runs until its context ends, as WatchLeases does.
	watch := func(_ any, ss grpc.ServerStream) error {
		select {
		case <-ss.Context().Done():
			return ss.Context().Err()
		case <-time.After(time.Minute):
			return errors.New("the stream was not ended")
		}
	}
	log := slog.New(slog.DiscardHandler)
	err = a.Stream(log)(nil, ctxStream{ctx: withBearer(noPeer(), "Bearer short")}, info, watch)
	if e := errs.FromStatus(err); !errors.Is(e, errs.ErrUnauthenticated) || errs.ReasonOf(e) != "TOKEN_EXPIRED" {
		t.Fatalf("a watch past its token's expiry ended with %v", err)
	}
	// An operator SVID's stream has no such deadline.
	ended := make(chan error, 1)
	ctx, cancel := context.WithCancel(svidPeer(t, ca, opID))
	go func() { ended <- a.Stream(log)(nil, ctxStream{ctx: ctx}, info, watch) }()
	select {
	case err := <-ended:
		t.Fatalf("an SVID stream ended by itself: %v", err)
	case <-time.After(500 * time.Millisecond):
	}
	cancel()
	<-ended
}
