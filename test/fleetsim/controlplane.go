// Package fleetsim runs a fleet of simulated agents against one real
// control plane, for the fleet-scale benchmarks of issue 7 (sessions held,
// resident memory and CPU per session, time to declare a dead node down).
//
// The control plane is the built gpuaas-controlplane binary, started as a
// process with its own development PKI, audit key and attestation policy.
// Each simulated agent is a pair of goroutines in the caller's process that
// speaks gpuaas.agent.v1 AgentService.Session itself over real mTLS gRPC on
// loopback: its own X509-SVID issued in memory by the PKI's CA, a Hello
// with an inventory of simulated GPUs (agent/gpu/sim), heartbeats, observed
// state for the leases it is given, attestation reports signed with its
// SVID and, optionally, signed telemetry. It runs no containers, touches no
// GPU and writes nothing but the control plane's files under its directory.
//
// It is test tooling: the control plane it starts trusts a CA whose key is
// in memory and admits a policy that allows the simulator's made-up agent
// digest. It must never be pointed at a real control plane.
package fleetsim

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc"

	"github.com/gpuaas/gpuaas/controlplane/fleet"
	"github.com/gpuaas/gpuaas/pkg/attestation"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/identity"
)

// TrustDomain of every simulated fleet.
const TrustDomain = "gpuaas.test"

// Operator is the operator identity the control plane admits for the
// caller's lease and node clients (DialOperator).
const Operator = "fleetsim"

// Liveness is the control plane's heartbeat configuration (its liveness
// section); zero fields take the control plane's defaults.
type Liveness struct {
	MinTTL                 time.Duration
	MaxHeartbeatsPerSecond float64
	Grace                  time.Duration
}

// Fleet is the control plane's liveness model for this configuration, to
// compute the TTL it applies at a fleet size.
func (l Liveness) Fleet() fleet.Liveness {
	return fleet.Liveness{MinTTL: l.MinTTL, MaxHeartbeatsPerSecond: l.MaxHeartbeatsPerSecond, Grace: l.Grace}
}

// DownAfter is how long after its last heartbeat a node of a fleet of n
// nodes is declared down: the TTL at that size plus the grace.
func (l Liveness) DownAfter(n int) time.Duration {
	f := l.Fleet()
	grace := f.Grace
	if grace == 0 {
		grace = 10 * time.Second // fleet.Liveness's default
	}
	return f.TTL(n) + grace
}

// ControlPlaneOptions configure StartControlPlane.
type ControlPlaneOptions struct {
	// Binary is the gpuaas-controlplane executable. Required.
	Binary string
	// Dir holds the PKI, configuration, data and log. Required.
	Dir string
	// Liveness is the heartbeat configuration.
	Liveness Liveness
	// AttestationInterval is how often each agent is challenged (default
	// 10m) and AttestationMaxAge the policy's max age (default 30m).
	AttestationInterval, AttestationMaxAge time.Duration
	// LogLevel of the control plane (default warn).
	LogLevel string
	// NoFile is the RLIMIT_NOFILE the process is given (default 65536, or
	// the most this process may set).
	NoFile uint64
	// Replicas of one control plane share a PKI, an audit signing key and
	// an etcd store: Shared, if set, is the first replica, whose PKI and
	// key this one uses; Etcd (endpoint and prefix) selects the etcd
	// backend; ReplicaTTL is the replica lease TTL.
	Shared                   *ControlPlane
	EtcdEndpoint, EtcdPrefix string
	ReplicaTTL               time.Duration
	// ReadBufferBytes is edge.read_buffer_bytes (0: the default).
	ReadBufferBytes int
}

// ControlPlane is a running control plane process.
type ControlPlane struct {
	// Addr is its gRPC address, MetricsAddr its metrics and health one.
	Addr, MetricsAddr string
	// PKI is its development PKI; PKI.CA issues agent SVIDs.
	PKI *identity.DevPKI
	// LogPath is where its output goes.
	LogPath  string
	Liveness Liveness

	cmd  *exec.Cmd
	done chan struct{}
	err  error

	closeOnce sync.Once
	op        *identity.FileSource
	auditKey  string
}

// AgentSHA256 is the agent binary digest every simulated agent reports and
// the policy StartControlPlane writes allows: a made-up value no real agent
// binary has.
const AgentSHA256 = "f1ee751f000000000000000000000000000000000000000000000000f1ee751f"

// StartControlPlane writes a development PKI, an audit signing key, an
// attestation policy that admits simulated agents and the configuration
// under o.Dir, starts the control plane with a high descriptor limit and
// waits until it accepts connections. The process is killed if the caller
// dies.
func StartControlPlane(ctx context.Context, o ControlPlaneOptions) (_ *ControlPlane, err error) {
	if o.Binary == "" || o.Dir == "" {
		return nil, errors.New("start control plane: binary and dir are required")
	}
	if o.AttestationInterval == 0 {
		o.AttestationInterval = 10 * time.Minute
	}
	if o.AttestationMaxAge == 0 {
		o.AttestationMaxAge = 30 * time.Minute
	}
	if o.LogLevel == "" {
		o.LogLevel = "warn"
	}
	if o.NoFile == 0 {
		o.NoFile = 1 << 16
	}
	cp := &ControlPlane{Liveness: o.Liveness, LogPath: filepath.Join(o.Dir, "controlplane.log"), done: make(chan struct{})}
	if o.Shared != nil {
		cp.PKI, cp.auditKey = o.Shared.PKI, o.Shared.auditKey
	} else {
		if cp.PKI, err = identity.WriteDevPKI(filepath.Join(o.Dir, "pki"), identity.DevPKIOptions{TrustDomain: TrustDomain, Operators: []string{Operator}}); err != nil {
			return nil, fmt.Errorf("start control plane: %w", err)
		}
		skey, _, err := auditlog.GenerateKey(TrustDomain + "/audit")
		if err != nil {
			return nil, fmt.Errorf("start control plane: audit key: %w", err)
		}
		cp.auditKey = filepath.Join(o.Dir, "pki", "audit-signing.key")
		if err := os.WriteFile(cp.auditKey, []byte(skey+"\n"), 0o600); err != nil {
			return nil, fmt.Errorf("start control plane: %w", err)
		}
	}
	auditKey := cp.auditKey
	policy := &attestation.Policy{AllowedAgentSHA256: []string{AgentSHA256}, AllowedDriverVersions: []string{driverVersion},
		RequiredFences: []string{"device", "egress"}, MaxAge: attestation.Duration(o.AttestationMaxAge)}
	raw, err := json.MarshalIndent(policy, "", "  ")
	if err != nil {
		return nil, err
	}
	policyPath := filepath.Join(o.Dir, "attestation-policy.json")
	if err := os.WriteFile(policyPath, raw, 0o644); err != nil {
		return nil, fmt.Errorf("start control plane: %w", err)
	}
	if cp.Addr, err = freeAddr(); err != nil {
		return nil, err
	}
	if cp.MetricsAddr, err = freeAddr(); err != nil {
		return nil, err
	}
	var live strings.Builder
	if o.Liveness.MinTTL > 0 {
		fmt.Fprintf(&live, "  min_ttl: %s\n", o.Liveness.MinTTL)
	}
	if o.Liveness.MaxHeartbeatsPerSecond > 0 {
		fmt.Fprintf(&live, "  max_heartbeats_per_second: %g\n", o.Liveness.MaxHeartbeatsPerSecond)
	}
	if o.Liveness.Grace > 0 {
		fmt.Fprintf(&live, "  grace: %s\n", o.Liveness.Grace)
	}
	liveYAML := ""
	if live.Len() > 0 {
		liveYAML = "liveness:\n" + live.String()
	}
	if o.EtcdEndpoint != "" {
		liveYAML += fmt.Sprintf("store:\n  backend: etcd\n  etcd: {endpoints: [%q], prefix: %q}\n", o.EtcdEndpoint, o.EtcdPrefix)
		if o.ReplicaTTL > 0 {
			liveYAML += fmt.Sprintf("replica: {ttl: %s}\n", o.ReplicaTTL)
		}
	}
	// The operator client's rate is unbounded; each agent is its own
	// identity, so the identity table must hold the whole fleet.
	cfg := fmt.Sprintf(`listen: %q
data_dir: %q
trust_domain: %s
svid: {cert: %q, key: %q, bundle: %q}
metrics_listen: %q
log: {level: %s}
audit:
  signing_key: %q
attestation:
  policy_file: %q
  interval: %s
edge:
  rate_per_second: 1000000
  rate_burst: 1000000
  max_identities: 100000
  read_buffer_bytes: %d
%s`, cp.Addr, filepath.Join(o.Dir, "data"), TrustDomain, cp.PKI.ControlPlane.CertPath, cp.PKI.ControlPlane.KeyPath, cp.PKI.BundlePath,
		cp.MetricsAddr, o.LogLevel, auditKey, policyPath, o.AttestationInterval, o.ReadBufferBytes, liveYAML)
	cfgPath := filepath.Join(o.Dir, "controlplane.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		return nil, fmt.Errorf("start control plane: %w", err)
	}
	if err := RaiseNoFile(o.NoFile); err != nil {
		return nil, fmt.Errorf("start control plane: %w", err)
	}
	logf, err := os.OpenFile(cp.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("start control plane: %w", err)
	}
	defer logf.Close() // the child has its own descriptor
	cp.cmd = exec.Command(o.Binary, "-config", cfgPath)
	cp.cmd.Stdout, cp.cmd.Stderr = logf, logf
	cp.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cp.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start control plane: %w", err)
	}
	go func() { cp.err = cp.cmd.Wait(); close(cp.done) }()
	defer func() {
		if err != nil {
			cp.Close()
		}
	}()
	f := cp.PKI.Operators[Operator]
	if cp.op, err = identity.NewFileSource(ctx, identity.FileSourceConfig{CertPath: f.CertPath, KeyPath: f.KeyPath,
		BundlePath: cp.PKI.BundlePath, TrustDomain: cp.PKI.TrustDomain}); err != nil {
		return nil, fmt.Errorf("start control plane: operator identity: %w", err)
	}
	deadline := time.Now().Add(time.Minute)
	for {
		if !cp.Running() {
			return nil, fmt.Errorf("start control plane: exited: %v (log %s: %s)", cp.err, cp.LogPath, cp.LogTail(2048))
		}
		c, derr := net.DialTimeout("tcp", cp.Addr, time.Second)
		if derr == nil {
			c.Close()
			return cp, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("start control plane: not listening on %s after a minute: %w", cp.Addr, derr)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// RaiseNoFile raises this process's RLIMIT_NOFILE (soft and hard) to n, or
// the soft limit to the hard one where raising the hard limit is not
// permitted. Processes started afterwards inherit it.
func RaiseNoFile(n uint64) error {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return fmt.Errorf("get RLIMIT_NOFILE: %w", err)
	}
	if lim.Cur >= n {
		return nil
	}
	want := syscall.Rlimit{Cur: n, Max: max(n, lim.Max)}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want); err == nil {
		return nil
	}
	lim.Cur = lim.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return fmt.Errorf("set RLIMIT_NOFILE: %w", err)
	}
	return nil
}

// NoFile is this process's soft RLIMIT_NOFILE.
func NoFile() uint64 {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0
	}
	return lim.Cur
}

func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("pick a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// Pid is the control plane's process id.
func (cp *ControlPlane) Pid() int { return cp.cmd.Process.Pid }

// Running reports whether the process has not exited.
func (cp *ControlPlane) Running() bool {
	select {
	case <-cp.done:
		return false
	default:
		return true
	}
}

// DialOperator connects to the control plane as the operator, for the
// lease and node services. The caller closes the connection.
func (cp *ControlPlane) DialOperator() (*grpc.ClientConn, error) {
	creds := identity.ClientCredentials(cp.op, tlsconfig.AuthorizeID(identity.ControlPlaneID(cp.PKI.TrustDomain)))
	return grpc.NewClient(cp.Addr, grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(256<<20)))
}

// Metrics scrapes the control plane's /metrics and returns the value of
// every sample whose series (name and labels, as exposed) is in names.
func (cp *ControlPlane) Metrics(ctx context.Context, names ...string) (map[string]float64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+cp.MetricsAddr+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("scrape control plane metrics: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("scrape control plane metrics: %s", resp.Status)
	}
	want := map[string]bool{}
	for _, n := range names {
		want[n] = true
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 || !want[line[:i]] {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			return nil, fmt.Errorf("scrape control plane metrics: %q: %w", line, err)
		}
		out[line[:i]] = v
	}
	return out, sc.Err()
}

// LogTail is the last n bytes of the control plane's output.
func (cp *ControlPlane) LogTail(n int64) string {
	f, err := os.Open(cp.LogPath)
	if err != nil {
		return err.Error()
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && st.Size() > n {
		_, _ = f.Seek(st.Size()-n, 0)
	}
	b := make([]byte, n)
	k, _ := f.Read(b)
	return string(b[:k])
}

// Close kills the control plane and waits for it to exit.
func (cp *ControlPlane) Close() {
	cp.closeOnce.Do(func() {
		if cp.cmd != nil && cp.cmd.Process != nil {
			_ = cp.cmd.Process.Signal(syscall.SIGKILL)
			<-cp.done
		}
		if cp.op != nil {
			_ = cp.op.Close()
		}
	})
}
