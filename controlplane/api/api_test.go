package api

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/fleet"
	"github.com/gpuaas/gpuaas/controlplane/lease"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/errs"
	"github.com/gpuaas/gpuaas/pkg/identity"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	auditv1 "github.com/gpuaas/gpuaas/proto/gpuaas/audit/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

type server struct {
	addr   string
	pki    *identity.DevPKI
	st     *store.Bolt
	td     spiffeid.TrustDomain
	leases *lease.Service
	logs   *LogRelay
	// leaseStore can make the lease server's audit writes fail.
	leaseStore *failableStore
}

// startServer runs the real control plane edge on loopback with the dev PKI.
func startServer(t testing.TB) *server {
	t.Helper()
	return startServerWith(t, &LogRelay{})
}

// startServerWith is startServer with the given log relay; configure, if
// given, adjusts the agent server (it gets the control plane's source).
func startServerWith(t testing.TB, logs *LogRelay, configure ...func(*AgentServer, identity.Source)) *server {
	t.Helper()
	dir := t.TempDir()
	pki, err := identity.WriteDevPKI(filepath.Join(dir, "pki"), identity.DevPKIOptions{TrustDomain: "gpuaas.test", Agents: []string{"node-a", "node-b"}, Operators: []string{"alice"}})
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.OpenBolt(filepath.Join(dir, "state.db"), store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.DiscardHandler)
	src := sourceFor(t, pki, pki.ControlPlane)
	leases := lease.New(lease.Options{Store: st, Logger: log})
	reg := fleet.New(st, log)
	leases.SetFleet(reg)
	authz := Authorizer{TrustDomain: pki.TrustDomain}
	srv := grpc.NewServer(
		grpc.Creds(identity.ServerCredentials(src, identity.AuthorizeKinds(pki.TrustDomain, identity.PeerAgent, identity.PeerOperator))),
		grpc.ChainUnaryInterceptor(authz.Unary(log)), grpc.ChainStreamInterceptor(authz.Stream(log)))
	as := &AgentServer{Fleet: reg, Leases: leases, Store: st, Log: log, HelloTimeout: time.Second, Logs: logs}
	for _, c := range configure {
		c(as, src)
	}
	agentv1.RegisterAgentServiceServer(srv, as)
	gate := &failableStore{Store: st}
	leasev1.RegisterLeaseServiceServer(srv, &LeaseServer{Leases: leases, Store: gate, Logs: logs, Log: log})
	auditv1.RegisterAuditLogServiceServer(srv, &AuditLogServer{Store: st})
	nodev1.RegisterNodeServiceServer(srv, &NodeServer{Fleet: reg, Leases: leases})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	t.Cleanup(func() { srv.Stop(); st.Close() })
	return &server{addr: lis.Addr().String(), pki: pki, st: st, td: pki.TrustDomain, leases: leases, logs: logs, leaseStore: gate}
}

// failableStore is the lease server's store (which it writes only for the
// GetLeaseLogs audit) with a switch that makes every write fail.
type failableStore struct {
	store.Store
	fail atomic.Bool
}

func (f *failableStore) Update(ctx context.Context, fn func(store.Tx) error) error {
	if f.fail.Load() {
		return errors.New("injected: store unavailable")
	}
	return f.Store.Update(ctx, fn)
}

// addNode records a node the way a first agent session does.
func (s *server) addNode(t testing.TB, id string) {
	t.Helper()
	raw, err := proto.Marshal(&nodev1.Node{Id: id})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.st.Update(context.Background(), func(tx store.Tx) error { return tx.Put(store.BucketNodes, id, raw) }); err != nil {
		t.Fatal(err)
	}
}

func sourceFor(t testing.TB, pki *identity.DevPKI, f identity.SVIDFiles) *identity.FileSource {
	t.Helper()
	src, err := identity.NewFileSource(context.Background(), identity.FileSourceConfig{CertPath: f.CertPath, KeyPath: f.KeyPath, BundlePath: pki.BundlePath, TrustDomain: pki.TrustDomain})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	return src
}

func (s *server) dial(t testing.TB, src identity.Source) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(s.addr, grpc.WithTransportCredentials(identity.ClientCredentials(src, tlsconfig.AuthorizeID(identity.ControlPlaneID(s.td)))))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func createReq(key string) *leasev1.CreateLeaseRequest {
	return &leasev1.CreateLeaseRequest{IdempotencyKey: key, Spec: &leasev1.LeaseSpec{
		Tenant: "acme", Gpu: &leasev1.GpuRequest{Kind: &leasev1.GpuRequest_MigProfile{MigProfile: "1g.18gb"}},
		Workload: &leasev1.Workload{Image: "img", Env: map[string]string{"SECRET": "hunter2"}}, Duration: durationpb.New(time.Minute),
	}}
}

func TestOperatorCanUseLeaseServiceAndSecretsAreRedacted(t *testing.T) {
	s := startServer(t)
	lc := leasev1.NewLeaseServiceClient(s.dial(t, sourceFor(t, s.pki, s.pki.Operators["alice"])))
	resp, err := lc.CreateLease(context.Background(), createReq("k"))
	if err != nil {
		t.Fatal(err)
	}
	l := resp.GetLease()
	if l.GetPhase() != leasev1.Phase_PHASE_PENDING || l.GetCreatedBy() != s.pki.Operators["alice"].ID.String() {
		t.Fatalf("lease = %v by %q", l.GetPhase(), l.GetCreatedBy())
	}
	if v := l.GetSpec().GetWorkload().GetEnv()["SECRET"]; v != Redacted {
		t.Fatalf("env value returned to the caller: %q", v)
	}
	got, err := lc.GetLease(context.Background(), &leasev1.GetLeaseRequest{Id: l.GetId()})
	if err != nil || got.GetLease().GetSpec().GetWorkload().GetEnv()["SECRET"] != Redacted {
		t.Fatalf("get: %v %v", err, got)
	}
}

func TestCanonicalErrorsCrossTheWire(t *testing.T) {
	s := startServer(t)
	lc := leasev1.NewLeaseServiceClient(s.dial(t, sourceFor(t, s.pki, s.pki.Operators["alice"])))
	r := createReq("k")
	r.Spec.Workload.Image = ""
	_, err := lc.CreateLease(context.Background(), r)
	e := errs.FromStatus(err)
	if !errors.Is(e, errs.ErrInvalidArgument) || errs.FieldOf(e) != "spec.workload.image" || errs.ReasonOf(e) != "INVALID_ARGUMENT" {
		t.Fatalf("err = %v field=%q reason=%q", err, errs.FieldOf(e), errs.ReasonOf(e))
	}
	_, err = lc.GetLease(context.Background(), &leasev1.GetLeaseRequest{Id: "l-aaaaaaaaaaaaaaaaaaaa"})
	if e := errs.FromStatus(err); !errors.Is(e, errs.ErrNotFound) || errs.ReasonOf(e) != "LEASE_NOT_FOUND" {
		t.Fatalf("missing lease: %v", err)
	}
}

func TestAgentsCannotCallOperatorServices(t *testing.T) {
	s := startServer(t)
	conn := s.dial(t, sourceFor(t, s.pki, s.pki.Agents["node-a"]))
	_, err := leasev1.NewLeaseServiceClient(conn).CreateLease(context.Background(), createReq("k"))
	if e := errs.FromStatus(err); !errors.Is(e, errs.ErrPermissionDenied) || errs.ReasonOf(e) != "NOT_AN_OPERATOR" {
		t.Fatalf("agent creating a lease: %v", err)
	}
	_, err = nodev1.NewNodeServiceClient(conn).ListNodes(context.Background(), &nodev1.ListNodesRequest{})
	if !errors.Is(errs.FromStatus(err), errs.ErrPermissionDenied) {
		t.Fatalf("agent listing nodes: %v", err)
	}
}

func TestOperatorsCannotOpenAgentSessions(t *testing.T) {
	s := startServer(t)
	conn := s.dial(t, sourceFor(t, s.pki, s.pki.Operators["alice"]))
	stream, err := agentv1.NewAgentServiceClient(conn).Session(context.Background())
	if err == nil {
		_, err = stream.Recv()
	}
	if e := errs.FromStatus(err); !errors.Is(e, errs.ErrPermissionDenied) || errs.ReasonOf(e) != "NOT_AN_AGENT" {
		t.Fatalf("operator session: %v", err)
	}
}

func TestAgentMaySpeakOnlyForItsOwnNode(t *testing.T) {
	s := startServer(t)
	conn := s.dial(t, sourceFor(t, s.pki, s.pki.Agents["node-a"]))
	stream, err := agentv1.NewAgentServiceClient(conn).Session(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&agentv1.SessionRequest{Msg: &agentv1.SessionRequest_Hello{Hello: &agentv1.Hello{NodeId: "node-b"}}}); err != nil {
		t.Fatal(err)
	}
	_, err = stream.Recv()
	if e := errs.FromStatus(err); !errors.Is(e, errs.ErrPermissionDenied) || errs.ReasonOf(e) != "NODE_MISMATCH" {
		t.Fatalf("hello for another node: %v", err)
	}
	es, err := audit.List(context.Background(), s.st, 0, 0)
	if err != nil || len(es) != 1 || es[0].Action != "session.hello" || es[0].Outcome != "denied" || !strings.HasSuffix(es[0].Actor, "/agent/node-a") {
		t.Fatalf("denied hello not audited: %v %+v", err, es)
	}
}

func TestSessionDeliversDesiredStateAndAcks(t *testing.T) {
	s := startServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := agentv1.NewAgentServiceClient(s.dial(t, sourceFor(t, s.pki, s.pki.Agents["node-a"]))).Session(ctx)
	if err != nil {
		t.Fatal(err)
	}
	inv := &nodev1.Inventory{Gpus: []*nodev1.Gpu{{Uuid: "GPU-1", Model: "NVIDIA H200", PciDeviceId: 0x2335, MigCapable: true, MigEnabled: true}}}
	stream.Send(&agentv1.SessionRequest{Msg: &agentv1.SessionRequest_Hello{Hello: &agentv1.Hello{NodeId: "node-a", Inventory: inv}}})
	first, err := stream.Recv()
	if err != nil || first.GetDesired() == nil || len(first.GetDesired().GetLeases()) != 0 {
		t.Fatalf("first message: %v %v", first, err)
	}
	// An operator's lease is placed on the connected node and pushed.
	lc := leasev1.NewLeaseServiceClient(s.dial(t, sourceFor(t, s.pki, s.pki.Operators["alice"])))
	resp, err := lc.CreateLease(ctx, createReq("k"))
	if err != nil || resp.GetLease().GetPlacement().GetNode() != "node-a" {
		t.Fatalf("create: %v %v", err, resp)
	}
	next, err := stream.Recv()
	if err != nil || len(next.GetDesired().GetLeases()) != 1 {
		t.Fatalf("pushed desired state: %v %v", next, err)
	}
	if next.GetDesired().GetLeases()[0].GetSpec().GetWorkload().GetEnv()["SECRET"] != "hunter2" {
		t.Fatal("the agent running the lease needs the real env value")
	}
	id := resp.GetLease().GetId()
	stream.Send(&agentv1.SessionRequest{Msg: &agentv1.SessionRequest_Observed{Observed: &agentv1.ObservedState{Sequence: 7,
		Leases: []*agentv1.ObservedLease{{LeaseId: id, Phase: leasev1.Phase_PHASE_RUNNING, Reason: "running"}}}}})
	ack, err := stream.Recv()
	if err != nil || ack.GetAck().GetObservedSequence() != 7 {
		t.Fatalf("ack: %v %v", ack, err)
	}
	got, _ := lc.GetLease(ctx, &leasev1.GetLeaseRequest{Id: id})
	if got.GetLease().GetPhase() != leasev1.Phase_PHASE_RUNNING {
		t.Fatalf("phase = %v", got.GetLease().GetPhase())
	}
	// Agent audit events are appended once, with the agent as actor, even if resent.
	ev := &agentv1.AuditEvent{Id: "e1", Action: "container.start", LeaseId: id, Outcome: "success"}
	for i := 0; i < 2; i++ {
		stream.Send(&agentv1.SessionRequest{Msg: &agentv1.SessionRequest_Audit{Audit: &agentv1.AuditEvents{Events: []*agentv1.AuditEvent{ev}}}})
		ack, err := stream.Recv()
		for err == nil && ack.GetAck() == nil {
			ack, err = stream.Recv()
		}
		if err != nil || len(ack.GetAck().GetAuditEventIds()) != 1 {
			t.Fatalf("audit ack: %v %v", ack, err)
		}
	}
	es, _ := audit.List(ctx, s.st, 0, 0)
	n := 0
	for _, e := range es {
		if e.Action == "agent.container.start" {
			n++
			if !strings.HasSuffix(e.Actor, "/agent/node-a") {
				t.Fatalf("actor = %s", e.Actor)
			}
		}
	}
	if n != 1 {
		t.Fatalf("agent event appended %d times", n)
	}
}

func TestForeignCAIsRefusedAtTheHandshake(t *testing.T) {
	s := startServer(t)
	other, err := identity.WriteDevPKI(filepath.Join(t.TempDir(), "other"), identity.DevPKIOptions{TrustDomain: "gpuaas.test", Operators: []string{"mallory"}})
	if err != nil {
		t.Fatal(err)
	}
	svid, err := x509svid.Load(other.Operators["mallory"].CertPath, other.Operators["mallory"].KeyPath)
	if err != nil {
		t.Fatal(err)
	}
	// Mallory trusts the real control plane but holds an SVID from her own CA.
	src := identity.StaticSource{SVID: svid, Bundle: s.pki.CA.Bundle()}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = leasev1.NewLeaseServiceClient(s.dial(t, src)).ListLeases(ctx, &leasev1.ListLeasesRequest{})
	if err == nil {
		t.Fatal("a certificate from another CA was accepted")
	}
}

// openSession says hello as node and returns the stream after the first
// desired state.
func openSession(t *testing.T, ctx context.Context, s *server, node string) agentv1.AgentService_SessionClient {
	t.Helper()
	stream, err := agentv1.NewAgentServiceClient(s.dial(t, sourceFor(t, s.pki, s.pki.Agents[node]))).Session(ctx)
	if err != nil {
		t.Fatal(err)
	}
	inv := &nodev1.Inventory{Gpus: []*nodev1.Gpu{{Uuid: "GPU-" + node, Model: "NVIDIA H200", PciDeviceId: 0x2335, MigCapable: true, MigEnabled: true}}}
	stream.Send(&agentv1.SessionRequest{Msg: &agentv1.SessionRequest_Hello{Hello: &agentv1.Hello{NodeId: node, Inventory: inv}}})
	if m, err := stream.Recv(); err != nil || m.GetDesired() == nil {
		t.Fatalf("%s hello: %v %v", node, m, err)
	}
	return stream
}

func TestAgentEventsAboutAnotherNodesLeaseAreRefused(t *testing.T) {
	s := startServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	openSession(t, ctx, s, "node-b")
	lc := leasev1.NewLeaseServiceClient(s.dial(t, sourceFor(t, s.pki, s.pki.Operators["alice"])))
	resp, err := lc.CreateLease(ctx, createReq("k"))
	if err != nil || resp.GetLease().GetPlacement().GetNode() != "node-b" {
		t.Fatalf("create: %v %v", err, resp)
	}
	a := openSession(t, ctx, s, "node-a")
	ev := &agentv1.AuditEvent{Id: "e1", Action: "partition.destroy", LeaseId: resp.GetLease().GetId(), Outcome: "success",
		Details: map[string]string{"node": "node-b", "agent_event_id": "forged"}}
	a.Send(&agentv1.SessionRequest{Msg: &agentv1.SessionRequest_Audit{Audit: &agentv1.AuditEvents{Events: []*agentv1.AuditEvent{ev}}}})
	for {
		m, err := a.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if len(m.GetAck().GetAuditEventIds()) == 1 {
			break
		}
	}
	es, _ := audit.List(ctx, s.st, 0, 0)
	last := es[len(es)-1]
	if last.Action != "agent.event" || last.Outcome != "denied" || last.Details["node"] != "node-a" || last.Details["agent_event_id"] != "e1" {
		t.Fatalf("claim about another node's lease recorded as %+v", last)
	}
	for _, e := range es {
		if e.Action == "agent.partition.destroy" {
			t.Fatalf("the false claim reached the audit log: %+v", e)
		}
	}
}

func TestOversizedInventoryIsRefused(t *testing.T) {
	s := startServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := agentv1.NewAgentServiceClient(s.dial(t, sourceFor(t, s.pki, s.pki.Agents["node-a"]))).Session(ctx)
	if err != nil {
		t.Fatal(err)
	}
	inv := &nodev1.Inventory{}
	for i := 0; i <= maxGPUs; i++ {
		inv.Gpus = append(inv.Gpus, &nodev1.Gpu{Index: uint32(i)})
	}
	stream.Send(&agentv1.SessionRequest{Msg: &agentv1.SessionRequest_Hello{Hello: &agentv1.Hello{NodeId: "node-a", Inventory: inv}}})
	_, err = stream.Recv()
	if e := errs.FromStatus(err); !errors.Is(e, errs.ErrInvalidArgument) || errs.FieldOf(e) != "hello.inventory.gpus" {
		t.Fatalf("oversized inventory: %v", err)
	}
}
