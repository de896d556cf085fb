package attestation_test

import (
	"bytes"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/pkg/attestation"
	"github.com/gpuaas/gpuaas/pkg/attestation/attestationtest"
)

// FuzzDecodeReport: decoding outside bytes never panics, and whatever is
// accepted is canonical (re-encodes to exactly the input).
func FuzzDecodeReport(f *testing.F) {
	good, err := attestation.Encode(attestationtest.Report("node-a", []byte("n"), time.Unix(1_800_000_000, 5)))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"format":"gpuaas.attestation.report/v1"}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := attestation.Decode(b)
		if err != nil {
			return
		}
		again, err := attestation.Encode(r)
		if err != nil {
			t.Fatalf("accepted report does not encode: %v", err)
		}
		if !bytes.Equal(again, b) {
			t.Fatalf("accepted non-canonical bytes:\n%q\n%q", b, again)
		}
	})
}

// FuzzVerifyQuote: TPM structures from a report never panic the verifier.
func FuzzVerifyQuote(f *testing.F) {
	f.Add([]byte{}, []byte{}, []byte{}, []byte{})
	f.Add([]byte{0x00, 0x23, 0x00, 0x0b, 0x00, 0x05, 0x00, 0x72}, []byte{0xff, 0x54, 0x43, 0x47, 0x80, 0x18}, []byte{0x00, 0x18, 0x00, 0x0b}, []byte("q"))
	f.Fuzz(func(t *testing.T, ak, attest, sig, qd []byte) {
		q := &attestation.TPMQuote{AKPublic: ak, Attest: attest, Signature: sig, PCRs: []attestation.PCRValue{{Index: 0, SHA256: "00"}}}
		if err := attestation.VerifyQuote(q, qd); err == nil {
			t.Fatal("a fuzzed quote verified")
		}
	})
}
