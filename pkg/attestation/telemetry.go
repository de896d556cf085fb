package attestation

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
)

// Telemetry signing. An agent signs its telemetry reports with an Ed25519
// key it generates at start and never writes to disk; the public half
// travels in its attestation report (AgentEvidence.TelemetryKey), so the
// SVID signature of that report vouches for the key, and a telemetry
// report is as trusted as the attested agent that sent it. The signature
// is over TelemetryContext || payload, the payload being the exact
// protobuf bytes carried in the report: a verifier checks the signature
// before it decodes anything and never re-encodes.

// TelemetryContext prefixes the signed bytes so that a telemetry
// signature can never be mistaken for a signature over anything else.
const TelemetryContext = "gpuaas.telemetry/v1\n"

// MaxTelemetryReport bounds the payload a verifier accepts. A fully
// partitioned 8-GPU host reports about 5 KiB.
const MaxTelemetryReport = 1 << 20

// Checks a telemetry verification can fail, as named in a CheckError.
const (
	// CheckTelemetrySignature: the signature is missing (ErrTelemetryUnsigned)
	// or is not a valid Ed25519 signature by the attested key.
	CheckTelemetrySignature = "telemetry_signature"
	// CheckTelemetryKey: there is no attested telemetry key, or the
	// payload's key_id does not name it.
	CheckTelemetryKey = "telemetry_key"
	// CheckTelemetryPayload: the payload is over MaxTelemetryReport or does
	// not decode.
	CheckTelemetryPayload = "telemetry_payload"
)

// ErrTelemetryUnsigned is the cause of the CheckTelemetrySignature error for
// a report without a signature.
var ErrTelemetryUnsigned = errors.New("telemetry report is unsigned")

// TelemetryKey is an agent's telemetry signing key: Ed25519, in memory only.
// Safe for concurrent use.
type TelemetryKey struct {
	priv ed25519.PrivateKey
	pub  ed25519.PublicKey
	id   [32]byte
}

// NewTelemetryKey generates a fresh key.
func NewTelemetryKey() (*TelemetryKey, error) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate telemetry key: %w", err)
	}
	return &TelemetryKey{priv: priv, pub: pub, id: TelemetryKeyID(pub)}, nil
}

// Public is the 32-byte public key, for AgentEvidence.TelemetryKey. The
// caller gets a copy.
func (k *TelemetryKey) Public() []byte { return bytes.Clone(k.pub) }

// ID is SHA-256 of the public key, the key_id of every payload it signs.
func (k *TelemetryKey) ID() [32]byte { return k.id }

// TelemetryKeyID is SHA-256 of a telemetry public key.
func TelemetryKeyID(pub []byte) [32]byte { return sha256.Sum256(pub) }

// Sign sets p.KeyId to the key's ID, encodes p (deterministic protobuf)
// and signs TelemetrySignedMessage(payload). The payload bytes in the report
// are exactly the signed ones; p is not kept.
func (k *TelemetryKey) Sign(p *agentv1.TelemetryPayload) (*agentv1.TelemetryReport, error) {
	if p == nil {
		return nil, errors.New("sign telemetry report: no payload")
	}
	p.KeyId = k.id[:]
	payload, err := proto.MarshalOptions{Deterministic: true}.Marshal(p)
	if err != nil {
		return nil, fmt.Errorf("sign telemetry report: %w", err)
	}
	if len(payload) > MaxTelemetryReport {
		return nil, fmt.Errorf("sign telemetry report: payload of %d bytes is over the %d verifiers accept", len(payload), MaxTelemetryReport)
	}
	return &agentv1.TelemetryReport{Payload: payload, Signature: ed25519.Sign(k.priv, TelemetrySignedMessage(payload))}, nil
}

// TelemetrySignedMessage is what a telemetry signature signs:
// TelemetryContext || SHA-256(payload). Signing the digest rather than the
// payload lets the verifier hash the payload with SHA-256 (hardware
// accelerated on current CPUs) instead of Ed25519's SHA-512, a fifth of the
// verification cost for a large report.
func TelemetrySignedMessage(payload []byte) []byte {
	d := sha256.Sum256(payload)
	return append([]byte(TelemetryContext), d[:]...)
}

// VerifyTelemetry checks a telemetry report against pub, the telemetry key
// of the node's latest verified attestation report, and returns its
// decoded payload. In order: the size, the presence of a signature
// (ErrTelemetryUnsigned), the Ed25519 signature over TelemetryContext ||
// the exact payload bytes, the decoding, and that the payload's key_id is
// SHA-256(pub). A failure is a *CheckError naming the check. The sequence
// (replay, reordering), the node and its leases are the caller's to check
// on the returned payload: they need state this function does not have.
func VerifyTelemetry(r *agentv1.TelemetryReport, pub []byte) (*agentv1.TelemetryPayload, error) {
	if err := verifyTelemetryEnvelope(r, pub); err != nil {
		return nil, err
	}
	p, err := decodeTelemetryPayload(r.GetPayload())
	if err != nil {
		return nil, &CheckError{Check: CheckTelemetryPayload, Expected: "a TelemetryPayload", Actual: "undecodable", Err: err}
	}
	id := TelemetryKeyID(pub)
	if !bytes.Equal(p.GetKeyId(), id[:]) {
		return nil, &CheckError{Check: CheckTelemetryKey, Expected: fmt.Sprintf("key_id %x", id), Actual: fmt.Sprintf("key_id %x", p.GetKeyId())}
	}
	return p, nil
}

// verifyTelemetryEnvelope checks the key, the size and the signature of a
// report.
func verifyTelemetryEnvelope(r *agentv1.TelemetryReport, pub []byte) error {
	if len(pub) != ed25519.PublicKeySize {
		return &CheckError{Check: CheckTelemetryKey, Expected: "an attested Ed25519 telemetry key", Actual: fmt.Sprintf("%d-byte key", len(pub))}
	}
	return checkTelemetryEnvelope(r, func(payload, sig []byte) bool { return verifyTelemetrySignature(pub, payload, sig) })
}

// checkTelemetryEnvelope checks the size and, with verify, the signature of
// a report.
func checkTelemetryEnvelope(r *agentv1.TelemetryReport, verify func(payload, sig []byte) bool) error {
	payload := r.GetPayload()
	if len(payload) > MaxTelemetryReport {
		return &CheckError{Check: CheckTelemetryPayload, Expected: fmt.Sprintf("at most %d bytes", MaxTelemetryReport), Actual: fmt.Sprintf("%d bytes", len(payload))}
	}
	sig := r.GetSignature()
	if len(sig) == 0 {
		return &CheckError{Check: CheckTelemetrySignature, Expected: "an Ed25519 signature", Actual: "none", Err: ErrTelemetryUnsigned}
	}
	if !verify(payload, sig) {
		return &CheckError{Check: CheckTelemetrySignature, Expected: "a valid Ed25519 signature by the attested telemetry key", Actual: "invalid"}
	}
	return nil
}

// verifyTelemetrySignature checks an Ed25519 signature over
// TelemetrySignedMessage(payload).
func verifyTelemetrySignature(pub, payload, sig []byte) bool {
	if len(sig) != ed25519.SignatureSize {
		return false
	}
	var msg [len(TelemetryContext) + sha256.Size]byte
	copy(msg[:], TelemetryContext)
	d := sha256.Sum256(payload)
	copy(msg[len(TelemetryContext):], d[:])
	return ed25519.Verify(pub, msg[:], sig)
}

// decodeTelemetryPayload decodes a payload exactly as proto.Unmarshal
// does, faster for what agents send. The control plane verifies every
// report of every node, and with proto.Unmarshal decoding is almost half
// of the cost of a report: it allocates each string and each optional
// field of each device separately (about 650 allocations for 8 fully
// partitioned GPUs). The fast path copies the payload once and takes the
// strings from that copy, and the devices and their optional fields from
// a few slabs (17 allocations, about half the time; a device kept alive
// keeps its report's slabs alive). It handles only the fields and wire types this
// version encodes; anything else (unknown fields, a repeated timestamp,
// malformed bytes) goes to proto.Unmarshal, which stays the reference:
// FuzzTelemetryPayloadDecoding checks the two agree.
func decodeTelemetryPayload(b []byte) (*agentv1.TelemetryPayload, error) {
	if p, ok := fastDecodeTelemetry(b); ok {
		return p, nil
	}
	p := new(agentv1.TelemetryPayload)
	if err := proto.Unmarshal(b, p); err != nil {
		return nil, err
	}
	return p, nil
}

// Slots of a device's optional fields in the decoder's slabs.
const (
	u32Slots  = 8 // utilization, gr engine, power, temperature, remapped x2, clocks x2
	u64Slots  = 5 // memory used, free, ecc x2, throttle reasons
	boolSlots = 2 // remap pending, failed
)

// telemetryDecoder holds the slabs of one decode.
type telemetryDecoder struct {
	b     []byte // the payload
	whole string // b, copied once; strings are its substrings
	u32   []uint32
	u64   []uint64
	bools []bool
}

// fastDecodeTelemetry is the fast path of decodeTelemetryPayload; ok is
// false when b is anything but what it handles.
func fastDecodeTelemetry(b []byte) (*agentv1.TelemetryPayload, bool) {
	n := 0
	for rest := b; len(rest) > 0; {
		num, typ, l := protowire.ConsumeTag(rest)
		if l < 0 {
			return nil, false
		}
		m := protowire.ConsumeFieldValue(num, typ, rest[l:])
		if m < 0 {
			return nil, false
		}
		if num == 6 && typ == protowire.BytesType {
			n++
		}
		rest = rest[l+m:]
	}
	d := telemetryDecoder{
		b:     b,
		whole: string(b),
		u32:   make([]uint32, n*u32Slots),
		u64:   make([]uint64, n*u64Slots),
		bools: make([]bool, n*boolSlots),
	}
	p := &agentv1.TelemetryPayload{}
	if n > 0 {
		devs := make([]agentv1.DeviceSample, n)
		p.Devices = make([]*agentv1.DeviceSample, n)
		for i := range devs {
			p.Devices[i] = &devs[i]
		}
	}
	dev := 0
	for off := 0; off < len(b); {
		num, typ, l := protowire.ConsumeTag(b[off:])
		if l < 0 {
			return nil, false
		}
		off += l
		switch {
		case typ == protowire.BytesType && num >= 1 && num <= 6:
			v, l := protowire.ConsumeBytes(b[off:])
			if l < 0 {
				return nil, false
			}
			start := off + l - len(v)
			off += l
			switch num {
			case 1:
				s, ok := d.str(start, len(v))
				if !ok {
					return nil, false
				}
				p.NodeId = s
			case 2:
				p.KeyId = append([]byte{}, v...)
			case 4:
				if p.Time != nil {
					return nil, false // a repeated message merges: proto.Unmarshal's case
				}
				sec, nanos, ok := decodeSecondsNanos(v)
				if !ok {
					return nil, false
				}
				p.Time = &timestamppb.Timestamp{Seconds: sec, Nanos: nanos}
			case 5:
				if p.Interval != nil {
					return nil, false
				}
				sec, nanos, ok := decodeSecondsNanos(v)
				if !ok {
					return nil, false
				}
				p.Interval = &durationpb.Duration{Seconds: sec, Nanos: nanos}
			case 6:
				if !d.device(p.Devices[dev], dev, start, len(v)) {
					return nil, false
				}
				dev++
			default: // 3 is a varint
				return nil, false
			}
		case typ == protowire.VarintType && num == 3:
			v, l := protowire.ConsumeVarint(b[off:])
			if l < 0 {
				return nil, false
			}
			off += l
			p.Sequence = v
		default:
			return nil, false
		}
	}
	return p, true
}

// str is the string at b[start:start+n], valid UTF-8 as proto3 requires.
func (d *telemetryDecoder) str(start, n int) (string, bool) {
	s := d.whole[start : start+n]
	return s, utf8.ValidString(s)
}

// device decodes the DeviceSample at whole[start:start+n] into ds, the
// i-th device.
func (d *telemetryDecoder) device(ds *agentv1.DeviceSample, i, start, n int) bool {
	u32 := d.u32[i*u32Slots : (i+1)*u32Slots]
	u64 := d.u64[i*u64Slots : (i+1)*u64Slots]
	bools := d.bools[i*boolSlots : (i+1)*boolSlots]
	b := d.b[:start+n]
	for off := start; off < len(b); {
		num, typ, l := protowire.ConsumeTag(b[off:])
		if l < 0 {
			return false
		}
		off += l
		if typ == protowire.BytesType {
			v, l := protowire.ConsumeBytes(b[off:])
			if l < 0 {
				return false
			}
			vstart := off + l - len(v)
			off += l
			var s string
			switch num {
			case 1, 2, 5, 6, 7:
				var ok bool
				if s, ok = d.str(vstart, len(v)); !ok {
					return false
				}
			case 23:
				for len(v) > 0 {
					x, m := protowire.ConsumeVarint(v)
					if m < 0 {
						return false
					}
					ds.Xids = append(ds.Xids, x)
					v = v[m:]
				}
				continue
			default:
				return false
			}
			switch num {
			case 1:
				ds.Uuid = s
			case 2:
				ds.GpuUuid = s
			case 5:
				ds.Profile = s
			case 6:
				ds.LeaseId = s
			case 7:
				ds.Tenant = s
			}
			continue
		}
		if typ != protowire.VarintType {
			return false
		}
		x, m := protowire.ConsumeVarint(b[off:])
		if m < 0 {
			return false
		}
		off += m
		switch num {
		case 3:
			ds.GpuIndex = uint32(x)
		case 4:
			ds.GpuInstanceId = uint32(x)
		case 8:
			u32[0] = uint32(x)
			ds.UtilizationPct = &u32[0]
		case 9:
			u32[1] = uint32(x)
			ds.GrEngineActivePct = &u32[1]
		case 10:
			u64[0] = x
			ds.MemoryUsedMib = &u64[0]
		case 11:
			u64[1] = x
			ds.MemoryFreeMib = &u64[1]
		case 12:
			u32[2] = uint32(x)
			ds.PowerMilliwatt = &u32[2]
		case 13:
			u32[3] = uint32(x)
			ds.TemperatureC = &u32[3]
		case 14:
			u64[2] = x
			ds.EccCorrectedVolatile = &u64[2]
		case 15:
			u64[3] = x
			ds.EccUncorrectedVolatile = &u64[3]
		case 16:
			u32[4] = uint32(x)
			ds.RemappedRowsCorrectable = &u32[4]
		case 17:
			u32[5] = uint32(x)
			ds.RemappedRowsUncorrectable = &u32[5]
		case 18:
			bools[0] = x != 0
			ds.RemapPending = &bools[0]
		case 19:
			bools[1] = x != 0
			ds.RemapFailed = &bools[1]
		case 20:
			u32[6] = uint32(x)
			ds.SmClockMhz = &u32[6]
		case 21:
			u32[7] = uint32(x)
			ds.MemoryClockMhz = &u32[7]
		case 22:
			u64[4] = x
			ds.ThrottleReasons = &u64[4]
		case 23:
			ds.Xids = append(ds.Xids, x)
		default:
			return false
		}
	}
	return true
}

// decodeSecondsNanos decodes a google.protobuf.Timestamp or Duration (the
// same two fields).
func decodeSecondsNanos(b []byte) (sec int64, nanos int32, ok bool) {
	for len(b) > 0 {
		num, typ, l := protowire.ConsumeTag(b)
		if l < 0 || typ != protowire.VarintType || (num != 1 && num != 2) {
			return 0, 0, false
		}
		v, m := protowire.ConsumeVarint(b[l:])
		if m < 0 {
			return 0, 0, false
		}
		b = b[l+m:]
		if num == 1 {
			sec = int64(v)
		} else {
			nanos = int32(v)
		}
	}
	return sec, nanos, true
}
