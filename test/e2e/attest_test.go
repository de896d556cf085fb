package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/pkg/attestation"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
	"github.com/gpuaas/gpuaas/test/cluster"
	"github.com/gpuaas/gpuaas/test/harness"
)

// startAttestCluster runs a one-node cluster (node-a, one H200) with the
// policy adjusted by policy, and dumps the daemons' logs if the test fails.
func startAttestCluster(t *testing.T, ctx context.Context, policy func(*attestation.Policy)) *cluster.Cluster {
	t.Helper()
	harness.RequireRoot(t, harness.ContainerdComponents...)
	bin := buildBinaries(t)
	c := cluster.StartT(t, ctx, cluster.Options{BinDir: bin, Agents: map[string][]string{"node-a": {"H200"}}, StopGrace: time.Second, Policy: policy})
	return c
}

// attestationOf waits until node-a's attestation satisfies ok.
func attestationOf(t *testing.T, ctx context.Context, nc nodev1.NodeServiceClient, timeout time.Duration, ok func(*nodev1.NodeAttestation) error) *nodev1.NodeAttestation {
	t.Helper()
	var a *nodev1.NodeAttestation
	waitUntil(t, timeout, func() error {
		resp, err := nc.GetNodeAttestation(ctx, &nodev1.GetNodeAttestationRequest{Id: "node-a"})
		if err != nil {
			return err
		}
		a = resp.GetAttestation()
		return ok(a)
	})
	return a
}

func checkOf(v *nodev1.AttestationVerdict, name string) *nodev1.AttestationCheck {
	for _, c := range v.GetChecks() {
		if c.GetName() == name {
			return c
		}
	}
	return nil
}

// metricValue sums the samples of a metric whose labels contain every
// label="value" pair given, from a Prometheus text endpoint.
func metricValue(t *testing.T, addr, name string, labels ...string) (float64, bool) {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sum, found := 0.0, false
	sc := bufio.NewScanner(io.LimitReader(resp.Body, 16<<20))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		match := true
		for _, l := range labels {
			if !strings.Contains(line, l) {
				match = false
			}
		}
		if !match {
			continue
		}
		v, err := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
		if err != nil {
			t.Fatalf("metric line %q: %v", line, err)
		}
		sum, found = sum+v, true
	}
	return sum, found
}

// TestAttestationPassesAndTelemetryIsAttributed runs the real agent and
// control plane: the node passes attestation before it gets a lease, the
// report a reviewer saves verifies offline with nothing but the trust
// bundle, later reports account for the running lease and its fences, and
// the lease's partition telemetry is attributed to the lease on the agent's
// endpoint and accepted, signed, by the control plane.
func TestAttestationPassesAndTelemetryIsAttributed(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	c := startAttestCluster(t, ctx, nil)
	nc, err := c.Nodes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	lc, err := c.Leases(ctx)
	if err != nil {
		t.Fatal(err)
	}
	a := attestationOf(t, ctx, nc, 30*time.Second, func(a *nodev1.NodeAttestation) error {
		if a.GetStatus() != nodev1.AttestationStatus_ATTESTATION_STATUS_PASS {
			return fmt.Errorf("attestation %v, checks %v", a.GetStatus(), a.GetLatest().GetChecks())
		}
		return nil
	})
	if a.GetReport() == nil || a.GetPassCount() == 0 {
		t.Fatalf("a PASS without its report or count: %v", a)
	}

	// A reviewer saves the report and verifies it offline.
	saved := filepath.Join(c.Dir, "node-a-report.json")
	out, err := c.Ctl(ctx, "attest", "show", "node-a", "--save", saved)
	if err != nil || !strings.HasPrefix(out, "NODE node-a: PASS") || !strings.Contains(out, "agent_digest") {
		t.Fatalf("attest show node-a: %v\n%s", err, out)
	}
	out, err = c.Ctl(ctx, "attest", "verify", saved, "--bundle", c.PKI.BundlePath, "--policy", c.PolicyPath(), "--node", "node-a")
	if err != nil || !strings.Contains(out, "VERDICT PASS") {
		t.Fatalf("offline verify of the saved report: %v\n%s", err, out)
	}

	l := create(t, ctx, lc, mkReq("attested", "1g.18gb", time.Hour, "sh", "-c", "while true; do sleep 1; done"))
	if _, err := c.WaitPhase(ctx, lc, l.GetId(), time.Minute, leasev1.Phase_PHASE_RUNNING); err != nil {
		t.Fatal(err)
	}
	// The next reports account for the lease: placed where the control
	// plane put it, fenced by both programs.
	a = attestationOf(t, ctx, nc, 40*time.Second, func(a *nodev1.NodeAttestation) error {
		v := a.GetLatest()
		for _, name := range []string{"placement/" + l.GetId(), "fence/" + l.GetId() + "/device", "fence/" + l.GetId() + "/egress"} {
			if ch := checkOf(v, name); ch == nil || !ch.GetOk() {
				return fmt.Errorf("check %s = %v (status %v)", name, ch, a.GetStatus())
			}
		}
		return nil
	})
	if a.GetStatus() != nodev1.AttestationStatus_ATTESTATION_STATUS_PASS {
		t.Fatalf("with a running lease: %v %v", a.GetStatus(), a.GetLatest().GetChecks())
	}
	out, err = c.Ctl(ctx, "attest", "history", "node-a")
	if err != nil || strings.Count(out, "PASS") < 2 {
		t.Fatalf("attest history: %v\n%s", err, out)
	}

	// Telemetry: the partition's samples carry the lease and tenant on the
	// agent's endpoint, and the control plane accepts the signed reports.
	waitUntil(t, 30*time.Second, func() error {
		if _, ok := metricValue(t, c.MetricsAddr["node-a"], "DCGM_FI_PROF_GR_ENGINE_ACTIVE", `lease="`+l.GetId()+`"`, `tenant="acme"`); !ok {
			return errors.New("no GR engine activity attributed to the lease")
		}
		if v, _ := metricValue(t, c.CPMetricsAddr, "gpuaas_controlplane_telemetry_reports_total", `result="accepted"`); v < 2 {
			return fmt.Errorf("control plane accepted %v telemetry reports", v)
		}
		return nil
	})
	if v, _ := metricValue(t, c.CPMetricsAddr, "gpuaas_controlplane_telemetry_reports_total", `result="telemetry_lease"`); v != 0 {
		t.Fatalf("the control plane refused %v reports for a lease not on the node", v)
	}
}

// TestDisallowedAgentFailsIsCordonedAndGetsNoLease: a policy that does not
// allow the running agent's binary fails the node with the check named,
// the failure is audited and cordons the node, and a lease stays pending.
func TestDisallowedAgentFailsIsCordonedAndGetsNoLease(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	c := startAttestCluster(t, ctx, func(p *attestation.Policy) {
		p.AllowedAgentSHA256 = []string{strings.Repeat("0", 64)}
	})
	nc, err := c.Nodes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	lc, err := c.Leases(ctx)
	if err != nil {
		t.Fatal(err)
	}
	l := create(t, ctx, lc, mkReq("never", "1g.18gb", time.Hour, "true"))
	a := attestationOf(t, ctx, nc, 30*time.Second, func(a *nodev1.NodeAttestation) error {
		if a.GetStatus() != nodev1.AttestationStatus_ATTESTATION_STATUS_FAIL {
			return fmt.Errorf("attestation %v", a.GetStatus())
		}
		return nil
	})
	if ch := checkOf(a.GetLatest(), attestation.CheckAgentDigest); ch == nil || ch.GetOk() || ch.GetExpected() != strings.Repeat("0", 64) {
		t.Fatalf("agent_digest check = %v", ch)
	}
	n, err := nc.GetNode(ctx, &nodev1.GetNodeRequest{Id: "node-a"})
	if err != nil {
		t.Fatal(err)
	}
	if !n.GetNode().GetCordoned() || !strings.Contains(n.GetNode().GetCordonReason(), "agent_digest") || n.GetNode().GetAttestation() != nodev1.AttestationStatus_ATTESTATION_STATUS_FAIL {
		t.Fatalf("node after FAIL = %v", n.GetNode())
	}
	// An operator's uncordon does not let a failing node take leases.
	if _, err := c.Ctl(ctx, "node", "uncordon", "node-a", "--reason", "test"); err != nil {
		t.Fatal(err)
	}
	got, err := lc.GetLease(ctx, &leasev1.GetLeaseRequest{Id: l.GetId()})
	if err != nil || got.GetLease().GetPhase() != leasev1.Phase_PHASE_PENDING || got.GetLease().GetPlacement() != nil {
		t.Fatalf("lease on a failing node: %v %v", got.GetLease(), err)
	}
	// An auditor reads the failure online (AuditLogService, audit:read).
	out, err := c.Ctl(ctx, "audit", "list", "--remote", "-o", "json")
	if err != nil || !strings.Contains(out, `"node.attestation"`) || !strings.Contains(out, "agent_digest") {
		t.Fatalf("audit list --remote: %v\n%.2000s", err, out)
	}
	// The failure and the cordon are in the audit log.
	if err := c.StopControlPlane(false); err != nil {
		t.Fatal(err)
	}
	db := filepath.Join(c.CPDataDir(), "state.db")
	for _, q := range [][]string{{"--action", "node.attestation", "--outcome", "failure"}, {"--action", "node.cordon", "--actor", "spiffe://" + cluster.TrustDomain + "/gpuaas/controlplane"}} {
		out, err := c.Ctl(ctx, append([]string{"audit", "search", "--db", db, "-o", "json"}, q...)...)
		if err != nil || !strings.Contains(out, "node/node-a") || !strings.Contains(out, "agent_digest") {
			t.Fatalf("audit search %v: %v\n%s", q, err, out)
		}
	}
}
