package auditsig

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"errors"
	"math/big"
	"net/url"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/gpuaas/gpuaas/pkg/identity"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
)

type pki struct {
	ca *identity.CA
	td spiffeid.TrustDomain
}

func newPKI(t testing.TB) *pki {
	t.Helper()
	td := spiffeid.RequireTrustDomainFromString("gpuaas.test")
	ca, err := identity.NewCA(td, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return &pki{ca: ca, td: td}
}

func (p *pki) svid(t testing.TB, node string) *x509svid.SVID {
	t.Helper()
	id, err := identity.AgentID(p.td, node)
	if err != nil {
		t.Fatal(err)
	}
	s, err := p.ca.IssueSVID(id, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func sampleEvent() *agentv1.AuditEvent {
	return &agentv1.AuditEvent{Id: "n-1", Time: timestamppb.New(time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC)),
		Action: "partition.create", Resource: "gpu/GPU-1/gi/1", Outcome: "success", LeaseId: "l-aaaaaaaaaaaaaaaaaaaa",
		Details: map[string]string{"profile": "1g.18gb", "gi": "1"}}
}

// opts is what the control plane would pass for a session of svid.
func opts(node string, svid *x509svid.SVID, p *pki) VerifyOptions {
	return VerifyOptions{Node: node, ID: svid.ID, PeerLeaf: svid.Certificates[0], Bundle: p.ca.Bundle()}
}

func TestSignedEventVerifiesAgainstTheSessionCertificate(t *testing.T) {
	p := newPKI(t)
	s := p.svid(t, "node-a")
	e := sampleEvent()
	if err := SignWith(s, "node-a", e); err != nil {
		t.Fatal(err)
	}
	if e.GetSignatureAlg() != AlgECDSAP256SHA256 {
		t.Fatalf("alg = %q", e.GetSignatureAlg())
	}
	o := opts("node-a", s, p)
	o.Bundle = nil // the session's own leaf needs no bundle
	v, err := Verify(e, o)
	if err != nil {
		t.Fatal(err)
	}
	if !v.Leaf.Equal(s.Certificates[0]) || len(v.Fingerprint) != 64 {
		t.Fatalf("verified = %+v", v)
	}
	// It survives the wire (the outbox and the session store the proto).
	raw, _ := proto.Marshal(e)
	back := &agentv1.AuditEvent{}
	if err := proto.Unmarshal(raw, back); err != nil {
		t.Fatal(err)
	}
	if _, err := Verify(back, o); err != nil {
		t.Fatalf("after a proto round trip: %v", err)
	}
}

func TestEveryFieldIsCoveredByTheSignature(t *testing.T) {
	p := newPKI(t)
	s := p.svid(t, "node-a")
	tamper := map[string]func(e *agentv1.AuditEvent){
		"id":       func(e *agentv1.AuditEvent) { e.Id = "n-2" },
		"time":     func(e *agentv1.AuditEvent) { e.Time = timestamppb.New(e.GetTime().AsTime().Add(time.Nanosecond)) },
		"no time":  func(e *agentv1.AuditEvent) { e.Time = nil },
		"action":   func(e *agentv1.AuditEvent) { e.Action = "partition.destroy" },
		"resource": func(e *agentv1.AuditEvent) { e.Resource = "gpu/GPU-1/gi/2" },
		"outcome":  func(e *agentv1.AuditEvent) { e.Outcome = "failure" },
		"reason":   func(e *agentv1.AuditEvent) { e.Reason = "x" },
		"lease":    func(e *agentv1.AuditEvent) { e.LeaseId = "l-bbbbbbbbbbbbbbbbbbbb" },
		"detail":   func(e *agentv1.AuditEvent) { e.Details["gi"] = "2" },
		"new key":  func(e *agentv1.AuditEvent) { e.Details["x"] = "" },
		"dropped":  func(e *agentv1.AuditEvent) { delete(e.Details, "gi") },
		// Moving bytes between adjacent fields changes the encoding too.
		"shifted": func(e *agentv1.AuditEvent) { e.Action, e.Resource = e.Action+"g", e.Resource[1:] },
	}
	for name, f := range tamper {
		t.Run(name, func(t *testing.T) {
			e := sampleEvent()
			if err := SignWith(s, "node-a", e); err != nil {
				t.Fatal(err)
			}
			f(e)
			if _, err := Verify(e, opts("node-a", s, p)); !errors.Is(err, ErrBadSignature) {
				t.Fatalf("tampered %s: err = %v", name, err)
			}
		})
	}
	// The node is covered: an event signed for one node does not verify
	// for another under the same key.
	e := sampleEvent()
	if err := SignWith(s, "node-a", e); err != nil {
		t.Fatal(err)
	}
	if _, err := Verify(e, opts("node-b", s, p)); !errors.Is(err, ErrBadSignature) {
		t.Fatalf("other node: %v", err)
	}
}

func TestPayloadIsDeterministicAndDomainSeparated(t *testing.T) {
	a, b := Payload("node-a", sampleEvent()), Payload("node-a", sampleEvent())
	if !bytes.Equal(a, b) {
		t.Fatal("payload differs between two encodings of the same event")
	}
	if !bytes.HasPrefix(a, []byte(Domain)) {
		t.Fatal("payload lacks the domain prefix")
	}
	e := sampleEvent()
	e.Signature, e.SignatureAlg = []byte{1, 2, 3}, "x"
	if !bytes.Equal(Payload("node-a", e), a) {
		t.Fatal("the signature fields are part of the payload")
	}
}

func TestAnotherNodesKeyIsRefused(t *testing.T) {
	p := newPKI(t)
	a, b := p.svid(t, "node-a"), p.svid(t, "node-b")
	e := sampleEvent()
	if err := SignWith(b, "node-a", e); err != nil {
		t.Fatal(err)
	}
	// node-b's SVID is valid in the bundle, but the session is node-a's.
	if _, err := Verify(e, opts("node-a", a, p)); !errors.Is(err, ErrWrongSigner) {
		t.Fatalf("err = %v", err)
	}
}

func TestAForeignCAIsRefused(t *testing.T) {
	p, other := newPKI(t), newPKI(t)
	real := p.svid(t, "node-a")
	forged := other.svid(t, "node-a") // same SPIFFE ID, another CA
	e := sampleEvent()
	if err := SignWith(forged, "node-a", e); err != nil {
		t.Fatal(err)
	}
	if _, err := Verify(e, opts("node-a", real, p)); !errors.Is(err, ErrUntrustedSigner) {
		t.Fatalf("err = %v", err)
	}
	o := opts("node-a", real, p)
	o.Bundle = nil
	if _, err := Verify(e, o); !errors.Is(err, ErrUntrustedSigner) {
		t.Fatalf("without a bundle: %v", err)
	}
}

func TestSigningAcrossAnSVIDRotationVerifiesAgainstTheBundle(t *testing.T) {
	p := newPKI(t)
	old := p.svid(t, "node-a")
	rotated := p.svid(t, "node-a")
	src := &identity.StaticSource{SVID: old}
	signer := NewSigner(src)
	before, after := sampleEvent(), sampleEvent()
	if err := signer.Sign("node-a", before); err != nil {
		t.Fatal(err)
	}
	src.SVID = rotated
	if err := signer.Sign("node-a", after); err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(before.GetSignature(), after.GetSignature()) {
		t.Fatal("the signer did not follow the rotation")
	}
	// The session still presents the old leaf: both verify, the rotated one
	// through the bundle.
	for _, e := range []*agentv1.AuditEvent{before, after} {
		v, err := Verify(e, opts("node-a", old, p))
		if err != nil {
			t.Fatal(err)
		}
		if e == after && !v.Leaf.Equal(rotated.Certificates[0]) {
			t.Fatal("verified against the wrong certificate")
		}
	}
	// And the other way round: a session opened with the new SVID accepts
	// an event signed before the rotation while the old SVID is valid.
	if _, err := Verify(before, opts("node-a", rotated, p)); err != nil {
		t.Fatal(err)
	}
}

func TestExpiredSignerIsRefusedUnlessItIsTheSessionCertificate(t *testing.T) {
	p := newPKI(t)
	live := p.svid(t, "node-a")
	id := live.ID
	expired, err := p.ca.IssueSVID(id, time.Now().Add(-2*time.Hour), time.Now().Add(-time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	e := sampleEvent()
	if err := SignWith(expired, "node-a", e); err != nil {
		t.Fatal(err)
	}
	if _, err := Verify(e, opts("node-a", live, p)); !errors.Is(err, ErrUntrustedSigner) {
		t.Fatalf("err = %v", err)
	}
}

func TestUnsignedAndMalformedSignaturesAreRefused(t *testing.T) {
	p := newPKI(t)
	s := p.svid(t, "node-a")
	o := opts("node-a", s, p)
	if _, err := Verify(sampleEvent(), o); !errors.Is(err, ErrUnsigned) || Reason(err) != "unsigned" {
		t.Fatalf("unsigned: %v", err)
	}
	signed := sampleEvent()
	if err := SignWith(s, "node-a", signed); err != nil {
		t.Fatal(err)
	}
	cases := map[string]func(e *agentv1.AuditEvent){
		"alg only":    func(e *agentv1.AuditEvent) { e.Signature = nil },
		"garbage":     func(e *agentv1.AuditEvent) { e.Signature = []byte("not der") },
		"trailing":    func(e *agentv1.AuditEvent) { e.Signature = append(e.Signature, 0) },
		"huge":        func(e *agentv1.AuditEvent) { e.Signature = make([]byte, MaxSignatureBytes+1) },
		"wrong alg":   func(e *agentv1.AuditEvent) { e.SignatureAlg = AlgEd25519 },
		"missing alg": func(e *agentv1.AuditEvent) { e.SignatureAlg = "" },
	}
	for name, f := range cases {
		e := proto.Clone(signed).(*agentv1.AuditEvent)
		f(e)
		if _, err := Verify(e, o); err == nil || errors.Is(err, ErrUnsigned) {
			t.Fatalf("%s: err = %v", name, err)
		}
	}
}

func TestAKeyThatIsNotTheCertificatesIsRefused(t *testing.T) {
	p := newPKI(t)
	s := p.svid(t, "node-a")
	// Someone with node-a's certificate but another key (a leaked
	// certificate, no key) cannot sign for it.
	thief := &x509svid.SVID{ID: s.ID, Certificates: s.Certificates, PrivateKey: p.svid(t, "node-a").PrivateKey}
	e := sampleEvent()
	if err := SignWith(thief, "node-a", e); err != nil {
		t.Fatal(err)
	}
	if _, err := Verify(e, opts("node-a", s, p)); !errors.Is(err, ErrBadSignature) {
		t.Fatalf("err = %v", err)
	}
}

func FuzzVerify(f *testing.F) {
	p := newPKI(f)
	s := p.svid(f, "node-a")
	e := sampleEvent()
	if err := SignWith(s, "node-a", e); err != nil {
		f.Fatal(err)
	}
	f.Add(e.GetSignature(), e.GetSignatureAlg())
	f.Add([]byte{0x30, 0x00}, AlgECDSAP256SHA256)
	f.Add([]byte{}, "")
	o := opts("node-a", s, p)
	f.Fuzz(func(t *testing.T, sig []byte, alg string) {
		ev := sampleEvent()
		ev.Signature, ev.SignatureAlg = sig, alg
		v, err := Verify(ev, o)
		if err == nil && (v == nil || !v.Leaf.Equal(s.Certificates[0])) {
			t.Fatalf("verified without the session's certificate: %+v", v)
		}
		if err == nil && !bytes.Equal(sig, e.GetSignature()) {
			// A different encoding of a valid signature is possible only
			// through ECDSA malleability; it must still be the real key.
			t.Logf("alternative signature accepted for the real key")
		}
	})
}

func BenchmarkSign(b *testing.B) {
	p := newPKI(b)
	s := p.svid(b, "node-a")
	e := sampleEvent()
	for b.Loop() {
		if err := SignWith(s, "node-a", e); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkVerify(b *testing.B) {
	p := newPKI(b)
	s := p.svid(b, "node-a")
	e := sampleEvent()
	if err := SignWith(s, "node-a", e); err != nil {
		b.Fatal(err)
	}
	o := opts("node-a", s, p)
	for b.Loop() {
		if _, err := Verify(e, o); err != nil {
			b.Fatal(err)
		}
	}
}

// issueWithKey mints an SVID for id with key, signed by p's CA (SPIRE may
// issue EC P-384 or RSA SVIDs; tests also try Ed25519).
func (p *pki) issueWithKey(t *testing.T, id spiffeid.ID, key crypto.Signer) *x509svid.SVID {
	t.Helper()
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, URIs: []*url.URL{id.URL()}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.ca.Cert, key.Public(), p.ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &x509svid.SVID{ID: id, Certificates: []*x509.Certificate{c}, PrivateKey: key}
}

func TestEverySVIDKeyTypeSignsAndVerifies(t *testing.T) {
	p := newPKI(t)
	session := p.svid(t, "node-a")
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	_, ed, _ := ed25519.GenerateKey(rand.Reader)
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	for alg, key := range map[string]crypto.Signer{AlgECDSAP384SHA384: p384, AlgEd25519: ed, AlgRSAPSSSHA256: rsaKey} {
		t.Run(alg, func(t *testing.T) {
			s := p.issueWithKey(t, session.ID, key)
			e := sampleEvent()
			if err := SignWith(s, "node-a", e); err != nil {
				t.Fatal(err)
			}
			if e.GetSignatureAlg() != alg {
				t.Fatalf("alg = %q, want %q", e.GetSignatureAlg(), alg)
			}
			if _, err := Verify(e, opts("node-a", session, p)); err != nil {
				t.Fatal(err)
			}
			e.Reason = "changed"
			if _, err := Verify(e, opts("node-a", session, p)); !errors.Is(err, ErrBadSignature) {
				t.Fatalf("tampered: %v", err)
			}
		})
	}
}
