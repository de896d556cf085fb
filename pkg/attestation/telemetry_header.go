package attestation

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/subtle"
	"fmt"

	"filippo.io/edwards25519"
	"google.golang.org/protobuf/encoding/protowire"

	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
)

// TelemetryHeader is what a verifier needs of a telemetry report to accept
// it: who sent it under which key, its sequence, and which lease each
// device is attributed to. The readings stay in the payload until
// something consumes them (DecodeTelemetryPayload).
type TelemetryHeader struct {
	NodeID   string
	KeyID    []byte
	Sequence uint64
	// Leases are the non-empty lease ids the devices are attributed to,
	// one per such device in payload order. They alias the report's
	// payload: copy one to keep it beyond the report.
	Leases [][]byte
	// Devices is the number of device samples.
	Devices int
}

// VerifyTelemetryHeader is VerifyTelemetry without decoding the readings:
// the same size, signature and key id checks, then only the header fields
// and each device's lease id are read (with protowire). It is what a
// control plane runs for every report of every node; a malformed payload
// is refused exactly as VerifyTelemetry refuses it.
func VerifyTelemetryHeader(r *agentv1.TelemetryReport, pub []byte) (TelemetryHeader, error) {
	v, err := NewTelemetryVerifier(pub)
	if err != nil {
		return TelemetryHeader{}, err
	}
	return v.VerifyHeader(r)
}

// TelemetryVerifier verifies the reports of one telemetry key; it holds the
// key decoded once (a verifier of many reports under one key skips a point
// decompression per report). Safe for concurrent use.
type TelemetryVerifier struct {
	pub    []byte
	id     [32]byte
	minusA *edwards25519.Point
}

// NewTelemetryVerifier decodes pub, an Ed25519 public key.
func NewTelemetryVerifier(pub []byte) (*TelemetryVerifier, error) {
	if len(pub) != ed25519.PublicKeySize {
		return nil, &CheckError{Check: CheckTelemetryKey, Expected: "an attested Ed25519 telemetry key", Actual: fmt.Sprintf("%d-byte key", len(pub))}
	}
	a, err := new(edwards25519.Point).SetBytes(pub)
	if err != nil {
		return nil, &CheckError{Check: CheckTelemetryKey, Expected: "an attested Ed25519 telemetry key", Actual: "not a curve point", Err: err}
	}
	return &TelemetryVerifier{pub: bytes.Clone(pub), id: TelemetryKeyID(pub), minusA: new(edwards25519.Point).Negate(a)}, nil
}

// Public is the key.
func (v *TelemetryVerifier) Public() []byte { return bytes.Clone(v.pub) }

// verify is Ed25519 verification (RFC 8032, section 5.1.7, cofactorless,
// as crypto/ed25519.Verify does it: S must be canonical, R is compared as
// encoded) of sig over TelemetrySignedMessage(payload), with the key's
// point decoded beforehand. FuzzTelemetryVerifierAgreesWithEd25519 checks
// it against crypto/ed25519.
func (v *TelemetryVerifier) verify(payload, sig []byte) bool {
	if len(sig) != ed25519.SignatureSize || sig[63]&224 != 0 {
		return false
	}
	d := sha256.Sum256(payload)
	h := sha512.New()
	h.Write(sig[:32])
	h.Write(v.pub)
	h.Write([]byte(TelemetryContext))
	h.Write(d[:])
	var digest [sha512.Size]byte
	k, err := edwards25519.NewScalar().SetUniformBytes(h.Sum(digest[:0]))
	if err != nil {
		return false
	}
	s, err := edwards25519.NewScalar().SetCanonicalBytes(sig[32:])
	if err != nil {
		return false
	}
	// R' = [S]B - [k]A; valid when R' encodes to R.
	r := new(edwards25519.Point).VarTimeDoubleScalarBaseMult(k, v.minusA, s)
	return subtle.ConstantTimeCompare(sig[:32], r.Bytes()) == 1
}

// VerifyHeader is VerifyTelemetryHeader under this verifier's key.
func (v *TelemetryVerifier) VerifyHeader(r *agentv1.TelemetryReport) (TelemetryHeader, error) {
	// A report under another key (an agent restarted with a new key whose
	// attestation is not judged yet) is told apart before its signature
	// is checked, so it reads as an unattested key, not as a forgery. The
	// key id read here is not trusted: it is checked again once signed.
	if id, ok := peekKeyID(r.GetPayload()); ok && len(r.GetSignature()) > 0 && !bytes.Equal(id, v.id[:]) {
		return TelemetryHeader{}, &CheckError{Check: CheckTelemetryKey, Expected: fmt.Sprintf("key_id %x", v.id), Actual: fmt.Sprintf("key_id %x (not attested)", id)}
	}
	if err := checkTelemetryEnvelope(r, v.verify); err != nil {
		return TelemetryHeader{}, err
	}
	h, err := scanTelemetryHeader(r.GetPayload())
	if err != nil {
		return TelemetryHeader{}, &CheckError{Check: CheckTelemetryPayload, Expected: "a TelemetryPayload", Actual: "undecodable", Err: err}
	}
	if !bytes.Equal(h.KeyID, v.id[:]) {
		return TelemetryHeader{}, &CheckError{Check: CheckTelemetryKey, Expected: fmt.Sprintf("key_id %x", v.id), Actual: fmt.Sprintf("key_id %x", h.KeyID)}
	}
	return h, nil
}

// DecodeTelemetryPayload decodes the readings of a report whose header
// VerifyTelemetryHeader accepted.
func DecodeTelemetryPayload(r *agentv1.TelemetryReport) (*agentv1.TelemetryPayload, error) {
	return decodeTelemetryPayload(r.GetPayload())
}

// TelemetryPayload field numbers the header scan reads.
const (
	fieldNodeID   = 1
	fieldKeyID    = 2
	fieldSequence = 3
	fieldDevices  = 6
	fieldLeaseID  = 6 // in DeviceSample
)

// scanTelemetryHeader reads the header of a payload, checking that the
// whole payload is well-formed protobuf wire data (every field of every
// device is consumed), so a payload proto.Unmarshal would refuse is
// refused here too.
func scanTelemetryHeader(b []byte) (TelemetryHeader, error) {
	var h TelemetryHeader
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return h, protowire.ParseError(n)
		}
		b = b[n:]
		switch {
		case num == fieldNodeID && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return h, protowire.ParseError(n)
			}
			h.NodeID, b = string(v), b[n:]
		case num == fieldKeyID && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return h, protowire.ParseError(n)
			}
			h.KeyID, b = v, b[n:]
		case num == fieldSequence && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return h, protowire.ParseError(n)
			}
			h.Sequence, b = v, b[n:]
		case num == fieldDevices && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return h, protowire.ParseError(n)
			}
			b = b[n:]
			h.Devices++
			lease, err := scanDeviceLease(v)
			if err != nil {
				return h, err
			}
			if len(lease) > 0 {
				h.Leases = append(h.Leases, lease)
			}
		default:
			n := protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return h, protowire.ParseError(n)
			}
			b = b[n:]
		}
	}
	return h, nil
}

// scanDeviceLease returns a DeviceSample's lease id (the last one, as
// proto.Unmarshal keeps the last of a repeated scalar), consuming every
// field so malformed data is refused.
func scanDeviceLease(b []byte) ([]byte, error) {
	var lease []byte
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, protowire.ParseError(n)
		}
		b = b[n:]
		if num == fieldLeaseID && typ == protowire.BytesType {
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return nil, protowire.ParseError(n)
			}
			lease, b = v, b[n:]
			continue
		}
		n = protowire.ConsumeFieldValue(num, typ, b)
		if n < 0 {
			return nil, protowire.ParseError(n)
		}
		b = b[n:]
	}
	return lease, nil
}

// peekKeyID reads a payload's key_id (the last one, as a decoder would)
// from its top-level fields; ok is false for a malformed payload.
func peekKeyID(b []byte) (id []byte, ok bool) {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, false
		}
		b = b[n:]
		if num == fieldKeyID && typ == protowire.BytesType {
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return nil, false
			}
			id, b = v, b[n:]
			continue
		}
		n = protowire.ConsumeFieldValue(num, typ, b)
		if n < 0 {
			return nil, false
		}
		b = b[n:]
	}
	return id, id != nil
}
