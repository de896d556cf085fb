package identity_test

import (
	"crypto/tls"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"

	"github.com/gpuaas/gpuaas/pkg/identity"
)

func TestTLSConfigsPinTLS13(t *testing.T) {
	pki := devPKI(t)
	src := static(t, pki.ControlPlane, pki.CA.Bundle())
	for name, c := range map[string]*tls.Config{
		"server": identity.ServerTLSConfig(src, tlsconfig.AuthorizeAny()),
		"client": identity.ClientTLSConfig(src, tlsconfig.AuthorizeAny()),
	} {
		if c.MinVersion != tls.VersionTLS13 || c.MaxVersion != tls.VersionTLS13 {
			t.Errorf("%s: versions %x..%x, want TLS 1.3 only", name, c.MinVersion, c.MaxVersion)
		}
	}
	if s := identity.ServerTLSConfig(src, nil); s.ClientAuth != tls.RequireAnyClientCert || !s.SessionTicketsDisabled {
		t.Errorf("server: ClientAuth=%v SessionTicketsDisabled=%v", s.ClientAuth, s.SessionTicketsDisabled)
	}
}

func TestMTLSHandshake(t *testing.T) {
	pki := devPKI(t)
	bundle := pki.CA.Bundle()
	cp := static(t, pki.ControlPlane, bundle)
	agent := static(t, pki.Agents["n1"], bundle)
	operator := static(t, pki.Operators["alice"], bundle)

	// A second CA for the same trust domain: its SVIDs look right but do not
	// chain to the bundle.
	rogueCA, err := identity.NewCA(td, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	rogueSVID, err := rogueCA.IssueSVID(pki.Agents["n1"].ID, now.Add(-time.Minute), now.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	rogue := identity.StaticSource{SVID: rogueSVID, Bundle: bundle}
	expiredSVID, err := pki.CA.IssueSVID(pki.Agents["n1"].ID, now.Add(-2*time.Hour), now.Add(-time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	expired := identity.StaticSource{SVID: expiredSVID, Bundle: bundle}

	agentsOnly := identity.AuthorizeKinds(td, identity.PeerAgent)
	onlyCP := tlsconfig.AuthorizeID(identity.ControlPlaneID(td))
	tls12 := func(c *tls.Config) *tls.Config {
		c.MinVersion, c.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
		return c
	}

	tests := []struct {
		name   string
		server *tls.Config
		client *tls.Config
		// wantErr is a fragment of the error on the side that refuses.
		wantErr    string
		serverSide bool
	}{
		{
			name:   "agent to control plane",
			server: identity.ServerTLSConfig(cp, agentsOnly),
			client: identity.ClientTLSConfig(agent, onlyCP),
		},
		{
			name:   "operator admitted where operators are",
			server: identity.ServerTLSConfig(cp, identity.AuthorizeKinds(td, identity.PeerAgent, identity.PeerOperator)),
			client: identity.ClientTLSConfig(operator, onlyCP),
		},
		{
			name:       "client svid from another CA",
			server:     identity.ServerTLSConfig(cp, agentsOnly),
			client:     identity.ClientTLSConfig(rogue, onlyCP),
			wantErr:    "certificate signed by unknown authority",
			serverSide: true,
		},
		{
			name:    "server svid from another CA",
			server:  identity.ServerTLSConfig(identity.StaticSource{SVID: rogueSVID, Bundle: bundle}, agentsOnly),
			client:  identity.ClientTLSConfig(agent, tlsconfig.AuthorizeAny()),
			wantErr: "certificate signed by unknown authority",
		},
		{
			name:       "expired client svid",
			server:     identity.ServerTLSConfig(cp, agentsOnly),
			client:     identity.ClientTLSConfig(expired, onlyCP),
			wantErr:    "expired",
			serverSide: true,
		},
		{
			name:    "expired server svid",
			server:  identity.ServerTLSConfig(identity.StaticSource{SVID: expiredSVID, Bundle: bundle}, agentsOnly),
			client:  identity.ClientTLSConfig(agent, tlsconfig.AuthorizeAny()),
			wantErr: "expired",
		},
		{
			name:       "server authorizer rejects operator",
			server:     identity.ServerTLSConfig(cp, agentsOnly),
			client:     identity.ClientTLSConfig(operator, onlyCP),
			wantErr:    "unauthorized peer",
			serverSide: true,
		},
		{
			name:    "client authorizer rejects an agent posing as server",
			server:  identity.ServerTLSConfig(static(t, pki.Agents["n2"], bundle), tlsconfig.AuthorizeAny()),
			client:  identity.ClientTLSConfig(agent, onlyCP),
			wantErr: "unexpected ID",
		},
		{
			name:       "nil authorizer admits nobody",
			server:     identity.ServerTLSConfig(cp, nil),
			client:     identity.ClientTLSConfig(agent, onlyCP),
			wantErr:    "no authorizer",
			serverSide: true,
		},
		{
			name:       "tls 1.2 only client",
			server:     identity.ServerTLSConfig(cp, agentsOnly),
			client:     tls12(identity.ClientTLSConfig(agent, onlyCP)),
			wantErr:    "unsupported versions",
			serverSide: true,
		},
		{
			name:       "client without a certificate",
			server:     identity.ServerTLSConfig(cp, agentsOnly),
			client:     &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}, //nolint:gosec // the point of the test
			wantErr:    "certificate",
			serverSide: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := handshake(t, tt.server, tt.client)
			if tt.wantErr == "" {
				if !res.ok() {
					t.Fatalf("handshake failed: server %v, client %v", res.serverErr, res.clientErr)
				}
				return
			}
			if res.serverErr == nil || res.clientErr == nil {
				t.Fatalf("handshake not refused on both sides: server %v, client %v", res.serverErr, res.clientErr)
			}
			refusing := res.clientErr
			if tt.serverSide {
				refusing = res.serverErr
			}
			if !strings.Contains(refusing.Error(), tt.wantErr) {
				t.Errorf("refusal %q does not mention %q", refusing, tt.wantErr)
			}
		})
	}
}

func TestMTLSPresentsIdentities(t *testing.T) {
	pki := devPKI(t)
	bundle := pki.CA.Bundle()
	res := handshake(t,
		identity.ServerTLSConfig(static(t, pki.ControlPlane, bundle), identity.AuthorizeKinds(td, identity.PeerAgent)),
		identity.ClientTLSConfig(static(t, pki.Agents["n2"], bundle), tlsconfig.AuthorizeID(identity.ControlPlaneID(td))))
	if !res.ok() {
		t.Fatalf("handshake: server %v, client %v", res.serverErr, res.clientErr)
	}
	if got := res.serverSaw.URIs[0].String(); got != "spiffe://gpuaas.test/gpuaas/agent/n2" {
		t.Errorf("server saw %s", got)
	}
	if got := spiffeid.RequireFromURI(res.clientSaw.URIs[0]); got != identity.ControlPlaneID(td) {
		t.Errorf("client saw %s", got)
	}
}

func TestNilSourceFailsClosed(t *testing.T) {
	pki := devPKI(t)
	bundle := pki.CA.Bundle()
	res := handshake(t,
		identity.ServerTLSConfig(nil, tlsconfig.AuthorizeAny()),
		identity.ClientTLSConfig(static(t, pki.Agents["n1"], bundle), tlsconfig.AuthorizeAny()))
	if res.serverErr == nil || !strings.Contains(res.serverErr.Error(), "no identity source") {
		t.Fatalf("server error %v, want a missing identity source", res.serverErr)
	}
}
