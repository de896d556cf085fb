package identity_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/gpuaas/gpuaas/pkg/identity"
)

func TestWriteDevPKI_RoundTrip(t *testing.T) {
	pki := devPKI(t)
	if !pki.CreatedCA {
		t.Error("CreatedCA = false on a fresh directory")
	}

	wantMode := map[string]os.FileMode{
		pki.BundlePath: 0o644,
		pki.CAKeyPath:  0o600,
	}
	wantDirs := []string{pki.Dir}
	all := []identity.SVIDFiles{pki.ControlPlane, pki.Agents["n1"], pki.Agents["n2"], pki.Operators["alice"]}
	for _, f := range all {
		wantMode[f.KeyPath] = 0o600
		wantDirs = append(wantDirs, filepath.Dir(f.CertPath))
	}
	for path, mode := range wantMode {
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != mode {
			t.Errorf("%s mode %v, want %v", path, fi.Mode().Perm(), mode)
		}
	}
	for _, d := range wantDirs {
		fi, err := os.Stat(d)
		if err != nil {
			t.Fatal(err)
		}
		if !fi.IsDir() || fi.Mode().Perm() != 0o700 {
			t.Errorf("%s mode %v, want directory 0700", d, fi.Mode())
		}
	}
	for _, p := range []string{
		filepath.Join(pki.Dir, "controlplane", "svid.pem"),
		filepath.Join(pki.Dir, "agent-n1", "svid-key.pem"),
		filepath.Join(pki.Dir, "operator-alice", "svid.pem"),
	} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("layout: %v", err)
		}
	}

	bundle, err := x509bundle.Load(td, pki.BundlePath)
	if err != nil {
		t.Fatalf("load bundle: %v", err)
	}
	cas := bundle.X509Authorities()
	if len(cas) != 1 {
		t.Fatalf("bundle has %d authorities, want 1", len(cas))
	}
	ca := cas[0]
	if !ca.IsCA || len(ca.URIs) != 1 || ca.URIs[0].String() != "spiffe://gpuaas.test" {
		t.Errorf("ca: IsCA=%v URIs=%v, want a CA with URI SAN spiffe://gpuaas.test", ca.IsCA, ca.URIs)
	}
	assertPKCS8P256(t, pki.CAKeyPath)

	wantIDs := map[string]string{
		pki.ControlPlane.CertPath:       "spiffe://gpuaas.test/gpuaas/controlplane",
		pki.Agents["n1"].CertPath:       "spiffe://gpuaas.test/gpuaas/agent/n1",
		pki.Agents["n2"].CertPath:       "spiffe://gpuaas.test/gpuaas/agent/n2",
		pki.Operators["alice"].CertPath: "spiffe://gpuaas.test/gpuaas/operator/alice",
	}
	serials := map[string]bool{}
	for _, f := range all {
		svid, err := x509svid.Load(f.CertPath, f.KeyPath)
		if err != nil {
			t.Fatalf("load %s: %v", f.CertPath, err)
		}
		if svid.ID.String() != wantIDs[f.CertPath] || svid.ID != f.ID {
			t.Errorf("%s: id %s, want %s", f.CertPath, svid.ID, wantIDs[f.CertPath])
		}
		leaf := svid.Certificates[0]
		if len(leaf.URIs) != 1 || len(leaf.DNSNames) != 0 || len(leaf.IPAddresses) != 0 || len(leaf.EmailAddresses) != 0 {
			t.Errorf("%s: SANs URIs=%v DNS=%v IP=%v, want exactly one URI", f.CertPath, leaf.URIs, leaf.DNSNames, leaf.IPAddresses)
		}
		if leaf.IsCA || leaf.KeyUsage != x509.KeyUsageDigitalSignature {
			t.Errorf("%s: IsCA=%v KeyUsage=%v", f.CertPath, leaf.IsCA, leaf.KeyUsage)
		}
		if len(leaf.ExtKeyUsage) != 2 || leaf.ExtKeyUsage[0] != x509.ExtKeyUsageServerAuth || leaf.ExtKeyUsage[1] != x509.ExtKeyUsageClientAuth {
			t.Errorf("%s: ExtKeyUsage=%v", f.CertPath, leaf.ExtKeyUsage)
		}
		if bits := leaf.SerialNumber.BitLen(); bits < 100 || bits > 128 {
			t.Errorf("%s: serial has %d bits, want a random 128-bit serial", f.CertPath, bits)
		}
		if serials[leaf.SerialNumber.String()] {
			t.Errorf("%s: serial reused", f.CertPath)
		}
		serials[leaf.SerialNumber.String()] = true
		if d := time.Until(leaf.NotBefore); d > -30*time.Second || d < -2*time.Minute {
			t.Errorf("%s: NotBefore %s is not about a minute back", f.CertPath, leaf.NotBefore)
		}
		if d := time.Until(leaf.NotAfter); d < 23*time.Hour || d > 25*time.Hour {
			t.Errorf("%s: NotAfter %s is not about 24h ahead", f.CertPath, leaf.NotAfter)
		}
		if _, _, err := x509svid.Verify(svid.Certificates, bundle); err != nil {
			t.Errorf("%s does not verify against the bundle: %v", f.CertPath, err)
		}
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool(ca), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
			t.Errorf("%s does not verify as a client certificate: %v", f.CertPath, err)
		}
		assertPKCS8P256(t, f.KeyPath)
	}
}

func pool(certs ...*x509.Certificate) *x509.CertPool {
	p := x509.NewCertPool()
	for _, c := range certs {
		p.AddCert(c)
	}
	return p
}

func assertPKCS8P256(t *testing.T, path string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "PRIVATE KEY" {
		t.Fatalf("%s: not a PKCS#8 PEM block", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	ek, ok := k.(*ecdsa.PrivateKey)
	if !ok || ek.Curve != elliptic.P256() {
		t.Fatalf("%s: key %T, want ECDSA P-256", path, k)
	}
}

func TestWriteDevPKI_ReusesCAToAddAgents(t *testing.T) {
	dir := t.TempDir()
	first, err := identity.WriteDevPKI(dir, identity.DevPKIOptions{TrustDomain: "gpuaas.test", Agents: []string{"n1"}})
	if err != nil {
		t.Fatal(err)
	}
	bundleBefore, _ := os.ReadFile(first.BundlePath)
	n1Before, _ := os.ReadFile(first.Agents["n1"].CertPath)

	second, err := identity.WriteDevPKI(dir, identity.DevPKIOptions{TrustDomain: "gpuaas.test", Agents: []string{"n3"}, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if second.CreatedCA {
		t.Error("CreatedCA = true, want the existing CA reused")
	}
	if !second.CA.Cert.Equal(first.CA.Cert) {
		t.Error("CA certificate changed")
	}
	bundleAfter, _ := os.ReadFile(second.BundlePath)
	if string(bundleAfter) != string(bundleBefore) {
		t.Error("bundle.pem was rewritten")
	}
	n1After, _ := os.ReadFile(first.Agents["n1"].CertPath)
	if string(n1After) != string(n1Before) {
		t.Error("agent n1 was reissued though not requested")
	}
	bundle, err := x509bundle.Load(td, second.BundlePath)
	if err != nil {
		t.Fatal(err)
	}
	svid, err := x509svid.Load(second.Agents["n3"].CertPath, second.Agents["n3"].KeyPath)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := x509svid.Verify(svid.Certificates, bundle); err != nil {
		t.Errorf("new agent does not chain to the reused CA: %v", err)
	}
	if d := time.Until(svid.Certificates[0].NotAfter); d > 2*time.Hour {
		t.Errorf("TTL not applied: not after in %s", d)
	}
}

func TestWriteDevPKI_Refuses(t *testing.T) {
	t.Run("other trust domain's CA", func(t *testing.T) {
		dir := t.TempDir()
		if _, err := identity.WriteDevPKI(dir, identity.DevPKIOptions{TrustDomain: "one.test"}); err != nil {
			t.Fatal(err)
		}
		_, err := identity.WriteDevPKI(dir, identity.DevPKIOptions{TrustDomain: "two.test"})
		if err == nil || !strings.Contains(err.Error(), "trust domain") {
			t.Fatalf("err = %v, want a trust domain mismatch", err)
		}
	})
	t.Run("ca key without bundle", func(t *testing.T) {
		dir := t.TempDir()
		pki, err := identity.WriteDevPKI(dir, identity.DevPKIOptions{TrustDomain: "gpuaas.test"})
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Remove(pki.BundlePath); err != nil {
			t.Fatal(err)
		}
		_, err = identity.WriteDevPKI(dir, identity.DevPKIOptions{TrustDomain: "gpuaas.test"})
		if err == nil || !strings.Contains(err.Error(), "bundle") {
			t.Fatalf("err = %v, want an error about the missing bundle", err)
		}
		if _, err := os.Stat(pki.BundlePath); !errors.Is(err, os.ErrNotExist) {
			t.Error("a new bundle was written next to the old CA key")
		}
	})
	t.Run("bad names write nothing", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "pki")
		for _, opts := range []identity.DevPKIOptions{
			{TrustDomain: "gpuaas.test", Agents: []string{"ok", "Bad_Name"}},
			{TrustDomain: "gpuaas.test", Operators: []string{"../etc"}},
			{TrustDomain: "not a trust domain"},
			{TrustDomain: ""},
			{TrustDomain: "gpuaas.test", TTL: -time.Hour},
		} {
			if _, err := identity.WriteDevPKI(dir, opts); err == nil {
				t.Errorf("WriteDevPKI(%+v) succeeded", opts)
			}
		}
		if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("directory created despite invalid options: %v", err)
		}
	})
	t.Run("ttl outliving the ca", func(t *testing.T) {
		_, err := identity.WriteDevPKI(t.TempDir(), identity.DevPKIOptions{TrustDomain: "gpuaas.test", TTL: 48 * time.Hour, CATTL: 24 * time.Hour})
		if err == nil {
			t.Fatal("want an error for an svid that outlives its ca")
		}
	})
}

func TestIssueSVID(t *testing.T) {
	ca, err := identity.NewCA(td, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	id := spiffeid.RequireFromString("spiffe://gpuaas.test/gpuaas/agent/x")
	now := time.Now()
	if _, err := ca.IssueSVID(id, now, now); err == nil {
		t.Error("empty validity window accepted")
	}
	if _, err := ca.IssueSVID(spiffeid.ID{}, now, now.Add(time.Hour)); err == nil {
		t.Error("zero id accepted")
	}
	expired, err := ca.IssueSVID(id, now.Add(-2*time.Hour), now.Add(-time.Hour))
	if err != nil {
		t.Fatalf("expired svids must be mintable for tests: %v", err)
	}
	if _, _, err := x509svid.Verify(expired.Certificates, ca.Bundle()); err == nil {
		t.Error("expired svid verified")
	}
	dir := t.TempDir()
	cert, key := filepath.Join(dir, "c.pem"), filepath.Join(dir, "k.pem")
	if err := identity.WriteSVID(cert, key, expired); err != nil {
		t.Fatal(err)
	}
	got, err := x509svid.Load(cert, key)
	if err != nil {
		t.Fatal(err)
	}
	if !got.Certificates[0].Equal(expired.Certificates[0]) {
		t.Error("WriteSVID round trip changed the certificate")
	}
}
