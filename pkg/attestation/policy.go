package attestation

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
)

// Status is a node's attestation result.
type Status string

const (
	// StatusPass: every check held.
	StatusPass Status = "PASS"
	// StatusFail: at least one check other than freshness failed.
	StatusFail Status = "FAIL"
	// StatusStale: the evidence was valid but too old (or never came).
	StatusStale Status = "STALE"
)

// Checks Evaluate runs, as named in a Verdict. Per-item checks append
// "/" and the item (a GPU UUID, a lease id, a PCR index).
const (
	CheckFreshness     = "freshness"
	CheckNode          = "node"
	CheckAgentDigest   = "agent_digest"
	CheckConfigDigest  = "config_digest"
	CheckDriverVersion = "driver_version"
	CheckSecureBoot    = "secure_boot"
	CheckMIGLayout     = "mig_layout"
	CheckLeases        = "leases"
	CheckImageDigest   = "image_digest"
	CheckFence         = "fence"
	CheckTPMQuote      = "tpm_quote"
	CheckTPMKey        = "tpm_key"
	CheckPCR           = "pcr"
	CheckGPUCC         = "gpu_cc"
)

// Duration is a time.Duration written as "5m" in a policy file.
type Duration time.Duration

func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

// DefaultMaxAge is the report age beyond which a report is STALE when the
// policy sets none.
const DefaultMaxAge = 5 * time.Minute

// Policy is what a fleet requires of every node. An empty list means "not
// configured" and its check passes as such, except AllowedAgentSHA256:
// a policy that allows no agent binary fails every node (fail closed).
type Policy struct {
	AllowedAgentSHA256    []string `json:"allowed_agent_sha256"`
	AllowedConfigSHA256   []string `json:"allowed_config_sha256,omitempty"`
	AllowedDriverVersions []string `json:"allowed_driver_versions,omitempty"`
	// RequiredFences are the fence kinds every running lease must have
	// (e.g. "device", "egress").
	RequiredFences    []string `json:"required_fences,omitempty"`
	RequireSecureBoot bool     `json:"require_secure_boot,omitempty"`
	// RequireTPM fails a node without a TPM quote.
	RequireTPM bool `json:"require_tpm,omitempty"`
	// PCRs are expected SHA-256 PCR values; each must be quoted and equal.
	PCRs []PCRValue `json:"pcrs,omitempty"`
	// AKPublicSHA256 pins each node's TPM attestation key (node -> hex
	// SHA-256 of the marshalled TPMT_PUBLIC); unpinned keys are trusted on
	// the report's word and the check says so.
	AKPublicSHA256 map[string]string `json:"ak_public_sha256,omitempty"`
	// RequireGPUCC fails a GPU that is not in confidential-computing mode.
	RequireGPUCC bool     `json:"require_gpu_cc,omitempty"`
	MaxAge       Duration `json:"max_age,omitempty"`
}

// ParsePolicy decodes a policy file, rejecting unknown fields.
func ParsePolicy(b []byte) (*Policy, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var p Policy
	if err := dec.Decode(&p); err != nil {
		return nil, fmt.Errorf("parse attestation policy: %w", err)
	}
	return &p, nil
}

// Expected is what the verifier knows about this node and this challenge.
type Expected struct {
	Node  string
	Nonce []byte // the challenge's nonce; nil skips the check (offline)
	Now   time.Time
	// CheckLeases compares the report's leases with Leases (the leases the
	// control plane placed on the node and believes running).
	CheckLeases bool
	Leases      []ExpectedLease
	// MIGLayout, when non-nil, is the expected GPU instances per GPU UUID.
	MIGLayout map[string][]MIGInstance
}

// ExpectedLease is a lease the control plane placed.
type ExpectedLease struct {
	LeaseID     string
	GPUUUID     string
	MIGUUID     string
	ImageDigest string
}

// Check is one evaluated check.
type Check struct {
	Name     string `json:"name"`
	OK       bool   `json:"ok"`
	Expected string `json:"expected"`
	Actual   string `json:"actual"`
}

// Verdict is the result for one report.
type Verdict struct {
	Node       string    `json:"node"`
	Status     Status    `json:"status"`
	ReportTime time.Time `json:"report_time"`
	Checks     []Check   `json:"checks"`
}

// Failed lists the failed checks.
func (v *Verdict) Failed() []Check {
	var out []Check
	for _, c := range v.Checks {
		if !c.OK {
			out = append(out, c)
		}
	}
	return out
}

// Check returns the named check.
func (v *Verdict) Check(name string) (Check, bool) {
	for _, c := range v.Checks {
		if c.Name == name {
			return c, true
		}
	}
	return Check{}, false
}

// VerifyAndEvaluate verifies a signed report and evaluates it. A
// verification failure is a FAIL verdict whose failed check is named.
func (p *Policy) VerifyAndEvaluate(s Signed, verifier *Verifier, exp Expected) Verdict {
	r, id, err := verifier.Verify(s)
	if err != nil {
		v := Verdict{Node: exp.Node, Status: StatusFail}
		if r != nil {
			v.ReportTime = r.Time
		}
		var ce *CheckError
		if errors.As(err, &ce) {
			actual := ce.Actual
			if ce.Err != nil {
				actual += ": " + ce.Err.Error()
			}
			v.Checks = append(v.Checks, Check{Name: ce.Check, Expected: ce.Expected, Actual: actual})
		} else {
			v.Checks = append(v.Checks, Check{Name: CheckSignature, Expected: "a verified report", Actual: err.Error()})
		}
		return v
	}
	v := p.Evaluate(r, exp)
	v.Checks = append([]Check{{Name: CheckSignature, OK: true, Expected: "signed by the node's agent", Actual: id.String()}}, v.Checks...)
	return v
}

// Evaluate checks a verified report against the policy and expectations.
// Every check is in the verdict, passed or failed; the status is FAIL when
// any check but freshness failed, STALE when only freshness failed.
func (p *Policy) Evaluate(r *Report, exp Expected) Verdict {
	v := Verdict{Node: r.Node, Status: StatusPass, ReportTime: r.Time}
	add := func(name string, ok bool, expected, actual string) {
		v.Checks = append(v.Checks, Check{Name: name, OK: ok, Expected: expected, Actual: actual})
	}

	if exp.Node != "" {
		add(CheckNode, r.Node == exp.Node, exp.Node, r.Node)
	}
	if exp.Nonce != nil {
		add(CheckNonce, bytes.Equal(r.Nonce, exp.Nonce), fmt.Sprintf("%x", exp.Nonce), fmt.Sprintf("%x", r.Nonce))
	}
	maxAge := time.Duration(p.MaxAge)
	if maxAge <= 0 {
		maxAge = DefaultMaxAge
	}
	now := exp.Now
	if now.IsZero() {
		now = time.Now()
	}
	age := now.Sub(r.Time)
	// A report from the future (beyond clock skew) is as suspect as an old one.
	add(CheckFreshness, age <= maxAge && age >= -time.Minute, "age <= "+maxAge.String(), "age "+age.Round(time.Millisecond).String())

	add(CheckAgentDigest, slices.Contains(p.AllowedAgentSHA256, r.Agent.BinarySHA256), oneOf(p.AllowedAgentSHA256, "(none allowed: policy lists no agent digest)"), r.Agent.BinarySHA256)
	if len(p.AllowedConfigSHA256) > 0 {
		add(CheckConfigDigest, slices.Contains(p.AllowedConfigSHA256, r.Agent.ConfigSHA256), oneOf(p.AllowedConfigSHA256, ""), r.Agent.ConfigSHA256)
	}
	if len(p.AllowedDriverVersions) > 0 {
		add(CheckDriverVersion, slices.Contains(p.AllowedDriverVersions, r.GPU.DriverVersion), oneOf(p.AllowedDriverVersions, ""), r.GPU.DriverVersion)
	}
	if p.RequireSecureBoot {
		add(CheckSecureBoot, r.Host.SecureBoot == SecureBootEnabled, SecureBootEnabled, r.Host.SecureBoot)
	}
	for _, d := range r.GPU.Devices {
		if p.RequireGPUCC {
			add(CheckGPUCC+"/"+d.UUID, d.CC.Status == CCAttested && len(d.CC.Report) > 0, CCAttested, d.CC.Status)
		}
	}
	p.evaluateMIG(r, exp, add)
	p.evaluateLeases(r, exp, add)
	p.evaluateTPM(r, add)

	v.Restatus()
	return v
}

// Restatus sets the status from the checks, after a verifier has added
// checks of its own: FAIL when any check but freshness failed, STALE when
// only freshness failed, else PASS.
func (v *Verdict) Restatus() {
	v.Status = StatusPass
	for _, c := range v.Checks {
		if c.OK {
			continue
		}
		if c.Name == CheckFreshness {
			if v.Status == StatusPass {
				v.Status = StatusStale
			}
			continue
		}
		v.Status = StatusFail
	}
}

func (p *Policy) evaluateMIG(r *Report, exp Expected, add func(string, bool, string, string)) {
	if exp.MIGLayout == nil {
		return
	}
	have := map[string][]MIGInstance{}
	for _, d := range r.GPU.Devices {
		have[d.UUID] = d.MIGLayout
	}
	gpus := map[string]bool{}
	for u := range exp.MIGLayout {
		gpus[u] = true
	}
	for u, l := range have {
		if len(l) > 0 {
			gpus[u] = true
		}
	}
	for _, u := range sortedKeys(gpus) {
		want, got := layoutString(exp.MIGLayout[u]), layoutString(have[u])
		if _, ok := have[u]; !ok {
			got = "(gpu not in report)"
		}
		add(CheckMIGLayout+"/"+u, want == got, want, got)
	}
}

// layoutString renders a layout by what placement means (profile, start,
// size), ignoring instance ids and UUIDs, which the driver assigns.
func layoutString(l []MIGInstance) string {
	parts := make([]string, 0, len(l))
	for _, m := range l {
		parts = append(parts, fmt.Sprintf("profile %d at %d+%d", m.ProfileID, m.Start, m.Size))
	}
	slices.Sort(parts)
	if len(parts) == 0 {
		return "(none)"
	}
	return strings.Join(parts, ", ")
}

func (p *Policy) evaluateLeases(r *Report, exp Expected, add func(string, bool, string, string)) {
	if exp.CheckLeases {
		want := make([]string, 0, len(exp.Leases))
		for _, l := range exp.Leases {
			want = append(want, l.LeaseID)
		}
		got := make([]string, 0, len(r.Leases))
		for _, l := range r.Leases {
			got = append(got, l.LeaseID)
		}
		slices.Sort(want)
		slices.Sort(got)
		add(CheckLeases, slices.Equal(want, got), oneOf(want, "(none)"), oneOf(got, "(none)"))
		byID := map[string]LeaseEvidence{}
		for _, l := range r.Leases {
			byID[l.LeaseID] = l
		}
		for _, l := range exp.Leases {
			got, ok := byID[l.LeaseID]
			if !ok {
				continue
			}
			wantPlace, gotPlace := l.GPUUUID+" "+l.MIGUUID, got.GPUUUID+" "+got.MIGUUID
			add(CheckLeases+"/"+l.LeaseID, wantPlace == gotPlace, strings.TrimSpace(wantPlace), strings.TrimSpace(gotPlace))
			if l.ImageDigest != "" {
				add(CheckImageDigest+"/"+l.LeaseID, got.ImageDigest == l.ImageDigest, l.ImageDigest, got.ImageDigest)
			}
		}
	}
	for _, l := range r.Leases {
		for _, kind := range p.RequiredFences {
			var found []string
			for _, f := range l.Fences {
				if f.Kind == kind && f.ProgramID != 0 && f.Tag != "" {
					found = append(found, fmt.Sprintf("%s program %d tag %s", f.Attach, f.ProgramID, f.Tag))
				}
			}
			add(CheckFence+"/"+l.LeaseID+"/"+kind, len(found) > 0, "an attached "+kind+" program", oneOf(found, "(none)"))
		}
	}
}

func (p *Policy) evaluateTPM(r *Report, add func(string, bool, string, string)) {
	q := r.TPM.Quote
	if q == nil {
		if p.RequireTPM || len(p.PCRs) > 0 {
			add(CheckTPMQuote, false, "a tpm quote", r.TPM.Status)
		}
		return
	}
	qd, err := HashWithoutQuote(r)
	actual := "verified"
	if err == nil {
		err = VerifyQuote(q, QualifyingData(r.Nonce, qd))
	}
	if err != nil {
		actual = err.Error()
	}
	add(CheckTPMQuote, err == nil, "a quote by the attestation key over this nonce and report", actual)
	ak := AKPublicSHA256(q.AKPublic)
	if pin, ok := p.AKPublicSHA256[r.Node]; ok {
		add(CheckTPMKey, pin == ak, pin, ak)
	} else if p.RequireTPM {
		add(CheckTPMKey, false, "a pinned attestation key for "+r.Node, ak+" (not pinned)")
	} else {
		add(CheckTPMKey, true, "(not pinned: trusted on the report's word)", ak)
	}
	got := map[int]string{}
	for _, v := range q.PCRs {
		got[v.Index] = v.SHA256
	}
	for _, want := range p.PCRs {
		g, ok := got[want.Index]
		if !ok {
			g = "(not quoted)"
		}
		add(fmt.Sprintf("%s/%d", CheckPCR, want.Index), ok && err == nil && strings.EqualFold(g, want.SHA256), want.SHA256, g)
	}
}

func oneOf(list []string, empty string) string {
	if len(list) == 0 {
		return empty
	}
	return strings.Join(list, " | ")
}

func sortedKeys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
