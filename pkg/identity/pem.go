package identity

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// PEM block types accepted in SVID, key and bundle files.
const (
	pemCertificate = "CERTIFICATE"
	pemPrivateKey  = "PRIVATE KEY" // PKCS#8 only
)

// maxPEMFileSize bounds what the loader reads; SVIDs and bundles are a few
// kilobytes, so anything larger is not one.
const maxPEMFileSize = 1 << 20

// material is one consistent set of files: an SVID whose key matches its
// leaf and whose chain verifies against the bundle of its trust domain.
type material struct {
	svid   *x509svid.SVID
	bundle *x509bundle.Bundle
}

// parseMaterial parses and cross-checks the contents of the three files. The
// paths only name the files in errors. Errors never include file contents.
func parseMaterial(td spiffeid.TrustDomain, now time.Time, certPath string, certPEM []byte, keyPath string, keyPEM []byte, bundlePath string, bundlePEM []byte) (*material, error) {
	if td.IsZero() {
		return nil, errors.New("trust domain is empty")
	}
	certs, err := decodeCertificates(certPEM)
	if err != nil {
		return nil, fmt.Errorf("svid certificate file %s: %w", certPath, err)
	}
	keyDER, err := decodePrivateKey(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("svid key file %s: %w", keyPath, err)
	}
	authorities, err := decodeCertificates(bundlePEM)
	if err != nil {
		return nil, fmt.Errorf("bundle file %s: %w", bundlePath, err)
	}

	var chain []byte
	for _, c := range certs {
		chain = append(chain, c.Raw...)
	}
	// go-spiffe checks the SVID shape (one SPIFFE URI SAN, non-root path, no
	// CA flag, digitalSignature, signing certs are CAs) and that the key
	// matches the leaf.
	svid, err := x509svid.ParseRaw(chain, keyDER)
	if err != nil {
		return nil, fmt.Errorf("svid %s with key %s: %w", certPath, keyPath, err)
	}
	if !svid.ID.MemberOf(td) {
		return nil, fmt.Errorf("svid %s: spiffe id %s is not in trust domain %q", certPath, svid.ID, td.Name())
	}
	leaf := svid.Certificates[0]
	if now.Before(leaf.NotBefore) {
		return nil, fmt.Errorf("svid %s: not valid before %s", certPath, leaf.NotBefore.UTC().Format(time.RFC3339))
	}
	if now.After(leaf.NotAfter) {
		return nil, fmt.Errorf("svid %s: expired at %s", certPath, leaf.NotAfter.UTC().Format(time.RFC3339))
	}

	bundle := x509bundle.FromX509Authorities(td, authorities)
	if _, _, err := x509svid.Verify(svid.Certificates, bundle, x509svid.WithTime(now)); err != nil {
		return nil, fmt.Errorf("svid %s does not chain to bundle %s: %w", certPath, bundlePath, err)
	}
	return &material{svid: svid, bundle: bundle}, nil
}

// decodeCertificates strictly decodes one or more CERTIFICATE blocks. Text
// before a block is allowed (RFC 7468 explanatory text); anything after the
// last complete block other than white space is not, so a half-written file
// is an error rather than a shorter chain.
func decodeCertificates(data []byte) ([]*x509.Certificate, error) {
	blocks, err := decodeBlocks(data)
	if err != nil {
		return nil, err
	}
	certs := make([]*x509.Certificate, 0, len(blocks))
	for i, b := range blocks {
		if b.Type != pemCertificate {
			return nil, fmt.Errorf("pem block %d is %q, want %q", i, b.Type, pemCertificate)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("pem block %d: parse certificate: %w", i, err)
		}
		certs = append(certs, c)
	}
	return certs, nil
}

// decodePrivateKey strictly decodes exactly one PKCS#8 PRIVATE KEY block and
// returns its DER. The key is parsed later, by go-spiffe.
func decodePrivateKey(data []byte) ([]byte, error) {
	blocks, err := decodeBlocks(data)
	if err != nil {
		return nil, err
	}
	if len(blocks) != 1 {
		return nil, fmt.Errorf("has %d pem blocks, want exactly one %q block", len(blocks), pemPrivateKey)
	}
	b := blocks[0]
	if b.Type != pemPrivateKey {
		return nil, fmt.Errorf("pem block is %q, want a PKCS#8 %q block", b.Type, pemPrivateKey)
	}
	if len(b.Headers) != 0 {
		return nil, errors.New("pem block has headers (encrypted keys are not supported)")
	}
	if _, err := x509.ParsePKCS8PrivateKey(b.Bytes); err != nil {
		return nil, fmt.Errorf("parse pkcs#8 private key: %w", err)
	}
	return b.Bytes, nil
}

func decodeBlocks(data []byte) ([]*pem.Block, error) {
	var blocks []*pem.Block
	rest := data
	for {
		b, r := pem.Decode(rest)
		if b == nil {
			break
		}
		blocks = append(blocks, b)
		rest = r
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		if len(blocks) == 0 {
			return nil, errors.New("no complete pem block")
		}
		return nil, fmt.Errorf("trailing data after pem block %d is not a complete pem block", len(blocks)-1)
	}
	if len(blocks) == 0 {
		return nil, errors.New("no pem blocks")
	}
	return blocks, nil
}

// readFileLimited reads a whole file, refusing files over maxPEMFileSize.
func readFileLimited(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxPEMFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if len(data) > maxPEMFileSize {
		return nil, fmt.Errorf("read %s: larger than %d bytes", path, maxPEMFileSize)
	}
	return data, nil
}
