package storetest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// testCertTTL is the lifetime of the test PKI's certificates: long enough
// for any test, short enough that a leaked key is worthless.
const testCertTTL = 2 * time.Hour

// backdate absorbs clock skew between the test and the TLS stacks.
const backdate = time.Minute

// CertFiles names a PEM certificate and its PEM PKCS#8 key.
type CertFiles struct {
	CertFile string
	KeyFile  string
}

// TestCA is a short-lived ECDSA P-256 certificate authority for tests of
// TLS with client certificates. It writes its certificate and the ones it
// issues into its directory.
type TestCA struct {
	// Cert is the CA certificate.
	Cert *x509.Certificate
	// CAFile is Cert as PEM, for a trust pool.
	CAFile string
	key    *ecdsa.PrivateKey
	dir    string
}

// NewTestCA creates a self-signed CA named name and writes its certificate
// into dir (created 0700 if missing).
func NewTestCA(dir, name string) (*TestCA, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("test ca: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("test ca: generate key: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{Organization: []string{"gpuaas test"}, CommonName: name},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(testCertTTL),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("test ca: create certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("test ca: parse certificate: %w", err)
	}
	caFile := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return nil, fmt.Errorf("test ca: %w", err)
	}
	return &TestCA{Cert: cert, CAFile: caFile, key: key, dir: dir}, nil
}

// IssueClient issues a client certificate whose subject common name is cn
// (etcd's user with --client-cert-auth) and writes it as cn.pem and
// cn-key.pem.
func (ca *TestCA) IssueClient(cn string) (CertFiles, error) {
	return ca.issue(cn, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, nil)
}

// IssueServer issues a certificate for a server on loopback (127.0.0.1,
// ::1 and localhost). It is valid for client authentication too, since
// etcd's gRPC gateway dials its own server with it.
func (ca *TestCA) IssueServer(cn string) (CertFiles, error) {
	return ca.issue(cn, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		func(t *x509.Certificate) {
			t.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}
			t.DNSNames = []string{"localhost"}
		})
}

func (ca *TestCA) issue(cn string, usage []x509.ExtKeyUsage, edit func(*x509.Certificate)) (CertFiles, error) {
	if cn == "" || filepath.Base(cn) != cn {
		return CertFiles{}, fmt.Errorf("test ca: issue: %q is not a plain name", cn)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return CertFiles{}, fmt.Errorf("test ca: issue %s: generate key: %w", cn, err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{Organization: []string{"gpuaas test"}, CommonName: cn},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(testCertTTL),
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           usage,
	}
	if edit != nil {
		edit(tmpl)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.key)
	if err != nil {
		return CertFiles{}, fmt.Errorf("test ca: issue %s: %w", cn, err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return CertFiles{}, fmt.Errorf("test ca: issue %s: %w", cn, err)
	}
	f := CertFiles{CertFile: filepath.Join(ca.dir, cn+".pem"), KeyFile: filepath.Join(ca.dir, cn+"-key.pem")}
	if err := os.WriteFile(f.KeyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return CertFiles{}, fmt.Errorf("test ca: issue %s: %w", cn, err)
	}
	if err := os.WriteFile(f.CertFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return CertFiles{}, fmt.Errorf("test ca: issue %s: %w", cn, err)
	}
	return f, nil
}

// serial is a random positive 127-bit serial number.
func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		// crypto/rand does not fail on supported platforms.
		panic("test ca: random serial: " + err.Error())
	}
	return n.Add(n, big.NewInt(1))
}
