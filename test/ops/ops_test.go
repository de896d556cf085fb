package ops

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gpuaas/gpuaas/agent/status"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
	"github.com/gpuaas/gpuaas/test/cluster"
	"github.com/gpuaas/gpuaas/test/harness"
)

// binDir builds the three commands into one directory (a cluster's
// BinDir) once per test binary.
func binDir(t *testing.T) string {
	t.Helper()
	var dir string
	for _, pkg := range []string{"./agent/cmd/gpuaas-agent", "./controlplane/cmd/gpuaas-controlplane", "./controlplane/cmd/gpuaasctl"} {
		dir = filepath.Dir(harness.BuildBinary(t, pkg))
	}
	return dir
}

func waitUntil(t *testing.T, what string, timeout time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: timed out after %s: %v", what, timeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func lease(key string, dur time.Duration, args ...string) *leasev1.CreateLeaseRequest {
	return &leasev1.CreateLeaseRequest{IdempotencyKey: key, Spec: &leasev1.LeaseSpec{
		Tenant:   "acme",
		Gpu:      &leasev1.GpuRequest{Kind: &leasev1.GpuRequest_MigProfile{MigProfile: "1g.18gb"}},
		Workload: &leasev1.Workload{Image: cluster.ImageName, Args: args},
		Duration: durationpb.New(dur),
	}}
}

// TestRunningCluster runs one agent with a lease that ran to its end and
// one still running, then checks what operators look at: the agent's
// status socket and both daemons' metrics under promtool.
func TestRunningCluster(t *testing.T) {
	harness.RequireRoot(t, harness.ContainerdComponents...)
	promtool, promErr := FindPromtool()
	bin := binDir(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	c := cluster.StartT(t, ctx, cluster.Options{BinDir: bin, Agents: map[string][]string{"node-a": {"H200"}}, StopGrace: time.Second})
	lc, err := c.Leases(ctx)
	if err != nil {
		t.Fatal(err)
	}
	nc, err := c.Nodes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "node-a attested", 60*time.Second, func() error {
		resp, err := nc.GetNode(ctx, &nodev1.GetNodeRequest{Id: "node-a"})
		if err != nil {
			return err
		}
		if n := resp.GetNode(); !n.GetConnected() || n.GetAttestation() != nodev1.AttestationStatus_ATTESTATION_STATUS_PASS {
			return fmt.Errorf("node-a connected %v, attestation %v", n.GetConnected(), n.GetAttestation())
		}
		return nil
	})
	job, err := lc.CreateLease(ctx, lease("job", time.Hour, "sh", "-c", "echo done"))
	if err != nil {
		t.Fatal(err)
	}
	long, err := lc.CreateLease(ctx, lease("long", time.Hour, "sleep", "3600"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.WaitPhase(ctx, lc, job.GetLease().GetId(), 90*time.Second, leasev1.Phase_PHASE_TERMINATED); err != nil {
		t.Fatal(err)
	}
	longID := long.GetLease().GetId()
	if _, err := c.WaitPhase(ctx, lc, longID, 90*time.Second, leasev1.Phase_PHASE_RUNNING); err != nil {
		t.Fatal(err)
	}

	t.Run("AgentStatus", func(t *testing.T) {
		agent := filepath.Join(bin, "gpuaas-agent")
		var snap status.Snapshot
		// The status follows the agent: wait for the fence and a
		// telemetry report after the lease started.
		waitUntil(t, "status shows the running lease fenced", 60*time.Second, func() error {
			out, err := exec.CommandContext(ctx, agent, "status", "-socket", c.StatusSocket("node-a"), "-json").Output()
			if err != nil {
				return fmt.Errorf("gpuaas-agent status -json: %w", err)
			}
			snap = status.Snapshot{}
			if err := json.Unmarshal(out, &snap); err != nil {
				return err
			}
			var l *status.Lease
			for i := range snap.Leases {
				if snap.Leases[i].ID == longID {
					l = &snap.Leases[i]
				}
			}
			if l == nil || l.Phase != "PHASE_RUNNING" || !l.Fenced || l.MIGDevice == "" || l.Container == "" {
				return fmt.Errorf("lease %s in status: %+v", longID, l)
			}
			for _, f := range snap.Fences {
				if f.LeaseID == longID {
					if !f.Verified || len(f.Programs) != 5 {
						return fmt.Errorf("fence of %s: %+v", longID, f)
					}
					if snap.Telemetry.Sequence == 0 {
						return errors.New("no telemetry report sent yet")
					}
					return nil
				}
			}
			return fmt.Errorf("no fence of %s in %+v", longID, snap.Fences)
		})
		cp := snap.ControlPlane
		if !cp.Connected || cp.Address != c.CPAddr || cp.Since.IsZero() {
			t.Errorf("control plane link = %+v", cp)
		}
		if !snap.Attestation.OK || len(snap.Attestation.NoncePrefix) != 8 {
			t.Errorf("attestation = %+v (the node is attested, so a challenge was answered)", snap.Attestation)
		}
		var onGPU bool
		for _, p := range snap.Partitions {
			for _, l := range snap.Leases {
				onGPU = onGPU || (l.ID == longID && l.MIGDevice == p.UUID)
			}
		}
		if !onGPU {
			t.Errorf("the lease's MIG device is not among the partitions %+v", snap.Partitions)
		}
		if len(snap.Errors) != 0 {
			t.Errorf("status errors: %q", snap.Errors)
		}

		// The human form, and its exit code.
		cmd := exec.CommandContext(ctx, agent, "status", "-socket", c.StatusSocket("node-a"))
		out, err := cmd.Output()
		if err != nil || !strings.Contains(string(out), longID) || !strings.Contains(string(out), "connected since") {
			t.Fatalf("gpuaas-agent status: %v\n%s", err, out)
		}
		// The agent's health endpoints: live and ready while connected.
		for _, path := range []string{"/healthz", "/readyz"} {
			if code := httpStatus(ctx, t, c.MetricsAddr["node-a"], path); code != http.StatusOK {
				t.Errorf("agent %s = %d while connected, want 200", path, code)
			}
		}
		// Exit 1 with the control plane gone, 2 with the agent gone; the
		// agent stays live but is no longer ready.
		if err := c.StopControlPlane(false); err != nil {
			t.Fatal(err)
		}
		waitUntil(t, "status exits 1 without the control plane", 60*time.Second, func() error {
			err := exec.CommandContext(ctx, agent, "status", "-socket", c.StatusSocket("node-a")).Run()
			if ee := (*exec.ExitError)(nil); errors.As(err, &ee) && ee.ExitCode() == 1 {
				return nil
			}
			return fmt.Errorf("status: %v", err)
		})
		if code := httpStatus(ctx, t, c.MetricsAddr["node-a"], "/readyz"); code != http.StatusServiceUnavailable {
			t.Errorf("agent /readyz = %d without the control plane, want 503", code)
		}
		if code := httpStatus(ctx, t, c.MetricsAddr["node-a"], "/healthz"); code != http.StatusOK {
			t.Errorf("agent /healthz = %d without the control plane, want 200 (it still enforces its leases)", code)
		}
		if err := c.StartControlPlane(ctx); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("PromtoolCheckMetrics", func(t *testing.T) {
		harness.Require(t, promErr)
		// Both daemons, after a lease ran: every family they export has
		// been touched at least once.
		for name, addr := range map[string]string{"agent": c.MetricsAddr["node-a"], "control plane": c.CPMetricsAddr} {
			var body []byte
			waitUntil(t, "scrape "+name, 30*time.Second, func() error {
				var err error
				body, err = scrape(ctx, addr)
				return err
			})
			cmd := exec.CommandContext(ctx, promtool, "check", "metrics")
			cmd.Stdin = bytes.NewReader(body)
			out, err := cmd.CombinedOutput()
			if problems := promtoolProblems(out); len(problems) > 0 {
				t.Errorf("promtool check metrics on the %s's /metrics (%d bytes): %v\n%s", name, len(body), err, strings.Join(problems, "\n"))
			} else if err != nil && len(bytes.TrimSpace(out)) == 0 {
				t.Errorf("promtool check metrics on the %s's /metrics failed without output: %v", name, err)
			}
		}
	})
}

func scrape(ctx context.Context, addr string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	tr := &http.Transport{DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /metrics: %s", resp.Status)
	}
	return body, nil
}

// dcgmCompat are the lint findings promtool reports on the agent's
// dcgm-exporter families, kept on purpose so that existing dcgm-exporter
// dashboards and alerts map over unchanged: its modelName label
// (camelCase) and its counters without a _total suffix
// (DCGM_FI_DEV_ECC_*_VOL_TOTAL, DCGM_FI_DEV_*_REMAPPED_ROWS).
var dcgmCompat = []string{
	`label names should be written in 'snake_case' not 'camelCase'`,
	`counter metrics should have "_total" suffix`,
}

// promtoolProblems returns promtool's findings other than the dcgm-exporter
// compatibility ones on DCGM_FI_* families.
func promtoolProblems(out []byte) []string {
	var problems []string
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		allowed := false
		if strings.HasPrefix(line, "DCGM_FI_") {
			for _, c := range dcgmCompat {
				allowed = allowed || strings.Contains(line, c)
			}
		}
		if !allowed {
			problems = append(problems, line)
		}
	}
	return problems
}

// TestPromtoolGateFailsOnABrokenMetric shows the gate's filter keeps every
// finding but the dcgm-exporter compatibility ones, and keeps those on
// any family other than DCGM_FI_*.
func TestPromtoolGateFailsOnABrokenMetric(t *testing.T) {
	out := []byte(`DCGM_FI_DEV_GPU_UTIL: label names should be written in 'snake_case' not 'camelCase'
DCGM_FI_DEV_ECC_SBE_VOL_TOTAL counter metrics should have "_total" suffix
gpuaas_agent_fenceDenials: metric names should be written in 'snake_case' not 'camelCase'
gpuaas_agent_things counter metrics should have "_total" suffix
`)
	got := promtoolProblems(out)
	if len(got) != 2 || !strings.HasPrefix(got[0], "gpuaas_agent_fenceDenials") || !strings.HasPrefix(got[1], "gpuaas_agent_things") {
		t.Fatalf("problems = %q, want the two non-dcgm findings", got)
	}
	if p := promtoolProblems([]byte("\n")); len(p) != 0 {
		t.Fatalf("empty output: %q", p)
	}
}

// httpStatus GETs http://addr/path and returns the status code.
func httpStatus(ctx context.Context, t *testing.T, addr, path string) int {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	resp.Body.Close()
	return resp.StatusCode
}
