package crash

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/identity"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	"github.com/gpuaas/gpuaas/test/harness"
)

const (
	trustDomain = "gpuaas.test"
	operator    = "crash"
	// startTimeout bounds the wait for a (re)started control plane to
	// listen: a safety net against a hang, not a performance assertion.
	startTimeout = time.Minute
)

// rig is one control plane installation on disk (binaries, development
// PKI, audit signing key, configuration, bbolt data directory) whose
// process the test starts, kills and restarts.
type rig struct {
	dir, cpBin, ctlBin string
	addr, cfgPath      string
	logPath            string
	auditPub           string
	pki                *identity.DevPKI
	op                 *identity.FileSource

	proc *process // the running control plane, if any
}

// process is one run of the control plane binary.
type process struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// newRig builds the binaries and writes everything the control plane
// needs under a test temporary directory. Edge limits are raised so that
// one operator identity may have every create of a round in flight at
// once; attestation is off because no agent ever connects (leases stay
// PENDING).
func newRig(t *testing.T) *rig {
	t.Helper()
	r := &rig{
		dir:    t.TempDir(),
		cpBin:  harness.BuildBinary(t, "./controlplane/cmd/gpuaas-controlplane"),
		ctlBin: harness.BuildBinary(t, "./controlplane/cmd/gpuaasctl"),
	}
	var err error
	if r.pki, err = identity.WriteDevPKI(filepath.Join(r.dir, "pki"), identity.DevPKIOptions{TrustDomain: trustDomain, Operators: []string{operator}}); err != nil {
		t.Fatal(err)
	}
	skey, vkey, err := auditlog.GenerateKey(trustDomain + "/audit")
	if err != nil {
		t.Fatal(err)
	}
	auditKey := filepath.Join(r.dir, "pki", "audit-signing.key")
	r.auditPub = filepath.Join(r.dir, "pki", "audit-signing.pub")
	if err := os.WriteFile(auditKey, []byte(skey+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(r.auditPub, []byte(vkey+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r.addr = l.Addr().String()
	l.Close()
	r.cfgPath, r.logPath = filepath.Join(r.dir, "controlplane.yaml"), filepath.Join(r.dir, "controlplane.log")
	cfg := fmt.Sprintf(`listen: %q
data_dir: %q
trust_domain: %s
svid: {cert: %q, key: %q, bundle: %q}
attestation: {disabled: true}
log: {level: warn}
audit:
  signing_key: %q
  checkpoint_every: 16
  checkpoint_interval: 100ms
edge:
  max_concurrent_streams: %d
  rate_per_second: 1000000
  rate_burst: 1000000
`, r.addr, r.dataDir(), trustDomain, r.pki.ControlPlane.CertPath, r.pki.ControlPlane.KeyPath, r.pki.BundlePath, auditKey, 2*calls)
	if err := os.WriteFile(r.cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	f := r.pki.Operators[operator]
	if r.op, err = identity.NewFileSource(context.Background(), identity.FileSourceConfig{CertPath: f.CertPath, KeyPath: f.KeyPath,
		BundlePath: r.pki.BundlePath, TrustDomain: r.pki.TrustDomain}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		r.op.Close()
		if r.proc != nil {
			r.kill(t)
		}
		if t.Failed() {
			t.Logf("control plane log (%s), last lines:\n%s", r.logPath, r.logTail())
		}
	})
	return r
}

func (r *rig) dataDir() string { return filepath.Join(r.dir, "data") }

// statePath is the control plane's bbolt file.
func (r *rig) statePath() string { return filepath.Join(r.dataDir(), "state.db") }

// start runs the control plane on the rig's data directory and returns once
// it accepts TCP connections.
func (r *rig) start(t *testing.T) {
	t.Helper()
	if r.proc != nil {
		t.Fatal("control plane already running")
	}
	logf, err := os.OpenFile(r.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close() // the child has its own descriptor
	p := &process{cmd: exec.Command(r.cpBin, "-config", r.cfgPath), done: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	// The control plane dies with the test binary, however that ends.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start the control plane: %v", err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	r.proc = p
	deadline := time.Now().Add(startTimeout)
	for {
		if p.exited() {
			r.proc = nil
			t.Fatalf("the control plane exited at start: %v", p.err)
		}
		c, err := net.DialTimeout("tcp", r.addr, time.Second)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the control plane does not listen on %s after %s: %v", r.addr, startTimeout, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// kill sends SIGKILL to the control plane and waits until it is gone.
func (r *rig) kill(t *testing.T) {
	t.Helper()
	p := r.proc
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil && !errors.Is(err, os.ErrProcessDone) {
		t.Errorf("kill the control plane: %v", err)
	}
	<-p.done
	r.proc = nil
}

// stop ends the control plane with SIGTERM, as systemd does, and fails the
// test unless it exits cleanly.
func (r *rig) stop(t *testing.T) {
	t.Helper()
	p := r.proc
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("stop the control plane: %v", err)
	}
	<-p.done
	r.proc = nil
	if p.err != nil {
		t.Fatalf("the control plane did not stop cleanly: %v", p.err)
	}
}

// dial returns an operator connection (mTLS, the development PKI's
// operator SVID) to the control plane.
func (r *rig) dial(t *testing.T) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(r.addr, grpc.WithTransportCredentials(
		identity.ClientCredentials(r.op, tlsconfig.AuthorizeID(identity.ControlPlaneID(r.pki.TrustDomain)))))
	if err != nil {
		t.Fatal(err)
	}
	return conn
}

// ctl runs gpuaasctl and returns its combined output.
func (r *rig) ctl(ctx context.Context, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, r.ctlBin, args...).CombinedOutput()
	return string(out), err
}

// verifyAudit runs `gpuaasctl audit verify` on the state file (the control
// plane must not be running: verify takes a shared lock) and fails the test
// unless the whole chain and every signed checkpoint verify.
func (r *rig) verifyAudit(t *testing.T, when string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := r.ctl(ctx, "audit", "verify", "--db", r.statePath(), "--key", r.auditPub)
	if err != nil || !strings.Contains(out, "audit log OK") || !strings.Contains(out, "signatures verified") {
		t.Fatalf("%s: gpuaasctl audit verify: %v\n%s", when, err, out)
	}
}

// leaseCreates reads the audit entries after sequence number after
// (read-only, the control plane stopped), sets *last to the last one's
// sequence number and returns how many lease.create entries name each
// lease id.
func (r *rig) leaseCreates(t *testing.T, after uint64, last *uint64) map[string]int {
	t.Helper()
	st, err := store.OpenBoltReadOnly(r.statePath(), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	es, err := audit.List(context.Background(), st, after, 0)
	if err != nil {
		t.Fatal(err)
	}
	*last = after
	out := map[string]int{}
	for _, e := range es {
		*last = e.Seq
		if e.Action != "lease.create" {
			continue
		}
		id, ok := strings.CutPrefix(e.Resource, "lease/")
		if !ok || e.Outcome != auditlog.OutcomeSuccess {
			t.Errorf("audit entry %d: lease.create of %q with outcome %q", e.Seq, e.Resource, e.Outcome)
			continue
		}
		out[id]++
	}
	return out
}

// storedLeases reads every lease from the state file (read-only, the
// control plane stopped).
func (r *rig) storedLeases(t *testing.T) []*leasev1.Lease {
	t.Helper()
	st, err := store.OpenBoltReadOnly(r.statePath(), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	var out []*leasev1.Lease
	err = st.View(context.Background(), func(tx store.Tx) error {
		return tx.Scan(store.BucketLeases, "", false, func(k string, v []byte) error {
			l := &leasev1.Lease{}
			if err := proto.Unmarshal(v, l); err != nil {
				return fmt.Errorf("lease %s: %w", k, err)
			}
			if l.GetId() != k {
				return fmt.Errorf("lease %s is stored under %s", l.GetId(), k)
			}
			out = append(out, l)
			return nil
		})
	})
	if err != nil {
		t.Fatalf("read the leases: %v", err)
	}
	return out
}

// logTail is the end of the control plane's log, for failure messages.
func (r *rig) logTail() string {
	b, err := os.ReadFile(r.logPath)
	if err != nil {
		return err.Error()
	}
	const n = 4096
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}
