package fleet_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/fleet"
	"github.com/gpuaas/gpuaas/controlplane/lease"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/attestation"
	"github.com/gpuaas/gpuaas/pkg/attestation/attestationtest"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

const cpActor = "spiffe://gpuaas.test/gpuaas/controlplane"

// attestRig is a registry with attestation enabled, node-a connected, a
// clock the test moves, and lease-1 placed on node-a (GPU-0, profile 9 at
// 0, RUNNING), as the sample report of attestationtest describes.
type attestRig struct {
	st  store.Store
	reg *fleet.Registry
	a   *fleet.Attestor
	ca  *attestationtest.CA

	mu   sync.Mutex
	now  time.Time
	live []*leasev1.Lease
}

func newAttestRig(t testing.TB) *attestRig {
	t.Helper()
	r := &attestRig{st: openStore(t), ca: attestationtest.NewCA(t), now: time.Now().UTC()}
	r.live = []*leasev1.Lease{{Id: "lease-1", Phase: leasev1.Phase_PHASE_RUNNING,
		Placement: &leasev1.Placement{Node: "node-a", GpuUuid: "GPU-0", ProfileId: 9, Start: 0, Size: 4}}}
	r.reg = fleet.NewRegistry(r.st, fleet.Options{Now: r.clock})
	var err error
	r.a, err = r.reg.EnableAttestation(fleet.AttestOptions{
		Policy: attestationtest.Policy(), Verifier: attestation.NewVerifier(r.ca.Bundle(), attestationtest.TrustDomain, 0),
		Actor: cpActor, NonceTTL: 30 * time.Second,
		Leases: func(context.Context, string) ([]*leasev1.Lease, error) {
			r.mu.Lock()
			defer r.mu.Unlock()
			return r.live, nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.reg.Connect(context.Background(), "node-a", peerA, "", "test", inventory("GPU-0", "GPU-1")); err != nil {
		t.Fatal(err)
	}
	return r
}

func (r *attestRig) clock() time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.now
}

func (r *attestRig) advance(d time.Duration) {
	r.mu.Lock()
	r.now = r.now.Add(d)
	r.mu.Unlock()
}

// answer signs the sample report for nonce, changed by mutate, with svid
// (node-a's agent SVID when nil).
func (r *attestRig) answer(t testing.TB, nonce []byte, svid *x509svid.SVID, mutate func(*attestation.Report)) *agentv1.ChallengeResponse {
	t.Helper()
	rep := attestationtest.Report("node-a", nonce, r.clock())
	if mutate != nil {
		mutate(rep)
	}
	if svid == nil {
		svid = r.ca.AgentSVID(t, "node-a")
	}
	s, err := attestation.Sign(rep, svid)
	if err != nil {
		t.Fatal(err)
	}
	return &agentv1.ChallengeResponse{Nonce: s.Nonce, Report: s.Report, Signature: s.Signature}
}

func (r *attestRig) challenge(t testing.TB) []byte {
	t.Helper()
	ch, err := r.a.Challenge(context.Background(), "node-a")
	if err != nil {
		t.Fatal(err)
	}
	return ch.GetNonce()
}

func (r *attestRig) judge(t testing.TB, resp *agentv1.ChallengeResponse) attestation.Verdict {
	t.Helper()
	v, err := r.a.Judge(context.Background(), "node-a", resp)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func (r *attestRig) eligible() bool {
	for _, n := range r.reg.ConnectedNodes() {
		if n.ID == "node-a" {
			return true
		}
	}
	return false
}

func (r *attestRig) auditEntries(t testing.TB) []auditlog.Entry {
	t.Helper()
	es, err := audit.List(context.Background(), r.st, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	return es
}

func failedCheck(v attestation.Verdict, name string) bool {
	for _, c := range v.Failed() {
		if c.Name == name {
			return true
		}
	}
	return false
}

func TestAttestationPassMakesTheNodeEligibleUntilStale(t *testing.T) {
	r := newAttestRig(t)
	if r.eligible() || r.a.Status("node-a") != fleet.StatusPending {
		t.Fatalf("an unattested node is eligible (status %s)", r.a.Status("node-a"))
	}
	v := r.judge(t, r.answer(t, r.challenge(t), nil, nil))
	if v.Status != attestation.StatusPass {
		t.Fatalf("verdict %s, failed %v", v.Status, v.Failed())
	}
	if c, ok := v.Check(fleet.CheckPlacement + "/lease-1"); !ok || !c.OK {
		t.Fatalf("placement check of the running lease = %+v, %v", c, ok)
	}
	if !r.eligible() || r.a.Status("node-a") != attestation.StatusPass {
		t.Fatal("a PASS node is not eligible")
	}
	// Past the policy's max age (5m) without a fresh report: STALE, and no
	// new leases.
	r.advance(6 * time.Minute)
	if r.eligible() || r.a.Status("node-a") != attestation.StatusStale {
		t.Fatalf("an old PASS still counts (status %s)", r.a.Status("node-a"))
	}
	if v := r.judge(t, r.answer(t, r.challenge(t), nil, nil)); v.Status != attestation.StatusPass || !r.eligible() {
		t.Fatalf("a fresh report: %s", v.Status)
	}
	rec, status, found, err := r.a.Record(context.Background(), "node-a")
	if err != nil || !found || status != attestation.StatusPass || rec.PassCount != 2 || rec.Count != 2 || len(rec.Report.Report) == 0 {
		t.Fatalf("record = %+v %s %v %v", rec, status, found, err)
	}
	// PENDING -> PASS -> (STALE) -> PASS: two changes, two entries; a
	// PASS repeated while fresh is not audited again.
	if v := r.judge(t, r.answer(t, r.challenge(t), nil, nil)); v.Status != attestation.StatusPass {
		t.Fatalf("third report: %s", v.Status)
	}
	var n int
	for _, e := range r.auditEntries(t) {
		if e.Action == "node.attestation" {
			n++
		}
	}
	if n != 2 {
		t.Fatalf("%d node.attestation entries for PENDING -> PASS -> STALE -> PASS -> PASS, want 2", n)
	}
}

func TestTamperedReportsFailWithTheCheckNamed(t *testing.T) {
	cases := map[string]struct {
		resp  func(t *testing.T, r *attestRig) *agentv1.ChallengeResponse
		check string
	}{
		"agent digest not allowed": {func(t *testing.T, r *attestRig) *agentv1.ChallengeResponse {
			return r.answer(t, r.challenge(t), nil, func(rep *attestation.Report) { rep.Agent.BinarySHA256 = strings.Repeat("ee", 32) })
		}, attestation.CheckAgentDigest},
		"bytes changed after signing": {func(t *testing.T, r *attestRig) *agentv1.ChallengeResponse {
			resp := r.answer(t, r.challenge(t), nil, nil)
			resp.Report = []byte(strings.Replace(string(resp.Report), attestationtest.AgentSHA256, strings.Repeat("ee", 32), 1))
			return resp
		}, attestation.CheckSignature},
		"nonce never issued": {func(t *testing.T, r *attestRig) *agentv1.ChallengeResponse {
			r.challenge(t)
			return r.answer(t, []byte("0123456789abcdef0123456789abcdef"), nil, nil)
		}, attestation.CheckNonce},
		"nonce inside differs": {func(t *testing.T, r *attestRig) *agentv1.ChallengeResponse {
			resp := r.answer(t, []byte("0123456789abcdef0123456789abcdef"), nil, nil)
			resp.Nonce = r.challenge(t)
			return resp
		}, attestation.CheckNonce},
		"signed by another node's agent": {func(t *testing.T, r *attestRig) *agentv1.ChallengeResponse {
			return r.answer(t, r.challenge(t), r.ca.AgentSVID(t, "node-b"), nil)
		}, attestation.CheckSignerID},
		"runs a lease placed elsewhere": {func(t *testing.T, r *attestRig) *agentv1.ChallengeResponse {
			return r.answer(t, r.challenge(t), nil, func(rep *attestation.Report) { rep.Leases[0].LeaseID = "lease-x" })
		}, fleet.CheckPlacement + "/lease-x"},
		"lease on another partition": {func(t *testing.T, r *attestRig) *agentv1.ChallengeResponse {
			return r.answer(t, r.challenge(t), nil, func(rep *attestation.Report) { rep.Leases[0].MIGUUID = "MIG-b" })
		}, fleet.CheckPlacement + "/lease-1"},
		"fence missing": {func(t *testing.T, r *attestRig) *agentv1.ChallengeResponse {
			return r.answer(t, r.challenge(t), nil, func(rep *attestation.Report) { rep.Leases[0].Fences = rep.Leases[0].Fences[:1] })
		}, attestation.CheckFence + "/lease-1/egress"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			r := newAttestRig(t)
			v := r.judge(t, tc.resp(t, r))
			if v.Status != attestation.StatusFail || !failedCheck(v, tc.check) {
				t.Fatalf("verdict %s, failed %+v; want FAIL naming %s", v.Status, v.Failed(), tc.check)
			}
			if r.eligible() {
				t.Fatal("a failed node is eligible")
			}
			st, err := r.reg.State(context.Background(), "node-a")
			if err != nil || !st.Cordoned || st.CordonedBy != cpActor || !strings.Contains(st.CordonReason, tc.check) {
				t.Fatalf("node state after FAIL = %+v, %v", st, err)
			}
			var fail, cordon bool
			for _, e := range r.auditEntries(t) {
				switch e.Action {
				case "node.attestation":
					fail = e.Outcome == auditlog.OutcomeFailure && e.Resource == "node/node-a" && strings.Contains(e.Reason, tc.check)
				case "node.cordon":
					cordon = e.Actor == cpActor && e.Details["cause"] == "attestation"
				}
			}
			if !fail || !cordon {
				t.Fatalf("audit: failure entry %v, cordon entry %v", fail, cordon)
			}
		})
	}
}

func TestReplayedAnswerFails(t *testing.T) {
	r := newAttestRig(t)
	resp := r.answer(t, r.challenge(t), nil, nil)
	if v := r.judge(t, resp); v.Status != attestation.StatusPass {
		t.Fatalf("first answer: %s %v", v.Status, v.Failed())
	}
	if v := r.judge(t, resp); v.Status != attestation.StatusFail || !failedCheck(v, attestation.CheckNonce) {
		t.Fatalf("replayed answer: %s %v", v.Status, v.Failed())
	}
}

func TestUncordonDoesNotReadmitAFailingNode(t *testing.T) {
	r := newAttestRig(t)
	r.judge(t, r.answer(t, r.challenge(t), nil, func(rep *attestation.Report) { rep.Host.SecureBoot = attestation.SecureBootDisabled }))
	op := lease.Caller{ID: "spiffe://gpuaas.test/gpuaas/operator/alice"}
	if err := r.reg.Cordon(context.Background(), op, "node-a", false, "fixed"); err != nil {
		t.Fatal(err)
	}
	if r.eligible() {
		t.Fatal("uncordoned but still FAIL: eligible")
	}
	if v := r.judge(t, r.answer(t, r.challenge(t), nil, nil)); v.Status != attestation.StatusPass || !r.eligible() {
		t.Fatalf("uncordoned and PASS: %s, eligible %v", v.Status, r.eligible())
	}
	hist, err := r.a.History(context.Background(), "node-a", 10)
	if err != nil || len(hist) != 2 || hist[0].Status != attestation.StatusPass || hist[1].Status != attestation.StatusFail {
		t.Fatalf("history (newest first) = %+v, %v", hist, err)
	}
}

func TestUnansweredChallengeIsStale(t *testing.T) {
	r := newAttestRig(t)
	r.judge(t, r.answer(t, r.challenge(t), nil, nil))
	nonce := r.challenge(t)
	r.advance(31 * time.Second)
	if err := r.a.Expire(context.Background(), "node-a"); err != nil {
		t.Fatal(err)
	}
	if s := r.a.Status("node-a"); s != attestation.StatusStale || r.eligible() {
		t.Fatalf("after an unanswered challenge: %s", s)
	}
	// A late answer to the expired challenge no longer counts.
	if v := r.judge(t, r.answer(t, nonce, nil, nil)); v.Status == attestation.StatusPass {
		t.Fatalf("a late answer passed: %+v", v)
	}
	hist, err := r.a.History(context.Background(), "node-a", 10)
	if err != nil || len(hist) < 2 || hist[len(hist)-2].Status != attestation.StatusStale {
		t.Fatalf("history = %+v, %v", hist, err)
	}
}

func TestHistoryKeepsTheNewest(t *testing.T) {
	r := newAttestRig(t)
	for i := 0; i < 105; i++ {
		r.judge(t, r.answer(t, r.challenge(t), nil, nil))
	}
	hist, err := r.a.History(context.Background(), "node-a", 1000)
	if err != nil || len(hist) != 100 {
		t.Fatalf("history has %d verdicts, %v; want the newest 100", len(hist), err)
	}
	rec, _, _, _ := r.a.Record(context.Background(), "node-a")
	if rec.Count != 105 || rec.PassCount != 105 {
		t.Fatalf("counts = %+v", rec)
	}
}

// attestWithTelemetry passes node-a with a report vouching for key.
func (r *attestRig) attestWithTelemetry(t testing.TB, key *attestation.TelemetryKey) {
	t.Helper()
	v := r.judge(t, r.answer(t, r.challenge(t), nil, func(rep *attestation.Report) { rep.Agent.TelemetryKey = key.Public() }))
	if v.Status != attestation.StatusPass {
		t.Fatalf("attestation: %s %v", v.Status, v.Failed())
	}
	r.a.SetPlaced("node-a", r.live)
}

func telemetryPayload(node string, seq uint64, lease string) *agentv1.TelemetryPayload {
	util := uint32(42)
	return &agentv1.TelemetryPayload{NodeId: node, Sequence: seq, Time: timestamppb.Now(), Devices: []*agentv1.DeviceSample{
		{Uuid: "GPU-0", GpuUuid: "GPU-0"},
		{Uuid: "MIG-a", GpuUuid: "GPU-0", GpuInstanceId: 1, Profile: "1g.18gb", LeaseId: lease, Tenant: "acme", GrEngineActivePct: &util},
	}}
}

func TestTelemetryIsAcceptedOnlyFromTheAttestedKeyInOrder(t *testing.T) {
	r := newAttestRig(t)
	key, err := attestation.NewTelemetryKey()
	if err != nil {
		t.Fatal(err)
	}
	sign := func(p *agentv1.TelemetryPayload) *agentv1.TelemetryReport {
		rep, err := key.Sign(p)
		if err != nil {
			t.Fatal(err)
		}
		return rep
	}
	refused := func(rep *agentv1.TelemetryReport, check string) {
		t.Helper()
		_, err := r.a.Telemetry("node-a", rep)
		if !strings.Contains(fmt.Sprint(err), check) {
			t.Fatalf("report refused with %v, want check %s", err, check)
		}
	}
	// Before any attested key: refused.
	refused(sign(telemetryPayload("node-a", 1, "lease-1")), attestation.CheckTelemetryKey)
	r.attestWithTelemetry(t, key)

	first := sign(telemetryPayload("node-a", 1, "lease-1"))
	h, err := r.a.Telemetry("node-a", first)
	if err != nil || len(h.Leases) != 1 || string(h.Leases[0]) != "lease-1" || h.Devices != 2 || h.Sequence != 1 {
		t.Fatalf("a good report: %+v, %v", h, err)
	}
	refused(first, fleet.CheckTelemetrySequence) // replayed
	if _, err := r.a.Telemetry("node-a", sign(telemetryPayload("node-a", 5, "lease-1"))); err != nil {
		t.Fatal(err)
	}
	refused(sign(telemetryPayload("node-a", 4, "lease-1")), fleet.CheckTelemetrySequence) // reordered
	refused(&agentv1.TelemetryReport{Payload: first.GetPayload()}, attestation.CheckTelemetrySignature)
	other, _ := attestation.NewTelemetryKey()
	forged, _ := other.Sign(telemetryPayload("node-a", 9, "lease-1"))
	refused(forged, attestation.CheckTelemetryKey) // another key: not attested
	refused(sign(telemetryPayload("node-a", 10, "lease-elsewhere")), fleet.CheckTelemetryLease)
	refused(sign(telemetryPayload("node-b", 11, "lease-1")), fleet.CheckTelemetryNode)

	// A lease that left the node stays attributable for a grace period
	// (the agent stops it meanwhile), then not.
	r.a.SetPlaced("node-a", nil)
	if _, err := r.a.Telemetry("node-a", sign(telemetryPayload("node-a", 12, "lease-1"))); err != nil {
		t.Fatalf("within the grace period: %v", err)
	}
	r.advance(3 * time.Minute)
	refused(sign(telemetryPayload("node-a", 13, "lease-1")), fleet.CheckTelemetryLease)
}
