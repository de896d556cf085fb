// Package auditsig signs and verifies the agent's own audit events
// (gpuaas.agent.v1.AuditEvent) so that the control plane appends only what
// the agent itself recorded.
//
// The signed payload is a canonical, protobuf-independent encoding of the
// event's fields 1-8 behind a domain-separation prefix and the node id
// (Payload). The signature is made with the agent's current X509-SVID key
// and travels with the signer's certificate chain (leaf first) in one DER
// SEQUENCE, so a verifier can check an event signed before or after an SVID
// rotation: against the session's own peer certificate, or against the
// trust bundle. Agent and control plane both use this package; it imports
// neither of them.
package auditsig

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"encoding/asn1"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
)

// Domain separates these signatures from every other use of the SVID key
// (TLS handshakes, other payloads).
const Domain = "gpuaas-agent-audit-event-v1\n"

// Signature algorithms; each is bound to one key type.
const (
	AlgECDSAP256SHA256 = "ecdsa-p256-sha256"
	AlgECDSAP384SHA384 = "ecdsa-p384-sha384"
	AlgEd25519         = "ed25519"
	AlgRSAPSSSHA256    = "rsa-pss-sha256"
)

// Limits on a signature field (outside input on the control plane).
const (
	MaxSignatureBytes = 16 << 10
	MaxChainCerts     = 4
)

// Errors a verification may return (wrapped with detail). Reason maps them
// to short audit reasons.
var (
	ErrUnsigned        = errors.New("event is not signed")
	ErrMalformed       = errors.New("signature is malformed")
	ErrBadSignature    = errors.New("signature does not verify")
	ErrUntrustedSigner = errors.New("signer certificate is not trusted")
	ErrWrongSigner     = errors.New("signer is not the session's agent")
)

// Reason is a short, stable reason for a verification error, for the audit
// log.
func Reason(err error) string {
	switch {
	case errors.Is(err, ErrUnsigned):
		return "unsigned"
	case errors.Is(err, ErrMalformed):
		return "malformed signature"
	case errors.Is(err, ErrBadSignature):
		return "bad signature"
	case errors.Is(err, ErrUntrustedSigner):
		return "untrusted signer"
	case errors.Is(err, ErrWrongSigner):
		return "wrong signer"
	default:
		return "signature not verified"
	}
}

// Payload is the canonical byte string signed for an event of node: Domain,
// then the node id and fields 1-8 in field order, each string as
// a uvarint length and its bytes, the time as a presence byte, int64
// seconds and int32 nanoseconds (big-endian), and the details as a uvarint
// count and their key/value pairs sorted by key. Signature fields are not
// part of it. The encoding does not depend on protobuf's wire format, which
// is not canonical across implementations.
func Payload(node string, e *agentv1.AuditEvent) []byte {
	n := len(Domain) + len(node) + 64
	for _, s := range []string{e.GetId(), e.GetAction(), e.GetResource(), e.GetOutcome(), e.GetReason(), e.GetLeaseId()} {
		n += len(s) + binary.MaxVarintLen64
	}
	for k, v := range e.GetDetails() {
		n += len(k) + len(v) + 2*binary.MaxVarintLen64
	}
	b := make([]byte, 0, n)
	b = append(b, Domain...)
	str := func(s string) {
		b = binary.AppendUvarint(b, uint64(len(s)))
		b = append(b, s...)
	}
	str(node)
	str(e.GetId())
	if t := e.GetTime(); t != nil {
		b = append(b, 1)
		b = binary.BigEndian.AppendUint64(b, uint64(t.GetSeconds()))
		b = binary.BigEndian.AppendUint32(b, uint32(t.GetNanos()))
	} else {
		b = append(b, 0)
	}
	str(e.GetAction())
	str(e.GetResource())
	str(e.GetOutcome())
	str(e.GetReason())
	str(e.GetLeaseId())
	d := e.GetDetails()
	keys := make([]string, 0, len(d))
	for k := range d {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	b = binary.AppendUvarint(b, uint64(len(keys)))
	for _, k := range keys {
		str(k)
		str(d[k])
	}
	return b
}

// envelope is the DER form of AuditEvent.signature.
type envelope struct {
	Certs []asn1.RawValue
	Sig   []byte
}

// Signer signs events with the current SVID of a source, so that it follows
// rotations: each Sign uses whatever SVID the source returns then.
type Signer struct {
	src x509svid.Source
}

// NewSigner returns a signer over src (an identity.Source satisfies it).
func NewSigner(src x509svid.Source) *Signer { return &Signer{src: src} }

// Sign sets e's signature and algorithm for node with the source's current
// SVID, replacing any earlier signature.
func (s *Signer) Sign(node string, e *agentv1.AuditEvent) error {
	svid, err := s.src.GetX509SVID()
	if err != nil {
		return fmt.Errorf("sign audit event: %w", err)
	}
	return SignWith(svid, node, e)
}

// SignWith signs e for node with svid's key and attaches svid's chain.
func SignWith(svid *x509svid.SVID, node string, e *agentv1.AuditEvent) error {
	if svid == nil || len(svid.Certificates) == 0 || svid.PrivateKey == nil {
		return errors.New("sign audit event: incomplete svid")
	}
	if len(svid.Certificates) > MaxChainCerts {
		return fmt.Errorf("sign audit event: svid chain of %d certificates (at most %d)", len(svid.Certificates), MaxChainCerts)
	}
	alg, err := algFor(svid.Certificates[0].PublicKey)
	if err != nil {
		return fmt.Errorf("sign audit event: %w", err)
	}
	msg := Payload(node, e)
	var sig []byte
	switch alg {
	case AlgEd25519:
		sig, err = svid.PrivateKey.Sign(rand.Reader, msg, crypto.Hash(0))
	case AlgECDSAP384SHA384:
		d := sha512.Sum384(msg)
		sig, err = svid.PrivateKey.Sign(rand.Reader, d[:], crypto.SHA384)
	case AlgRSAPSSSHA256:
		d := sha256.Sum256(msg)
		sig, err = svid.PrivateKey.Sign(rand.Reader, d[:], &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA256})
	default:
		d := sha256.Sum256(msg)
		sig, err = svid.PrivateKey.Sign(rand.Reader, d[:], crypto.SHA256)
	}
	if err != nil {
		return fmt.Errorf("sign audit event: %w", err)
	}
	env := envelope{Sig: sig}
	for _, c := range svid.Certificates {
		env.Certs = append(env.Certs, asn1.RawValue{FullBytes: c.Raw})
	}
	der, err := asn1.Marshal(env)
	if err != nil {
		return fmt.Errorf("sign audit event: encode: %w", err)
	}
	e.Signature, e.SignatureAlg = der, alg
	return nil
}

// algFor is the algorithm for a certificate's public key.
func algFor(pub any) (string, error) {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256():
			return AlgECDSAP256SHA256, nil
		case elliptic.P384():
			return AlgECDSAP384SHA384, nil
		}
		return "", fmt.Errorf("unsupported ECDSA curve %s", k.Curve.Params().Name)
	case ed25519.PublicKey:
		return AlgEd25519, nil
	case *rsa.PublicKey:
		return AlgRSAPSSSHA256, nil
	}
	return "", fmt.Errorf("unsupported key type %T", pub)
}

// VerifyOptions says what a signature must be checked against.
type VerifyOptions struct {
	// Node is the node the event is claimed for (the session's node).
	Node string
	// ID is the SPIFFE ID the signer certificate must carry (the session
	// peer's ID).
	ID spiffeid.ID
	// PeerLeaf is the certificate the session's peer presented in its
	// verified mTLS handshake; a signer certificate equal to it is trusted
	// without a bundle.
	PeerLeaf *x509.Certificate
	// Bundle verifies any other signer chain (an SVID issued after or
	// before the session's, across a rotation). Nil trusts only PeerLeaf.
	Bundle x509bundle.Source
	// Now is the time chains are verified at (zero: time.Now()).
	Now time.Time
}

// Verified describes a verified signer.
type Verified struct {
	Leaf *x509.Certificate
	// Fingerprint is the hex SHA-256 of the signer's leaf certificate.
	Fingerprint string
}

// Verify checks e's signature: the envelope parses, the leaf carries o.ID,
// the chain is the session's own certificate or verifies against o.Bundle,
// the algorithm is the one for the leaf's key, and the signature verifies
// over Payload(o.Node, e). Errors wrap the Err* values.
func Verify(e *agentv1.AuditEvent, o VerifyOptions) (*Verified, error) {
	raw, alg := e.GetSignature(), e.GetSignatureAlg()
	if len(raw) == 0 && alg == "" {
		return nil, ErrUnsigned
	}
	certs, sig, err := parseEnvelope(raw)
	if err != nil {
		return nil, err
	}
	leaf := certs[0]
	id, err := x509svid.IDFromCert(leaf)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrUntrustedSigner, err)
	}
	if id != o.ID {
		return nil, fmt.Errorf("%w: signed by %s", ErrWrongSigner, id)
	}
	if o.PeerLeaf == nil || !leaf.Equal(o.PeerLeaf) {
		if o.Bundle == nil {
			return nil, fmt.Errorf("%w: not the session's certificate and no bundle to verify it", ErrUntrustedSigner)
		}
		now := o.Now
		if now.IsZero() {
			now = time.Now()
		}
		if _, _, err := x509svid.Verify(certs, o.Bundle, x509svid.WithTime(now)); err != nil {
			return nil, fmt.Errorf("%w: %v", ErrUntrustedSigner, err)
		}
	}
	want, err := algFor(leaf.PublicKey)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrUntrustedSigner, err)
	}
	if alg != want {
		return nil, fmt.Errorf("%w: algorithm %q for a key that signs with %q", ErrBadSignature, alg, want)
	}
	if !check(leaf.PublicKey, alg, Payload(o.Node, e), sig) {
		return nil, ErrBadSignature
	}
	fp := sha256.Sum256(leaf.Raw)
	return &Verified{Leaf: leaf, Fingerprint: hex.EncodeToString(fp[:])}, nil
}

// parseEnvelope decodes a signature field.
func parseEnvelope(raw []byte) ([]*x509.Certificate, []byte, error) {
	if len(raw) == 0 || len(raw) > MaxSignatureBytes {
		return nil, nil, fmt.Errorf("%w: %d bytes (1-%d)", ErrMalformed, len(raw), MaxSignatureBytes)
	}
	var env envelope
	rest, err := asn1.Unmarshal(raw, &env)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	if len(rest) != 0 {
		return nil, nil, fmt.Errorf("%w: %d trailing bytes", ErrMalformed, len(rest))
	}
	if len(env.Certs) == 0 || len(env.Certs) > MaxChainCerts || len(env.Sig) == 0 {
		return nil, nil, fmt.Errorf("%w: %d certificates, %d signature bytes", ErrMalformed, len(env.Certs), len(env.Sig))
	}
	certs := make([]*x509.Certificate, 0, len(env.Certs))
	for i, rv := range env.Certs {
		c, err := x509.ParseCertificate(rv.FullBytes)
		if err != nil {
			return nil, nil, fmt.Errorf("%w: certificate %d: %v", ErrMalformed, i, err)
		}
		certs = append(certs, c)
	}
	return certs, env.Sig, nil
}

// check verifies sig over msg with pub under alg (already matched to pub).
func check(pub any, alg string, msg, sig []byte) bool {
	switch alg {
	case AlgECDSAP256SHA256:
		k, ok := pub.(*ecdsa.PublicKey)
		d := sha256.Sum256(msg)
		return ok && ecdsa.VerifyASN1(k, d[:], sig)
	case AlgECDSAP384SHA384:
		k, ok := pub.(*ecdsa.PublicKey)
		d := sha512.Sum384(msg)
		return ok && ecdsa.VerifyASN1(k, d[:], sig)
	case AlgEd25519:
		k, ok := pub.(ed25519.PublicKey)
		return ok && ed25519.Verify(k, msg, sig)
	case AlgRSAPSSSHA256:
		k, ok := pub.(*rsa.PublicKey)
		d := sha256.Sum256(msg)
		return ok && rsa.VerifyPSS(k, crypto.SHA256, d[:], sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash}) == nil
	}
	return false
}
