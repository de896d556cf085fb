package attestation_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/pkg/attestation"
	"github.com/gpuaas/gpuaas/pkg/attestation/attestationtest"
)

var (
	td    = attestationtest.TrustDomain
	nonce = []byte("0123456789abcdef0123456789abcdef")
)

func signed(t testing.TB, ca *attestationtest.CA, r *attestation.Report) attestation.Signed {
	t.Helper()
	s, err := attestation.Sign(r, ca.AgentSVID(t, r.Node))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestSignedReportPasses(t *testing.T) {
	ca := attestationtest.NewCA(t)
	now := time.Now()
	s := signed(t, ca, attestationtest.Report("node-a", nonce, now))
	v := attestationtest.Policy().VerifyAndEvaluate(s, attestation.NewVerifier(ca.Bundle(), td, 0), attestationtest.Expected("node-a", nonce, now))
	if v.Status != attestation.StatusPass {
		t.Fatalf("status %s, failed %+v", v.Status, v.Failed())
	}
	for _, name := range []string{"signature", "nonce", "freshness", "agent_digest", "driver_version", "secure_boot", "mig_layout/GPU-0", "leases", "image_digest/lease-1", "fence/lease-1/device", "fence/lease-1/egress"} {
		if c, ok := v.Check(name); !ok || !c.OK {
			t.Errorf("check %s: %+v present %v", name, c, ok)
		}
	}
}

// A tampered report is rejected with the check that caught it named.
func TestTamperedReportIsRejectedWithCheckNamed(t *testing.T) {
	ca := attestationtest.NewCA(t)
	other := attestationtest.NewCA(t)
	now := time.Now()
	good := func() attestation.Signed { return signed(t, ca, attestationtest.Report("node-a", nonce, now)) }

	cases := []struct {
		name   string
		signed func() attestation.Signed
		exp    attestation.Expected
		check  string
		status attestation.Status
	}{
		{"changed agent digest", func() attestation.Signed {
			s := good()
			s.Report = bytes.Replace(s.Report, []byte(attestationtest.AgentSHA256), []byte(strings.Repeat("ef", 32)), 1)
			return s
		}, attestationtest.Expected("node-a", nonce, now), attestation.CheckSignature, attestation.StatusFail},
		{"changed image digest", func() attestation.Signed {
			s := good()
			s.Report = bytes.Replace(s.Report, []byte("sha256:0e0e"), []byte("sha256:0f0e"), 1)
			return s
		}, attestationtest.Expected("node-a", nonce, now), attestation.CheckSignature, attestation.StatusFail},
		{"stale nonce (replayed answer to an earlier challenge)", good,
			attestationtest.Expected("node-a", []byte("a-newer-challenge-nonce-00000000"), now), attestation.CheckNonce, attestation.StatusFail},
		{"nonce beside the report swapped", func() attestation.Signed {
			s := good()
			s.Nonce = []byte("a-newer-challenge-nonce-00000000")
			return s
		}, attestationtest.Expected("node-a", nonce, now), attestation.CheckNonce, attestation.StatusFail},
		{"wrong signer: another node's agent", func() attestation.Signed {
			s, err := attestation.Sign(attestationtest.Report("node-a", nonce, now), ca.AgentSVID(t, "node-b"))
			if err != nil {
				t.Fatal(err)
			}
			return s
		}, attestationtest.Expected("node-a", nonce, now), attestation.CheckSignerID, attestation.StatusFail},
		{"wrong signer: another trust root", func() attestation.Signed {
			s, err := attestation.Sign(attestationtest.Report("node-a", nonce, now), other.AgentSVID(t, "node-a"))
			if err != nil {
				t.Fatal(err)
			}
			return s
		}, attestationtest.Expected("node-a", nonce, now), attestation.CheckSigner, attestation.StatusFail},
		{"report for another node", func() attestation.Signed {
			return signed(t, ca, attestationtest.Report("node-b", nonce, now))
		}, attestationtest.Expected("node-a", nonce, now), attestation.CheckNode, attestation.StatusFail},
		{"re-encoded (pretty printed) report", func() attestation.Signed {
			s := good()
			var buf bytes.Buffer
			if err := json.Indent(&buf, s.Report, "", " "); err != nil {
				t.Fatal(err)
			}
			s.Report = buf.Bytes()
			return s
		}, attestationtest.Expected("node-a", nonce, now), attestation.CheckFormat, attestation.StatusFail},
		{"old report", good, attestationtest.Expected("node-a", nonce, now.Add(10*time.Minute)), attestation.CheckFreshness, attestation.StatusStale},
		{"report from the future", good, attestationtest.Expected("node-a", nonce, now.Add(-10*time.Minute)), attestation.CheckFreshness, attestation.StatusStale},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			v := attestationtest.Policy().VerifyAndEvaluate(tc.signed(), attestation.NewVerifier(ca.Bundle(), td, 0), tc.exp)
			if v.Status != tc.status {
				t.Fatalf("status %s, want %s; failed %+v", v.Status, tc.status, v.Failed())
			}
			c, ok := v.Check(tc.check)
			if !ok || c.OK {
				t.Fatalf("check %s not failed; failed checks %+v", tc.check, v.Failed())
			}
			if c.Expected == "" || c.Actual == "" {
				t.Errorf("check %s lacks expected or actual: %+v", tc.check, c)
			}
		})
	}
}

// Policy failures: every failed check is named, and all of them are listed.
func TestPolicyFailuresAreAllNamed(t *testing.T) {
	now := time.Now()
	r := attestationtest.Report("node-a", nonce, now)
	r.Agent.BinarySHA256 = strings.Repeat("99", 32)
	r.GPU.DriverVersion = "535.0"
	r.Host.SecureBoot = attestation.SecureBootNoEFI
	r.Leases[0].Fences = r.Leases[0].Fences[:1] // egress fence gone
	r.GPU.Devices[0].MIGLayout = r.GPU.Devices[0].MIGLayout[:1]
	r.Leases = append(r.Leases, attestation.LeaseEvidence{LeaseID: "lease-unknown", GPUUUID: "GPU-1"})
	v := attestationtest.Policy().Evaluate(r, attestationtest.Expected("node-a", nonce, now))
	if v.Status != attestation.StatusFail {
		t.Fatalf("status %s", v.Status)
	}
	want := map[string]string{
		"agent_digest":               strings.Repeat("99", 32),
		"driver_version":             "535.0",
		"secure_boot":                attestation.SecureBootNoEFI,
		"fence/lease-1/egress":       "(none)",
		"fence/lease-unknown/device": "(none)",
		"mig_layout/GPU-0":           "profile 9 at 0+4",
		"leases":                     "lease-1 | lease-unknown",
	}
	failed := map[string]attestation.Check{}
	for _, c := range v.Failed() {
		failed[c.Name] = c
	}
	for name, actual := range want {
		c, ok := failed[name]
		if !ok {
			t.Errorf("check %s did not fail", name)
			continue
		}
		if c.Actual != actual {
			t.Errorf("check %s actual %q, want %q", name, c.Actual, actual)
		}
	}
	if c := failed["agent_digest"]; c.Expected != attestationtest.AgentSHA256 {
		t.Errorf("agent_digest expected %q", c.Expected)
	}
}

func TestEmptyPolicyFailsClosedOnAgentDigest(t *testing.T) {
	now := time.Now()
	v := (&attestation.Policy{}).Evaluate(attestationtest.Report("node-a", nonce, now), attestation.Expected{Now: now})
	if c, ok := v.Check(attestation.CheckAgentDigest); v.Status != attestation.StatusFail || !ok || c.OK {
		t.Fatalf("empty policy: %s %+v", v.Status, v.Checks)
	}
}

func TestRequireTPMWithoutQuoteFails(t *testing.T) {
	now := time.Now()
	p := attestationtest.Policy()
	p.RequireTPM = true
	v := p.Evaluate(attestationtest.Report("node-a", nonce, now), attestationtest.Expected("node-a", nonce, now))
	c, ok := v.Check(attestation.CheckTPMQuote)
	if v.Status != attestation.StatusFail || !ok || c.Actual != attestation.TPMNotAvailable {
		t.Fatalf("%s %+v", v.Status, c)
	}
}

func TestEncodingIsCanonical(t *testing.T) {
	now := time.Date(2026, 11, 28, 23, 0, 0, 123, time.FixedZone("x", 3600))
	a := attestationtest.Report("node-a", nonce, now)
	b := attestationtest.Report("node-a", nonce, now.UTC())
	// Same evidence in another order encodes to the same bytes.
	b.GPU.Devices[0], b.GPU.Devices[1] = b.GPU.Devices[1], b.GPU.Devices[0]
	b.Leases[0].Fences[0], b.Leases[0].Fences[1] = b.Leases[0].Fences[1], b.Leases[0].Fences[0]
	ea, err := attestation.Encode(a)
	if err != nil {
		t.Fatal(err)
	}
	eb, err := attestation.Encode(b)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(ea, eb) {
		t.Fatalf("encodings differ:\n%s\n%s", ea, eb)
	}
	if _, err := attestation.Decode(ea); err != nil {
		t.Fatal(err)
	}
	// Absent evidence is stated, never omitted.
	for _, s := range []string{`"cc":{"status":"not available (CC mode off)"`, `"tpm":{"status":"not available (no TPM)","quote":null}`} {
		if !bytes.Contains(ea, []byte(s)) {
			t.Errorf("encoding lacks %s", s)
		}
	}
	for _, bad := range []string{
		strings.Replace(string(ea), `"node":"node-a"`, `"node":"node-a","node":"node-b"`, 1),
		strings.Replace(string(ea), `"node":`, `"Node":`, 1),
		strings.Replace(string(ea), `"leases":[`, `"extra":1,"leases":[`, 1),
		string(ea) + " ",
		strings.Replace(string(ea), Format(), "gpuaas.attestation.report/v0", 1),
	} {
		if _, err := attestation.Decode([]byte(bad)); !errors.Is(err, attestation.ErrMalformed) {
			t.Errorf("accepted a non-canonical report: %v\n%s", err, bad)
		}
	}
}

func Format() string { return attestation.Format }

func TestInvalidUTF8EncodesToADecodableFixpoint(t *testing.T) {
	r := attestationtest.Report("node-a", nonce, time.Now())
	r.Host.KernelCmdline = "root=/dev/sda1 \xff\xfe quiet"
	b, err := attestation.Encode(r)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := attestation.Decode(b); err != nil {
		t.Fatal(err)
	}
}

func TestParsePolicy(t *testing.T) {
	p, err := attestation.ParsePolicy([]byte(`{"allowed_agent_sha256":["aa"],"max_age":"90s","pcrs":[{"index":7,"sha256":"00"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	if time.Duration(p.MaxAge) != 90*time.Second || len(p.PCRs) != 1 {
		t.Fatalf("%+v", p)
	}
	if _, err := attestation.ParsePolicy([]byte(`{"allowed_agent_digests":["aa"]}`)); err == nil {
		t.Fatal("accepted an unknown field")
	}
}

// A caching verifier still checks every report's signature and the
// chain's validity at each report's time, and is safe for concurrent use.
func TestCachingVerifier(t *testing.T) {
	ca := attestationtest.NewCA(t)
	now := time.Now()
	v := attestation.NewVerifier(ca.Bundle(), td, attestation.DefaultChainCacheTTL)
	good := signed(t, ca, attestationtest.Report("node-a", nonce, now))
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for range 20 {
				if _, _, err := v.Verify(good); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()

	tampered := good
	tampered.Report = bytes.Replace(good.Report, []byte(attestationtest.AgentSHA256), []byte(strings.Repeat("ef", 32)), 1)
	var ce *attestation.CheckError
	if _, _, err := v.Verify(tampered); !errors.As(err, &ce) || ce.Check != attestation.CheckSignature {
		t.Fatalf("tampered report through the cache: %v", err)
	}
	// The same SVID signing a report dated after it expired: the cached
	// chain does not cover that time, and the chain check runs again.
	late := signed(t, ca, attestationtest.Report("node-a", nonce, now.Add(3*time.Hour)))
	if _, _, err := v.Verify(late); !errors.As(err, &ce) || ce.Check != attestation.CheckSigner {
		t.Fatalf("report outside the svid's validity: %v", err)
	}
}

// BenchmarkVerifyAndEvaluate is the control plane's cost of one report
// from an agent whose SVID it has seen: decode, cached chain, ECDSA P-256
// signature and policy. Run with -cpu 1 for the per-core figure.
func BenchmarkVerifyAndEvaluate(b *testing.B) {
	benchVerify(b, attestation.DefaultChainCacheTTL)
}

// BenchmarkVerifyAndEvaluateColdChain also builds and verifies the SVID
// chain for every report (a verifier with no cache).
func BenchmarkVerifyAndEvaluateColdChain(b *testing.B) {
	benchVerify(b, 0)
}

func benchVerify(b *testing.B, ttl time.Duration) {
	ca := attestationtest.NewCA(b)
	now := time.Now()
	s := signed(b, ca, attestationtest.Report("node-a", nonce, now))
	p := attestationtest.Policy()
	exp := attestationtest.Expected("node-a", nonce, now)
	verifier := attestation.NewVerifier(ca.Bundle(), td, ttl)
	b.SetBytes(int64(len(s.Report)))
	b.ReportAllocs()
	for b.Loop() {
		if v := p.VerifyAndEvaluate(s, verifier, exp); v.Status != attestation.StatusPass {
			b.Fatal(v.Failed())
		}
	}
}
