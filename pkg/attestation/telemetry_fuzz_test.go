package attestation

import (
	"bytes"
	"crypto/ed25519"
	"slices"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
)

// FuzzVerifyTelemetry: telemetry reports from an agent never panic the
// verifier, and nothing but what the key signed is accepted. The fuzzer
// mutates a genuine report's payload, signature and the key it is checked
// against.
func FuzzVerifyTelemetry(f *testing.F) {
	k, err := NewTelemetryKey()
	if err != nil {
		f.Fatal(err)
	}
	good, err := k.Sign(telemetryPayload(1))
	if err != nil {
		f.Fatal(err)
	}
	pub := k.Public()
	f.Add(good.GetPayload(), good.GetSignature(), pub)
	f.Add([]byte{}, []byte{}, pub)
	f.Add([]byte{0x0a, 0x01}, good.GetSignature(), pub)
	f.Add(good.GetPayload(), good.GetSignature()[:32], pub)
	f.Add(good.GetPayload(), good.GetSignature(), []byte{})
	f.Fuzz(func(t *testing.T, payload, sig, key []byte) {
		p, err := VerifyTelemetry(&agentv1.TelemetryReport{Payload: payload, Signature: sig}, key)
		if err != nil {
			if p != nil {
				t.Fatal("a refused report returned a payload")
			}
			return
		}
		// Accepted: the key really signed exactly these bytes, and the
		// payload names the key.
		if len(key) != ed25519.PublicKeySize || !ed25519.Verify(key, TelemetrySignedMessage(payload), sig) {
			t.Fatal("accepted a report the key did not sign")
		}
		id := TelemetryKeyID(key)
		if string(p.GetKeyId()) != string(id[:]) {
			t.Fatal("accepted a payload naming another key")
		}
	})
}

// FuzzTelemetryPayloadDecoding: the fast payload decoder agrees with
// proto.Unmarshal on every input: the same payload when that succeeds, an
// error when it fails, and never a panic.
func FuzzTelemetryPayloadDecoding(f *testing.F) {
	p := telemetryPayload(1)
	p.KeyId = []byte("0123456789abcdef0123456789abcdef")
	good, err := proto.Marshal(p)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add([]byte{})
	f.Add(protowire.AppendVarint(protowire.AppendTag(bytes.Clone(good), 99, protowire.VarintType), 7)) // unknown field
	f.Add(append(bytes.Clone(good), good[len(good)-40:]...))                                           // a torn tail
	twice := protowire.AppendBytes(protowire.AppendTag(bytes.Clone(good), 4, protowire.BytesType), []byte{0x10, 0x05})
	f.Add(twice) // a second timestamp merges
	dev := protowire.AppendTag(nil, 23, protowire.VarintType)
	dev = protowire.AppendVarint(dev, 13)
	dev = protowire.AppendTag(dev, 23, protowire.BytesType)
	dev = protowire.AppendBytes(dev, protowire.AppendVarint(protowire.AppendVarint(nil, 31), 79))
	dev = protowire.AppendTag(dev, 18, protowire.VarintType)
	dev = protowire.AppendVarint(dev, 2)
	dev = protowire.AppendTag(dev, 1, protowire.BytesType)
	dev = protowire.AppendBytes(dev, []byte{0xff, 0xfe})
	f.Add(protowire.AppendBytes(protowire.AppendTag(nil, 6, protowire.BytesType), dev)) // unpacked and packed xids, bool 2, bad UTF-8
	f.Fuzz(func(t *testing.T, b []byte) {
		want := new(agentv1.TelemetryPayload)
		wantErr := proto.Unmarshal(b, want)
		got, err := decodeTelemetryPayload(b)
		switch {
		case wantErr != nil && err == nil:
			t.Fatalf("decoded what proto.Unmarshal refuses (%v): %v", wantErr, got)
		case wantErr == nil && err != nil:
			t.Fatalf("refused what proto.Unmarshal decodes: %v", err)
		case wantErr == nil && !proto.Equal(got, want):
			t.Fatalf("decoded differently:\n got %v\nwant %v", got, want)
		}
	})
}

// FuzzTelemetryHeader: the header scan a control plane runs on every
// report never panics, and on every payload proto.Unmarshal accepts it
// reads exactly the node, key id, sequence, device count and lease ids of
// the decoded payload.
func FuzzTelemetryHeader(f *testing.F) {
	p := telemetryPayload(1)
	p.KeyId = []byte("0123456789abcdef0123456789abcdef")
	good, err := proto.Marshal(p)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add([]byte{})
	f.Add([]byte{0x32, 0x02, 0x32, 0x00})
	f.Add(append(append([]byte{}, good...), good...))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, herr := scanTelemetryHeader(b)
		var want agentv1.TelemetryPayload
		if err := proto.Unmarshal(b, &want); err != nil {
			return
		}
		if herr != nil {
			t.Fatalf("proto.Unmarshal accepts what the header scan refuses: %v", herr)
		}
		var leases, got []string
		for _, d := range want.GetDevices() {
			if id := d.GetLeaseId(); id != "" {
				leases = append(leases, id)
			}
		}
		for _, l := range h.Leases {
			got = append(got, string(l))
		}
		if h.NodeID != want.GetNodeId() || !bytes.Equal(h.KeyID, want.GetKeyId()) || h.Sequence != want.GetSequence() ||
			h.Devices != len(want.GetDevices()) || !slices.Equal(got, leases) {
			t.Fatalf("header %+v, decoded node %q key %x seq %d devices %d leases %q", h, want.GetNodeId(), want.GetKeyId(), want.GetSequence(), len(want.GetDevices()), leases)
		}
	})
}

// FuzzTelemetryVerifierAgreesWithEd25519: the verifier that keeps its key
// decoded accepts exactly the signatures crypto/ed25519 accepts, for any
// key, signature and payload.
func FuzzTelemetryVerifierAgreesWithEd25519(f *testing.F) {
	k, err := NewTelemetryKey()
	if err != nil {
		f.Fatal(err)
	}
	good, err := k.Sign(telemetryPayload(1))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(k.Public(), good.GetSignature(), good.GetPayload())
	f.Add(k.Public(), good.GetSignature(), []byte("other"))
	f.Add(make([]byte, 32), make([]byte, 64), []byte{})
	f.Fuzz(func(t *testing.T, pub, sig, payload []byte) {
		want := len(pub) == ed25519.PublicKeySize && ed25519.Verify(pub, TelemetrySignedMessage(payload), sig)
		v, err := NewTelemetryVerifier(pub)
		if err != nil {
			if want {
				t.Fatalf("ed25519 accepts a key the verifier refuses: %v", err)
			}
			return
		}
		if got := v.verify(payload, sig); got != want {
			t.Fatalf("verifier says %v, crypto/ed25519 says %v", got, want)
		}
	})
}
