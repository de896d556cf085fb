// Package e2e runs whole-system tests: the built control plane and agent as
// processes, a real containerd, simulated GPUs, an operator over mTLS.
package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gpuaas/gpuaas/pkg/errs"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
	"github.com/gpuaas/gpuaas/test/cluster"
	"github.com/gpuaas/gpuaas/test/harness"
)

// buildBinaries builds the three commands into a temporary directory.
func buildBinaries(t *testing.T) string {
	t.Helper()
	bin := t.TempDir()
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("go", "build", "-o", bin, "./agent/cmd/gpuaas-agent", "./controlplane/cmd/gpuaas-controlplane", "./controlplane/cmd/gpuaasctl")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

func mkReq(key, profile string, dur time.Duration, args ...string) *leasev1.CreateLeaseRequest {
	return &leasev1.CreateLeaseRequest{IdempotencyKey: key, Spec: &leasev1.LeaseSpec{
		Tenant:   "acme",
		Gpu:      &leasev1.GpuRequest{Kind: &leasev1.GpuRequest_MigProfile{MigProfile: profile}},
		Workload: &leasev1.Workload{Image: cluster.ImageName, Args: args, Env: map[string]string{"API_TOKEN": "tok-secret-123"}},
		Duration: durationpb.New(dur),
	}}
}

// tasks lists the containers in the agent's namespace with their task pids.
func tasks(t *testing.T, ctx context.Context, c *cluster.Cluster) map[string]uint32 {
	t.Helper()
	cl, err := containerd.New(c.Containerd.Address())
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx = namespaces.WithNamespace(ctx, c.Namespace)
	cs, err := cl.Containers(ctx)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]uint32{}
	for _, ctr := range cs {
		var pid uint32
		if task, err := ctr.Task(ctx, nil); err == nil {
			pid = task.Pid()
		}
		out[ctr.ID()] = pid
	}
	return out
}

func keys(m map[string]uint32) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func TestLeaseEndToEnd(t *testing.T) {
	harness.RequireRoot(t, harness.ContainerdComponents...)
	if _, err := exec.LookPath("go"); err != nil {
		harness.Require(t, err)
	}
	bin := buildBinaries(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	c := cluster.StartT(t, ctx, cluster.Options{BinDir: bin, Agents: map[string][]string{"node-a": {"H200", "H100"}}, StopGrace: time.Second})
	lc, err := c.Leases(ctx)
	if err != nil {
		t.Fatal(err)
	}
	nc, err := c.Nodes(ctx)
	if err != nil {
		t.Fatal(err)
	}

	// The agent connects and reports its two simulated GPUs.
	var node *nodev1.Node
	waitUntil(t, 20*time.Second, func() error {
		resp, err := nc.GetNode(ctx, &nodev1.GetNodeRequest{Id: "node-a"})
		if err != nil {
			return err
		}
		if node = resp.GetNode(); !node.GetConnected() || len(node.GetInventory().GetGpus()) != 2 {
			return errors.New("node-a not connected with 2 GPUs")
		}
		// Only an attested node takes leases.
		if node.GetAttestation() != nodev1.AttestationStatus_ATTESTATION_STATUS_PASS {
			return fmt.Errorf("node-a attestation %v", node.GetAttestation())
		}
		return nil
	})

	// Bad input is refused with the field named, and creates nothing.
	_, err = lc.CreateLease(ctx, mkReq("bad", "5g.99gb", time.Minute, "true"))
	if e := errs.FromStatus(err); !errors.Is(e, errs.ErrInvalidArgument) || errs.FieldOf(e) != "spec.gpu.mig_profile" {
		t.Fatalf("unknown profile: %v", err)
	}
	_, err = lc.CreateLease(ctx, mkReq("bad2", "1g.18gb", -time.Minute, "true"))
	if e := errs.FromStatus(err); !errors.Is(e, errs.ErrInvalidArgument) || errs.FieldOf(e) != "spec.duration" {
		t.Fatalf("negative duration: %v", err)
	}

	// Three leases of different profiles, plus two workloads that exit.
	start := time.Now()
	long := []string{"sh", "-c", "echo gpu=$NVIDIA_VISIBLE_DEVICES uid=$(id -u); nc -w 2 169.254.169.254 80 </dev/null 2>&1 | head -1; while true; do sleep 1; done"}
	a := create(t, ctx, lc, mkReq("a", "1g.18gb", time.Hour, long...))
	b := create(t, ctx, lc, mkReq("b", "3g.71gb", time.Hour, long...))
	h100 := create(t, ctx, lc, mkReq("c", "2g.20gb", time.Hour, long...))
	okJob := create(t, ctx, lc, mkReq("ok", "1g.18gb", time.Hour, "sh", "-c", "echo finished"))
	badJob := create(t, ctx, lc, mkReq("fail", "1g.18gb", time.Hour, "sh", "-c", "exit 3"))
	if got := a.GetSpec().GetWorkload().GetEnv()["API_TOKEN"]; got != "[REDACTED]" {
		t.Fatalf("env value echoed to the caller: %q", got)
	}
	if h100.GetPlacement().GetGpuModel() != "NVIDIA H100 80GB HBM3" && !strings.Contains(h100.GetPlacement().GetGpuModel(), "H100") {
		t.Fatalf("2g.20gb placed on %q", h100.GetPlacement().GetGpuModel())
	}
	for _, l := range []*leasev1.Lease{a, b, h100} {
		got, err := c.WaitPhase(ctx, lc, l.GetId(), 60*time.Second, leasev1.Phase_PHASE_RUNNING)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(got.GetStatus().GetMigUuid(), "MIG-") || got.GetStatus().GetContainerId() == "" || got.GetStatus().GetImageDigest() != c.Image.Manifest.Digest.String() {
			t.Fatalf("running lease status: %v", got.GetStatus())
		}
	}
	t.Logf("provisioning latency: 3 leases RUNNING %s after the first create", time.Since(start).Round(time.Millisecond))

	// Workloads that exit end their leases with their exit status.
	got, err := c.WaitPhase(ctx, lc, okJob.GetId(), 60*time.Second, leasev1.Phase_PHASE_TERMINATED)
	if err != nil || !got.GetStatus().GetExited() || got.GetStatus().GetExitCode() != 0 || got.GetReason() != "exited with code 0" {
		t.Fatalf("exit 0 job: %v %v %q", err, got.GetStatus(), got.GetReason())
	}
	got, err = c.WaitPhase(ctx, lc, badJob.GetId(), 60*time.Second, leasev1.Phase_PHASE_FAILED)
	if err != nil || got.GetStatus().GetExitCode() != 3 {
		t.Fatalf("exit 3 job: %v %v", err, got.GetStatus())
	}

	// The container runs as nobody, sees its partition, and its output is kept.
	waitUntil(t, 10*time.Second, func() error {
		out, err := os.ReadFile(c.ContainerLog("node-a", a.GetId()))
		if err != nil {
			return err
		}
		// The metadata endpoint is refused by the lease's eBPF fence
		// (EPERM), not merely unroutable.
		if !strings.Contains(string(out), "gpu=MIG-") || !strings.Contains(string(out), "uid=65534") || !strings.Contains(string(out), "Operation not permitted") {
			return errors.New("log: " + string(out))
		}
		return nil
	})

	// The fence's refusals are counted in the agent's metrics.
	waitUntil(t, 20*time.Second, func() error {
		resp, err := http.Get("http://" + c.MetricsAddr["node-a"] + "/metrics")
		if err != nil {
			return err
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		for _, line := range strings.Split(string(body), "\n") {
			if strings.HasPrefix(line, `gpuaas_agent_fence_denials_total{kind="connect"} `) && !strings.HasSuffix(line, " 0") {
				return nil
			}
		}
		return errors.New("no connect denial counted")
	})

	// Each partition reached its container through a CDI spec.
	specs, _ := filepath.Glob(filepath.Join(c.AgentDataDir("node-a"), "cdi", "gpuaas.dev-mig-*.json"))
	if len(specs) != 3 {
		t.Fatalf("CDI specs for 3 running leases: %v", specs)
	}

	// Every running lease is fenced: its programs are pinned.
	for _, l := range []*leasev1.Lease{a, b, h100} {
		if _, err := os.Stat(filepath.Join(c.PinRoot("node-a"), l.GetId())); err != nil {
			t.Fatalf("lease %s has no pinned fence: %v", l.GetId(), err)
		}
	}

	// Kill -9 the agent while leases run: the containers keep running, and
	// the restarted agent adopts them instead of duplicating them.
	before := tasks(t, ctx, c)
	if len(before) != 3 {
		t.Fatalf("containers before restart: %v", keys(before))
	}
	if err := c.StopAgent("node-a", true); err != nil {
		t.Fatal(err)
	}
	if err := c.StartAgent(ctx, "node-a"); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 20*time.Second, func() error {
		resp, err := nc.GetNode(ctx, &nodev1.GetNodeRequest{Id: "node-a"})
		if err != nil || !resp.GetNode().GetConnected() {
			return errors.New("agent not reconnected")
		}
		return nil
	})
	time.Sleep(2 * time.Second) // a few reconcile passes
	// The fences held while the agent was down and were adopted, not
	// duplicated: the kernel's view has each lease's five programs, with
	// tags matching the policy.
	waitUntil(t, 10*time.Second, func() error {
		resp, err := http.Get("http://" + c.MetricsAddr["node-a"] + "/fences")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		var fences []struct {
			LeaseID  string
			Verified bool
			Programs []struct{ ProgramID uint32 }
			Problems []string
		}
		if err := json.NewDecoder(resp.Body).Decode(&fences); err != nil {
			return err
		}
		seen := map[string]bool{}
		for _, f := range fences {
			if !f.Verified || len(f.Programs) != 5 {
				return fmt.Errorf("fence of %s: verified=%v programs=%d problems=%v", f.LeaseID, f.Verified, len(f.Programs), f.Problems)
			}
			seen[f.LeaseID] = true
		}
		for _, l := range []*leasev1.Lease{a, b, h100} {
			if !seen[l.GetId()] {
				return fmt.Errorf("no fence for %s after the restart (have %v)", l.GetId(), seen)
			}
		}
		return nil
	})
	after := tasks(t, ctx, c)
	if strings.Join(keys(after), ",") != strings.Join(keys(before), ",") {
		t.Fatalf("containers changed across restart: %v -> %v", keys(before), keys(after))
	}
	for id, pid := range before {
		if after[id] != pid || pid == 0 {
			t.Fatalf("container %s task pid %d -> %d: not the same process", id, pid, after[id])
		}
	}

	// Cancel one: the container and the partition go, the lease ends.
	if _, err := lc.CancelLease(ctx, &leasev1.CancelLeaseRequest{Id: a.GetId(), Reason: "e2e"}); err != nil {
		t.Fatal(err)
	}
	got, err = c.WaitPhase(ctx, lc, a.GetId(), 30*time.Second, leasev1.Phase_PHASE_TERMINATED)
	if err != nil || !strings.HasPrefix(got.GetReason(), "cancelled") {
		t.Fatalf("cancelled lease: %v %q", err, got.GetReason())
	}
	if _, ok := tasks(t, ctx, c)[got.GetStatus().GetContainerId()]; ok {
		t.Fatal("cancelled lease's container still exists")
	}
	if _, err := os.Stat(filepath.Join(c.PinRoot("node-a"), a.GetId())); !os.IsNotExist(err) {
		t.Fatalf("cancelled lease's fence is still pinned: %v", err)
	}

	// Expiry with the control plane down: the agent ends the lease on its
	// own clock.
	short := create(t, ctx, lc, mkReq("short", "1g.18gb", 6*time.Second, long...))
	got, err = c.WaitPhase(ctx, lc, short.GetId(), 30*time.Second, leasev1.Phase_PHASE_RUNNING)
	if err != nil {
		t.Fatal(err)
	}
	shortCtr := got.GetStatus().GetContainerId()
	if err := c.StopControlPlane(true); err != nil { // kill -9: state must survive
		t.Fatal(err)
	}
	waitUntil(t, time.Until(short.GetNotAfter().AsTime())+20*time.Second, func() error {
		if _, ok := tasks(t, ctx, c)[shortCtr]; ok {
			return errors.New("expired lease's container still running")
		}
		return nil
	})
	if err := c.StartControlPlane(ctx); err != nil {
		t.Fatal(err)
	}
	got, err = c.WaitPhase(ctx, lc, short.GetId(), 30*time.Second, leasev1.Phase_PHASE_TERMINATED)
	if err != nil || got.GetReason() != "expired" {
		t.Fatalf("expired lease after control plane restart: %v %q", err, got.GetReason())
	}
	// Leases acknowledged before the kill -9 are all still there.
	for _, l := range []*leasev1.Lease{a, b, h100, okJob, badJob} {
		if _, err := lc.GetLease(ctx, &leasev1.GetLeaseRequest{Id: l.GetId()}); err != nil {
			t.Fatalf("lease %s lost across kill -9: %v", l.GetId(), err)
		}
	}
	// Cancel the rest and check the node is empty again.
	for _, l := range []*leasev1.Lease{b, h100} {
		if _, err := lc.CancelLease(ctx, &leasev1.CancelLeaseRequest{Id: l.GetId()}); err != nil {
			t.Fatal(err)
		}
		if _, err := c.WaitPhase(ctx, lc, l.GetId(), 30*time.Second, leasev1.Phase_PHASE_TERMINATED); err != nil {
			t.Fatal(err)
		}
	}
	waitUntil(t, 20*time.Second, func() error {
		resp, err := nc.GetNode(ctx, &nodev1.GetNodeRequest{Id: "node-a"})
		if err != nil {
			return err
		}
		for _, g := range resp.GetNode().GetInventory().GetGpus() {
			if len(g.GetInstances()) != 0 {
				return errors.New("partitions left on " + g.GetUuid())
			}
		}
		return nil
	})
	if left := tasks(t, ctx, c); len(left) != 0 {
		t.Fatalf("containers left: %v", keys(left))
	}

	// The audit log verifies and holds the agent's own operations; the
	// secret never reached it.
	time.Sleep(time.Second) // let the agent's outbox drain
	if err := c.StopControlPlane(false); err != nil {
		t.Fatal(err)
	}
	db := filepath.Join(c.CPDataDir(), "state.db")
	out, err := c.Ctl(ctx, "audit", "verify", "--db", db)
	if err != nil || !strings.Contains(out, "audit log OK") {
		t.Fatalf("audit verify: %v\n%s", err, out)
	}
	list, err := c.Ctl(ctx, "audit", "list", "--db", db)
	if err != nil {
		t.Fatal(err)
	}
	for _, action := range []string{"lease.create", "lease.cancel", "lease.running", "lease.terminated", "lease.failed", "agent.fence.attach", "agent.fence.detach", "agent.fence.deny",
		"agent.partition.create", "agent.container.start", "agent.container.stop", "agent.partition.destroy"} {
		if !strings.Contains(list, action) {
			t.Errorf("audit log has no %s entry", action)
		}
	}
	if strings.Contains(list, "tok-secret-123") {
		t.Error("secret env value in the audit log")
	}
	// Every lease that ran has one usage ledger entry, in the audit log
	// too.
	ujs, err := c.Ctl(ctx, "usage", "--db", db, "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var usage []struct {
		LeaseID   string `json:"lease_id"`
		Tenant    string `json:"tenant"`
		Millis    int64  `json:"duration_ms"`
		GPUMillis int64  `json:"gpu_ms"`
	}
	if err := json.Unmarshal([]byte(ujs), &usage); err != nil {
		t.Fatalf("usage -o json: %v\n%s", err, ujs)
	}
	seen := map[string]int{}
	for _, u := range usage {
		seen[u.LeaseID]++
		if u.Tenant != "acme" || u.Millis <= 0 || u.GPUMillis <= 0 || u.GPUMillis > u.Millis {
			t.Errorf("usage entry %+v", u)
		}
	}
	for _, l := range []*leasev1.Lease{a, b, h100, okJob} {
		if seen[l.GetId()] != 1 {
			t.Errorf("lease %s has %d usage entries, want 1 (ledger %s)", l.GetId(), seen[l.GetId()], ujs)
		}
	}
	if !strings.Contains(list, "usage.interval") {
		t.Error("no usage.interval entry in the audit log")
	}
	// Every event the agent reported carries its verified signature, and
	// none was refused.
	js, err := c.Ctl(ctx, "audit", "list", "--db", db, "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var entries []struct {
		Action  string            `json:"action"`
		Details map[string]string `json:"details"`
	}
	if err := json.Unmarshal([]byte(js), &entries); err != nil {
		t.Fatalf("audit list -o json: %v", err)
	}
	agentEvents := 0
	for _, e := range entries {
		if e.Action == "agent.event.rejected" {
			t.Errorf("an agent event was refused: %v", e.Details)
		}
		if strings.HasPrefix(e.Action, "agent.") && e.Action != "agent.event.rejected" {
			agentEvents++
			if e.Details["agent_sig"] != "verified" {
				t.Errorf("%s entry without a verified agent signature: %v", e.Action, e.Details)
			}
		}
	}
	if agentEvents == 0 {
		t.Error("no agent events in the audit log")
	}
	for _, f := range []string{"controlplane.log", "agent-node-a.log"} {
		b, _ := os.ReadFile(filepath.Join(c.Dir, f))
		if strings.Contains(string(b), "tok-secret-123") {
			t.Errorf("secret env value in %s", f)
		}
	}
	// Sealed at rest: neither the control plane's state nor the agent's
	// journal holds the value in plain text.
	for _, f := range []string{filepath.Join(c.CPDataDir(), "state.db"), filepath.Join(c.AgentDataDir("node-a"), "journal.db")} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(b), "tok-secret-123") {
			t.Errorf("secret env value in plain text in %s", f)
		}
		// The state keeps every lease (sealed); the journal keeps only the
		// leases still desired, none by now.
		if strings.HasSuffix(f, "state.db") && !strings.Contains(string(b), "sealed:v1:") {
			t.Errorf("no sealed value in %s", f)
		}
	}
}

func waitUntil(t *testing.T, timeout time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s: %v", timeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func create(t *testing.T, ctx context.Context, lc leasev1.LeaseServiceClient, r *leasev1.CreateLeaseRequest) *leasev1.Lease {
	t.Helper()
	resp, err := lc.CreateLease(ctx, r)
	if err != nil {
		t.Fatalf("create lease %s: %v", r.GetIdempotencyKey(), err)
	}
	return resp.GetLease()
}
