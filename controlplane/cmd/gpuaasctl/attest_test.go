package main

import (
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	"github.com/gpuaas/gpuaas/pkg/attestation"
	"github.com/gpuaas/gpuaas/pkg/attestation/attestationtest"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
)

var attestNonce = []byte("cli-challenge-nonce-0123456789ab")

// attestFiles writes a trust bundle, a policy the sample report passes,
// and the sample report of node-a signed by its agent, saved as the
// protojson of the session's ChallengeResponse.
func attestFiles(t *testing.T, mutate func(*attestation.Report)) (bundle, policy, report string) {
	t.Helper()
	dir := t.TempDir()
	ca := attestationtest.NewCA(t)
	pem, err := ca.Bundle().Marshal()
	if err != nil {
		t.Fatal(err)
	}
	bundle = filepath.Join(dir, "bundle.pem")
	if err := os.WriteFile(bundle, pem, 0o644); err != nil {
		t.Fatal(err)
	}
	pb, err := json.Marshal(attestationtest.Policy())
	if err != nil {
		t.Fatal(err)
	}
	policy = filepath.Join(dir, "policy.json")
	if err := os.WriteFile(policy, pb, 0o644); err != nil {
		t.Fatal(err)
	}
	r := attestationtest.Report("node-a", attestNonce, time.Now())
	if mutate != nil {
		mutate(r)
	}
	s, err := attestation.Sign(r, ca.AgentSVID(t, "node-a"))
	if err != nil {
		t.Fatal(err)
	}
	saved, err := protojson.Marshal(&agentv1.ChallengeResponse{Nonce: s.Nonce, Report: s.Report, Signature: s.Signature})
	if err != nil {
		t.Fatal(err)
	}
	report = filepath.Join(dir, "report.json")
	if err := os.WriteFile(report, saved, 0o644); err != nil {
		t.Fatal(err)
	}
	return bundle, policy, report
}

func TestAttestVerifyPassesASavedReport(t *testing.T) {
	bundle, policy, report := attestFiles(t, nil)
	out, err := ctl(t, "attest", "verify", report, "--bundle", bundle, "--policy", policy, "--node", "node-a", "--nonce", hex.EncodeToString(attestNonce))
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if !strings.HasPrefix(out, "VERDICT PASS\n") {
		t.Fatalf("verdict not first:\n%s", out)
	}
	rows := tableRows(t, out[strings.Index(out, "CHECK"):], "CHECK", "RESULT", "EXPECTED", "ACTUAL")
	seen := map[string]string{}
	for _, r := range rows {
		seen[r[0]] = r[1]
	}
	for _, name := range []string{"signature", "node", "nonce", "freshness", "agent_digest", "fence/lease-1/egress"} {
		if seen[name] != "ok" {
			t.Errorf("check %s: %q\n%s", name, seen[name], out)
		}
	}
}

func TestAttestVerifyNamesTheFailedCheck(t *testing.T) {
	bundle, policy, report := attestFiles(t, func(r *attestation.Report) { r.Agent.BinarySHA256 = strings.Repeat("77", 32) })
	out, err := ctl(t, "attest", "verify", report, "--bundle", bundle, "--policy", policy)
	if err == nil || !strings.Contains(err.Error(), "FAIL") || !strings.Contains(err.Error(), "agent_digest") {
		t.Fatalf("err %v\n%s", err, out)
	}
	if !strings.HasPrefix(out, "VERDICT FAIL\n") || !strings.Contains(out, strings.Repeat("77", 32)) || !strings.Contains(out, attestationtest.AgentSHA256) {
		t.Fatalf("expected and actual digests not shown:\n%s", out)
	}

	// Another CA's bundle: the signer check fails.
	other, _, _ := attestFiles(t, nil)
	out, err = ctl(t, "attest", "verify", report, "--bundle", other)
	if err == nil || !strings.Contains(err.Error(), "signer") {
		t.Fatalf("wrong bundle: err %v\n%s", err, out)
	}
}

func TestAttestStaleNonceAndOldReport(t *testing.T) {
	bundle, policy, report := attestFiles(t, nil)
	_, err := ctl(t, "attest", "verify", report, "--bundle", bundle, "--policy", policy, "--nonce", "00ff")
	if err == nil || !strings.Contains(err.Error(), "FAIL") || !strings.Contains(err.Error(), "nonce") {
		t.Fatalf("stale nonce: %v", err)
	}
	later := time.Now().Add(time.Hour).Format(time.RFC3339)
	out, err := ctl(t, "attest", "verify", report, "--bundle", bundle, "--policy", policy, "--at", later)
	if err == nil || !strings.Contains(err.Error(), "STALE") || !strings.HasPrefix(out, "VERDICT STALE") {
		t.Fatalf("old report: %v\n%s", err, out)
	}
}

func TestAttestVerifyWithoutPolicyAuthenticatesOnly(t *testing.T) {
	bundle, _, report := attestFiles(t, func(r *attestation.Report) { r.Agent.BinarySHA256 = "not judged" })
	out, err := ctl(t, "attest", "verify", report, "--bundle", bundle)
	if err != nil || !strings.HasPrefix(out, "VERDICT PASS (authenticity only: no --policy)") {
		t.Fatalf("%v\n%s", err, out)
	}
}

func TestAttestShowRendersVerdictChecksAndEvidence(t *testing.T) {
	bundle, policy, report := attestFiles(t, nil)
	out, err := ctl(t, "attest", "show", "--report", report, "--bundle", bundle, "--policy", policy)
	if err != nil {
		t.Fatal(err)
	}
	iv, ic, ie := strings.Index(out, "VERDICT PASS"), strings.Index(out, "CHECK"), strings.Index(out, "EVIDENCE")
	if iv != 0 || ic < iv || ie < ic {
		t.Fatalf("order verdict, checks, evidence wrong:\n%s", out)
	}
	for _, want := range []string{`gpu 1 GPU attestation +not available \(CC mode off\)`, `\ntpm +not available \(no TPM\)`, `lease lease-1 fence +egress`, `nvidia driver +570\.86\.15`} {
		if !regexp.MustCompile(want).MatchString(out) {
			t.Errorf("show lacks %q:\n%s", want, out)
		}
	}

	out, err = ctl(t, "attest", "show", "--report", report, "--bundle", bundle, "--policy", policy, "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var res struct {
		Verdict attestation.Verdict `json:"verdict"`
		Judged  bool                `json:"judged"`
		Report  attestation.Report  `json:"report"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if res.Verdict.Status != attestation.StatusPass || !res.Judged || res.Report.Node != "node-a" || len(res.Verdict.Checks) == 0 {
		t.Fatalf("%+v", res)
	}
}

func TestAttestRejectsBadInput(t *testing.T) {
	bundle, policy, report := attestFiles(t, nil)
	garbage := filepath.Join(t.TempDir(), "garbage.json")
	if err := os.WriteFile(garbage, []byte(`{"report":"bm90IGEgcmVwb3J0","signature":"eA=="}`), 0o644); err != nil {
		t.Fatal(err)
	}
	for name, args := range map[string][]string{
		"no bundle":        {"attest", "verify", report},
		"not a report":     {"attest", "verify", garbage, "--bundle", bundle},
		"bad nonce":        {"attest", "verify", report, "--bundle", bundle, "--nonce", "xyz"},
		"missing policy":   {"attest", "verify", report, "--bundle", bundle, "--policy", policy + ".missing"},
		"bad output":       {"attest", "show", "--report", report, "--bundle", bundle, "-o", "yaml"},
		"unreadable input": {"attest", "show", "--report", report + ".missing", "--bundle", bundle},
	} {
		if out, err := ctl(t, args...); err == nil {
			t.Errorf("%s: accepted\n%s", name, out)
		}
	}
}
