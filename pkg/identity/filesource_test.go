package identity_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"go.uber.org/goleak"

	"github.com/gpuaas/gpuaas/pkg/identity"
)

func fileSourceConfig(pki *identity.DevPKI, f identity.SVIDFiles) identity.FileSourceConfig {
	return identity.FileSourceConfig{
		CertPath:     f.CertPath,
		KeyPath:      f.KeyPath,
		BundlePath:   pki.BundlePath,
		TrustDomain:  pki.TrustDomain,
		PollInterval: 10 * time.Millisecond,
	}
}

func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestNewFileSource_RejectsBadFiles(t *testing.T) {
	pki := devPKI(t)
	dir := t.TempDir()
	now := time.Now()
	cp := pki.ControlPlane
	agentKey := pki.Agents["n1"].KeyPath

	issueTo := func(name string, id spiffeid.ID, nb, na time.Time) identity.SVIDFiles {
		svid, err := pki.CA.IssueSVID(id, nb, na)
		if err != nil {
			t.Fatal(err)
		}
		f := identity.SVIDFiles{ID: id, CertPath: filepath.Join(dir, name+".pem"), KeyPath: filepath.Join(dir, name+"-key.pem")}
		if err := identity.WriteSVID(f.CertPath, f.KeyPath, svid); err != nil {
			t.Fatal(err)
		}
		return f
	}
	expired := issueTo("expired", cp.ID, now.Add(-2*time.Hour), now.Add(-time.Hour))
	future := issueTo("future", cp.ID, now.Add(time.Hour), now.Add(2*time.Hour))
	foreign := issueTo("foreign", spiffeid.RequireFromString("spiffe://other.test/gpuaas/controlplane"), now.Add(-time.Minute), now.Add(time.Hour))

	rogueCA, err := identity.NewCA(td, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	rogueBundle := filepath.Join(dir, "rogue-bundle.pem")
	writeFile(t, rogueBundle, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: rogueCA.Cert.Raw}))

	garbage := filepath.Join(dir, "garbage.pem")
	writeFile(t, garbage, []byte("not pem at all\n"))
	empty := filepath.Join(dir, "empty.pem")
	writeFile(t, empty, nil)
	truncated := filepath.Join(dir, "truncated.pem")
	c := readFile(t, cp.CertPath)
	writeFile(t, truncated, c[:len(c)/2])
	trailing := filepath.Join(dir, "trailing.pem")
	writeFile(t, trailing, append(append([]byte{}, c...), c[:40]...))

	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	sec1DER, _ := x509.MarshalECPrivateKey(ecKey)
	sec1 := filepath.Join(dir, "sec1.pem")
	writeFile(t, sec1, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: sec1DER}))
	keyAsCert := filepath.Join(dir, "key-as-cert.pem")
	writeFile(t, keyAsCert, readFile(t, cp.KeyPath))

	tests := []struct {
		name               string
		cert, key, bundle  string
		td                 spiffeid.TrustDomain
		wantFile, wantText string
	}{
		{name: "missing certificate", cert: filepath.Join(dir, "nope.pem"), key: cp.KeyPath, bundle: pki.BundlePath, wantFile: "nope.pem", wantText: "no such file"},
		{name: "missing key", cert: cp.CertPath, key: filepath.Join(dir, "nokey.pem"), bundle: pki.BundlePath, wantFile: "nokey.pem", wantText: "no such file"},
		{name: "missing bundle", cert: cp.CertPath, key: cp.KeyPath, bundle: filepath.Join(dir, "nobundle.pem"), wantFile: "nobundle.pem", wantText: "no such file"},
		{name: "garbage certificate", cert: garbage, key: cp.KeyPath, bundle: pki.BundlePath, wantFile: garbage, wantText: "pem"},
		{name: "empty certificate", cert: empty, key: cp.KeyPath, bundle: pki.BundlePath, wantFile: empty, wantText: "no pem blocks"},
		{name: "half-written certificate", cert: truncated, key: cp.KeyPath, bundle: pki.BundlePath, wantFile: truncated, wantText: "pem"},
		{name: "trailing partial block", cert: trailing, key: cp.KeyPath, bundle: pki.BundlePath, wantFile: trailing, wantText: "trailing data"},
		{name: "key file holds a certificate", cert: cp.CertPath, key: cp.CertPath, bundle: pki.BundlePath, wantFile: cp.CertPath, wantText: "PRIVATE KEY"},
		{name: "certificate file holds a key", cert: keyAsCert, key: cp.KeyPath, bundle: pki.BundlePath, wantFile: keyAsCert, wantText: "CERTIFICATE"},
		{name: "sec1 key", cert: cp.CertPath, key: sec1, bundle: pki.BundlePath, wantFile: sec1, wantText: "PKCS#8"},
		{name: "key of another identity", cert: cp.CertPath, key: agentKey, bundle: pki.BundlePath, wantFile: cp.CertPath, wantText: "does not match private key"},
		{name: "garbage bundle", cert: cp.CertPath, key: cp.KeyPath, bundle: garbage, wantFile: garbage, wantText: "pem"},
		{name: "empty bundle", cert: cp.CertPath, key: cp.KeyPath, bundle: empty, wantFile: empty, wantText: "no pem blocks"},
		{name: "bundle of another CA", cert: cp.CertPath, key: cp.KeyPath, bundle: rogueBundle, wantFile: rogueBundle, wantText: "unknown authority"},
		{name: "svid outside the trust domain", cert: foreign.CertPath, key: foreign.KeyPath, bundle: pki.BundlePath, wantFile: foreign.CertPath, wantText: "not in trust domain"},
		{name: "expired svid", cert: expired.CertPath, key: expired.KeyPath, bundle: pki.BundlePath, wantFile: expired.CertPath, wantText: "expired at"},
		{name: "not yet valid svid", cert: future.CertPath, key: future.KeyPath, bundle: pki.BundlePath, wantFile: future.CertPath, wantText: "not valid before"},
		{name: "configured for another trust domain", cert: cp.CertPath, key: cp.KeyPath, bundle: pki.BundlePath, td: spiffeid.RequireTrustDomainFromString("other.test"), wantFile: cp.CertPath, wantText: "not in trust domain"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := identity.FileSourceConfig{CertPath: tt.cert, KeyPath: tt.key, BundlePath: tt.bundle, TrustDomain: td}
			if !tt.td.IsZero() {
				cfg.TrustDomain = tt.td
			}
			src, err := identity.NewFileSource(context.Background(), cfg)
			if err == nil {
				src.Close()
				t.Fatal("NewFileSource succeeded")
			}
			if !strings.Contains(err.Error(), tt.wantFile) || !strings.Contains(err.Error(), tt.wantText) {
				t.Errorf("error %q should name %s and say %q", err, tt.wantFile, tt.wantText)
			}
		})
	}

	t.Run("incomplete config", func(t *testing.T) {
		for _, cfg := range []identity.FileSourceConfig{
			{KeyPath: "k", BundlePath: "b", TrustDomain: td},
			{CertPath: "c", BundlePath: "b", TrustDomain: td},
			{CertPath: "c", KeyPath: "k", TrustDomain: td},
			{CertPath: "c", KeyPath: "k", BundlePath: "b"},
			{CertPath: "c", KeyPath: "k", BundlePath: "b", TrustDomain: td, PollInterval: -time.Second},
		} {
			if src, err := identity.NewFileSource(context.Background(), cfg); err == nil {
				src.Close()
				t.Errorf("NewFileSource(%+v) succeeded", cfg)
			}
		}
	})
}

func TestFileSource_Serves(t *testing.T) {
	pki := devPKI(t)
	src, err := identity.NewFileSource(context.Background(), fileSourceConfig(pki, pki.Agents["n1"]))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	svid, err := src.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	if svid.ID != pki.Agents["n1"].ID {
		t.Errorf("id %s", svid.ID)
	}
	b, err := src.GetX509BundleForTrustDomain(td)
	if err != nil || !b.HasX509Authority(pki.CA.Cert) {
		t.Errorf("bundle: %v", err)
	}
	if _, err := src.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString("other.test")); err == nil {
		t.Error("served a bundle for a foreign trust domain")
	}
}

// TestFileSource_Rotation rewrites the SVID files under a live TLS server
// configuration and checks that new handshakes present the new certificate
// while invalid writes are ignored.
func TestFileSource_Rotation(t *testing.T) {
	pki := devPKI(t)
	logs := &syncBuffer{}
	cfg := fileSourceConfig(pki, pki.ControlPlane)
	cfg.Logger = slog.New(slog.NewTextHandler(logs, nil))
	src, err := identity.NewFileSource(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()

	server := identity.ServerTLSConfig(src, identity.AuthorizeKinds(td, identity.PeerAgent))
	client := identity.ClientTLSConfig(static(t, pki.Agents["n1"], pki.CA.Bundle()), tlsconfig.AuthorizeID(identity.ControlPlaneID(td)))
	presented := func() string {
		t.Helper()
		res := handshake(t, server, client)
		if !res.ok() {
			t.Fatalf("handshake: server %v, client %v", res.serverErr, res.clientErr)
		}
		return res.clientSaw.SerialNumber.String()
	}
	current := func() string {
		svid, err := src.GetX509SVID()
		if err != nil {
			t.Fatal(err)
		}
		return svid.Certificates[0].SerialNumber.String()
	}

	first := presented()
	if first != current() {
		t.Fatalf("handshake presented %s, source holds %s", first, current())
	}

	// A proper rotation: new key and certificate, written atomically.
	now := time.Now()
	next, err := pki.CA.IssueSVID(pki.ControlPlane.ID, now.Add(-time.Minute), now.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if err := identity.WriteSVID(pki.ControlPlane.CertPath, pki.ControlPlane.KeyPath, next); err != nil {
		t.Fatal(err)
	}
	want := next.Certificates[0].SerialNumber.String()
	eventually(t, "the rotated svid", func() bool { return current() == want })
	if got := presented(); got != want {
		t.Fatalf("after rotation the handshake presented %s, want %s (first was %s)", got, want, first)
	}
	if !strings.Contains(logs.String(), "svid rotated") {
		t.Error("rotation not logged")
	}

	// Garbage, a half-written certificate, and a certificate without its
	// key are all ignored: the old SVID keeps serving.
	third, err := pki.CA.IssueSVID(pki.ControlPlane.ID, now.Add(-time.Minute), now.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	thirdCert, thirdKey := filepath.Join(dir, "c.pem"), filepath.Join(dir, "k.pem")
	if err := identity.WriteSVID(thirdCert, thirdKey, third); err != nil {
		t.Fatal(err)
	}
	thirdCertPEM := readFile(t, thirdCert)
	for _, bad := range []struct {
		name string
		data []byte
		says string
	}{
		{"garbage", []byte("\x00\x01 garbage -----BEGIN"), "no complete pem block"},
		{"half written", thirdCertPEM[:len(thirdCertPEM)-30], "no complete pem block"},
		{"certificate before its key", thirdCertPEM, "does not match private key"},
	} {
		writeFile(t, pki.ControlPlane.CertPath, bad.data)
		err := src.Reload()
		if err == nil || !strings.Contains(err.Error(), bad.says) {
			t.Fatalf("%s: Reload = %v, want an error saying %q", bad.name, err, bad.says)
		}
		time.Sleep(5 * cfg.PollInterval) // give the watcher its chances to get it wrong
		if got := presented(); got != want {
			t.Fatalf("%s: handshake presented %s, want the kept %s", bad.name, got, want)
		}
	}
	eventually(t, "the watcher's warning", func() bool {
		return strings.Contains(logs.String(), "ignoring invalid svid files")
	})

	// The key lands: the pair is complete and valid, so it is taken.
	writeFile(t, pki.ControlPlane.KeyPath, readFile(t, thirdKey))
	want3 := third.Certificates[0].SerialNumber.String()
	eventually(t, "the third svid", func() bool { return current() == want3 })
	if got := presented(); got != want3 {
		t.Fatalf("handshake presented %s, want %s", got, want3)
	}
}

func TestFileSource_ExpiryFailsClosed(t *testing.T) {
	pki := devPKI(t)
	now := time.Now()
	short, err := pki.CA.IssueSVID(pki.Agents["n1"].ID, now.Add(-time.Minute), now.Add(1200*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	f := pki.Agents["n1"]
	if err := identity.WriteSVID(f.CertPath, f.KeyPath, short); err != nil {
		t.Fatal(err)
	}
	logs := &syncBuffer{}
	cfg := fileSourceConfig(pki, f)
	cfg.Logger = slog.New(slog.NewTextHandler(logs, nil))
	src, err := identity.NewFileSource(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if _, err := src.GetX509SVID(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "expiry", func() bool {
		_, err := src.GetX509SVID()
		return errors.Is(err, identity.ErrNoIdentity)
	})
	eventually(t, "the expiry logged", func() bool { return strings.Contains(logs.String(), "svid expired") })

	// A handshake with the expired source fails on this side, before any
	// certificate is sent.
	res := handshake(t, identity.ServerTLSConfig(src, tlsconfig.AuthorizeAny()),
		identity.ClientTLSConfig(static(t, pki.ControlPlane, pki.CA.Bundle()), tlsconfig.AuthorizeAny()))
	if res.serverErr == nil || !strings.Contains(res.serverErr.Error(), "expired") {
		t.Fatalf("server error %v, want the expired identity", res.serverErr)
	}
}

func TestFileSource_CloseStopsWatcher(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	pki := devPKI(t)

	src, err := identity.NewFileSource(context.Background(), fileSourceConfig(pki, pki.ControlPlane))
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(30 * time.Millisecond) // let it poll
	if err := src.Close(); err != nil {
		t.Fatal(err)
	}
	if err := src.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := src.GetX509SVID(); err != nil {
		t.Errorf("svid gone after Close: %v", err)
	}

	// Cancelling the context also stops it; Close still returns.
	ctx, cancel := context.WithCancel(context.Background())
	src2, err := identity.NewFileSource(ctx, fileSourceConfig(pki, pki.ControlPlane))
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := src2.Close(); err != nil {
		t.Fatal(err)
	}
}
