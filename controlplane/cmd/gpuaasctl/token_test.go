package main

import (
	"context"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gpuaas/gpuaas/controlplane/api"
	"github.com/gpuaas/gpuaas/controlplane/fleet"
	"github.com/gpuaas/gpuaas/controlplane/lease"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/authn"
	"github.com/gpuaas/gpuaas/pkg/authn/authntest"
	"github.com/gpuaas/gpuaas/pkg/identity"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// TestBearerTokenThroughTheCLI: a platform user with an OIDC token (read
// from a file, never a flag value) and no SVID lists and reads its
// tenant's leases over TLS 1.3 that authenticates the control plane; a
// lease of another tenant is NotFound; an empty token file is refused
// before anything is sent.
func TestBearerTokenThroughTheCLI(t *testing.T) {
	dir := t.TempDir()
	pki, err := identity.WriteDevPKI(filepath.Join(dir, "pki"), identity.DevPKIOptions{TrustDomain: "gpuaas.test"})
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.OpenBolt(filepath.Join(dir, "state.db"), store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	svid, err := x509svid.Load(pki.ControlPlane.CertPath, pki.ControlPlane.KeyPath)
	if err != nil {
		t.Fatal(err)
	}
	key := authntest.NewKey("k1", "ES256")
	idp := authntest.NewProvider(key)
	defer idp.Close()
	verifier, err := authn.NewVerifier(authn.Config{Issuer: idp.Issuer, Audience: "gpuaas", HTTPClient: idp.Client()})
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.DiscardHandler)
	leases := lease.New(lease.Options{Store: st, Logger: log})
	leases.SetFleet(fleet.New(st, log))
	authz := api.Authorizer{TrustDomain: pki.TrustDomain, Tokens: verifier}
	src := identity.StaticSource{SVID: svid, Bundle: pki.CA.Bundle()}
	srv := grpc.NewServer(append([]grpc.ServerOption{grpc.Creds(api.ServerCredentials(src,
		identity.AuthorizeKinds(pki.TrustDomain, identity.PeerAgent, identity.PeerOperator),
		api.TLSOptions{TrustDomain: pki.TrustDomain, ClientCertOptional: true}))}, authz.ServerOptions(log)...)...)
	leasev1.RegisterLeaseServiceServer(srv, &api.LeaseServer{Leases: leases, Store: st, Log: log})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	defer srv.Stop()

	mine, err := leases.Create(context.Background(), lease.Caller{ID: "test"}, &leasev1.CreateLeaseRequest{IdempotencyKey: "a", Spec: &leasev1.LeaseSpec{Tenant: "acme",
		Gpu: &leasev1.GpuRequest{Kind: &leasev1.GpuRequest_MigProfile{MigProfile: "1g.18gb"}}, Workload: &leasev1.Workload{Image: "img"}, Duration: durationpb.New(time.Hour)}})
	if err != nil {
		t.Fatal(err)
	}
	theirs, err := leases.Create(context.Background(), lease.Caller{ID: "test"}, &leasev1.CreateLeaseRequest{IdempotencyKey: "b", Spec: &leasev1.LeaseSpec{Tenant: "umbrella",
		Gpu: &leasev1.GpuRequest{Kind: &leasev1.GpuRequest_MigProfile{MigProfile: "1g.18gb"}}, Workload: &leasev1.Workload{Image: "img"}, Duration: durationpb.New(time.Hour)}})
	if err != nil {
		t.Fatal(err)
	}
	tok := key.Sign(idp.Claims("gpuaas", "carol", map[string]any{"tenant": "acme", "scope": "lease:read", "exp": time.Now().Add(time.Hour).Unix()}))
	tokFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokFile, []byte(tok+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	base := []string{"--addr", lis.Addr().String(), "--bundle", pki.BundlePath, "--token-file", tokFile}

	out, err := ctl(t, append(base, "-o", "json", "lease", "list")...)
	if err != nil {
		t.Fatalf("lease list with a token: %s", describe(err))
	}
	if !strings.Contains(out, mine.GetId()) || strings.Contains(out, theirs.GetId()) {
		t.Fatalf("a tenant's token listed:\n%s", out)
	}
	if _, err := ctl(t, append(base, "lease", "get", theirs.GetId())...); err == nil || !strings.Contains(describe(err), "LEASE_NOT_FOUND") {
		t.Fatalf("another tenant's lease: %v", err)
	}
	if err := os.WriteFile(tokFile, []byte("\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ctl(t, append(base, "lease", "list")...); err == nil || !strings.Contains(err.Error(), "--token-file") {
		t.Fatalf("an empty token file: %v", err)
	}
}
