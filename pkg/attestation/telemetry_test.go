package attestation

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
)

func ptr[T any](v T) *T { return &v }

// telemetryPayload is what a host with gpus H200s, each split into seven
// 1g.18gb MIG devices, reports: every field a real device reports (a GPU
// with MIG enabled has no utilization; a MIG device no power, temperature,
// ECC, remapping, clocks or throttle reasons), one lease per MIG device,
// and an XID on the first.
func telemetryPayload(gpus int) *agentv1.TelemetryPayload {
	p := &agentv1.TelemetryPayload{
		NodeId:   "gpu-node-0042.dc1.example.net",
		Sequence: 1_234_567,
		Time:     timestamppb.New(time.Unix(1_800_000_000, 123_456_789)),
		Interval: durationpb.New(10 * time.Second),
	}
	for g := range gpus {
		gpuUUID := fmt.Sprintf("GPU-%08x-1b2c-4d3e-8f40-%012x", 0x5e6f7a8b+g, 0x1a2b3c4d5e6f+g)
		p.Devices = append(p.Devices, &agentv1.DeviceSample{
			Uuid: gpuUUID, GpuUuid: gpuUUID, GpuIndex: uint32(g),
			MemoryUsedMib: ptr(uint64(7 * 18_176)), MemoryFreeMib: ptr(uint64(143_771 - 7*18_176)),
			PowerMilliwatt: ptr(uint32(612_345)), TemperatureC: ptr(uint32(71)),
			EccCorrectedVolatile: ptr(uint64(3)), EccUncorrectedVolatile: ptr(uint64(0)),
			RemappedRowsCorrectable: ptr(uint32(1)), RemappedRowsUncorrectable: ptr(uint32(0)),
			RemapPending: ptr(false), RemapFailed: ptr(false),
			SmClockMhz: ptr(uint32(1980)), MemoryClockMhz: ptr(uint32(3201)),
			ThrottleReasons: ptr(uint64(0x4)),
		})
		for gi := range 7 {
			d := &agentv1.DeviceSample{
				Uuid:    fmt.Sprintf("MIG-%08x-7a6b-5c4d-9e8f-%012x", 0x0a1b2c3d+g*7+gi, 0xa9b8c7d6e5f4+g*7+gi),
				GpuUuid: gpuUUID, GpuIndex: uint32(g), GpuInstanceId: uint32(7 + gi), Profile: "1g.18gb",
				LeaseId: fmt.Sprintf("l-%020d", g*7+gi), Tenant: fmt.Sprintf("tenant-%02d", gi),
				GrEngineActivePct: ptr(uint32(60 + gi*5)),
				MemoryUsedMib:     ptr(uint64(16_128)), MemoryFreeMib: ptr(uint64(2_048)),
			}
			if gi == 0 {
				d.Xids = []uint64{13}
			}
			p.Devices = append(p.Devices, d)
		}
	}
	return p
}

func newTelemetryKey(t testing.TB) *TelemetryKey {
	t.Helper()
	k, err := NewTelemetryKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func signTelemetry(t testing.TB, k *TelemetryKey, p *agentv1.TelemetryPayload) *agentv1.TelemetryReport {
	t.Helper()
	r, err := k.Sign(p)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestTelemetryReportVerifies(t *testing.T) {
	k := newTelemetryKey(t)
	id := k.ID()
	if pub := k.Public(); len(pub) != ed25519.PublicKeySize || TelemetryKeyID(pub) != id {
		t.Fatalf("public key %x, id %x", pub, id)
	}
	want := telemetryPayload(8)
	r := signTelemetry(t, k, want)
	if !bytes.Equal(want.GetKeyId(), id[:]) {
		t.Fatalf("Sign left key_id %x, want %x", want.GetKeyId(), id)
	}
	// The signature is over the context and the SHA-256 of the payload
	// bytes as sent: checkable with nothing but sha256sum and an Ed25519
	// verifier.
	digest := sha256.Sum256(r.GetPayload())
	msg := append([]byte("gpuaas.telemetry/v1\n"), digest[:]...)
	if !ed25519.Verify(k.Public(), msg, r.GetSignature()) {
		t.Fatal("signature is not Ed25519 over context || SHA-256(payload)")
	}
	got, err := VerifyTelemetry(r, k.Public())
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(got, want) {
		t.Fatalf("verified payload differs from the signed one:\n%v\n%v", got, want)
	}
}

// A report that was changed, signed by another key, not signed, about
// another key, oversized or undecodable is refused with the check named.
func TestTamperedTelemetryIsRejectedWithCheckNamed(t *testing.T) {
	k := newTelemetryKey(t)
	other := newTelemetryKey(t)
	good := func() *agentv1.TelemetryReport { return signTelemetry(t, k, telemetryPayload(1)) }

	cases := []struct {
		name     string
		report   func() *agentv1.TelemetryReport
		pub      []byte
		check    string
		unsigned bool
	}{
		{"payload byte flipped", func() *agentv1.TelemetryReport {
			r := good()
			r.Payload[len(r.Payload)/2] ^= 0x01
			return r
		}, k.Public(), CheckTelemetrySignature, false},
		{"signature byte flipped", func() *agentv1.TelemetryReport {
			r := good()
			r.Signature[0] ^= 0x80
			return r
		}, k.Public(), CheckTelemetrySignature, false},
		{"truncated signature", func() *agentv1.TelemetryReport {
			r := good()
			r.Signature = r.Signature[:63]
			return r
		}, k.Public(), CheckTelemetrySignature, false},
		{"signed by another key", func() *agentv1.TelemetryReport {
			return signTelemetry(t, other, telemetryPayload(1))
		}, k.Public(), CheckTelemetrySignature, false},
		{"verified against another key", good, other.Public(), CheckTelemetrySignature, false},
		{"missing signature", func() *agentv1.TelemetryReport {
			r := good()
			r.Signature = nil
			return r
		}, k.Public(), CheckTelemetrySignature, true},
		{"nil report", func() *agentv1.TelemetryReport { return nil }, k.Public(), CheckTelemetrySignature, true},
		{"no attested key", good, nil, CheckTelemetryKey, false},
		{"short attested key", good, k.Public()[:31], CheckTelemetryKey, false},
		{"oversized", func() *agentv1.TelemetryReport {
			return &agentv1.TelemetryReport{Payload: make([]byte, MaxTelemetryReport+1), Signature: make([]byte, 64)}
		}, k.Public(), CheckTelemetryPayload, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p, err := VerifyTelemetry(c.report(), c.pub)
			assertCheck(t, p, err, c.check)
			if got := errors.Is(err, ErrTelemetryUnsigned); got != c.unsigned {
				t.Errorf("errors.Is(err, ErrTelemetryUnsigned) = %v, want %v", got, c.unsigned)
			}
		})
	}
}

// A validly signed report whose payload is garbage, or names another key,
// is refused: the signature alone does not make it telemetry of this key.
func TestSignedButWrongTelemetryIsRejected(t *testing.T) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	sign := func(payload []byte) *agentv1.TelemetryReport {
		return &agentv1.TelemetryReport{Payload: payload, Signature: ed25519.Sign(priv, TelemetrySignedMessage(payload))}
	}
	marshal := func(p *agentv1.TelemetryPayload) []byte {
		b, err := proto.Marshal(p)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	id := TelemetryKeyID(pub)
	otherID := TelemetryKeyID([]byte("another key"))

	withKey := func(key []byte) []byte {
		p := telemetryPayload(1)
		p.KeyId = key
		return marshal(p)
	}
	cases := []struct {
		name    string
		payload []byte
		check   string
	}{
		{"garbage payload", []byte{0xff, 0xff, 0xff, 0xff}, CheckTelemetryPayload},
		{"truncated payload", withKey(id[:])[:40], CheckTelemetryPayload},
		{"key id of another key", withKey(otherID[:]), CheckTelemetryKey},
		{"no key id", withKey(nil), CheckTelemetryKey},
		{"truncated key id", withKey(id[:31]), CheckTelemetryKey},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p, err := VerifyTelemetry(sign(c.payload), pub)
			assertCheck(t, p, err, c.check)
		})
	}
	// The same signer with the right key id passes: the cases above fail
	// for the reason named, not for the way they were signed.
	if _, err := VerifyTelemetry(sign(withKey(id[:])), pub); err != nil {
		t.Fatalf("control case: %v", err)
	}
}

// A context-free signature over the bare payload (a signature made for
// some other purpose) is not a telemetry signature.
func TestTelemetrySignatureIsBoundToItsContext(t *testing.T) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	p := telemetryPayload(1)
	id := TelemetryKeyID(pub)
	p.KeyId = id[:]
	payload, err := proto.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	_, err = VerifyTelemetry(&agentv1.TelemetryReport{Payload: payload, Signature: ed25519.Sign(priv, payload)}, pub)
	assertCheck(t, nil, err, CheckTelemetrySignature)
}

func assertCheck(t *testing.T, p *agentv1.TelemetryPayload, err error, check string) {
	t.Helper()
	if p != nil {
		t.Errorf("a refused report returned a payload: %v", p)
	}
	var ce *CheckError
	if !errors.As(err, &ce) {
		t.Fatalf("err = %v, want a *CheckError", err)
	}
	if ce.Check != check {
		t.Fatalf("failed check %q (%v), want %q", ce.Check, err, check)
	}
}

func TestSignRefusesANilPayload(t *testing.T) {
	if _, err := newTelemetryKey(t).Sign(nil); err == nil {
		t.Fatal("signed a nil payload")
	}
}

func BenchmarkVerifyTelemetry(b *testing.B) {
	for _, gpus := range []int{8, 1} {
		name := fmt.Sprintf("%dxH200-%dMIG", gpus, 7*gpus)
		b.Run(name, func(b *testing.B) {
			k := newTelemetryKey(b)
			r := signTelemetry(b, k, telemetryPayload(gpus))
			pub := k.Public()
			b.SetBytes(int64(len(r.GetPayload())))
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				if _, err := VerifyTelemetry(r, pub); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "reports/s")
		})
	}
}

func BenchmarkDecodeTelemetryPayload(b *testing.B) {
	payload, err := proto.Marshal(telemetryPayload(8))
	if err != nil {
		b.Fatal(err)
	}
	for _, bc := range []struct {
		name   string
		decode func([]byte) (*agentv1.TelemetryPayload, error)
	}{
		{"fast", decodeTelemetryPayload},
		{"proto.Unmarshal", func(b []byte) (*agentv1.TelemetryPayload, error) {
			p := new(agentv1.TelemetryPayload)
			return p, proto.Unmarshal(b, p)
		}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.SetBytes(int64(len(payload)))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := bc.decode(payload); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestTelemetryHeaderAgreesWithTheFullDecode: the header a control plane
// checks is the decoded payload's, and what the full verification refuses
// the header verification refuses with the same check.
func TestTelemetryHeaderAgreesWithTheFullDecode(t *testing.T) {
	k := newTelemetryKey(t)
	p := telemetryPayload(2)
	r := signTelemetry(t, k, p)
	h, err := VerifyTelemetryHeader(r, k.Public())
	if err != nil {
		t.Fatal(err)
	}
	full, err := VerifyTelemetry(r, k.Public())
	if err != nil {
		t.Fatal(err)
	}
	var leases []string
	for _, d := range full.GetDevices() {
		if d.GetLeaseId() != "" {
			leases = append(leases, d.GetLeaseId())
		}
	}
	var got []string
	for _, l := range h.Leases {
		got = append(got, string(l))
	}
	if h.NodeID != full.GetNodeId() || h.Sequence != full.GetSequence() || !bytes.Equal(h.KeyID, full.GetKeyId()) ||
		h.Devices != len(full.GetDevices()) || fmt.Sprint(got) != fmt.Sprint(leases) {
		t.Fatalf("header %+v, decoded node %s seq %d devices %d leases %v", h, full.GetNodeId(), full.GetSequence(), len(full.GetDevices()), leases)
	}
	other := newTelemetryKey(t)
	for name, bad := range map[string]*agentv1.TelemetryReport{
		"unsigned":     {Payload: r.GetPayload()},
		"another key":  signTelemetry(t, other, telemetryPayload(1)),
		"truncated":    {Payload: r.GetPayload()[:len(r.GetPayload())-3], Signature: r.GetSignature()},
		"garbage":      mustSignRaw(t, k, []byte{0x32, 0xff, 0xff, 0xff}),
		"other key id": mustSignRaw(t, k, mustMarshal(t, &agentv1.TelemetryPayload{NodeId: "n", KeyId: []byte("x"), Sequence: 1})),
	} {
		_, herr := VerifyTelemetryHeader(bad, k.Public())
		_, ferr := VerifyTelemetry(bad, k.Public())
		var hc, fc *CheckError
		if !errors.As(herr, &hc) || !errors.As(ferr, &fc) {
			t.Fatalf("%s: header verification %v, full verification %v", name, herr, ferr)
		}
		want := fc.Check
		if name == "another key" {
			// The header path names a report under another key for what
			// it is (a key not attested), before checking its signature.
			want = CheckTelemetryKey
		}
		if hc.Check != want {
			t.Errorf("%s: header verification %v, full verification %v", name, herr, ferr)
		}
	}
	// A payload that claims the attested key id but is signed by another
	// key is a forgery: refused on its signature.
	forged := mustSignRaw(t, other, r.GetPayload())
	if _, err := VerifyTelemetryHeader(forged, k.Public()); !errors.As(err, new(*CheckError)) || !strings.Contains(err.Error(), CheckTelemetrySignature) {
		t.Errorf("a forgery under the attested key id: %v", err)
	}
}

func mustMarshal(t testing.TB, p *agentv1.TelemetryPayload) []byte {
	t.Helper()
	b, err := proto.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// mustSignRaw signs payload bytes as they are, whatever they hold.
func mustSignRaw(t testing.TB, k *TelemetryKey, payload []byte) *agentv1.TelemetryReport {
	t.Helper()
	msg := TelemetrySignedMessage(payload)
	return &agentv1.TelemetryReport{Payload: payload, Signature: ed25519.Sign(k.priv, msg)}
}

func BenchmarkVerifyTelemetryHeader(b *testing.B) {
	for _, gpus := range []int{8, 1} {
		b.Run(fmt.Sprintf("%dxH200-%dMIG", gpus, 7*gpus), func(b *testing.B) {
			// As the control plane runs it: one verifier per node key.
			k := newTelemetryKey(b)
			r := signTelemetry(b, k, telemetryPayload(gpus))
			v, err := NewTelemetryVerifier(k.Public())
			if err != nil {
				b.Fatal(err)
			}
			b.SetBytes(int64(len(r.GetPayload())))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := v.VerifyHeader(r); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "reports/s")
		})
	}
}
