package identity

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Dev PKI file layout under the directory given to WriteDevPKI.
const (
	BundleFile  = "bundle.pem"
	CAKeyFile   = "ca-key.pem"
	SVIDFile    = "svid.pem"
	SVIDKeyFile = "svid-key.pem"

	controlPlaneDir = "controlplane"
	agentDirPrefix  = "agent-"
	operatorDirPfx  = "operator-"
)

// Defaults of the development PKI.
const (
	DefaultSVIDTTL = 24 * time.Hour
	DefaultCATTL   = 5 * 365 * 24 * time.Hour
	// backdate is how far NotBefore is set in the past to absorb clock skew.
	backdate = time.Minute
)

// DevPKIOptions configures WriteDevPKI.
type DevPKIOptions struct {
	// TrustDomain is the trust domain name, e.g. "gpuaas.test". Required.
	TrustDomain string
	// Agents are node names; each gets an agent SVID.
	Agents []string
	// Operators are operator names; each gets an operator SVID.
	Operators []string
	// TTL is the lifetime of each SVID; DefaultSVIDTTL if zero.
	TTL time.Duration
	// CATTL is the lifetime of a newly created CA; DefaultCATTL if zero. It
	// is ignored when an existing CA is reused.
	CATTL time.Duration
}

// SVIDFiles names one identity's files.
type SVIDFiles struct {
	ID       spiffeid.ID
	CertPath string
	KeyPath  string
}

// DevPKI describes what WriteDevPKI wrote.
type DevPKI struct {
	Dir         string
	TrustDomain spiffeid.TrustDomain
	// CA is the development CA, usable to mint more SVIDs in tests.
	CA *CA
	// CreatedCA is true when this call created the CA rather than reusing it.
	CreatedCA    bool
	BundlePath   string
	CAKeyPath    string
	ControlPlane SVIDFiles
	Agents       map[string]SVIDFiles
	Operators    map[string]SVIDFiles
}

// WriteDevPKI writes a development PKI under dir: a CA (bundle.pem and
// ca-key.pem), and SVIDs for the control plane, each agent and each operator
// in subdirectories controlplane/, agent-NODE/ and operator-NAME/ (svid.pem,
// svid-key.pem). If dir already holds a CA for the same trust domain it is
// reused, so agents can be added later; the requested SVIDs (and always the
// control plane's) are issued anew. Keys are PKCS#8 ECDSA P-256, mode 0600;
// directories are 0700. Files are replaced atomically, so a running
// FileSource picks up reissued SVIDs.
//
// It never overwrites a CA: a CA for another trust domain, or a ca-key.pem
// without a matching bundle.pem (or the reverse), is an error. The result is
// for development and tests only.
func WriteDevPKI(dir string, opts DevPKIOptions) (*DevPKI, error) {
	td, err := spiffeid.TrustDomainFromString(opts.TrustDomain)
	if err != nil {
		return nil, fmt.Errorf("dev pki: trust domain %q: %w", opts.TrustDomain, err)
	}
	ttl := opts.TTL
	if ttl == 0 {
		ttl = DefaultSVIDTTL
	}
	if ttl < 0 {
		return nil, fmt.Errorf("dev pki: ttl %s is negative", ttl)
	}
	caTTL := opts.CATTL
	if caTTL == 0 {
		caTTL = DefaultCATTL
	}

	// Validate every name before writing anything.
	cpID := ControlPlaneID(td)
	agents := make(map[string]SVIDFiles, len(opts.Agents))
	for _, node := range opts.Agents {
		id, err := AgentID(td, node)
		if err != nil {
			return nil, fmt.Errorf("dev pki: %w", err)
		}
		d := filepath.Join(dir, agentDirPrefix+node)
		agents[node] = SVIDFiles{ID: id, CertPath: filepath.Join(d, SVIDFile), KeyPath: filepath.Join(d, SVIDKeyFile)}
	}
	operators := make(map[string]SVIDFiles, len(opts.Operators))
	for _, name := range opts.Operators {
		id, err := OperatorID(td, name)
		if err != nil {
			return nil, fmt.Errorf("dev pki: %w", err)
		}
		d := filepath.Join(dir, operatorDirPfx+name)
		operators[name] = SVIDFiles{ID: id, CertPath: filepath.Join(d, SVIDFile), KeyPath: filepath.Join(d, SVIDKeyFile)}
	}

	if err := mkdirPrivate(dir); err != nil {
		return nil, fmt.Errorf("dev pki: %w", err)
	}
	bundlePath := filepath.Join(dir, BundleFile)
	caKeyPath := filepath.Join(dir, CAKeyFile)
	ca, err := LoadCA(td, bundlePath, caKeyPath)
	created := false
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if ca, err = NewCA(td, caTTL); err != nil {
			return nil, fmt.Errorf("dev pki: %w", err)
		}
		keyPEM, err := pkcs8PEM(ca.Key)
		if err != nil {
			return nil, fmt.Errorf("dev pki: encode ca key: %w", err)
		}
		if err := writeFileAtomic(caKeyPath, keyPEM, 0o600); err != nil {
			return nil, fmt.Errorf("dev pki: write ca key: %w", err)
		}
		if err := writeFileAtomic(bundlePath, encodeCerts(ca.Cert), 0o644); err != nil {
			return nil, fmt.Errorf("dev pki: write bundle: %w", err)
		}
		created = true
	case err != nil:
		return nil, fmt.Errorf("dev pki: reuse existing ca: %w", err)
	}

	now := time.Now()
	notBefore, notAfter := now.Add(-backdate), now.Add(ttl)
	if notAfter.After(ca.Cert.NotAfter) {
		return nil, fmt.Errorf("dev pki: svid ttl %s outlives the ca, which expires at %s", ttl, ca.Cert.NotAfter.UTC().Format(time.RFC3339))
	}
	issue := func(f SVIDFiles) error {
		if err := mkdirPrivate(filepath.Dir(f.CertPath)); err != nil {
			return err
		}
		svid, err := ca.IssueSVID(f.ID, notBefore, notAfter)
		if err != nil {
			return err
		}
		return WriteSVID(f.CertPath, f.KeyPath, svid)
	}
	cp := SVIDFiles{ID: cpID, CertPath: filepath.Join(dir, controlPlaneDir, SVIDFile), KeyPath: filepath.Join(dir, controlPlaneDir, SVIDKeyFile)}
	all := []SVIDFiles{cp}
	for _, node := range opts.Agents {
		all = append(all, agents[node])
	}
	for _, name := range opts.Operators {
		all = append(all, operators[name])
	}
	for _, f := range all {
		if err := issue(f); err != nil {
			return nil, fmt.Errorf("dev pki: issue %s: %w", f.ID, err)
		}
	}
	return &DevPKI{
		Dir:          dir,
		TrustDomain:  td,
		CA:           ca,
		CreatedCA:    created,
		BundlePath:   bundlePath,
		CAKeyPath:    caKeyPath,
		ControlPlane: cp,
		Agents:       agents,
		Operators:    operators,
	}, nil
}

// CA is a development certificate authority for one trust domain. Its key is
// held in memory; it is for development and tests only.
type CA struct {
	TrustDomain spiffeid.TrustDomain
	Cert        *x509.Certificate
	Key         crypto.Signer
}

// NewCA creates a self-signed ECDSA P-256 CA whose certificate carries the
// trust domain ID (spiffe://TD) as its only URI SAN.
func NewCA(td spiffeid.TrustDomain, ttl time.Duration) (*CA, error) {
	if td.IsZero() {
		return nil, errors.New("new ca: trust domain is empty")
	}
	if ttl <= 0 {
		return nil, fmt.Errorf("new ca: ttl %s is not positive", ttl)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("new ca: generate key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, fmt.Errorf("new ca: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"gpuaas"}, CommonName: "gpuaas development CA " + td.Name()},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(ttl),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{td.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("new ca: create certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("new ca: parse certificate: %w", err)
	}
	return &CA{TrustDomain: td, Cert: cert, Key: key}, nil
}

// LoadCA loads a CA written by WriteDevPKI: the key from keyPath and, from
// the bundle at bundlePath, the CA certificate that matches it. It returns an
// error wrapping fs.ErrNotExist only when neither file exists.
func LoadCA(td spiffeid.TrustDomain, bundlePath, keyPath string) (*CA, error) {
	_, bErr := os.Stat(bundlePath)
	_, kErr := os.Stat(keyPath)
	switch {
	case errors.Is(bErr, fs.ErrNotExist) && errors.Is(kErr, fs.ErrNotExist):
		return nil, fmt.Errorf("load ca: %w: neither %s nor %s exists", fs.ErrNotExist, bundlePath, keyPath)
	case errors.Is(kErr, fs.ErrNotExist):
		return nil, fmt.Errorf("load ca: bundle %s exists but ca key %s does not", bundlePath, keyPath)
	case errors.Is(bErr, fs.ErrNotExist):
		return nil, fmt.Errorf("load ca: ca key %s exists but bundle %s does not", keyPath, bundlePath)
	}
	keyPEM, err := readFileLimited(keyPath)
	if err != nil {
		return nil, fmt.Errorf("load ca: %w", err)
	}
	keyDER, err := decodePrivateKey(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("load ca: key %s: %w", keyPath, err)
	}
	k, err := x509.ParsePKCS8PrivateKey(keyDER)
	if err != nil {
		return nil, fmt.Errorf("load ca: key %s: %w", keyPath, err)
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("load ca: key %s: %T is not a signer", keyPath, k)
	}
	bundlePEM, err := readFileLimited(bundlePath)
	if err != nil {
		return nil, fmt.Errorf("load ca: %w", err)
	}
	certs, err := decodeCertificates(bundlePEM)
	if err != nil {
		return nil, fmt.Errorf("load ca: bundle %s: %w", bundlePath, err)
	}
	pub, ok := signer.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok {
		return nil, fmt.Errorf("load ca: key %s: unsupported key type %T", keyPath, signer)
	}
	for _, c := range certs {
		if !pub.Equal(c.PublicKey) {
			continue
		}
		if !c.IsCA {
			return nil, fmt.Errorf("load ca: certificate for key %s in %s is not a ca", keyPath, bundlePath)
		}
		if len(c.URIs) != 1 || c.URIs[0].String() != td.IDString() {
			return nil, fmt.Errorf("load ca: ca in %s is not for trust domain %q", bundlePath, td.Name())
		}
		return &CA{TrustDomain: td, Cert: c, Key: signer}, nil
	}
	return nil, fmt.Errorf("load ca: no certificate in %s matches key %s", bundlePath, keyPath)
}

// Bundle returns a trust bundle holding only this CA.
func (ca *CA) Bundle() *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(ca.TrustDomain, []*x509.Certificate{ca.Cert})
}

// IssueSVID mints an X509-SVID for id with a fresh ECDSA P-256 key: exactly
// one URI SAN, KeyUsage digitalSignature, ExtKeyUsage serverAuth and
// clientAuth, not a CA, a random 128-bit serial, valid from notBefore to
// notAfter. It deliberately accepts any validity window and any trust domain
// so tests can mint expired and foreign SVIDs; WriteDevPKI applies the sane
// defaults.
func (ca *CA) IssueSVID(id spiffeid.ID, notBefore, notAfter time.Time) (*x509svid.SVID, error) {
	if id.IsZero() || id.Path() == "" {
		return nil, fmt.Errorf("issue svid %q: id must have a trust domain and a path", id)
	}
	if !notAfter.After(notBefore) {
		return nil, fmt.Errorf("issue svid %s: not_after %s is not after not_before %s", id, notAfter, notBefore)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("issue svid %s: generate key: %w", id, err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, fmt.Errorf("issue svid %s: %w", id, err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"gpuaas"}},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		BasicConstraintsValid: true,
		IsCA:                  false,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:                  []*url.URL{id.URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.Key)
	if err != nil {
		return nil, fmt.Errorf("issue svid %s: create certificate: %w", id, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("issue svid %s: parse certificate: %w", id, err)
	}
	return &x509svid.SVID{ID: id, Certificates: []*x509.Certificate{cert}, PrivateKey: key}, nil
}

// WriteSVID writes an SVID's certificate chain and PKCS#8 key as PEM, each
// file replaced atomically (temporary file, fsync, rename); the key is
// written first and is mode 0600. A reader can briefly see the new key with
// the old certificate; FileSource ignores such a mismatched pair until both
// files agree.
func WriteSVID(certPath, keyPath string, svid *x509svid.SVID) error {
	if svid == nil || len(svid.Certificates) == 0 || svid.PrivateKey == nil {
		return errors.New("write svid: incomplete svid")
	}
	keyPEM, err := pkcs8PEM(svid.PrivateKey)
	if err != nil {
		return fmt.Errorf("write svid %s: %w", svid.ID, err)
	}
	if err := writeFileAtomic(keyPath, keyPEM, 0o600); err != nil {
		return fmt.Errorf("write svid %s key: %w", svid.ID, err)
	}
	if err := writeFileAtomic(certPath, encodeCerts(svid.Certificates...), 0o644); err != nil {
		return fmt.Errorf("write svid %s certificate: %w", svid.ID, err)
	}
	return nil
}

func randomSerial() (*big.Int, error) {
	var b [16]byte
	for {
		if _, err := rand.Read(b[:]); err != nil {
			return nil, fmt.Errorf("random serial: %w", err)
		}
		b[0] &= 0x7f // positive in DER without a leading zero byte
		if n := new(big.Int).SetBytes(b[:]); n.Sign() > 0 {
			return n, nil
		}
	}
}

func encodeCerts(certs ...*x509.Certificate) []byte {
	var buf bytes.Buffer
	for _, c := range certs {
		_ = pem.Encode(&buf, &pem.Block{Type: pemCertificate, Bytes: c.Raw})
	}
	return buf.Bytes()
}

func pkcs8PEM(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("marshal pkcs#8 key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: pemPrivateKey, Bytes: der}), nil
}

// mkdirPrivate creates dir (and parents) and makes dir itself mode 0700.
func mkdirPrivate(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create directory %s: %w", dir, err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return fmt.Errorf("chmod directory %s: %w", dir, err)
	}
	return nil
}

// writeFileAtomic replaces path with data: it writes a temporary file in the
// same directory with the final mode, syncs it, renames it over path and
// syncs the directory, so readers see the old or the new file, never a part.
func writeFileAtomic(path string, data []byte, perm os.FileMode) (err error) {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("create temporary file for %s: %w", path, err)
	}
	defer func() {
		if err != nil {
			_ = tmp.Close()
			_ = os.Remove(tmp.Name())
		}
	}()
	if err := tmp.Chmod(perm); err != nil {
		return fmt.Errorf("chmod %s: %w", tmp.Name(), err)
	}
	if _, err := tmp.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", tmp.Name(), err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", tmp.Name(), err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("close %s: %w", tmp.Name(), err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("rename into %s: %w", path, err)
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		_ = d.Close()
	}
	return nil
}
