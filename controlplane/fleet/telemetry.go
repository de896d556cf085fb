package fleet

import (
	"bytes"
	"fmt"
	"time"

	"github.com/gpuaas/gpuaas/pkg/attestation"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// Checks a telemetry report can fail, besides pkg/attestation's signature
// checks.
const (
	CheckTelemetryNode     = "telemetry_node"
	CheckTelemetrySequence = "telemetry_sequence"
	CheckTelemetryLease    = "telemetry_lease"
)

// placedGrace is how long a lease stays attributable in telemetry after it
// left the node's desired set (the agent stops it in the meantime).
const placedGrace = 2 * time.Minute

// telemetryState is what verifies one node's telemetry: the key its latest
// verified attestation report vouched for, the last sequence accepted under
// it, and the leases placed on the node.
type telemetryState struct {
	key     *attestation.TelemetryVerifier
	lastSeq uint64
	// placed: lease id -> when it was last in the node's desired set
	// (zero: it still is).
	placed map[string]time.Time
}

// setTelemetryKey adopts the telemetry key of a verified report. A new key
// (an agent restart) starts its sequence afresh; the same key keeps it, so
// a re-attestation cannot be used to replay reports.
func (a *Attestor) setTelemetryKey(node string, key []byte) {
	a.mu.Lock()
	defer a.mu.Unlock()
	t := &a.node(node).telemetry
	if t.key != nil && bytes.Equal(t.key.Public(), key) {
		return
	}
	t.key, t.lastSeq = nil, 0
	if len(key) == 0 {
		return
	}
	v, err := attestation.NewTelemetryVerifier(key)
	if err != nil {
		// The report verified but its telemetry key is not a key: no
		// telemetry is accepted until a report brings a usable one.
		a.reg.log.Warn("attested telemetry key unusable", "node", node, "err", err)
		return
	}
	t.key = v
}

// SetPlaced records the leases the node should run (its desired set, as
// last sent on the session), to attribute telemetry.
func (a *Attestor) SetPlaced(node string, leases []*leasev1.Lease) {
	now := a.reg.now()
	a.mu.Lock()
	defer a.mu.Unlock()
	t := &a.node(node).telemetry
	if t.placed == nil {
		t.placed = map[string]time.Time{}
	}
	in := make(map[string]bool, len(leases))
	for _, l := range leases {
		in[l.GetId()] = true
		t.placed[l.GetId()] = time.Time{}
	}
	for id, gone := range t.placed {
		switch {
		case in[id]:
		case gone.IsZero():
			t.placed[id] = now
		case now.Sub(gone) > placedGrace:
			delete(t.placed, id)
		}
	}
}

// Telemetry verifies a telemetry report of node's agent: signed by the key
// of the node's latest verified attestation report, about node, with a
// sequence above the last accepted (not a replay, not reordered), and
// attributing devices only to leases placed on node. The error of a
// refused report is an *attestation.CheckError naming the check.
//
// Only the header and the lease ids are read (VerifyTelemetryHeader); a
// consumer of the readings decodes them with
// attestation.DecodeTelemetryPayload.
func (a *Attestor) Telemetry(node string, r *agentv1.TelemetryReport) (attestation.TelemetryHeader, error) {
	a.mu.Lock()
	key := a.node(node).telemetry.key
	a.mu.Unlock()
	if key == nil {
		return attestation.TelemetryHeader{}, &attestation.CheckError{Check: attestation.CheckTelemetryKey, Expected: "a telemetry key from a verified attestation report", Actual: "(none: the node has no verified report with a telemetry key)"}
	}
	h, err := key.VerifyHeader(r)
	if err != nil {
		return h, err
	}
	if h.NodeID != node {
		return h, &attestation.CheckError{Check: CheckTelemetryNode, Expected: node, Actual: h.NodeID}
	}
	now := a.reg.now()
	a.mu.Lock()
	defer a.mu.Unlock()
	t := &a.node(node).telemetry
	if t.key != key {
		// The key changed while this report was being verified.
		return h, &attestation.CheckError{Check: attestation.CheckTelemetryKey, Expected: "the current telemetry key", Actual: "a superseded key"}
	}
	if h.Sequence <= t.lastSeq {
		return h, &attestation.CheckError{Check: CheckTelemetrySequence, Expected: fmt.Sprintf("above %d", t.lastSeq), Actual: fmt.Sprint(h.Sequence)}
	}
	for _, id := range h.Leases {
		gone, ok := t.placed[string(id)]
		if !ok || (!gone.IsZero() && now.Sub(gone) > placedGrace) {
			return h, &attestation.CheckError{Check: CheckTelemetryLease, Expected: "leases placed on " + node, Actual: fmt.Sprintf("a device attributed to lease %.64q", id)}
		}
	}
	t.lastSeq = h.Sequence
	return h, nil
}
