package e2e

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/durationpb"

	agentlease "github.com/gpuaas/gpuaas/agent/lease"
	"github.com/gpuaas/gpuaas/agent/runtime/logfile"
	"github.com/gpuaas/gpuaas/agent/session"
	"github.com/gpuaas/gpuaas/controlplane/api"
	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/fleet"
	"github.com/gpuaas/gpuaas/controlplane/lease"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/identity"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
	"github.com/gpuaas/gpuaas/test/harness"
)

// buildCommands builds the named commands of the module into a temporary
// directory (traversable by the containerd shim).
func buildCommands(t *testing.T, pkgs ...string) string {
	t.Helper()
	if _, err := exec.LookPath("go"); err != nil {
		harness.Require(t, err)
	}
	bin := t.TempDir()
	if err := os.Chmod(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("go", append([]string{"build", "-o", bin}, pkgs...)...)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// logsControlPlane is the control plane's real gRPC edge in process.
type logsControlPlane struct {
	addr string
	pki  *identity.DevPKI
	st   store.Store
}

func startLogsControlPlane(t *testing.T) *logsControlPlane {
	t.Helper()
	dir := t.TempDir()
	pki, err := identity.WriteDevPKI(filepath.Join(dir, "pki"), identity.DevPKIOptions{TrustDomain: "gpuaas.test", Agents: []string{"node-a"}, Operators: []string{"alice"}})
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.OpenBolt(filepath.Join(dir, "state.db"), store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.DiscardHandler)
	src, err := identity.NewFileSource(context.Background(), identity.FileSourceConfig{CertPath: pki.ControlPlane.CertPath, KeyPath: pki.ControlPlane.KeyPath, BundlePath: pki.BundlePath, TrustDomain: pki.TrustDomain})
	if err != nil {
		t.Fatal(err)
	}
	leases := lease.New(lease.Options{Store: st, Logger: log})
	reg := fleet.New(st, log)
	leases.SetFleet(reg)
	logs := &api.LogRelay{}
	authz := api.Authorizer{TrustDomain: pki.TrustDomain}
	srv := grpc.NewServer(
		grpc.Creds(identity.ServerCredentials(src, identity.AuthorizeKinds(pki.TrustDomain, identity.PeerAgent, identity.PeerOperator))),
		grpc.ChainUnaryInterceptor(authz.Unary(log)), grpc.ChainStreamInterceptor(authz.Stream(log)))
	agentv1.RegisterAgentServiceServer(srv, &api.AgentServer{Fleet: reg, Leases: leases, Store: st, Log: log, Logs: logs})
	leasev1.RegisterLeaseServiceServer(srv, &api.LeaseServer{Leases: leases, Store: st, Logs: logs, Log: log})
	nodev1.RegisterNodeServiceServer(srv, &api.NodeServer{Fleet: reg, Leases: leases})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() { defer close(served); srv.Serve(lis) }()
	t.Cleanup(func() { srv.Stop(); <-served; src.Close(); st.Close() })
	return &logsControlPlane{addr: lis.Addr().String(), pki: pki, st: st}
}

func (cp *logsControlPlane) dial(t *testing.T, f identity.SVIDFiles) *grpc.ClientConn {
	t.Helper()
	src, err := identity.NewFileSource(context.Background(), identity.FileSourceConfig{CertPath: f.CertPath, KeyPath: f.KeyPath, BundlePath: cp.pki.BundlePath, TrustDomain: cp.pki.TrustDomain})
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(cp.addr, grpc.WithTransportCredentials(identity.ClientCredentials(src, tlsconfig.AuthorizeID(identity.ControlPlaneID(cp.pki.TrustDomain)))))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(); src.Close() })
	return conn
}

// runLogsAgent runs node-a's session (package agent/session) with the log
// directory as its log source; its executor is idle: the test runs the
// container itself.
func runLogsAgent(t *testing.T, cp *logsControlPlane, logDir string) {
	t.Helper()
	j, err := agentlease.OpenJournal(filepath.Join(t.TempDir(), "journal.db"))
	if err != nil {
		t.Fatal(err)
	}
	f := cp.pki.Agents["node-a"]
	src, err := identity.NewFileSource(context.Background(), identity.FileSourceConfig{CertPath: f.CertPath, KeyPath: f.KeyPath, BundlePath: cp.pki.BundlePath, TrustDomain: cp.pki.TrustDomain})
	if err != nil {
		t.Fatal(err)
	}
	inv := &nodev1.Inventory{Gpus: []*nodev1.Gpu{{Index: 0, Uuid: "GPU-11111111-2222-4333-8444-555555555555", Model: "NVIDIA H200", PciDeviceId: 0x2335, MigCapable: true, MigEnabled: true}}}
	c := session.New(session.Options{
		Addresses: []string{cp.addr}, Node: "node-a", AgentVersion: "e2e",
		Creds:     identity.ClientCredentials(src, tlsconfig.AuthorizeID(identity.ControlPlaneID(cp.pki.TrustDomain))),
		Executor:  agentlease.New(agentlease.Options{Journal: j}),
		Journal:   j,
		Inventory: func(context.Context) (*nodev1.Inventory, error) { return inv, nil },
		Logs:      session.FileLogs{Dir: logDir},
		Heartbeat: 100 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); c.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done; src.Close(); j.Close() })
}

// runLoggingContainer runs a busybox container to its exit with output
// through gpuaas-logdriver into path, as the agent's runtime wires it.
func runLoggingContainer(t *testing.T, driver, path, script string) {
	t.Helper()
	ns := harness.UniqueID("e2e-logs")
	t.Cleanup(func() { _ = harness.RemoveNamespaceDirs(ns) })
	ctrd := harness.StartContainerdT(t, harness.Options{})
	cl, err := ctrd.NewClient(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), ns), time.Minute)
	defer cancel()
	img, snap := harness.ImportBusyboxT(t, ctx, cl, "localhost/gpuaas/busybox:e2e-logs")
	id := harness.UniqueID("logs")
	ctr, err := cl.NewContainer(ctx, id, containerd.WithSnapshotter(snap), containerd.WithNewSnapshot(id, img),
		containerd.WithNewSpec(oci.WithImageConfig(img), oci.WithProcessArgs("sh", "-c", script)))
	if err != nil {
		t.Fatal(err)
	}
	defer ctr.Delete(context.WithoutCancel(ctx), containerd.WithSnapshotCleanup)
	task, err := ctr.NewTask(ctx, cio.BinaryIO(driver, map[string]string{"--file": path, "--max-bytes": "524288", "--max-files": "2"}))
	if err != nil {
		t.Fatal(err)
	}
	defer task.Delete(context.WithoutCancel(ctx), containerd.WithProcessKill)
	exited, err := task.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := task.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if st := <-exited; st.ExitCode() != 0 {
		t.Fatalf("container exit %d", st.ExitCode())
	}
}

// TestLeaseLogsFromAContainerToGpuaasctl follows a tenant's output the
// whole way: a real container under containerd, gpuaas-logdriver writing the
// rotated log, the agent's session reading it on the control plane's
// request, the control plane relaying it, and gpuaasctl printing it.
func TestLeaseLogsFromAContainerToGpuaasctl(t *testing.T) {
	harness.RequireRoot(t, harness.ContainerdComponents...)
	bin := buildCommands(t, "./agent/cmd/gpuaas-logdriver", "./controlplane/cmd/gpuaasctl")
	cp := startLogsControlPlane(t)
	logDir := filepath.Join(t.TempDir(), "logs")
	runLogsAgent(t, cp, logDir)

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	alice := cp.pki.Operators["alice"]
	conn := cp.dial(t, alice)
	nc := nodev1.NewNodeServiceClient(conn)
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		n, err := nc.GetNode(ctx, &nodev1.GetNodeRequest{Id: "node-a"})
		if err == nil && n.GetNode().GetConnected() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("node-a never connected: %v", err)
		}
	}
	lc := leasev1.NewLeaseServiceClient(conn)
	resp, err := lc.CreateLease(ctx, &leasev1.CreateLeaseRequest{IdempotencyKey: "logs", Spec: &leasev1.LeaseSpec{
		Tenant: "acme", Gpu: &leasev1.GpuRequest{Kind: &leasev1.GpuRequest_MigProfile{MigProfile: "1g.18gb"}},
		Workload: &leasev1.Workload{Image: "localhost/gpuaas/busybox:e2e-logs"}, Duration: durationpb.New(time.Hour)}})
	if err != nil || resp.GetLease().GetPlacement().GetNode() != "node-a" {
		t.Fatalf("create: %v %v", resp, err)
	}
	id := resp.GetLease().GetId()

	// More output than the two 512 KiB files keep, yet more kept than one
	// stream can run ahead of the other (a pipe buffer of short lines plus
	// the driver's queue), so both streams' last lines are in it.
	path := filepath.Join(logDir, id+".log")
	runLoggingContainer(t, filepath.Join(bin, "gpuaas-logdriver"), path,
		"i=0; while [ $i -lt 20000 ]; do echo \"out $i\"; echo \"err $i\" >&2; i=$((i+1)); done; echo last")
	var want []byte
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		want, _, err = logfile.Read(path, 0, 0)
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(want, []byte(" stdout F last\n")) && bytes.Contains(want, []byte(" stderr F err 19999\n")) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the driver never wrote the container's last lines")
		}
	}

	gpuaasctl := func(args ...string) (string, string) {
		t.Helper()
		cmd := exec.CommandContext(ctx, filepath.Join(bin, "gpuaasctl"), append([]string{"--addr", cp.addr, "--cert", alice.CertPath, "--key", alice.KeyPath, "--bundle", cp.pki.BundlePath}, args...)...)
		cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if err := cmd.Run(); err != nil {
			t.Fatalf("gpuaasctl %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
		}
		return stdout.String(), stderr.String()
	}
	out, errOut := gpuaasctl("lease", "logs", id)
	if out != string(want) {
		t.Fatalf("gpuaasctl lease logs printed %d bytes, want the %d retained", len(out), len(want))
	}
	if !strings.Contains(errOut, "rotated away") {
		t.Fatalf("no note that older output was rotated away: %q", errOut)
	}
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	for _, l := range lines {
		if _, err := logfile.ParseRecord([]byte(l)); err != nil {
			t.Fatalf("line %q: %v", l, err)
		}
	}
	if strings.Contains(out, " out 0\n") {
		t.Fatal("the oldest output was not rotated away")
	}
	out, _ = gpuaasctl("lease", "logs", id, "--tail", "200")
	if len(out) > 200 || !strings.HasSuffix(string(want), out) || !strings.HasSuffix(out, "\n") || len(out) == 0 {
		t.Fatalf("--tail 200: %q", out)
	}

	// Each call left its audit entry.
	es, err := audit.List(ctx, cp.st, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range es {
		if e.Action == "lease.logs" && e.Resource == "lease/"+id && e.Outcome == "success" && e.Actor == alice.ID.String() {
			n++
		}
	}
	if n != 2 {
		t.Fatalf("%d lease.logs audit entries, want 2", n)
	}
}
