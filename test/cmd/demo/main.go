// Command demo runs gpuaas end to end on this machine and narrates it: a
// private containerd, the control plane and one agent with two simulated
// GPUs, three leases of different profiles from request to running
// container (each in a network namespace of its own on the agent's CNI
// bridge, with its address printed), one cancelled, one expired, one that
// finishes on its own, the audit log verified, and everything cleaned up.
// `make demo` runs it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	"github.com/gpuaas/gpuaas/test/cluster"
	"github.com/gpuaas/gpuaas/test/harness"
)

func main() {
	bin := flag.String("bin", "bin", "directory with the built binaries")
	keep := flag.Bool("keep", false, "keep the demo directory (logs, state) afterwards")
	flag.Parse()
	if err := errors.Join(harness.CheckRoot(harness.ContainerdComponents...), harness.CheckNetwork()); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	if err := run(ctx, *bin, *keep); err != nil {
		fmt.Fprintln(os.Stderr, "\ndemo FAILED:", err)
		os.Exit(1)
	}
}

var t0 = time.Now()

func step(format string, args ...any) {
	fmt.Printf("\n[%5.1fs] == %s\n", time.Since(t0).Seconds(), fmt.Sprintf(format, args...))
}

func run(ctx context.Context, binDir string, keep bool) (err error) {
	abs, err := filepath.Abs(binDir)
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "gpuaas-demo-")
	if err != nil {
		return err
	}
	step("starting containerd, the control plane and agent node-a (simulated H200 + H100) in %s", dir)
	c, err := cluster.Start(ctx, cluster.Options{Dir: dir, BinDir: abs, Agents: map[string][]string{"node-a": {"H200", "H100"}}, StopGrace: time.Second, LogLevel: "warn"})
	if err != nil {
		return err
	}
	defer func() {
		step("cleaning up: stopping the daemons and containerd, removing every container")
		if cerr := c.Close(); cerr != nil && err == nil {
			err = cerr
		}
		if keep {
			fmt.Println("kept", dir)
		} else {
			os.RemoveAll(dir)
		}
	}()
	ctl := func(args ...string) (string, error) {
		fmt.Printf("$ gpuaasctl %s\n", strings.Join(args, " "))
		out, err := c.Ctl(ctx, args...)
		fmt.Print(out)
		if err != nil {
			return out, fmt.Errorf("gpuaasctl %s: %w", args[0], err)
		}
		return out, nil
	}
	lc, err := c.Leases(ctx)
	if err != nil {
		return err
	}
	waitNode := time.Now()
	for {
		out, _ := c.Ctl(ctx, "node", "list")
		if strings.Contains(out, "true") {
			break
		}
		if time.Since(waitNode) > 20*time.Second {
			return fmt.Errorf("agent did not connect; see %s", filepath.Join(dir, "agent-node-a.log"))
		}
		time.Sleep(100 * time.Millisecond)
	}
	step("the agent connected over mTLS and reported its GPUs")
	if _, err := ctl("node", "get", "node-a"); err != nil {
		return err
	}
	for {
		out, _ := c.Ctl(ctx, "node", "list")
		if strings.Contains(out, "PASS") {
			break
		}
		if time.Since(waitNode) > 40*time.Second {
			return fmt.Errorf("node-a did not pass attestation: %s (see %s)", out, filepath.Join(dir, "controlplane.log"))
		}
		time.Sleep(200 * time.Millisecond)
	}
	step("node-a passed attestation: its agent answered the control plane's challenge with a report signed by its SVID")
	saved := filepath.Join(dir, "node-a-attestation.json")
	if _, err := ctl("attest", "show", "node-a", "--save", saved); err != nil {
		return err
	}
	step("a reviewer verifies the saved report offline, with only the trust bundle and the policy")
	if _, err := ctl("attest", "verify", saved, "--bundle", c.PKI.BundlePath, "--policy", c.PolicyPath(), "--node", "node-a"); err != nil {
		return err
	}

	step("creating three leases of different profiles")
	loop := "echo hello from $(hostname) on $NVIDIA_VISIBLE_DEVICES as uid $(id -u); echo network: $(ls /sys/class/net | tr '\\n' ' ')address $(ip -4 -o addr show dev eth0 | awk '{print $4}'); echo cloud metadata: $(nc -w 2 169.254.169.254 80 </dev/null 2>&1); i=0; while true; do i=$((i+1)); echo tick $i; sleep 1; done"
	type demoLease struct{ name, id string }
	var leases []demoLease
	start := time.Now()
	for _, l := range []struct{ name, profile, dur, cmd string }{
		{"cancel-me", "3g.71gb", "1h", loop},
		{"expire-me", "1g.18gb", "12s", loop},
		{"batch-job", "2g.20gb", "1h", "echo computing on $NVIDIA_VISIBLE_DEVICES; sleep 4; echo result=42"},
	} {
		out, err := ctl("lease", "create", "--tenant", "acme", "--profile", l.profile, "--image", cluster.ImageName,
			"--duration", l.dur, "--arg", "sh", "--arg", "-c", "--arg", l.cmd, "--env", "API_TOKEN=never-shown", "--idempotency-key", l.name)
		if err != nil {
			return err
		}
		// The table's second line starts with the new lease's id.
		lines := strings.Split(out, "\n")
		if len(lines) < 2 || !strings.HasPrefix(lines[1], "l-") {
			return fmt.Errorf("lease create printed %q", out)
		}
		leases = append(leases, demoLease{l.name, strings.Fields(lines[1])[0]})
	}
	var latencies []string
	for _, l := range leases {
		if _, err := c.WaitPhase(ctx, lc, l.id, 60*time.Second, leasev1.Phase_PHASE_RUNNING); err != nil {
			return err
		}
		latencies = append(latencies, fmt.Sprintf("%s %s", l.name, time.Since(start).Round(time.Millisecond)))
	}
	step("all three RUNNING (request to running container: %s)", strings.Join(latencies, ", "))
	n := c.Networks["node-a"]
	fmt.Printf("each in a network namespace of its own on bridge %s (subnet %s, NAT to the outside, eBPF egress fence):\n", n.Bridge, n.Subnet)
	for _, l := range leases {
		ip, err := leaseIP(ctx, lc, l.id)
		if err != nil {
			return err
		}
		fmt.Printf("  %-10s %s  ip %s\n", l.name, l.id, ip)
	}
	if _, err := ctl("lease", "list"); err != nil {
		return err
	}
	time.Sleep(1500 * time.Millisecond)
	for _, l := range leases {
		out, _ := os.ReadFile(c.ContainerLog("node-a", l.id))
		fmt.Printf("--- output of %s (%s):\n%s", l.name, l.id, indent(lastLines(string(out), 4)))
	}

	step("signed telemetry: each partition's readings carry its lease on the agent's Prometheus endpoint (dcgm-exporter names)")
	time.Sleep(2500 * time.Millisecond) // one more sampling interval
	for _, line := range metricLines("http://"+c.MetricsAddr["node-a"]+"/metrics", "DCGM_FI_PROF_GR_ENGINE_ACTIVE{", `lease="l-`) {
		fmt.Println("  " + line)
	}
	for _, line := range metricLines("http://"+c.CPMetricsAddr+"/metrics", "gpuaas_controlplane_telemetry_reports_total", "") {
		fmt.Println("  control plane: " + line)
	}

	step("cancelling %s", leases[0].name)
	if _, err := ctl("lease", "cancel", leases[0].id, "--reason", "demo"); err != nil {
		return err
	}
	step("waiting: %s ends on its own, %s reaches its not_after", leases[2].name, leases[1].name)
	for _, l := range leases {
		if _, err := c.WaitPhase(ctx, lc, l.id, 60*time.Second, leasev1.Phase_PHASE_TERMINATED, leasev1.Phase_PHASE_FAILED); err != nil {
			return err
		}
	}
	if _, err := ctl("lease", "list"); err != nil {
		return err
	}
	out, _ := os.ReadFile(c.ContainerLog("node-a", leases[2].id))
	fmt.Printf("--- output of %s:\n%s", leases[2].name, indent(string(out)))
	if _, err := ctl("node", "get", "node-a"); err != nil {
		return err
	}

	step("stopping the control plane and verifying the audit log offline")
	time.Sleep(time.Second) // let the agent's audit outbox drain
	if err := c.StopControlPlane(false); err != nil {
		return err
	}
	db := filepath.Join(c.CPDataDir(), "state.db")
	if _, err := ctl("audit", "list", "--db", db); err != nil {
		return err
	}
	verify, err := ctl("audit", "verify", "--db", db, "--key", c.AuditPub)
	if err != nil {
		return err
	}
	step("the usage ledger: one entry per lease that ran, GPU time weighted by the share of the GPU it held")
	if _, err := ctl("usage", "--db", db); err != nil {
		return err
	}
	if _, err := ctl("usage", "--db", db, "--summary"); err != nil {
		return err
	}
	step("summary")
	fmt.Printf("  leases: %d created, all ended (cancelled, expired, exited 0)\n", len(leases))
	fmt.Printf("  provisioning: %s\n", strings.Join(latencies, ", "))
	fmt.Printf("  %s", verify)
	fmt.Printf("  total demo time so far: %s\n", time.Since(t0).Round(100*time.Millisecond))
	return nil
}

// leaseIP waits for the lease's reported address (the agent reports it
// with the container; the control plane may show RUNNING a report
// earlier).
func leaseIP(ctx context.Context, lc leasev1.LeaseServiceClient, id string) (string, error) {
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := lc.GetLease(ctx, &leasev1.GetLeaseRequest{Id: id})
		if err != nil {
			return "", err
		}
		if ip := resp.GetLease().GetStatus().GetIp(); ip != "" {
			return ip, nil
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("lease %s reports no address", id)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n") + "\n"
}

func indent(s string) string {
	return "    " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n    ") + "\n"
}

// metricLines fetches a Prometheus text endpoint and returns the lines that
// start with prefix and contain sub.
func metricLines(url, prefix, sub string) []string {
	resp, err := http.Get(url)
	if err != nil {
		return []string{"(" + err.Error() + ")"}
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	if err != nil {
		return []string{"(" + err.Error() + ")"}
	}
	var out []string
	for _, l := range strings.Split(string(body), "\n") {
		if strings.HasPrefix(l, prefix) && strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return out
}
