package identity

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// FuzzParseMaterial feeds arbitrary bytes to the SVID/key/bundle loader:
// it must never panic, must return either an error or a complete validated
// set, and every error must name one of the files. Valid inputs cost a
// signature check each, so run it with a short -fuzzminimizetime (2s) or the
// engine spends its time minimizing.
func FuzzParseMaterial(f *testing.F) {
	td := spiffeid.RequireTrustDomainFromString("gpuaas.test")
	pki, err := WriteDevPKI(f.TempDir(), DevPKIOptions{TrustDomain: td.Name(), Agents: []string{"n1"}})
	if err != nil {
		f.Fatal(err)
	}
	read := func(p string) []byte {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		return b
	}
	cert, key, bundle := read(pki.ControlPlane.CertPath), read(pki.ControlPlane.KeyPath), read(pki.BundlePath)
	agentKey := read(pki.Agents["n1"].KeyPath)
	f.Add(cert, key, bundle)
	f.Add(cert, agentKey, bundle)
	f.Add(bundle, key, cert)
	f.Add(cert[:len(cert)/2], key, bundle)
	f.Add(cert, key[:len(key)-10], bundle)
	f.Add([]byte{}, []byte{}, []byte{})
	f.Add([]byte("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n"), []byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"), bundle)
	f.Add(append(append([]byte{}, cert...), cert...), key, append(append([]byte{}, bundle...), bundle...))

	now := time.Now()
	const certPath, keyPath, bundlePath = "/fuzz/svid.pem", "/fuzz/svid-key.pem", "/fuzz/bundle.pem"
	f.Fuzz(func(t *testing.T, certPEM, keyPEM, bundlePEM []byte) {
		m, err := parseMaterial(td, now, certPath, certPEM, keyPath, keyPEM, bundlePath, bundlePEM)
		if err != nil {
			if m != nil {
				t.Fatal("material returned with an error")
			}
			msg := err.Error()
			if !strings.Contains(msg, certPath) && !strings.Contains(msg, keyPath) && !strings.Contains(msg, bundlePath) {
				t.Fatalf("error names no file: %v", err)
			}
			return
		}
		if m == nil || m.svid == nil || m.bundle == nil || len(m.svid.Certificates) == 0 || m.svid.PrivateKey == nil {
			t.Fatal("incomplete material without an error")
		}
		if !m.svid.ID.MemberOf(td) || m.bundle.Empty() {
			t.Fatalf("accepted %s with %d authorities", m.svid.ID, len(m.bundle.X509Authorities()))
		}
	})
}

// FuzzDecodePEM checks the strict PEM decoders on their own, cheaply: no
// panic, and an accepted result is never empty.
func FuzzDecodePEM(f *testing.F) {
	f.Add([]byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"))
	f.Add([]byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"))
	f.Add([]byte("text before\n-----BEGIN CERTIFICATE-----\n"))
	f.Add([]byte(""))
	f.Fuzz(func(t *testing.T, data []byte) {
		if certs, err := decodeCertificates(data); err == nil && len(certs) == 0 {
			t.Fatal("no certificates and no error")
		}
		if der, err := decodePrivateKey(data); err == nil && len(der) == 0 {
			t.Fatal("no key and no error")
		}
	})
}
