package attestation

import (
	"bytes"
	"fmt"

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
	// Leases are the distinct non-empty lease ids the devices are
	// attributed to, in payload order.
	Leases []string
	// Devices is the number of device samples.
	Devices int
}

// VerifyTelemetryHeader is VerifyTelemetry without decoding the readings:
// the same size, signature and key id checks, then only the header fields
// and each device's lease id are read (with protowire). It is what a
// control plane runs for every report of every node; a malformed payload
// is refused exactly as VerifyTelemetry refuses it.
func VerifyTelemetryHeader(r *agentv1.TelemetryReport, pub []byte) (TelemetryHeader, error) {
	if err := verifyTelemetryEnvelope(r, pub); err != nil {
		return TelemetryHeader{}, err
	}
	h, err := scanTelemetryHeader(r.GetPayload())
	if err != nil {
		return TelemetryHeader{}, &CheckError{Check: CheckTelemetryPayload, Expected: "a TelemetryPayload", Actual: "undecodable", Err: err}
	}
	id := TelemetryKeyID(pub)
	if !bytes.Equal(h.KeyID, id[:]) {
		return TelemetryHeader{}, &CheckError{Check: CheckTelemetryKey, Expected: fmt.Sprintf("key_id %x", id), Actual: fmt.Sprintf("key_id %x", h.KeyID)}
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
	seen := map[string]bool{}
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
			if lease != "" && !seen[lease] {
				seen[lease] = true
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
func scanDeviceLease(b []byte) (string, error) {
	lease := ""
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return "", protowire.ParseError(n)
		}
		b = b[n:]
		if num == fieldLeaseID && typ == protowire.BytesType {
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return "", protowire.ParseError(n)
			}
			lease, b = string(v), b[n:]
			continue
		}
		n = protowire.ConsumeFieldValue(num, typ, b)
		if n < 0 {
			return "", protowire.ParseError(n)
		}
		b = b[n:]
	}
	return lease, nil
}
