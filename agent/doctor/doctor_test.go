package doctor

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/agent/gpu/sim"
	"github.com/gpuaas/gpuaas/pkg/config"
	"github.com/gpuaas/gpuaas/pkg/identity"
	"github.com/gpuaas/gpuaas/test/harness"
)

func find(t *testing.T, rs []Result, check string) Result {
	t.Helper()
	for _, r := range rs {
		if r.Check == check {
			return r
		}
	}
	t.Fatalf("no %q finding in %+v", check, rs)
	return Result{}
}

func pki(t *testing.T, ttl time.Duration) (*identity.DevPKI, config.SVID) {
	t.Helper()
	p, err := identity.WriteDevPKI(t.TempDir(), identity.DevPKIOptions{TrustDomain: "gpuaas.test", Agents: []string{"node-a", "node-b"}, TTL: ttl})
	if err != nil {
		t.Fatal(err)
	}
	a := p.Agents["node-a"]
	return p, config.SVID{Cert: a.CertPath, Key: a.KeyPath, Bundle: p.BundlePath}
}

func TestGPUChecks(t *testing.T) {
	ctx := context.Background()
	s, err := sim.New(sim.Config{GPUs: []sim.GPUConfig{{Model: "H200", MIGEnabled: true}, {Model: "H100", MIGEnabled: false}}})
	if err != nil {
		t.Fatal(err)
	}
	rs := checkGPU(ctx, Inputs{GPUBackend: "sim", GPU: s})
	if r := find(t, rs, "gpu-driver"); r.Severity != Warn || !strings.Contains(r.Detail, "simulated") {
		t.Errorf("sim backend should warn: %+v", r)
	}
	if r := find(t, rs, "gpu-mig[0]"); r.Severity != OK {
		t.Errorf("MIG-enabled H200: %+v", r)
	}
	if r := find(t, rs, "gpu-mig[1]"); r.Severity != Warn || !strings.Contains(r.Detail, "MIG disabled") || !strings.Contains(r.Fix, "-mig 1") {
		t.Errorf("MIG-disabled GPU: %+v", r)
	}

	// A GPU whose mode change waits for a reset: the simulator keeps it
	// pending while the GPU is in use, as the driver does.
	devs, _ := s.Devices(ctx)
	if _, err := s.SetMIGMode(ctx, devs[1].UUID, true); err != nil {
		t.Fatal(err)
	}
	if m, _ := s.MIGMode(ctx, devs[1].UUID); m.Current != m.Pending {
		if r := find(t, checkGPU(ctx, Inputs{GPUBackend: "sim", GPU: s}), "gpu-mig[1]"); r.Severity != Warn || !strings.Contains(r.Detail, "pending") {
			t.Errorf("pending mode: %+v", r)
		}
	}

	// No driver: a failure naming the library, with the fix.
	noDriver := errors.New("load NVIDIA driver library libnvidia-ml.so.1: cannot open shared object file")
	r := find(t, checkGPU(ctx, Inputs{GPUBackend: "nvml", GPUErr: noDriver}), "gpu-driver")
	if r.Severity != Fail || !strings.Contains(r.Detail, "libnvidia-ml.so.1") || !strings.Contains(r.Fix, "NVIDIA driver") {
		t.Errorf("no driver: %+v", r)
	}
	var _ gpu.Backend = s
}

func TestSVIDChecks(t *testing.T) {
	_, svid := pki(t, time.Hour*48)
	in := Inputs{Node: "node-a", TrustDomain: "gpuaas.test", SVID: svid, Now: time.Now}
	if r := checkSVID(in); r.Severity != OK {
		t.Errorf("valid SVID: %+v", r)
	}
	// Another node's SVID is refused: the control plane would refuse it.
	in.Node = "node-b"
	if r := checkSVID(in); r.Severity != Fail || !strings.Contains(r.Detail, "node-b") {
		t.Errorf("SVID of another node: %+v", r)
	}
	in.Node = "node-a"
	// Expiring soon, expired.
	in.Now = func() time.Time { return time.Now().Add(47 * time.Hour) }
	if r := checkSVID(in); r.Severity != Warn {
		t.Errorf("expiring SVID: %+v", r)
	}
	in.Now = func() time.Time { return time.Now().Add(49 * time.Hour) }
	if r := checkSVID(in); r.Severity != Fail || !strings.Contains(r.Detail, "expired") {
		t.Errorf("expired SVID: %+v", r)
	}
	// A bundle from another CA.
	_, other := pki(t, time.Hour)
	in.Now, in.SVID.Bundle = time.Now, other.Bundle
	if r := checkSVID(in); r.Severity != Fail || !strings.Contains(r.Detail, "chain") {
		t.Errorf("foreign bundle: %+v", r)
	}
	// Missing files.
	if r := checkSVID(Inputs{Node: "node-a", TrustDomain: "gpuaas.test"}); r.Severity != Fail {
		t.Errorf("no SVID configured: %+v", r)
	}
}

func TestStateDirCheck(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	if r := checkStateDir(dir); r.Severity != OK || !strings.Contains(r.Detail, "does not exist") {
		t.Errorf("absent dir: %+v", r)
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if r := checkStateDir(dir); r.Severity != Fail || !strings.Contains(r.Fix, "chmod 0700") {
		t.Errorf("world-readable dir: %+v", r)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if r := checkStateDir(dir); r.Severity != OK {
		t.Errorf("0700 dir: %+v", r)
	}
	file := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if r := checkStateDir(file); r.Severity != Fail {
		t.Errorf("a file as data_dir: %+v", r)
	}
}

func TestCNICheck(t *testing.T) {
	dir := t.TempDir()
	for _, p := range []string{"bridge", "host-local", "loopback"} {
		if err := os.WriteFile(filepath.Join(dir, p), []byte("#!/bin/sh\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "portmap"), nil, 0o644); err != nil { // not executable
		t.Fatal(err)
	}
	r := checkCNI(dir, DefaultCNIPlugins)
	if r.Severity != Fail || !strings.Contains(r.Detail, "portmap") || strings.Contains(r.Detail, "bridge") {
		t.Errorf("missing portmap: %+v", r)
	}
	if err := os.Chmod(filepath.Join(dir, "portmap"), 0o755); err != nil {
		t.Fatal(err)
	}
	if r := checkCNI(dir, DefaultCNIPlugins); r.Severity != OK {
		t.Errorf("all plugins: %+v", r)
	}
}

func TestContainerdCheck(t *testing.T) {
	ctx := context.Background()
	if r := checkContainerd(ctx, filepath.Join(t.TempDir(), "none.sock")); r.Severity != Fail || r.Fix == "" {
		t.Errorf("no containerd: %+v", r)
	}
	harness.RequireRoot(t)
	cd := harness.StartContainerdT(t, harness.Options{})
	if r := checkContainerd(ctx, cd.Address()); r.Severity != OK || !strings.Contains(r.Detail, "containerd") {
		t.Errorf("running containerd: %+v", r)
	}
}

// TestRunOnThisHost runs every check on the test machine: the kernel
// checks must agree with what the other packages' tests rely on (bpffs,
// cgroup eBPF), and the exit code is the worst finding's.
func TestRunOnThisHost(t *testing.T) {
	harness.RequireRoot(t)
	s, err := sim.New(sim.Config{GPUs: []sim.GPUConfig{{Model: "H200", MIGEnabled: true}}})
	if err != nil {
		t.Fatal(err)
	}
	_, svid := pki(t, 48*time.Hour)
	rs := Run(context.Background(), Inputs{
		GPUBackend: "sim", GPU: s, ContainerdAddress: filepath.Join(t.TempDir(), "none.sock"),
		Node: "node-a", TrustDomain: "gpuaas.test", SVID: svid, DataDir: t.TempDir(),
	})
	for _, c := range []string{"root", "bpffs", "cgroup-bpf", "identity", "runc"} {
		if r := find(t, rs, c); r.Severity != OK {
			t.Errorf("%s on the test host: %+v", c, r)
		}
	}
	if find(t, rs, "containerd").Severity != Fail {
		t.Error("containerd at a missing socket passed")
	}
	if got := ExitCode(rs); got != int(Fail) {
		t.Errorf("exit code %d with a failure, want %d", got, Fail)
	}
	var table, js bytes.Buffer
	if err := Write(&table, rs, false); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(table.String(), "fix: start containerd") {
		t.Errorf("table lacks the fix:\n%s", table.String())
	}
	if err := Write(&js, rs, true); err != nil {
		t.Fatal(err)
	}
	var decoded []map[string]string
	if err := json.Unmarshal(js.Bytes(), &decoded); err != nil || len(decoded) != len(rs) || decoded[0]["severity"] == "" {
		t.Errorf("json output: %v %s", err, js.String())
	}
}

func TestExitCode(t *testing.T) {
	for _, c := range []struct {
		sev  []Severity
		want int
	}{{nil, 0}, {[]Severity{OK, OK}, 0}, {[]Severity{OK, Warn}, 1}, {[]Severity{Fail, Warn, OK}, 2}} {
		var rs []Result
		for _, s := range c.sev {
			rs = append(rs, Result{Severity: s})
		}
		if got := ExitCode(rs); got != c.want {
			t.Errorf("ExitCode(%v) = %d, want %d", c.sev, got, c.want)
		}
	}
}
