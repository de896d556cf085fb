package attestation

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/gpuaas/gpuaas/pkg/identity"
)

// SignatureFormat identifies version 1 of the signature envelope.
const SignatureFormat = "gpuaas.attestation.signature/v1"

// Signature algorithms. Both sign SHA-256 of the exact report bytes.
const (
	AlgECDSASHA256 = "ecdsa-sha256"        // ASN.1 DER ECDSA signature
	AlgRSASHA256   = "rsa-pkcs1v15-sha256" // RSASSA-PKCS1-v1_5
)

// maxEnvelopeSize bounds the signature envelope a verifier will decode.
const maxEnvelopeSize = 64 << 10

// Envelope is the signature of a report with the signer's X509-SVID chain,
// so that a verifier needs nothing but the trust bundle.
type Envelope struct {
	Format string `json:"format"`
	Alg    string `json:"alg"`
	// Chain is the SVID chain in DER, leaf first.
	Chain [][]byte `json:"chain"`
	Sig   []byte   `json:"sig"`
}

// Signed is a report as it travels and is saved: exactly the fields of the
// session's ChallengeResponse (nonce, report, signature), so a saved report
// is that message's protojson form.
type Signed struct {
	Nonce     []byte `json:"nonce"`
	Report    []byte `json:"report"`
	Signature []byte `json:"signature"`
}

// Checks a verification can fail, as named in a Verdict.
const (
	CheckFormat    = "format"
	CheckEnvelope  = "signature_envelope"
	CheckSigner    = "signer"
	CheckSignerID  = "signer_id"
	CheckSignature = "signature"
	CheckNonce     = "nonce"
)

// CheckError is a failed verification check.
type CheckError struct {
	Check    string
	Expected string
	Actual   string
	Err      error
}

func (e *CheckError) Error() string {
	msg := fmt.Sprintf("attestation check %s failed: expected %s, got %s", e.Check, e.Expected, e.Actual)
	if e.Err != nil {
		msg += ": " + e.Err.Error()
	}
	return msg
}

func (e *CheckError) Unwrap() error { return e.Err }

// Sign encodes the report canonically and signs it with the SVID's key.
func Sign(r *Report, svid *x509svid.SVID) (Signed, error) {
	if svid == nil || svid.PrivateKey == nil || len(svid.Certificates) == 0 {
		return Signed{}, errors.New("sign attestation report: no SVID")
	}
	b, err := Encode(r)
	if err != nil {
		return Signed{}, err
	}
	digest := sha256.Sum256(b)
	env := Envelope{Format: SignatureFormat}
	switch svid.PrivateKey.Public().(type) {
	case *ecdsa.PublicKey:
		env.Alg = AlgECDSASHA256
	case *rsa.PublicKey:
		env.Alg = AlgRSASHA256
	default:
		return Signed{}, fmt.Errorf("sign attestation report: unsupported key type %T", svid.PrivateKey.Public())
	}
	env.Sig, err = svid.PrivateKey.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		return Signed{}, fmt.Errorf("sign attestation report: %w", err)
	}
	for _, c := range svid.Certificates {
		env.Chain = append(env.Chain, c.Raw)
	}
	sig, err := json.Marshal(env)
	if err != nil {
		return Signed{}, fmt.Errorf("sign attestation report: %w", err)
	}
	return Signed{Nonce: r.Nonce, Report: b, Signature: sig}, nil
}

// Verify checks a signed report offline: canonical encoding, the signer's
// chain against the bundle (at the report's time), that the signer is the
// agent of the report's node in trust domain td, the signature, and that
// the nonce beside the report is the nonce inside it. It returns the
// decoded report and the signer. A failure is a *CheckError naming the
// check. Freshness and policy are Evaluate's. A verifier of many reports
// uses a Verifier, which caches verified chains.
func Verify(s Signed, bundles x509bundle.Source, td spiffeid.TrustDomain) (*Report, spiffeid.ID, error) {
	return NewVerifier(bundles, td, 0).Verify(s)
}

// DefaultChainCacheTTL is how long a Verifier trusts a chain it verified
// before checking it against the bundle again, which bounds how late a
// bundle rotation that removes a CA takes effect.
const DefaultChainCacheTTL = time.Minute

// maxCachedChains bounds a Verifier's cache; it is emptied when full.
const maxCachedChains = 8192

// Verifier verifies signed reports against one trust domain's bundle. It
// caches each verified SVID chain (by the SHA-256 of its DER) for a TTL,
// so the control plane pays for chain building once per agent SVID, not
// once per report; the report signature is always checked. Safe for
// concurrent use.
type Verifier struct {
	bundles x509bundle.Source
	td      spiffeid.TrustDomain
	ttl     time.Duration
	now     func() time.Time

	mu     sync.Mutex
	chains map[[32]byte]verifiedChain
}

type verifiedChain struct {
	id                  spiffeid.ID
	leaf                *x509.Certificate
	notBefore, notAfter time.Time // the intersection of the chain's validity
	verifiedAt          time.Time
}

// NewVerifier returns a verifier; ttl <= 0 disables the chain cache.
func NewVerifier(bundles x509bundle.Source, td spiffeid.TrustDomain, ttl time.Duration) *Verifier {
	return &Verifier{bundles: bundles, td: td, ttl: ttl, now: time.Now, chains: map[[32]byte]verifiedChain{}}
}

// chain verifies the envelope's chain for a report made at t, from the
// cache when it holds a fresh entry whose validity covers t.
func (v *Verifier) chain(der [][]byte, t time.Time) (spiffeid.ID, *x509.Certificate, error) {
	var key [32]byte
	if v.ttl > 0 {
		h := sha256.New()
		for _, c := range der {
			h.Write(binary.BigEndian.AppendUint32(nil, uint32(len(c))))
			h.Write(c)
		}
		copy(key[:], h.Sum(nil))
		v.mu.Lock()
		e, ok := v.chains[key]
		v.mu.Unlock()
		if ok && v.now().Sub(e.verifiedAt) < v.ttl && !t.Before(e.notBefore) && !t.After(e.notAfter) {
			return e.id, e.leaf, nil
		}
	}
	id, chains, err := x509svid.ParseAndVerify(der, v.bundles, x509svid.WithTime(t))
	if err != nil {
		return spiffeid.ID{}, nil, err
	}
	e := verifiedChain{id: id, leaf: chains[0][0], verifiedAt: v.now()}
	for i, c := range chains[0] {
		if i == 0 || c.NotBefore.After(e.notBefore) {
			e.notBefore = c.NotBefore
		}
		if i == 0 || c.NotAfter.Before(e.notAfter) {
			e.notAfter = c.NotAfter
		}
	}
	if v.ttl > 0 {
		v.mu.Lock()
		if len(v.chains) >= maxCachedChains {
			clear(v.chains)
		}
		v.chains[key] = e
		v.mu.Unlock()
	}
	return e.id, e.leaf, nil
}

// Verify checks a signed report (see the package function Verify).
func (v *Verifier) Verify(s Signed) (*Report, spiffeid.ID, error) {
	td := v.td
	r, err := Decode(s.Report)
	if err != nil {
		return nil, spiffeid.ID{}, &CheckError{Check: CheckFormat, Expected: "canonical " + Format, Actual: "malformed", Err: err}
	}
	if len(s.Signature) > maxEnvelopeSize {
		return r, spiffeid.ID{}, &CheckError{Check: CheckEnvelope, Expected: SignatureFormat, Actual: fmt.Sprintf("%d bytes", len(s.Signature))}
	}
	dec := json.NewDecoder(bytes.NewReader(s.Signature))
	dec.DisallowUnknownFields()
	var env Envelope
	if err := dec.Decode(&env); err != nil || env.Format != SignatureFormat || len(env.Chain) == 0 {
		return r, spiffeid.ID{}, &CheckError{Check: CheckEnvelope, Expected: SignatureFormat, Actual: "malformed", Err: err}
	}
	id, leaf, err := v.chain(env.Chain, r.Time)
	if err != nil {
		return r, spiffeid.ID{}, &CheckError{Check: CheckSigner, Expected: "an X509-SVID chaining to the " + td.String() + " bundle", Actual: "unverified chain", Err: err}
	}
	want, err := identity.AgentID(td, r.Node)
	if err != nil || id != want || r.AgentID != id.String() {
		exp := "agent of node " + r.Node
		if err == nil {
			exp = want.String()
		}
		return r, id, &CheckError{Check: CheckSignerID, Expected: exp, Actual: fmt.Sprintf("signer %s, report agent_id %s", id, r.AgentID)}
	}
	digest := sha256.Sum256(s.Report)
	ok := false
	switch pub := leaf.PublicKey.(type) {
	case *ecdsa.PublicKey:
		ok = env.Alg == AlgECDSASHA256 && ecdsa.VerifyASN1(pub, digest[:], env.Sig)
	case *rsa.PublicKey:
		ok = env.Alg == AlgRSASHA256 && rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], env.Sig) == nil
	}
	if !ok {
		return r, id, &CheckError{Check: CheckSignature, Expected: "valid " + env.Alg + " signature by " + id.String(), Actual: "invalid"}
	}
	if !bytes.Equal(s.Nonce, r.Nonce) {
		return r, id, &CheckError{Check: CheckNonce, Expected: fmt.Sprintf("%x (signed)", r.Nonce), Actual: fmt.Sprintf("%x (beside the report)", s.Nonce)}
	}
	return r, id, nil
}
