// Package cluster runs a whole gpuaas installation on one machine for the
// end-to-end test and the demo: a private containerd, a development PKI, the
// control plane and agents as real processes (the built binaries), and an
// operator's gRPC clients. Everything it starts, Close stops and removes.
package cluster

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc"

	"github.com/gpuaas/gpuaas/pkg/attestation"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/identity"
	"github.com/gpuaas/gpuaas/pkg/seal"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
	"github.com/gpuaas/gpuaas/test/harness"
	"github.com/gpuaas/gpuaas/test/ociimage"
)

// TrustDomain of every cluster.
const TrustDomain = "gpuaas.test"

// ImageName is the workload image every cluster imports.
const ImageName = "localhost/gpuaas/busybox:demo"

// Options configure a cluster.
type Options struct {
	// Dir holds everything; a new temporary directory if empty.
	Dir string
	// BinDir holds gpuaas-agent, gpuaas-controlplane and gpuaasctl.
	BinDir string
	// Agents maps node names to their simulated GPU models.
	Agents map[string][]string
	// StopGrace is the agents' SIGTERM-to-SIGKILL grace.
	StopGrace time.Duration
	// LogLevel of the daemons (default "info").
	LogLevel string
	// LogDriver is the agents' gpuaas-logdriver (absolute path, e.g. from
	// harness.BuildBinary). Empty: the agent's default, the one in BinDir
	// if there is one, else uncapped logs.
	LogDriver string
	// WorkloadAPI, if set, is a SPIFFE Workload API address (a SPIRE
	// agent's socket): the control plane and every agent take their SVIDs
	// from it instead of the development PKI, and Operator is the
	// operator identity Dial presents.
	WorkloadAPI string
	Operator    identity.Source
	// Policy, if set, adjusts the control plane's attestation policy
	// before it is written. The default allows the agent binary in BinDir
	// (by its SHA-256) and requires the device and egress fences on every
	// running lease, with a 1 minute max age.
	Policy func(*attestation.Policy)
	// TelemetryInterval is the agents' telemetry.interval (default 2s).
	TelemetryInterval time.Duration
	// AgentConfig, if set, returns YAML appended to a node's agent
	// configuration: top-level keys the cluster does not write itself
	// (mig, for a static layout).
	AgentConfig func(node string) string
}

// Proc is one daemon process.
type Proc struct {
	Name    string
	LogPath string
	cmd     *exec.Cmd
	done    chan struct{}
	err     error
}

// Pid is the process's id.
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Done is closed when the process has exited.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Err waits for the process to exit and returns how it ended.
func (p *Proc) Err() error {
	<-p.done
	return p.err
}

// Running reports whether the process has not exited.
func (p *Proc) Running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// Cluster is a running installation.
type Cluster struct {
	opts   Options
	Dir    string
	ownDir bool
	PKI    *identity.DevPKI
	// AuditKey signs the control plane's audit checkpoints; AuditPub is
	// its verifier key (gpuaasctl audit verify --key).
	AuditKey, AuditPub string
	Containerd         *harness.Containerd
	CPAddr             string
	Image              ociimage.Image
	// Namespace is the agents' containerd namespace, unique per cluster so
	// that its per-namespace runc state and parent cgroups can be removed
	// at Close without racing another test's containerd.
	Namespace string

	// MetricsAddr is each agent's Prometheus endpoint (host:port).
	MetricsAddr map[string]string
	// CPMetricsAddr is the control plane's metrics and health address.
	CPMetricsAddr string
	// Networks are the agents' bridge networks, one per node (a bridge
	// and a subnet of its own), removed at Close.
	Networks map[string]*harness.Network

	mu     sync.Mutex
	cp     *Proc
	agents map[string]*Proc
	conns  []*grpc.ClientConn
	srcs   []*identity.FileSource // closed by Close
}

// Start brings up containerd, the PKI, the control plane and every agent.
func Start(ctx context.Context, opts Options) (_ *Cluster, err error) {
	if opts.LogLevel == "" {
		opts.LogLevel = "warn"
	}
	if opts.StopGrace == 0 {
		opts.StopGrace = 2 * time.Second
	}
	if opts.TelemetryInterval == 0 {
		opts.TelemetryInterval = 2 * time.Second
	}
	c := &Cluster{opts: opts, Dir: opts.Dir, agents: map[string]*Proc{}, Namespace: harness.UniqueID("gpuaas"), Networks: map[string]*harness.Network{}}
	if c.Dir == "" {
		if c.Dir, err = os.MkdirTemp("", "gpuaas-e2e-"); err != nil {
			return nil, err
		}
		c.ownDir = true
	}
	defer func() {
		if err != nil {
			c.Close()
		}
	}()
	for _, b := range []string{"gpuaas-agent", "gpuaas-controlplane", "gpuaasctl"} {
		if _, err := os.Stat(filepath.Join(opts.BinDir, b)); err != nil {
			return nil, fmt.Errorf("binary %s: %w", b, err)
		}
	}
	if c.Containerd, err = harness.StartContainerd(ctx, harness.Options{Dir: filepath.Join(c.Dir, "containerd")}); err != nil {
		return nil, fmt.Errorf("start containerd: %w", err)
	}
	bb, err := ociimage.FindBusybox()
	if err != nil {
		return nil, err
	}
	if c.Image, err = ociimage.WriteArchiveFile(filepath.Join(c.Dir, "image.tar"), ociimage.Options{Name: ImageName, BusyboxPath: bb}); err != nil {
		return nil, fmt.Errorf("build image: %w", err)
	}
	var nodes []string
	for n := range opts.Agents {
		nodes = append(nodes, n)
	}
	if c.PKI, err = identity.WriteDevPKI(filepath.Join(c.Dir, "pki"), identity.DevPKIOptions{TrustDomain: TrustDomain, Agents: nodes, Operators: []string{"admin"}}); err != nil {
		return nil, fmt.Errorf("dev pki: %w", err)
	}
	if c.CPAddr, err = freeAddr(); err != nil {
		return nil, err
	}
	skey, vkey, err := auditlog.GenerateKey(TrustDomain + "/audit")
	if err != nil {
		return nil, err
	}
	c.AuditKey, c.AuditPub = filepath.Join(c.Dir, "pki", "audit-signing.key"), filepath.Join(c.Dir, "pki", "audit-signing.pub")
	if err := os.WriteFile(c.AuditKey, []byte(skey+"\n"), 0o600); err != nil {
		return nil, err
	}
	if err := os.WriteFile(c.AuditPub, []byte(vkey+"\n"), 0o644); err != nil {
		return nil, err
	}
	if err := c.writePolicy(); err != nil {
		return nil, err
	}
	// Secrets at rest: one sealing key for the control plane, one per
	// agent.
	for _, name := range append([]string{"controlplane"}, nodes...) {
		line, err := seal.GenerateKeyLine("k1")
		if err != nil {
			return nil, err
		}
		if err := os.WriteFile(c.SecretsKey(name), []byte(line+"\n"), 0o600); err != nil {
			return nil, err
		}
	}
	if c.CPMetricsAddr, err = freeAddr(); err != nil {
		return nil, err
	}
	if err := c.StartControlPlane(ctx); err != nil {
		return nil, err
	}
	c.MetricsAddr = map[string]string{}
	for _, n := range nodes {
		if c.MetricsAddr[n], err = freeAddr(); err != nil {
			return nil, err
		}
	}
	for _, n := range nodes {
		if err := c.StartAgent(ctx, n); err != nil {
			return nil, err
		}
	}
	return c, nil
}

func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// CPDataDir is the control plane's data directory.
func (c *Cluster) CPDataDir() string { return filepath.Join(c.Dir, "controlplane") }

// AgentDataDir is an agent's data directory.
func (c *Cluster) AgentDataDir(node string) string { return filepath.Join(c.Dir, "agent-"+node) }

// StatusSocket is an agent's status socket (`gpuaas-agent status
// -socket`), in the cluster's directory (so Close removes it).
func (c *Cluster) StatusSocket(node string) string {
	return filepath.Join(c.Dir, "status-"+node+".sock")
}

// PinRoot is where an agent pins its leases' eBPF fences: unique per
// cluster, removed at Close.
func (c *Cluster) PinRoot(node string) string {
	return filepath.Join("/sys/fs/bpf", c.Namespace+"-"+node)
}

// ContainerLog is where a lease's container output goes.
func (c *Cluster) ContainerLog(node, leaseID string) string {
	return filepath.Join(c.AgentDataDir(node), "logs", leaseID+".log")
}

func (c *Cluster) start(name, bin, cfg string, cfgBody string) (*Proc, error) {
	if err := os.WriteFile(cfg, []byte(cfgBody), 0o600); err != nil {
		return nil, err
	}
	p := &Proc{Name: name, LogPath: filepath.Join(c.Dir, name+".log"), done: make(chan struct{})}
	logf, err := os.OpenFile(p.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	p.cmd = exec.Command(filepath.Join(c.opts.BinDir, bin), "-config", cfg)
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	go func() { p.err = p.cmd.Wait(); logf.Close(); close(p.done) }()
	return p, nil
}

// SecretsKey is the sealing key file of the control plane ("controlplane")
// or of a node's agent.
func (c *Cluster) SecretsKey(name string) string {
	return filepath.Join(c.Dir, "pki", "secrets-"+name+".key")
}

// PolicyPath is the control plane's attestation policy file.
func (c *Cluster) PolicyPath() string { return filepath.Join(c.Dir, "attestation-policy.json") }

// writePolicy writes the attestation policy: the agent binary the cluster
// runs is the one allowed.
func (c *Cluster) writePolicy() error {
	sum, err := fileSHA256(filepath.Join(c.opts.BinDir, "gpuaas-agent"))
	if err != nil {
		return err
	}
	p := &attestation.Policy{AllowedAgentSHA256: []string{sum}, RequiredFences: []string{"device", "egress"}, MaxAge: attestation.Duration(time.Minute)}
	if c.opts.Policy != nil {
		c.opts.Policy(p)
	}
	raw, err := json.MarshalIndent(p, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(c.PolicyPath(), raw, 0o644)
}

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// StartControlPlane starts (or restarts) the control plane and waits until
// it accepts connections.
func (c *Cluster) StartControlPlane(ctx context.Context) error {
	cfg := fmt.Sprintf(`listen: %q
data_dir: %q
trust_domain: %s
%stick_interval: 200ms
audit:
  signing_key: %q
  checkpoint_every: 10
  checkpoint_interval: 1s
attestation:
  policy_file: %q
  interval: 10s
secrets:
  key_file: %q
metrics_listen: %q
log:
  level: %s
`, c.CPAddr, c.CPDataDir(), TrustDomain, c.svidYAML(c.PKI.ControlPlane), c.AuditKey, c.PolicyPath(), c.SecretsKey("controlplane"), c.CPMetricsAddr, c.opts.LogLevel)
	p, err := c.start("controlplane", "gpuaas-controlplane", filepath.Join(c.Dir, "controlplane.yaml"), cfg)
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.cp = p
	c.mu.Unlock()
	return waitFor(ctx, 15*time.Second, func() error {
		if !p.Running() {
			return fmt.Errorf("control plane exited: %v (see %s)", p.err, p.LogPath)
		}
		conn, err := net.DialTimeout("tcp", c.CPAddr, 200*time.Millisecond)
		if err == nil {
			conn.Close()
		}
		return err
	})
}

// svidYAML is a daemon's svid section: the Workload API when the cluster
// uses one, else the development PKI files f.
func (c *Cluster) svidYAML(f identity.SVIDFiles) string {
	if c.opts.WorkloadAPI != "" {
		return fmt.Sprintf("svid:\n  workload_api: %q\n", c.opts.WorkloadAPI)
	}
	return fmt.Sprintf("svid:\n  cert: %q\n  key: %q\n  bundle: %q\n", f.CertPath, f.KeyPath, c.PKI.BundlePath)
}

// StartAgent starts (or restarts) a node's agent.
func (c *Cluster) StartAgent(ctx context.Context, node string) error {
	c.mu.Lock()
	n := c.Networks[node]
	c.mu.Unlock()
	if n == nil {
		var err error
		if n, err = harness.NewNetwork(); err != nil {
			return fmt.Errorf("network of %s: %w", node, err)
		}
		// The agent keeps its address allocations under its data dir.
		n.StateDir = filepath.Join(c.AgentDataDir(node), "network")
		c.mu.Lock()
		c.Networks[node] = n
		c.mu.Unlock()
	}
	logs := ""
	if c.opts.LogDriver != "" {
		logs = fmt.Sprintf("logs:\n  driver: %q\n", c.opts.LogDriver)
	}
	var gpus strings.Builder
	for _, m := range c.opts.Agents[node] {
		fmt.Fprintf(&gpus, "      - model: %s\n        mig_enabled: true\n", m)
	}
	cfg := fmt.Sprintf(`node: %s
control_plane: %q
trust_domain: %s
%sdata_dir: %q
containerd:
  address: %q
  namespace: %s
  cdi_spec_dir: %q
gpu:
  backend: sim
  sim:
    gpus:
%simages:
  allowed_registries: [localhost]
image_archives:
  - %q
stop_grace: %s
isolation:
  pin_root: %q
metrics_listen: %q
status_socket: %q
telemetry:
  interval: %s
secrets:
  key_file: %q
network:
  bridge: %s
  subnet: %s
  plugin_dirs: [%q]
  run_dir: %q
%slog:
  level: %s
`, node, c.CPAddr, TrustDomain, c.svidYAML(c.PKI.Agents[node]), c.AgentDataDir(node), c.Containerd.Address(), c.Namespace, filepath.Join(c.AgentDataDir(node), "cdi"),
		gpus.String(), filepath.Join(c.Dir, "image.tar"), c.opts.StopGrace, c.PinRoot(node), c.MetricsAddr[node], c.StatusSocket(node), c.opts.TelemetryInterval, c.SecretsKey(node),
		n.Bridge, n.Subnet, n.PluginDir, n.RunDir, logs, c.opts.LogLevel)
	if c.opts.AgentConfig != nil {
		cfg += c.opts.AgentConfig(node)
	}
	p, err := c.start("agent-"+node, "gpuaas-agent", filepath.Join(c.Dir, "agent-"+node+".yaml"), cfg)
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.agents[node] = p
	c.mu.Unlock()
	return nil
}

func stop(p *Proc, sig syscall.Signal) error {
	if p == nil || !p.Running() {
		return nil
	}
	_ = p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
		return nil
	case <-time.After(20 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
		return fmt.Errorf("%s did not stop on %v", p.Name, sig)
	}
}

// StopControlPlane stops the control plane: SIGKILL if kill, else SIGTERM.
func (c *Cluster) StopControlPlane(kill bool) error {
	c.mu.Lock()
	p := c.cp
	c.mu.Unlock()
	if kill {
		return stop(p, syscall.SIGKILL)
	}
	return stop(p, syscall.SIGTERM)
}

// StopAgent stops a node's agent: SIGKILL if kill, else SIGTERM.
func (c *Cluster) StopAgent(node string, kill bool) error {
	c.mu.Lock()
	p := c.agents[node]
	c.mu.Unlock()
	if kill {
		return stop(p, syscall.SIGKILL)
	}
	return stop(p, syscall.SIGTERM)
}

// Agent is a node's agent process, the one StartAgent started last (nil
// before).
func (c *Cluster) Agent(node string) *Proc {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.agents[node]
}

// Dial returns an operator connection to the control plane.
func (c *Cluster) Dial(ctx context.Context) (*grpc.ClientConn, error) {
	td := spiffeid.RequireTrustDomainFromString(TrustDomain)
	var src identity.Source = c.opts.Operator
	var fsrc *identity.FileSource
	if src == nil {
		f := c.PKI.Operators["admin"]
		var err error
		if fsrc, err = identity.NewFileSource(ctx, identity.FileSourceConfig{CertPath: f.CertPath, KeyPath: f.KeyPath, BundlePath: c.PKI.BundlePath, TrustDomain: td}); err != nil {
			return nil, err
		}
		src = fsrc
	}
	conn, err := grpc.NewClient(c.CPAddr, grpc.WithTransportCredentials(identity.ClientCredentials(src, tlsconfig.AuthorizeID(identity.ControlPlaneID(td)))))
	if err != nil {
		if fsrc != nil {
			fsrc.Close()
		}
		return nil, err
	}
	c.mu.Lock()
	c.conns = append(c.conns, conn)
	if fsrc != nil {
		c.srcs = append(c.srcs, fsrc)
	}
	c.mu.Unlock()
	return conn, nil
}

// Leases returns an operator's lease client.
func (c *Cluster) Leases(ctx context.Context) (leasev1.LeaseServiceClient, error) {
	conn, err := c.Dial(ctx)
	if err != nil {
		return nil, err
	}
	return leasev1.NewLeaseServiceClient(conn), nil
}

// Nodes returns an operator's node client.
func (c *Cluster) Nodes(ctx context.Context) (nodev1.NodeServiceClient, error) {
	conn, err := c.Dial(ctx)
	if err != nil {
		return nil, err
	}
	return nodev1.NewNodeServiceClient(conn), nil
}

// CtlEnv is the environment that points gpuaasctl at this cluster.
func (c *Cluster) CtlEnv() []string {
	f := c.PKI.Operators["admin"]
	return append(os.Environ(), "GPUAAS_ADDR="+c.CPAddr, "GPUAAS_TRUST_DOMAIN="+TrustDomain,
		"GPUAAS_CERT="+f.CertPath, "GPUAAS_KEY="+f.KeyPath, "GPUAAS_BUNDLE="+c.PKI.BundlePath)
}

// Ctl runs gpuaasctl against the cluster and returns its combined output.
func (c *Cluster) Ctl(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, filepath.Join(c.opts.BinDir, "gpuaasctl"), args...)
	cmd.Env = c.CtlEnv()
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// WaitPhase polls a lease until it reaches one of the phases.
func (c *Cluster) WaitPhase(ctx context.Context, lc leasev1.LeaseServiceClient, id string, timeout time.Duration, phases ...leasev1.Phase) (*leasev1.Lease, error) {
	var last *leasev1.Lease
	err := waitFor(ctx, timeout, func() error {
		resp, err := lc.GetLease(ctx, &leasev1.GetLeaseRequest{Id: id})
		if err != nil {
			return err
		}
		last = resp.GetLease()
		for _, p := range phases {
			if last.GetPhase() == p {
				return nil
			}
		}
		return fmt.Errorf("lease %s is %v (%s)", id, last.GetPhase(), last.GetReason())
	})
	return last, err
}

func waitFor(ctx context.Context, timeout time.Duration, f func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %s: %w", timeout, err)
		}
		select {
		case <-ctx.Done():
			return errors.Join(ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Close stops every process (agents first, gracefully), then containerd
// (which removes every container left), and the directory if it made it.
func (c *Cluster) Close() error {
	var errs []error
	c.mu.Lock()
	conns, srcs, agents, cp := c.conns, c.srcs, c.agents, c.cp
	c.conns, c.srcs = nil, nil
	c.mu.Unlock()
	for _, conn := range conns {
		conn.Close()
	}
	for _, s := range srcs {
		s.Close()
	}
	for _, p := range agents {
		errs = append(errs, stop(p, syscall.SIGTERM))
	}
	errs = append(errs, stop(cp, syscall.SIGTERM))
	if c.Containerd != nil {
		errs = append(errs, c.Containerd.Close())
		// The namespace's (now empty) runc state dir and parent cgroups.
		errs = append(errs, harness.RemoveNamespaceDirs(c.Namespace))
	}
	// Fences outlive their agent by design; the cluster's go with it.
	for node := range c.opts.Agents {
		errs = append(errs, os.RemoveAll(c.PinRoot(node)))
	}
	// So do the networks of the containers containerd's close removed
	// (namespace files, NAT rules, addresses), and the bridges.
	for _, n := range c.Networks {
		errs = append(errs, n.Remove())
	}
	if c.ownDir {
		errs = append(errs, os.RemoveAll(c.Dir))
	}
	return errors.Join(errs...)
}

// StartT is Start for a test: the test fails at once if the cluster cannot
// start; at its end the daemons' logs are printed if it failed, and the
// cluster is closed.
func StartT(t testing.TB, ctx context.Context, opts Options) *Cluster {
	t.Helper()
	c, err := Start(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			logs := []string{"controlplane.log"}
			for n := range opts.Agents {
				logs = append(logs, "agent-"+n+".log")
			}
			for _, f := range logs {
				b, _ := os.ReadFile(filepath.Join(c.Dir, f))
				t.Logf("%s:\n%s", f, b)
			}
		}
		if err := c.Close(); err != nil {
			t.Errorf("close cluster: %v", err)
		}
	})
	return c
}
