package main

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/audit/sink"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/identity"
	auditv1 "github.com/gpuaas/gpuaas/proto/gpuaas/audit/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestAuditForwardingSurvivesKill9 runs the real control plane binary with
// forwarding to an in-process sink over mTLS, creates leases (each one an
// audit entry) and kills the process with SIGKILL at random moments, 20
// times, while the sink is also stopped and restarted. At the end the sink
// holds every checkpointed entry exactly once, in order, byte for byte,
// and both the sink's directory and the state file verify.
func TestAuditForwardingSurvivesKill9(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and kills the control plane binary 20 times")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "gpuaas-controlplane")
	build := exec.Command("go", "build", "-o", bin, ".")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build the control plane: %v\n%s", err, out)
	}
	pki, err := identity.WriteDevPKI(filepath.Join(dir, "pki"), identity.DevPKIOptions{TrustDomain: "gpuaas.test", Operators: []string{"alice"}})
	if err != nil {
		t.Fatal(err)
	}
	td := pki.TrustDomain
	sinkID := spiffeid.RequireFromPath(td, "/gpuaas/audit-sink")
	sinkSVID, err := pki.CA.IssueSVID(sinkID, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	sinkSrc := identity.StaticSource{SVID: sinkSVID, Bundle: pki.CA.Bundle()}
	const origin = "gpuaas.test/audit"
	skey, pub := filepath.Join(dir, "audit.key"), filepath.Join(dir, "audit.pub")
	if _, err := auditlog.WriteKeyPair(origin, skey, pub); err != nil {
		t.Fatal(err)
	}
	trusted, err := auditlog.LoadVerifiers(pub)
	if err != nil {
		t.Fatal(err)
	}

	sinkDir, sinkAddr, cpAddr := filepath.Join(dir, "sink"), freeAddr(t), freeAddr(t)
	var sinkSrv *grpc.Server
	var sinkDone chan struct{}
	startSink := func() {
		s, err := sink.Open(sink.Options{Dir: sinkDir, Origin: origin, Trusted: trusted})
		if err != nil {
			t.Fatal(err)
		}
		lis, err := net.Listen("tcp", sinkAddr)
		if err != nil {
			t.Fatal(err)
		}
		sinkSrv = grpc.NewServer(grpc.Creds(identity.ServerCredentials(sinkSrc, sink.AuthorizeSenders(identity.ControlPlaneID(td)))))
		auditv1.RegisterAuditSinkServiceServer(sinkSrv, &sink.Server{Sink: s})
		sinkDone = make(chan struct{})
		go func(srv *grpc.Server, done chan struct{}) { srv.Serve(lis); close(done) }(sinkSrv, sinkDone)
	}
	stopSink := func() {
		if sinkSrv != nil {
			sinkSrv.Stop()
			<-sinkDone
			sinkSrv = nil
		}
	}
	startSink()
	defer stopSink()

	dataDir := filepath.Join(dir, "data")
	cfgPath := filepath.Join(dir, "controlplane.yaml")
	cfg := fmt.Sprintf(`listen: %s
data_dir: %s
trust_domain: gpuaas.test
svid: {cert: %s, key: %s, bundle: %s}
tick_interval: 100ms
attestation: {disabled: true}
log: {level: warn}
audit:
  signing_key: %s
  checkpoint_every: 3
  checkpoint_interval: 100ms
  forward: {address: "%s", sink_id: "%s", max_batch: 5}
`, cpAddr, dataDir, pki.ControlPlane.CertPath, pki.ControlPlane.KeyPath, pki.BundlePath, skey, sinkAddr, sinkID)
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}

	opSrc, err := identity.NewFileSource(context.Background(), identity.FileSourceConfig{CertPath: pki.Operators["alice"].CertPath,
		KeyPath: pki.Operators["alice"].KeyPath, BundlePath: pki.BundlePath, TrustDomain: td})
	if err != nil {
		t.Fatal(err)
	}
	defer opSrc.Close()
	conn, err := grpc.NewClient(cpAddr, grpc.WithTransportCredentials(identity.ClientCredentials(opSrc, tlsconfig.AuthorizeID(identity.ControlPlaneID(td)))))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	lc := leasev1.NewLeaseServiceClient(conn)

	var stderr bytes.Buffer
	start := func() *exec.Cmd {
		cmd := exec.Command(bin, "-config", cfgPath)
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		return cmd
	}
	rng := rand.New(rand.NewPCG(7, 8))
	created := 0
	createSome := func(n int) {
		for range n {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_, err := lc.CreateLease(ctx, &leasev1.CreateLeaseRequest{IdempotencyKey: fmt.Sprintf("k%d", created), Spec: &leasev1.LeaseSpec{
				Tenant: "acme", Gpu: &leasev1.GpuRequest{Kind: &leasev1.GpuRequest_MigProfile{MigProfile: "1g.18gb"}},
				Workload: &leasev1.Workload{Image: "img"}, Duration: durationpb.New(time.Hour)}}, grpc.WaitForReady(true))
			cancel()
			if err == nil {
				created++
			}
		}
	}
	for round := 0; round < 20; round++ {
		if round%7 == 3 {
			stopSink() // the sink is down for this round
		} else if sinkSrv == nil {
			startSink()
		}
		cmd := start()
		createSome(1 + rng.IntN(4))
		time.Sleep(time.Duration(rng.IntN(300)) * time.Millisecond)
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()
	}
	if created < 20 {
		t.Fatalf("only %d leases were created across the runs; stderr:\n%s", created, stderr.String())
	}
	if sinkSrv == nil {
		startSink()
	}
	// A last run, stopped gracefully.
	cmd := start()
	createSome(2)
	cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("control plane exit: %v\n%s", err, stderr.String())
	}
	byProcesses, err := sink.VerifyDir(sinkDir, origin, trusted)
	if err != nil {
		t.Fatalf("sink directory does not verify: %v", err)
	}
	if byProcesses.Entries == 0 {
		t.Fatalf("the control plane processes delivered nothing; stderr:\n%s", stderr.String())
	}
	st, err := store.OpenBolt(filepath.Join(dataDir, "state.db"), store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	// Drain what the last process signed but had no time to deliver, as
	// its next start would, through the same forwarder over mTLS.
	cpSrc, err := identity.NewFileSource(context.Background(), identity.FileSourceConfig{CertPath: pki.ControlPlane.CertPath,
		KeyPath: pki.ControlPlane.KeyPath, BundlePath: pki.BundlePath, TrustDomain: td})
	if err != nil {
		t.Fatal(err)
	}
	defer cpSrc.Close()
	sconn, err := grpc.NewClient(sinkAddr, grpc.WithTransportCredentials(identity.ClientCredentials(cpSrc, tlsconfig.AuthorizeID(sinkID))))
	if err != nil {
		t.Fatal(err)
	}
	defer sconn.Close()
	fw, err := audit.NewForwarder(audit.ForwarderOptions{Store: st, Sink: audit.NewGRPCSink(sconn), Origin: origin, MaxBatch: 5})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := fw.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	for {
		ok, err := fw.Step(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			break
		}
	}
	stopSink()
	res, err := sink.VerifyDir(sinkDir, origin, trusted)
	if err != nil {
		t.Fatalf("sink directory does not verify: %v", err)
	}
	vr, err := audit.Verify(context.Background(), st, audit.VerifyOptions{Trusted: trusted, Origin: origin})
	if err != nil {
		t.Fatalf("state file does not verify: %v", err)
	}
	if vr.Latest == nil || res.Latest == nil || res.Latest.Size != vr.Latest.Size || !bytes.Equal(res.Latest.Root, vr.Latest.Root) {
		t.Fatalf("sink holds %v, the log's latest checkpoint is %v", res.Latest, vr.Latest)
	}
	if vr.Entries < uint64(created) || res.Entries != vr.Entries {
		t.Fatalf("the log holds %d entries for %d created leases, the sink %d: a graceful stop signs a last checkpoint", vr.Entries, created, res.Entries)
	}
	// Byte for byte: the sink's entries are the log's, in order, once.
	b, err := audit.ReadBatch(context.Background(), st, 0, int(res.Latest.Size))
	if err != nil {
		t.Fatal(err)
	}
	v := auditlog.NewVerifier()
	if err := v.AddAll(b.Entries); err != nil || uint64(len(b.Entries)) != res.Entries || !bytes.Equal(v.Root(), res.Latest.Root) {
		t.Fatalf("sink and log differ: %v", err)
	}
	t.Logf("%d leases, %d entries in the log, %d delivered in %d batches (%d by the killed processes)", created, vr.Entries, res.Entries, res.Batches, byProcesses.Entries)
}
