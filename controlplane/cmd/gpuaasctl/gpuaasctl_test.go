package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gpuaas/gpuaas/controlplane/api"
	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/fleet"
	"github.com/gpuaas/gpuaas/controlplane/lease"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/identity"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

// controlPlane is the real control plane edge (lease service, fleet, gRPC
// servers with the authorizing interceptors) on loopback over mTLS with the
// dev PKI, as controlplane/api's tests start it.
type controlPlane struct {
	addr string
	pki  *identity.DevPKI
	reg  *fleet.Registry
	st   store.Store
}

func startControlPlane(t *testing.T) *controlPlane {
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
	svid, err := x509svid.Load(pki.ControlPlane.CertPath, pki.ControlPlane.KeyPath)
	if err != nil {
		t.Fatal(err)
	}
	src := identity.StaticSource{SVID: svid, Bundle: pki.CA.Bundle()}
	leases := lease.New(lease.Options{Store: st, Logger: log})
	reg := fleet.New(st, log)
	leases.SetFleet(reg)
	authz := api.Authorizer{TrustDomain: pki.TrustDomain}
	srv := grpc.NewServer(
		grpc.Creds(identity.ServerCredentials(src, identity.AuthorizeKinds(pki.TrustDomain, identity.PeerAgent, identity.PeerOperator))),
		grpc.ChainUnaryInterceptor(authz.Unary(log)), grpc.ChainStreamInterceptor(authz.Stream(log)))
	logs := &api.LogRelay{}
	agentv1.RegisterAgentServiceServer(srv, &api.AgentServer{Fleet: reg, Leases: leases, Store: st, Log: log, HelloTimeout: time.Second, Logs: logs})
	leasev1.RegisterLeaseServiceServer(srv, &api.LeaseServer{Leases: leases, Store: st, Logs: logs, Log: log})
	nodev1.RegisterNodeServiceServer(srv, &api.NodeServer{Fleet: reg, Leases: leases})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() { defer close(served); srv.Serve(lis) }()
	t.Cleanup(func() { srv.Stop(); <-served; st.Close() })
	return &controlPlane{addr: lis.Addr().String(), pki: pki, reg: reg, st: st}
}

// connectNode registers node-a's agent session with one MIG-enabled H200,
// as the agent server does on hello.
func (cp *controlPlane) connectNode(t *testing.T) {
	t.Helper()
	inv := &nodev1.Inventory{Gpus: []*nodev1.Gpu{{Uuid: "GPU-0a1b2c3d-0000-4000-8000-000000000001", Model: "NVIDIA H200", PciDeviceId: 0x2335, MigCapable: true, MigEnabled: true}}}
	if _, err := cp.reg.Connect(context.Background(), "node-a", cp.pki.Agents["node-a"].ID.String(), "127.0.0.1:1", "v9.9.9-test", inv); err != nil {
		t.Fatal(err)
	}
}

// ctl runs gpuaasctl as the operator alice against the control plane.
func (cp *controlPlane) ctl(t *testing.T, args ...string) (string, error) {
	t.Helper()
	alice := cp.pki.Operators["alice"]
	return ctl(t, append([]string{"--addr", cp.addr, "--cert", alice.CertPath, "--key", alice.KeyPath, "--bundle", cp.pki.BundlePath}, args...)...)
}

// mustCtl is ctl that fails the test on an error.
func (cp *controlPlane) mustCtl(t *testing.T, args ...string) string {
	t.Helper()
	out, err := cp.ctl(t, args...)
	if err != nil {
		t.Fatalf("gpuaasctl %s: %s", strings.Join(args, " "), describe(err))
	}
	return out
}

// ctl runs the command tree with args, its stdout captured, the GPUAAS_*
// environment cleared so only the flags count.
func ctl(t *testing.T, args ...string) (string, error) {
	t.Helper()
	for _, k := range []string{"GPUAAS_ADDR", "GPUAAS_TRUST_DOMAIN", "GPUAAS_CERT", "GPUAAS_KEY", "GPUAAS_BUNDLE", "GPUAAS_TOKEN_FILE"} {
		t.Setenv(k, "")
	}
	var out bytes.Buffer
	root := newRoot(&globals{stdout: &out})
	root.SetArgs(args)
	root.SetOut(io.Discard)
	root.SetErr(io.Discard)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := root.ExecuteContext(ctx)
	return out.String(), err
}

func parseLease(t *testing.T, out string) *leasev1.Lease {
	t.Helper()
	l := &leasev1.Lease{}
	if err := protojson.Unmarshal([]byte(out), l); err != nil {
		t.Fatalf("-o json output is not a gpuaas.lease.v1.Lease: %v\n%s", err, out)
	}
	return l
}

func parseList(t *testing.T, out string) []*leasev1.Lease {
	t.Helper()
	r := &leasev1.ListLeasesResponse{}
	if err := protojson.Unmarshal([]byte(out), r); err != nil {
		t.Fatalf("-o json output is not a gpuaas.lease.v1.ListLeasesResponse: %v\n%s", err, out)
	}
	return r.GetLeases()
}

// tableRows returns the whitespace-split rows of a table after its header.
func tableRows(t *testing.T, out string, header ...string) [][]string {
	t.Helper()
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	if got := strings.Fields(lines[0]); len(got) < len(header) || !equalPrefix(got, header) {
		t.Fatalf("table header %q, want it to start with %q\n%s", lines[0], header, out)
	}
	var rows [][]string
	for _, l := range lines[1:] {
		if strings.TrimSpace(l) == "" {
			break
		}
		rows = append(rows, strings.Fields(l))
	}
	return rows
}

func equalPrefix(got, want []string) bool {
	for i, w := range want {
		if got[i] != w {
			return false
		}
	}
	return true
}

var createArgs = []string{"lease", "create", "--tenant", "acme", "--profile", "1g.18gb", "--image", "registry.test/train:1",
	"--env", "TOKEN=hunter2", "--arg", "python", "--arg", "train.py", "--duration", "1h"}

func TestDevPKIWritesFilesAndPrintsIdentities(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pki")
	out, err := ctl(t, "dev-pki", "--dir", dir, "--trust-domain", "example.test", "--agents", "node-a,node-b", "--operators", "alice")
	if err != nil {
		t.Fatal(describe(err))
	}
	rows := tableRows(t, out, "IDENTITY", "CERT", "KEY")
	want := map[string]bool{
		"spiffe://example.test/gpuaas/controlplane":   false,
		"spiffe://example.test/gpuaas/agent/node-a":   false,
		"spiffe://example.test/gpuaas/agent/node-b":   false,
		"spiffe://example.test/gpuaas/operator/alice": false,
	}
	bundle := ""
	for _, r := range rows {
		if r[0] == "bundle" {
			bundle = r[1]
			continue
		}
		if len(r) != 3 {
			t.Fatalf("row %q: want IDENTITY CERT KEY", r)
		}
		if _, ok := want[r[0]]; !ok {
			t.Errorf("printed an identity nobody asked for: %s", r[0])
			continue
		}
		want[r[0]] = true
		svid, err := x509svid.Load(r[1], r[2])
		if err != nil {
			t.Errorf("%s: printed files do not load: %v", r[0], err)
			continue
		}
		if svid.ID.String() != r[0] {
			t.Errorf("%s: the certificate at %s is for %s", r[0], r[1], svid.ID)
		}
		if fi, err := os.Stat(r[2]); err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: key %s mode %v (%v), want 0600", r[0], r[2], fi.Mode().Perm(), err)
		}
	}
	for id, seen := range want {
		if !seen {
			t.Errorf("identity %s not printed", id)
		}
	}
	if bundle != filepath.Join(dir, identity.BundleFile) {
		t.Errorf("bundle printed as %q, want %s", bundle, filepath.Join(dir, identity.BundleFile))
	}
	if _, err := os.Stat(bundle); err != nil {
		t.Errorf("bundle: %v", err)
	}

	// The CA is never overwritten by a PKI for another trust domain.
	if _, err := ctl(t, "dev-pki", "--dir", dir, "--trust-domain", "other.test"); err == nil {
		t.Fatal("dev-pki over a CA of another trust domain succeeded")
	}
}

func TestLeaseLifecycleThroughTheCLI(t *testing.T) {
	cp := startControlPlane(t)
	cp.connectNode(t)

	var first, second *leasev1.Lease
	t.Run("create prints a table without secrets", func(t *testing.T) {
		out := cp.mustCtl(t, createArgs...)
		if strings.Contains(out, "hunter2") {
			t.Fatalf("the env value reached the output:\n%s", out)
		}
		rows := tableRows(t, out, "ID", "TENANT", "PROFILE", "PHASE", "NODE")
		if len(rows) != 1 {
			t.Fatalf("rows = %q, want one lease", rows)
		}
		if r := rows[0]; !strings.HasPrefix(r[0], "l-") || r[1] != "acme" || r[2] != "1g.18gb" || r[3] != "SCHEDULED" || r[4] != "node-a" {
			t.Fatalf("row = %q, want the new lease scheduled on node-a", r)
		}
	})
	t.Run("create -o json is a Lease with env redacted", func(t *testing.T) {
		out := cp.mustCtl(t, append([]string{"-o", "json"}, createArgs...)...)
		if strings.Contains(out, "hunter2") {
			t.Fatalf("the env value reached the output:\n%s", out)
		}
		second = parseLease(t, out)
		if second.GetPhase() != leasev1.Phase_PHASE_SCHEDULED || second.GetPlacement().GetNode() != "node-a" {
			t.Errorf("lease = %v on %q, want SCHEDULED on node-a", second.GetPhase(), second.GetPlacement().GetNode())
		}
		if v := second.GetSpec().GetWorkload().GetEnv()["TOKEN"]; v != api.Redacted {
			t.Errorf("env TOKEN = %q, want %s", v, api.Redacted)
		}
		if a := second.GetSpec().GetWorkload().GetArgs(); len(a) != 2 || a[0] != "python" || a[1] != "train.py" {
			t.Errorf("args = %q, want [python train.py] in order", a)
		}
		if second.GetCreatedBy() != cp.pki.Operators["alice"].ID.String() {
			t.Errorf("created by %q, want the operator's SPIFFE ID", second.GetCreatedBy())
		}
	})
	t.Run("list -o json shows both, newest first", func(t *testing.T) {
		all := parseList(t, cp.mustCtl(t, "-o", "json", "lease", "list"))
		if len(all) != 2 || all[0].GetId() != second.GetId() {
			t.Fatalf("list = %v, want 2 leases with %s first", all, second.GetId())
		}
		first = all[1]
		for _, l := range all {
			if v := l.GetSpec().GetWorkload().GetEnv()["TOKEN"]; v != api.Redacted {
				t.Errorf("listed env TOKEN = %q, want %s", v, api.Redacted)
			}
		}
	})
	t.Run("get", func(t *testing.T) {
		got := parseLease(t, cp.mustCtl(t, "-o", "json", "lease", "get", first.GetId()))
		if got.GetId() != first.GetId() || got.GetSpec().GetWorkload().GetEnv()["TOKEN"] != api.Redacted {
			t.Fatalf("get %s = %v", first.GetId(), got)
		}
		rows := tableRows(t, cp.mustCtl(t, "lease", "get", first.GetId()), "ID")
		if len(rows) != 1 || rows[0][0] != first.GetId() {
			t.Fatalf("get table rows = %q", rows)
		}
	})
	t.Run("extend moves not_after by exactly --by", func(t *testing.T) {
		got := parseLease(t, cp.mustCtl(t, "-o", "json", "lease", "extend", second.GetId(), "--by", "30m"))
		if d := got.GetNotAfter().AsTime().Sub(second.GetNotAfter().AsTime()); d != 30*time.Minute {
			t.Fatalf("not_after moved by %s, want 30m", d)
		}
	})
	t.Run("cancel", func(t *testing.T) {
		got := parseLease(t, cp.mustCtl(t, "-o", "json", "lease", "cancel", first.GetId(), "--reason", "no longer needed"))
		if got.GetPhase() != leasev1.Phase_PHASE_TERMINATING || got.GetReason() != "cancelled: no longer needed" {
			t.Fatalf("cancelled lease = %v %q, want TERMINATING with the reason", got.GetPhase(), got.GetReason())
		}
	})
	t.Run("list --phase filters", func(t *testing.T) {
		for _, tc := range []struct {
			phases string
			want   []string
		}{
			{"scheduled", []string{second.GetId()}},
			{"TERMINATING", []string{first.GetId()}},
			{"scheduled,terminating", []string{second.GetId(), first.GetId()}},
			{"running", nil},
		} {
			var ids []string
			for _, l := range parseList(t, cp.mustCtl(t, "-o", "json", "lease", "list", "--phase", tc.phases)) {
				ids = append(ids, l.GetId())
			}
			if strings.Join(ids, ",") != strings.Join(tc.want, ",") {
				t.Errorf("--phase %s: %v, want %v", tc.phases, ids, tc.want)
			}
		}
		rows := tableRows(t, cp.mustCtl(t, "lease", "list", "--phase", "terminating"), "ID")
		if len(rows) != 1 || rows[0][0] != first.GetId() || rows[0][3] != "TERMINATING" {
			t.Errorf("--phase terminating table = %q", rows)
		}
	})
	t.Run("list --phase with an unknown phase is an error", func(t *testing.T) {
		_, err := cp.ctl(t, "lease", "list", "--phase", "running,bogus")
		if err == nil || !strings.Contains(err.Error(), `--phase "bogus"`) {
			t.Fatalf("err = %v, want one naming --phase \"bogus\"", err)
		}
	})
	t.Run("the same idempotency key returns the same lease", func(t *testing.T) {
		args := append([]string{"-o", "json"}, createArgs...)
		args = append(args, "--idempotency-key", "retry-1")
		a := parseLease(t, cp.mustCtl(t, args...))
		b := parseLease(t, cp.mustCtl(t, args...))
		if a.GetId() != b.GetId() {
			t.Fatalf("two creates with one key made %s and %s", a.GetId(), b.GetId())
		}
	})
}

func TestNodeListAndGetShowLiveCapacity(t *testing.T) {
	cp := startControlPlane(t)
	cp.connectNode(t)

	free := func(t *testing.T) string {
		t.Helper()
		out := cp.mustCtl(t, "node", "get", "node-a")
		_, gpus, ok := strings.Cut(out, "\nGPU")
		if !ok {
			t.Fatalf("node get has no GPU table:\n%s", out)
		}
		for _, f := range strings.Fields(gpus) {
			if strings.HasPrefix(f, "3g.71gb=") {
				return strings.TrimPrefix(f, "3g.71gb=")
			}
		}
		t.Fatalf("node get shows no 3g.71gb capacity:\n%s", out)
		return ""
	}
	if f := free(t); f != "2" {
		t.Fatalf("an idle H200 shows 3g.71gb=%s, want 2", f)
	}
	cp.mustCtl(t, "lease", "create", "--tenant", "acme", "--profile", "3g.71gb", "--image", "registry.test/train:1")
	if f := free(t); f != "1" {
		t.Fatalf("with one 3g lease the H200 shows 3g.71gb=%s, want 1", f)
	}

	rows := tableRows(t, cp.mustCtl(t, "node", "list"), "NODE", "CONNECTED", "ATTESTATION", "SCHEDULING", "GPUS", "LEASES")
	if len(rows) != 1 || rows[0][0] != "node-a" || rows[0][1] != "true" || rows[0][3] != "ok" || rows[0][4] != "1" || rows[0][5] != "1" {
		t.Fatalf("node list rows = %q, want node-a connected, schedulable, with 1 GPU and 1 lease", rows)
	}

	// Cordon and uncordon, with the reason shown and the node's state
	// returned.
	rows = tableRows(t, cp.mustCtl(t, "node", "cordon", "node-a", "--reason", "maintenance"), "NODE", "CONNECTED", "ATTESTATION", "SCHEDULING")
	if len(rows) != 1 || rows[0][3] != "cordoned:" || rows[0][4] != "maintenance" {
		t.Fatalf("node cordon rows = %q, want node-a cordoned: maintenance", rows)
	}
	cordoned := &nodev1.Node{}
	if err := protojson.Unmarshal([]byte(cp.mustCtl(t, "-o", "json", "node", "uncordon", "node-a")), cordoned); err != nil || cordoned.GetCordoned() {
		t.Fatalf("node uncordon -o json = %v, %v; want the node uncordoned", cordoned, err)
	}
	n := &nodev1.Node{}
	if err := protojson.Unmarshal([]byte(cp.mustCtl(t, "-o", "json", "node", "get", "node-a")), n); err != nil {
		t.Fatal(err)
	}
	if !n.GetConnected() || n.GetSession().GetAgentVersion() != "v9.9.9-test" || n.GetLeaseCount() != 1 {
		t.Fatalf("node get -o json = %v", n)
	}
	resp := &nodev1.ListNodesResponse{}
	if err := protojson.Unmarshal([]byte(cp.mustCtl(t, "-o", "json", "node", "list")), resp); err != nil || len(resp.GetNodes()) != 1 {
		t.Fatalf("node list -o json = %v, %v", resp, err)
	}

	_, err := cp.ctl(t, "node", "get", "node-z")
	if d := describe(err); err == nil || !strings.Contains(d, "NODE_NOT_FOUND") {
		t.Fatalf("node get of an unknown node: %v", d)
	}
}

func TestErrorsAreRenderedWithTheirReason(t *testing.T) {
	cp := startControlPlane(t)
	for _, tc := range []struct {
		name string
		args []string
		want []string
	}{
		{"unknown MIG profile", []string{"lease", "create", "--tenant", "acme", "--profile", "9g.bogus", "--image", "img"},
			[]string{"spec.gpu.mig_profile", "INVALID_ARGUMENT"}},
		{"missing image", []string{"lease", "create", "--tenant", "acme", "--profile", "1g.18gb"},
			[]string{"spec.workload.image", "INVALID_ARGUMENT"}},
		{"unknown lease", []string{"lease", "get", "l-aaaaaaaaaaaaaaaaaaaa"}, []string{"LEASE_NOT_FOUND"}},
		{"extend by zero", []string{"lease", "extend", "l-aaaaaaaaaaaaaaaaaaaa", "--by", "0s"}, []string{"extend_by", "INVALID_ARGUMENT"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := cp.ctl(t, tc.args...)
			if err == nil {
				t.Fatal("succeeded")
			}
			d := describe(err)
			for _, w := range tc.want {
				if !strings.Contains(d, w) {
					t.Errorf("error %q does not mention %q", d, w)
				}
			}
		})
	}
}

func TestBadFlagsAreRefusedBeforeAnythingIsSent(t *testing.T) {
	cp := startControlPlane(t)
	alice := cp.pki.Operators["alice"]
	for _, tc := range []struct {
		name string
		run  func() (string, error)
		want string
	}{
		{"bad --output on lease list", func() (string, error) { return cp.ctl(t, "-o", "yaml", "lease", "list") }, "--output"},
		{"bad --output on node list", func() (string, error) { return cp.ctl(t, "--output", "xml", "node", "list") }, "--output"},
		{"missing --cert", func() (string, error) {
			return ctl(t, "--addr", cp.addr, "--key", alice.KeyPath, "--bundle", cp.pki.BundlePath, "lease", "list")
		}, "--cert"},
		{"--env without =", func() (string, error) {
			return cp.ctl(t, "lease", "create", "--tenant", "acme", "--profile", "1g.18gb", "--image", "img", "--env", "TOKEN")
		}, "--env"},
		{"--metadata without a key", func() (string, error) {
			return cp.ctl(t, "lease", "create", "--tenant", "acme", "--profile", "1g.18gb", "--image", "img", "--metadata", "=v")
		}, "--metadata"},
		{"bad --trust-domain", func() (string, error) { return cp.ctl(t, "--trust-domain", "Not A Domain", "lease", "list") }, "--trust-domain"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := tc.run()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want an error naming %s", err, tc.want)
			}
			if out != "" {
				t.Errorf("printed %q on error", out)
			}
		})
	}
	// Nothing above reached the lease service.
	if all := parseList(t, cp.mustCtl(t, "-o", "json", "lease", "list")); len(all) != 0 {
		t.Fatalf("refused commands created %d leases", len(all))
	}
}

// writeAuditedStore leaves a closed state file holding n lease.create audit
// entries written by the real lease service.
func writeAuditedStore(t *testing.T, n int) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "state.db")
	st, err := store.OpenBolt(path, store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	svc := lease.New(lease.Options{Store: st})
	for i := range n {
		_, err := svc.Create(context.Background(), lease.Caller{ID: "spiffe://gpuaas.test/gpuaas/operator/alice"}, &leasev1.CreateLeaseRequest{
			IdempotencyKey: fmt.Sprintf("key-%d", i), Spec: &leasev1.LeaseSpec{Tenant: "acme",
				Gpu:      &leasev1.GpuRequest{Kind: &leasev1.GpuRequest_MigProfile{MigProfile: "1g.18gb"}},
				Workload: &leasev1.Workload{Image: "img"}, Duration: durationpb.New(time.Hour)}})
		if err != nil {
			t.Fatal(err)
		}
	}
	return path
}

func TestAuditVerify(t *testing.T) {
	t.Run("a fresh store is OK", func(t *testing.T) {
		path := writeAuditedStore(t, 0)
		out, err := ctl(t, "audit", "verify", "--db", path)
		if err != nil || !strings.HasPrefix(out, "audit log OK: 0 entries") {
			t.Fatalf("verify = %q, %v", out, err)
		}
	})
	t.Run("entries written by the lease service verify", func(t *testing.T) {
		path := writeAuditedStore(t, 3)
		out, err := ctl(t, "audit", "verify", "--db", path)
		if err != nil || !strings.HasPrefix(out, "audit log OK: 3 entries") {
			t.Fatalf("verify = %q, %v", out, err)
		}
		rows := tableRows(t, mustOffline(t, "audit", "list", "--db", path), "SEQ", "TIME", "ACTOR", "ACTION")
		if len(rows) != 3 || rows[0][0] != "1" || rows[0][3] != "lease.create" {
			t.Fatalf("audit list rows = %q", rows)
		}
	})
	t.Run("a rewritten entry is INVALID", func(t *testing.T) {
		path := writeAuditedStore(t, 3)
		st, err := store.OpenBolt(path, store.BoltOptions{})
		if err != nil {
			t.Fatal(err)
		}
		err = st.Update(context.Background(), func(tx store.Tx) error {
			raw, err := tx.Get(store.BucketAudit, audit.Key(2))
			if err != nil {
				return err
			}
			e, err := auditlog.Decode(raw)
			if err != nil {
				return err
			}
			e.Outcome = auditlog.OutcomeDenied
			return tx.Put(store.BucketAudit, audit.Key(2), auditlog.Encode(e))
		})
		st.Close()
		if err != nil {
			t.Fatal(err)
		}
		out, err := ctl(t, "audit", "verify", "--db", path)
		if err == nil || !strings.Contains(err.Error(), "INVALID") || !errors.Is(err, auditlog.ErrTampered) {
			t.Fatalf("verify of a tampered log = %q, %v; want an INVALID error that is auditlog.ErrTampered", out, err)
		}
		if strings.Contains(out, "OK") {
			t.Errorf("printed %q for a tampered log", out)
		}
	})
}

// mustOffline runs an offline gpuaasctl command that must succeed.
func mustOffline(t *testing.T, args ...string) string {
	t.Helper()
	out, err := ctl(t, args...)
	if err != nil {
		t.Fatalf("gpuaasctl %s: %s", strings.Join(args, " "), describe(err))
	}
	return out
}

// agentServingLogs opens node-a's agent session over mTLS and answers every
// log request with the last tail_bytes of log (all of it for 0) in chunks of
// at most 64 KiB, as the agent does.
func (cp *controlPlane) agentServingLogs(t *testing.T, log []byte) {
	t.Helper()
	svid, err := x509svid.Load(cp.pki.Agents["node-a"].CertPath, cp.pki.Agents["node-a"].KeyPath)
	if err != nil {
		t.Fatal(err)
	}
	src := identity.StaticSource{SVID: svid, Bundle: cp.pki.CA.Bundle()}
	conn, err := grpc.NewClient(cp.addr, grpc.WithTransportCredentials(identity.ClientCredentials(src, tlsconfig.AuthorizeID(identity.ControlPlaneID(cp.pki.TrustDomain)))))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	stream, err := agentv1.NewAgentServiceClient(conn).Session(ctx)
	if err != nil {
		t.Fatal(err)
	}
	inv := &nodev1.Inventory{Gpus: []*nodev1.Gpu{{Uuid: "GPU-0a1b2c3d-0000-4000-8000-000000000001", Model: "NVIDIA H200", PciDeviceId: 0x2335, MigCapable: true, MigEnabled: true}}}
	if err := stream.Send(&agentv1.SessionRequest{Msg: &agentv1.SessionRequest_Hello{Hello: &agentv1.Hello{NodeId: "node-a", Inventory: inv}}}); err != nil {
		t.Fatal(err)
	}
	if m, err := stream.Recv(); err != nil || m.GetDesired() == nil {
		t.Fatalf("hello: %v %v", m, err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			m, err := stream.Recv()
			if err != nil {
				return
			}
			req := m.GetLogRequest()
			if req == nil {
				continue
			}
			data, truncated := log, false
			if n := req.GetTailBytes(); n > 0 && int64(len(data)) > n {
				data, truncated = data[int64(len(data))-n:], true
			}
			for first := true; first || len(data) > 0; first = false {
				n := min(len(data), 64<<10)
				ch := &agentv1.LogChunk{RequestId: req.GetRequestId(), Data: data[:n], Eof: n == len(data)}
				ch.Truncated = ch.Eof && truncated
				data = data[n:]
				if err := stream.Send(&agentv1.SessionRequest{Msg: &agentv1.SessionRequest_LogChunk{LogChunk: ch}}); err != nil {
					return
				}
			}
		}
	}()
	t.Cleanup(func() { cancel(); <-done; conn.Close() })
}

func TestLeaseLogsThroughTheCLI(t *testing.T) {
	cp := startControlPlane(t)
	var log bytes.Buffer
	for i := 0; i < 5000; i++ {
		fmt.Fprintf(&log, "2026-11-28T22:00:00.%09dZ stdout F line %d\n", i, i)
	}
	cp.agentServingLogs(t, log.Bytes())
	l := parseLease(t, cp.mustCtl(t, append([]string{"-o", "json"}, createArgs...)...))
	if l.GetPlacement().GetNode() != "node-a" {
		t.Fatalf("lease on %q", l.GetPlacement().GetNode())
	}

	out := cp.mustCtl(t, "lease", "logs", l.GetId())
	if out != log.String() {
		t.Fatalf("logs: %d bytes, want the agent's %d", len(out), log.Len())
	}
	out = cp.mustCtl(t, "lease", "logs", l.GetId(), "--tail", "100")
	if len(out) != 100 || !strings.HasSuffix(log.String(), out) {
		t.Fatalf("--tail 100: %q", out)
	}
	if _, err := cp.ctl(t, "lease", "logs", "l-zzzzzzzzzzzzzzzzzzzz"); !strings.Contains(describe(err), "LEASE_NOT_FOUND") {
		t.Fatalf("unknown lease: %s", describe(err))
	}
	if _, err := cp.ctl(t, "lease", "logs", l.GetId(), "--tail", "-1"); err == nil {
		t.Fatal("a negative --tail was accepted")
	}

	es, err := audit.List(context.Background(), cp.st, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	var outcomes []string
	for _, e := range es {
		if e.Action == "lease.logs" {
			outcomes = append(outcomes, e.Outcome+" "+e.Resource)
			if e.Actor != cp.pki.Operators["alice"].ID.String() {
				t.Errorf("actor %s", e.Actor)
			}
		}
	}
	want := []string{"success lease/" + l.GetId(), "success lease/" + l.GetId(), "failure lease/l-zzzzzzzzzzzzzzzzzzzz"}
	if strings.Join(outcomes, ",") != strings.Join(want, ",") {
		t.Fatalf("lease.logs audit entries %q, want %q", outcomes, want)
	}
}
