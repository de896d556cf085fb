package fleet

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/attestation"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/errs"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

// Attestation. The control plane challenges every agent when its session
// opens and every Interval after: a fresh 32-byte nonce, answered with a
// report signed by the agent's SVID (pkg/attestation). Each answer is
// verified and judged against the policy and against what this control
// plane placed on the node, and the verdict is stored with the report it
// judged (bucket attestation) and in the node's history (bucket
// attestation_history, the newest maxAttestationHistory kept).
//
// A node is eligible for new leases only while its latest verdict is PASS
// and younger than the policy's max age. A FAIL is an audit entry
// (node.attestation, every failed check named) and cordons the node in the
// same transaction; only an operator's uncordon lets it take leases again,
// and only once a later report passes. A change of status (PENDING, STALE
// or FAIL to PASS and back) is audited too; repeated PASSes are not, so the
// audit log does not grow with the challenge rate.
//
// The report also carries the agent's telemetry key: telemetry reports
// (TelemetryReport on the session) are accepted only when signed by the key
// of the node's latest verified report.

// maxAttestationHistory is how many verdicts are kept per node.
const maxAttestationHistory = 100

// maxPendingNonces bounds the outstanding challenges per node; the oldest
// is forgotten first.
const maxPendingNonces = 4

// CheckPlacement names the checks that compare a report's leases and
// partitions with what the control plane placed on the node.
const CheckPlacement = "placement"

// AttestOptions configures attestation.
type AttestOptions struct {
	// Policy judges reports. Required.
	Policy *attestation.Policy
	// Verifier authenticates reports against the trust bundle. Required.
	Verifier *attestation.Verifier
	// Interval is how often a connected agent is challenged (default: a
	// third of the policy's max age), NonceTTL how long a challenge may go
	// unanswered before the node is STALE (default 30s).
	Interval time.Duration
	NonceTTL time.Duration
	// Actor is the control plane's SPIFFE ID, the actor of the audit
	// entries attestation appends.
	Actor string
	// Leases lists the live leases placed on a node.
	Leases func(ctx context.Context, node string) ([]*leasev1.Lease, error)
}

// Attestor challenges agents and keeps their verdicts.
type Attestor struct {
	o      AttestOptions
	st     store.Store
	reg    *Registry
	maxAge time.Duration

	mu     sync.Mutex
	nodes  map[string]*nodeAttest
	loaded bool
}

// nodeAttest is the in-memory attestation state of one node.
type nodeAttest struct {
	status     attestation.Status // of the latest verdict; "" while pending
	reportTime time.Time
	pending    []pendingNonce
	telemetry  telemetryState
}

type pendingNonce struct {
	nonce  []byte
	issued time.Time
}

// AttestationRecord is a node's attestation state as stored.
type AttestationRecord struct {
	Latest      VerdictRecord      `json:"latest"`
	Report      attestation.Signed `json:"report"`
	Count       uint64             `json:"count"`
	PassCount   uint64             `json:"pass_count"`
	FailCount   uint64             `json:"fail_count"`
	StaleCount  uint64             `json:"stale_count"`
	LastSuccess time.Time          `json:"last_success,omitzero"`
	LastFailure time.Time          `json:"last_failure,omitzero"`
	// Seq numbers the node's history entries.
	Seq uint64 `json:"seq"`
}

// VerdictRecord is one stored verdict.
type VerdictRecord struct {
	Status       attestation.Status  `json:"status"`
	Checks       []attestation.Check `json:"checks"`
	ReportTime   time.Time           `json:"report_time,omitzero"`
	VerifyTime   time.Time           `json:"verify_time"`
	ReportSHA256 string              `json:"report_sha256,omitempty"`
}

// StatusPending is the status of a node with no verdict yet.
const StatusPending attestation.Status = "PENDING"

// EnableAttestation makes attestation decide which nodes take leases. It
// must be called before the registry serves sessions.
func (r *Registry) EnableAttestation(o AttestOptions) (*Attestor, error) {
	if o.Policy == nil || o.Verifier == nil || o.Leases == nil {
		return nil, errors.New("enable attestation: policy, verifier and leases are required")
	}
	maxAge := time.Duration(o.Policy.MaxAge)
	if maxAge <= 0 {
		maxAge = attestation.DefaultMaxAge
	}
	if o.Interval <= 0 {
		o.Interval = maxAge / 3
	}
	if o.Interval >= maxAge {
		return nil, fmt.Errorf("enable attestation: interval %s must be shorter than the policy's max age %s", o.Interval, maxAge)
	}
	if o.NonceTTL <= 0 {
		o.NonceTTL = 30 * time.Second
	}
	a := &Attestor{o: o, st: r.st, reg: r, maxAge: maxAge, nodes: map[string]*nodeAttest{}}
	r.mu.Lock()
	r.attest = a
	r.mu.Unlock()
	r.changed()
	return a, nil
}

// Interval is how often a session challenges its agent.
func (a *Attestor) Interval() time.Duration { return a.o.Interval }

func (a *Attestor) node(n string) *nodeAttest {
	na := a.nodes[n]
	if na == nil {
		na = &nodeAttest{}
		a.nodes[n] = na
	}
	return na
}

// load reads every node's latest status once, so that eligibility (hot:
// every placement) never touches the store and survives a restart.
func (a *Attestor) load(ctx context.Context) error {
	a.mu.Lock()
	loaded := a.loaded
	a.mu.Unlock()
	if loaded {
		return nil
	}
	recs := map[string]AttestationRecord{}
	err := a.st.View(ctx, func(tx store.Tx) error {
		return tx.Scan(store.BucketAttestation, "", false, func(k string, v []byte) error {
			var rec AttestationRecord
			if err := json.Unmarshal(v, &rec); err != nil {
				return fmt.Errorf("decode attestation record %s: %w", k, err)
			}
			recs[k] = rec
			return nil
		})
	})
	if err != nil {
		return err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.loaded {
		return nil
	}
	for n, rec := range recs {
		na := a.node(n)
		na.status, na.reportTime = rec.Latest.Status, rec.Latest.ReportTime
	}
	a.loaded = true
	a.reg.changed()
	return nil
}

// effective is the status now of a node whose latest verdict is status,
// made from a report of reportTime.
func (a *Attestor) effective(status attestation.Status, reportTime, now time.Time) attestation.Status {
	switch {
	case status == "":
		return StatusPending
	case status == attestation.StatusPass && now.Sub(reportTime) > a.maxAge:
		return attestation.StatusStale
	}
	return status
}

// Status is node's attestation status now.
func (a *Attestor) Status(node string) attestation.Status {
	now := a.reg.now()
	a.mu.Lock()
	defer a.mu.Unlock()
	na := a.nodes[node]
	if na == nil {
		return StatusPending
	}
	return a.effective(na.status, na.reportTime, now)
}

// eligibleSet reports which of nodes may take new leases, under one lock.
func (a *Attestor) eligibleSet(nodes []string, now time.Time) (map[string]bool, time.Time) {
	out := make(map[string]bool, len(nodes))
	var until time.Time
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, n := range nodes {
		if na := a.nodes[n]; na != nil && a.effective(na.status, na.reportTime, now) == attestation.StatusPass {
			out[n] = true
			// PASS until more than maxAge after the report (effective).
			if stale := na.reportTime.Add(a.maxAge); until.IsZero() || stale.Before(until) {
				until = stale
			}
		}
	}
	return out, until
}

// Challenge makes a new challenge for node's agent.
func (a *Attestor) Challenge(ctx context.Context, node string) (*agentv1.Challenge, error) {
	if err := a.load(ctx); err != nil {
		return nil, err
	}
	nonce := make([]byte, 32)
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	na := a.node(node)
	na.pending = append(na.pending, pendingNonce{nonce: nonce, issued: a.reg.now()})
	if len(na.pending) > maxPendingNonces {
		na.pending = slices.Delete(na.pending, 0, len(na.pending)-maxPendingNonces)
	}
	return &agentv1.Challenge{Nonce: nonce}, nil
}

// Expire records a STALE verdict for each of node's challenges left
// unanswered past the nonce TTL. Sessions call it on their challenge tick.
func (a *Attestor) Expire(ctx context.Context, node string) error {
	now := a.reg.now()
	a.mu.Lock()
	na := a.node(node)
	var expired []pendingNonce
	na.pending = slices.DeleteFunc(na.pending, func(p pendingNonce) bool {
		if now.Sub(p.issued) > a.o.NonceTTL {
			expired = append(expired, p)
			return true
		}
		return false
	})
	a.mu.Unlock()
	for _, p := range expired {
		v := attestation.Verdict{Node: node, Status: attestation.StatusStale, Checks: []attestation.Check{{
			Name: attestation.CheckFreshness, Expected: "an answer within " + a.o.NonceTTL.String(),
			Actual: fmt.Sprintf("no answer to challenge %x after %s", p.nonce[:8], now.Sub(p.issued).Round(time.Second)),
		}}}
		if _, err := a.record(ctx, node, v, attestation.Signed{}, now); err != nil {
			return err
		}
	}
	return nil
}

// Judge verifies and judges an agent's answer to a challenge, records the
// verdict (cordoning the node on FAIL) and returns it. node is the
// session's node, which the report must be of.
func (a *Attestor) Judge(ctx context.Context, node string, resp *agentv1.ChallengeResponse) (attestation.Verdict, error) {
	if err := a.load(ctx); err != nil {
		return attestation.Verdict{}, err
	}
	now := a.reg.now()
	if len(resp.GetReport()) > attestation.MaxReportSize || len(resp.GetNonce()) > 64 {
		return attestation.Verdict{}, errs.InvalidArgument("challenge_response", "report or nonce too large")
	}
	a.mu.Lock()
	na := a.node(node)
	var issued time.Time
	known := false
	for i, p := range na.pending {
		if bytes.Equal(p.nonce, resp.GetNonce()) {
			issued, known = p.issued, true
			na.pending = slices.Delete(na.pending, i, i+1)
			break
		}
	}
	a.mu.Unlock()

	exp := attestation.Expected{Node: node, Now: now}
	if known {
		exp.Nonce = resp.GetNonce()
	}
	signed := attestation.Signed{Nonce: resp.GetNonce(), Report: resp.GetReport(), Signature: resp.GetSignature()}
	v := a.o.Policy.VerifyAndEvaluate(signed, a.o.Verifier, exp)
	if !known {
		// A nonce this control plane did not issue, or one already
		// answered: a replayed or forged report.
		v.Checks = append(v.Checks, attestation.Check{Name: attestation.CheckNonce,
			Expected: "the nonce of an outstanding challenge", Actual: fmt.Sprintf("%x (not issued, or already answered)", resp.GetNonce())})
	} else if age := now.Sub(issued); age > a.o.NonceTTL {
		v.Checks = append(v.Checks, attestation.Check{Name: attestation.CheckFreshness,
			Expected: "an answer within " + a.o.NonceTTL.String(), Actual: "answered after " + age.Round(time.Millisecond).String()})
	}
	var report *attestation.Report
	if sig, ok := v.Check(attestation.CheckSignature); ok && sig.OK {
		report, _ = attestation.Decode(resp.GetReport())
	}
	if report != nil {
		live, err := a.o.Leases(ctx, node)
		if err != nil {
			return attestation.Verdict{}, err
		}
		v.Checks = append(v.Checks, placementChecks(node, report, live)...)
	}
	v.Node = node
	v.Restatus()
	if _, err := a.record(ctx, node, v, signed, now); err != nil {
		return attestation.Verdict{}, err
	}
	if report != nil {
		a.setTelemetryKey(node, report.Agent.TelemetryKey)
	}
	return v, nil
}

// placementChecks compares a verified report with the leases the control
// plane placed on the node: every lease the agent runs must be one placed
// there, on the GPU and partition it was placed on, and every lease the
// control plane knows as RUNNING must be in the report. Idle partitions
// (static layouts, partitions being torn down) are not leases and are not
// judged here; the policy's mig_layout check covers a full layout.
func placementChecks(node string, r *attestation.Report, live []*leasev1.Lease) []attestation.Check {
	var out []attestation.Check
	placed := map[string]*leasev1.Lease{}
	for _, l := range live {
		placed[l.GetId()] = l
	}
	layout := map[string]attestation.MIGInstance{}
	for _, d := range r.GPU.Devices {
		for _, m := range d.MIGLayout {
			if m.MIGUUID != "" {
				layout[d.UUID+"/"+m.MIGUUID] = m
			}
		}
	}
	reported := map[string]bool{}
	for _, le := range r.Leases {
		reported[le.LeaseID] = true
		name := CheckPlacement + "/" + le.LeaseID
		l := placed[le.LeaseID]
		if l == nil {
			out = append(out, attestation.Check{Name: name, Expected: "a lease placed on " + node, Actual: "runs a lease this control plane did not place there"})
			continue
		}
		p := l.GetPlacement()
		want := fmt.Sprintf("gpu %s profile %d at %d", p.GetGpuUuid(), p.GetProfileId(), p.GetStart())
		if p.GetMigProfile() == "" && p.GetSize() == 0 {
			want = "gpu " + p.GetGpuUuid() + " (whole gpu)"
		}
		got := "gpu " + le.GPUUUID
		if le.MIGUUID == "" {
			got += " (whole gpu)"
		} else if m, ok := layout[le.GPUUUID+"/"+le.MIGUUID]; ok {
			got = fmt.Sprintf("gpu %s profile %d at %d", le.GPUUUID, m.ProfileID, m.Start)
		} else {
			got += " partition " + le.MIGUUID + " (not in the gpu's layout)"
		}
		out = append(out, attestation.Check{Name: name, OK: want == got, Expected: want, Actual: got})
	}
	for _, l := range live {
		if l.GetPhase() == leasev1.Phase_PHASE_RUNNING && !reported[l.GetId()] {
			out = append(out, attestation.Check{Name: CheckPlacement + "/" + l.GetId(), Expected: "running on " + node, Actual: "(not in the report)"})
		}
	}
	return out
}

// record stores a verdict: the node's record and history, the audit entry
// it owes (every FAIL, and every change of status) and, on FAIL, the
// cordon. All in one transaction.
func (a *Attestor) record(ctx context.Context, node string, v attestation.Verdict, signed attestation.Signed, now time.Time) (AttestationRecord, error) {
	vr := VerdictRecord{Status: v.Status, Checks: v.Checks, ReportTime: v.ReportTime, VerifyTime: now}
	if vr.Checks == nil {
		vr.Checks = []attestation.Check{}
	}
	if len(signed.Report) > 0 {
		h := sha256.Sum256(signed.Report)
		vr.ReportSHA256 = hex.EncodeToString(h[:])
	}
	var rec AttestationRecord
	cordoned := false
	err := a.st.Update(ctx, func(tx store.Tx) error {
		var err error
		if rec, err = getAttestation(tx, node); err != nil {
			return err
		}
		prev := a.effective(rec.Latest.Status, rec.Latest.ReportTime, now)
		rec.Latest = vr
		if len(signed.Report) > 0 {
			rec.Report = signed
		}
		rec.Count++
		rec.Seq++
		switch v.Status {
		case attestation.StatusPass:
			rec.PassCount++
			rec.LastSuccess = now
		case attestation.StatusFail:
			rec.FailCount++
			rec.LastFailure = now
		case attestation.StatusStale:
			rec.StaleCount++
		}
		if err := putJSON(tx, store.BucketAttestation, node, rec); err != nil {
			return err
		}
		if err := putJSON(tx, store.BucketAttestationHistory, historyKey(node, rec.Seq), vr); err != nil {
			return err
		}
		if rec.Seq > maxAttestationHistory {
			if err := tx.Delete(store.BucketAttestationHistory, historyKey(node, rec.Seq-maxAttestationHistory)); err != nil && !errors.Is(err, store.ErrNotFound) {
				return err
			}
		}
		failed := v.Failed()
		if v.Status != attestation.StatusFail && prev == v.Status {
			return nil
		}
		names := make([]string, 0, len(failed))
		details := map[string]string{"status": string(v.Status), "previous": string(prev), "report_sha256": vr.ReportSHA256}
		for i, c := range failed {
			names = append(names, c.Name)
			if i < 16 {
				details["check."+truncateDetail(c.Name, 48)] = truncateDetail("expected "+c.Expected+"; actual "+c.Actual, 200)
			}
		}
		outcome, reason := auditlog.OutcomeSuccess, "attestation "+string(v.Status)
		if v.Status != attestation.StatusPass {
			outcome = auditlog.OutcomeFailure
		}
		if len(names) > 0 {
			reason += ": failed " + truncateDetail(strings.Join(names, ", "), 512)
		}
		if _, err := audit.Append(tx, auditlog.Entry{Time: now, Actor: a.o.Actor, Action: "node.attestation", Resource: "node/" + node,
			Outcome: outcome, Reason: reason, Details: details}); err != nil {
			return err
		}
		if v.Status != attestation.StatusFail {
			return nil
		}
		cordoned, err = cordonTx(tx, node, true, auditlog.Entry{Time: now, Actor: a.o.Actor, Action: "node.cordon", Resource: "node/" + node,
			Outcome: auditlog.OutcomeSuccess, Reason: truncateDetail(reason, 256), Details: map[string]string{"cause": "attestation"}})
		return err
	})
	if err != nil {
		return AttestationRecord{}, fmt.Errorf("record attestation verdict for %s: %w", node, err)
	}
	if cordoned {
		a.reg.setCordoned(node, true)
		a.reg.log.Warn("node cordoned: attestation failed", "node", node, "failed", len(v.Failed()))
	}
	a.mu.Lock()
	na := a.node(node)
	na.status, na.reportTime = v.Status, v.ReportTime
	a.mu.Unlock()
	a.reg.changed()
	return rec, nil
}

func historyKey(node string, seq uint64) string { return fmt.Sprintf("%s/%020d", node, seq) }

func truncateDetail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}

func getAttestation(tx store.Tx, node string) (AttestationRecord, error) {
	var rec AttestationRecord
	raw, err := tx.Get(store.BucketAttestation, node)
	if errors.Is(err, store.ErrNotFound) {
		return rec, nil
	}
	if err != nil {
		return rec, err
	}
	if err := json.Unmarshal(raw, &rec); err != nil {
		return rec, fmt.Errorf("decode attestation record %s: %w", node, err)
	}
	return rec, nil
}

func putJSON(tx store.Tx, bucket, key string, v any) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return tx.Put(bucket, key, raw)
}

// Record returns node's stored attestation state and its status now;
// found is false for a node never judged.
func (a *Attestor) Record(ctx context.Context, node string) (rec AttestationRecord, status attestation.Status, found bool, err error) {
	err = a.st.View(ctx, func(tx store.Tx) error {
		raw, err := tx.Get(store.BucketAttestation, node)
		if errors.Is(err, store.ErrNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		found = true
		return json.Unmarshal(raw, &rec)
	})
	if err != nil || !found {
		return rec, StatusPending, found, err
	}
	return rec, a.effective(rec.Latest.Status, rec.Latest.ReportTime, a.reg.now()), true, nil
}

// History returns node's newest verdicts, newest first, at most limit.
func (a *Attestor) History(ctx context.Context, node string, limit int) ([]VerdictRecord, error) {
	var out []VerdictRecord
	err := a.st.View(ctx, func(tx store.Tx) error {
		return tx.Scan(store.BucketAttestationHistory, node+"/", true, func(k string, v []byte) error {
			var vr VerdictRecord
			if err := json.Unmarshal(v, &vr); err != nil {
				return fmt.Errorf("decode attestation history %s: %w", k, err)
			}
			out = append(out, vr)
			if len(out) >= limit {
				return store.ErrStopScan
			}
			return nil
		})
	})
	return out, err
}

// AttestationStatusProto maps a status to the API's enum.
func AttestationStatusProto(s attestation.Status) nodev1.AttestationStatus {
	switch s {
	case attestation.StatusPass:
		return nodev1.AttestationStatus_ATTESTATION_STATUS_PASS
	case attestation.StatusFail:
		return nodev1.AttestationStatus_ATTESTATION_STATUS_FAIL
	case attestation.StatusStale:
		return nodev1.AttestationStatus_ATTESTATION_STATUS_STALE
	case StatusPending:
		return nodev1.AttestationStatus_ATTESTATION_STATUS_PENDING
	}
	return nodev1.AttestationStatus_ATTESTATION_STATUS_UNSPECIFIED
}
