package api

import (
	"bytes"
	"context"
	"errors"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/gpuaas/gpuaas/controlplane/lease"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/errs"
	"github.com/gpuaas/gpuaas/pkg/identity"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

// Placeholders a fuzz input may use for the ids of the two leases the
// target creates (their real ids are random, so a stored corpus entry could
// not name them): in an observed lease's id, and in an audit event's lease
// id or resource.
const (
	ownLeaseToken   = "@A" // the lease placed on node-a, the fuzzed agent's own node
	otherLeaseToken = "@B" // the lease placed on node-b, which node-a must never change
)

// fuzzServer is the control plane edge a fuzz target shares between its
// inputs, and what the target needs of it.
type fuzzServer struct {
	*server
	leases *lease.Service
	agentA *grpc.ClientConn
	agentB *grpc.ClientConn
	op     *grpc.ClientConn
}

// startFuzzServer is startServer for a *testing.F: the same real edge on
// loopback with the dev PKI, kept for the whole fuzz target (startServer,
// sourceFor and dial take a *testing.T, which a target does not have
// before its inputs).
func startFuzzServer(tb testing.TB) *fuzzServer {
	tb.Helper()
	s := startServer(tb)
	dial := func(f identity.SVIDFiles) *grpc.ClientConn { return s.dial(tb, sourceFor(tb, s.pki, f)) }
	return &fuzzServer{server: s, leases: s.leases, agentA: dial(s.pki.Agents["node-a"]), agentB: dial(s.pki.Agents["node-b"]), op: dial(s.pki.Operators["alice"])}
}

// fuzzInventory is one H200 with MIG enabled.
func fuzzInventory(uuid string) *nodev1.Inventory {
	return &nodev1.Inventory{Gpus: []*nodev1.Gpu{{Uuid: uuid, Model: "NVIDIA H200", PciDeviceId: 0x2335, MigCapable: true, MigEnabled: true}}}
}

// agentSession is one open session of an agent, with its replies read by a
// goroutine so a wait can time out.
type agentSession struct {
	stream agentv1.AgentService_SessionClient
	cancel context.CancelFunc
	in     chan sessionReply
}

type sessionReply struct {
	msg *agentv1.SessionResponse
	err error
}

// openAgentSession dials a session for node with a valid hello and waits
// for the first desired state.
func openAgentSession(tb testing.TB, conn *grpc.ClientConn, node string, inv *nodev1.Inventory) *agentSession {
	tb.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	stream, err := agentv1.NewAgentServiceClient(conn).Session(ctx)
	if err != nil {
		cancel()
		tb.Fatalf("open a session for %s: %v", node, err)
	}
	s := &agentSession{stream: stream, cancel: cancel, in: make(chan sessionReply, 64)}
	go func() {
		for {
			m, err := stream.Recv()
			select {
			case s.in <- sessionReply{m, err}:
			case <-ctx.Done():
				return
			}
			if err != nil {
				return
			}
		}
	}()
	if err := stream.Send(&agentv1.SessionRequest{Msg: &agentv1.SessionRequest_Hello{Hello: &agentv1.Hello{NodeId: node, AgentVersion: "fuzz", Inventory: inv}}}); err != nil {
		cancel()
		tb.Fatalf("send hello for %s: %v", node, err)
	}
	select {
	case r := <-s.in:
		if r.err != nil || r.msg.GetDesired() == nil {
			cancel()
			tb.Fatalf("the first message of %s's session: %v %v", node, r.msg, r.err)
		}
	case <-time.After(10 * time.Second):
		cancel()
		tb.Fatalf("no desired state for %s within 10s of a valid hello", node)
	}
	return s
}

// createFuzzLease creates a lease of profile on node as the operator.
func createFuzzLease(tb testing.TB, conn *grpc.ClientConn, key, node, profile string) *leasev1.Lease {
	tb.Helper()
	req := createReq(key)
	req.Spec.Gpu = &leasev1.GpuRequest{Kind: &leasev1.GpuRequest_MigProfile{MigProfile: profile}, Node: node}
	req.Spec.Duration = durationpb.New(24 * time.Hour) // no expiry while fuzzing
	resp, err := leasev1.NewLeaseServiceClient(conn).CreateLease(context.Background(), req)
	if err != nil {
		tb.Fatalf("create a %s lease on %s: %v", profile, node, err)
	}
	return resp.GetLease()
}

// rawLease is a lease as stored, byte for byte.
func rawLease(tb testing.TB, st store.Store, id string) []byte {
	tb.Helper()
	var raw []byte
	err := st.View(context.Background(), func(tx store.Tx) error {
		var err error
		raw, err = tx.Get(store.BucketLeases, id)
		return err
	})
	if err != nil {
		tb.Fatalf("read lease %s: %v", id, err)
	}
	return raw
}

// substituteLeaseIDs replaces the placeholder tokens with the real ids.
func substituteLeaseIDs(m *agentv1.SessionRequest, own, other string) {
	sub := func(s string) string {
		s = strings.ReplaceAll(s, otherLeaseToken, other)
		return strings.ReplaceAll(s, ownLeaseToken, own)
	}
	for _, o := range m.GetObserved().GetLeases() {
		o.LeaseId = sub(o.GetLeaseId())
	}
	for _, e := range m.GetAudit().GetEvents() {
		e.LeaseId, e.Resource = sub(e.GetLeaseId()), sub(e.GetResource())
	}
}

// checkSessionEnd fails t unless err, the end of a session, is a canonical
// status: a class the caller can act on with its stable reason. Unknown and
// Internal mean the server failed on agent input (a recovered panic or an
// unclassified error) rather than refusing it; io.EOF means it ended the
// session without saying why.
func checkSessionEnd(t *testing.T, err error, sent *agentv1.SessionRequest) {
	t.Helper()
	if errors.Is(err, io.EOF) {
		t.Fatalf("the server ended the session with an OK status after %v; it must keep the session or refuse the message with a canonical error", sent)
	}
	st, ok := status.FromError(err)
	if !ok {
		t.Fatalf("the session ended with a non-status error %v after %v", err, sent)
	}
	switch st.Code() {
	case codes.Unknown, codes.Internal, codes.DataLoss, codes.OK:
		t.Fatalf("the session ended with %v (%q) after %v: agent input must be refused with a canonical error (InvalidArgument, PermissionDenied, ...), never fail the server", st.Code(), st.Message(), sent)
	case codes.InvalidArgument, codes.PermissionDenied, codes.FailedPrecondition, codes.NotFound, codes.AlreadyExists, codes.Aborted:
		if errs.ReasonOf(errs.FromStatus(err)) == "" {
			t.Fatalf("the session ended with %v (%q) but no ErrorInfo reason after %v: errors must be made by pkg/errs", st.Code(), st.Message(), sent)
		}
	}
}

// fuzzSeeds are valid session messages: the ones a real agent sends, and a
// few it must not (a report about another node's lease, a second hello).
func fuzzSeeds() []*agentv1.SessionRequest {
	now := timestamppb.New(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC))
	observed := func(seq uint64, leases ...*agentv1.ObservedLease) *agentv1.SessionRequest {
		return &agentv1.SessionRequest{Msg: &agentv1.SessionRequest_Observed{Observed: &agentv1.ObservedState{Sequence: seq, DesiredGeneration: 1, Leases: leases, Inventory: fuzzInventory("GPU-A")}}}
	}
	audit := func(events ...*agentv1.AuditEvent) *agentv1.SessionRequest {
		return &agentv1.SessionRequest{Msg: &agentv1.SessionRequest_Audit{Audit: &agentv1.AuditEvents{Events: events}}}
	}
	return []*agentv1.SessionRequest{
		{Msg: &agentv1.SessionRequest_Heartbeat{Heartbeat: &agentv1.Heartbeat{Time: now}}},
		observed(1, &agentv1.ObservedLease{LeaseId: ownLeaseToken, Phase: leasev1.Phase_PHASE_PROVISIONING, Reason: "creating partition", UpdateTime: now}),
		observed(2, &agentv1.ObservedLease{LeaseId: ownLeaseToken, Phase: leasev1.Phase_PHASE_RUNNING, Reason: "running",
			Status: &leasev1.LeaseStatus{MigUuid: "MIG-1", ContainerId: "c-1"}, UpdateTime: now}),
		observed(3, &agentv1.ObservedLease{LeaseId: otherLeaseToken, Phase: leasev1.Phase_PHASE_TERMINATED, Reason: "not mine",
			Status: &leasev1.LeaseStatus{MigUuid: "MIG-2"}}),
		observed(4, &agentv1.ObservedLease{LeaseId: "not-a-lease-id", Phase: leasev1.Phase_PHASE_FAILED}),
		audit(&agentv1.AuditEvent{Id: "e1", Time: now, Action: "container.start", LeaseId: ownLeaseToken, Outcome: "success", Details: map[string]string{"image": "img"}}),
		audit(&agentv1.AuditEvent{Id: "e2", Time: now, Action: "mig.destroy", Resource: "lease/" + otherLeaseToken, Outcome: "failure", Reason: "in use"}),
		{Msg: &agentv1.SessionRequest_ChallengeResponse{ChallengeResponse: &agentv1.ChallengeResponse{Nonce: []byte{1, 2, 3}, Report: []byte("{}"), Signature: []byte{4}}}},
		{Msg: &agentv1.SessionRequest_Hello{Hello: &agentv1.Hello{NodeId: "node-a"}}},
		{},
	}
}

// FuzzAgentSession feeds arbitrary session messages to the real server on
// an agent's open session. The server must not crash, must keep the session
// or end it with a canonical status, and a report from node-a must never
// change a lease placed on node-b. The server and the session live across
// inputs (a new session is opened when one ends), so state builds up as it
// does with a real agent.
func FuzzAgentSession(f *testing.F) {
	s := startFuzzServer(f)

	// A lease on node-b, whose agent then leaves: node-a must not touch it.
	b := openAgentSession(f, s.agentB, "node-b", fuzzInventory("GPU-B"))
	other := createFuzzLease(f, s.op, "lease-b", "node-b", "1g.18gb")
	if other.GetPlacement().GetNode() != "node-b" {
		f.Fatalf("the node-b lease was placed on %q", other.GetPlacement().GetNode())
	}
	b.cancel()

	var (
		mu      sync.Mutex // inputs run one at a time, but be sure
		sess    = openAgentSession(f, s.agentA, "node-a", fuzzInventory("GPU-A"))
		seq     uint64
		ownID   = createFuzzLease(f, s.op, "lease-a", "node-a", "1g.18gb").GetId()
		otherID = other.GetId()
		want    = rawLease(f, s.st, otherID)
	)
	// A lease that waits for the whole GPU, so every tick runs the scheduler
	// over the inventory the fuzzed agent last reported.
	createFuzzLease(f, s.op, "lease-pending", "node-a", "7g.141gb")
	f.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		if sess != nil {
			sess.cancel()
		}
	})

	for _, m := range fuzzSeeds() {
		raw, err := proto.Marshal(m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(raw)
	}

	f.Fuzz(func(t *testing.T, data []byte) {
		msg := &agentv1.SessionRequest{}
		if err := proto.Unmarshal(data, msg); err != nil {
			return // not a session message; the transport would refuse it
		}
		substituteLeaseIDs(msg, ownID, otherID)
		mu.Lock()
		defer mu.Unlock()
		if sess == nil {
			sess = openAgentSession(t, s.agentA, "node-a", fuzzInventory("GPU-A"))
		}
		// A marker no fuzzed message is likely to carry: once it is acked,
		// the server has handled the fuzzed message (a session is handled in
		// order).
		seq++
		marker := 1<<63 | seq
		// A failed Send means the session is over; Recv says why.
		if sess.stream.Send(msg) == nil {
			_ = sess.stream.Send(&agentv1.SessionRequest{Msg: &agentv1.SessionRequest_Observed{Observed: &agentv1.ObservedState{Sequence: marker}}})
		}
		timeout := time.After(10 * time.Second)
	wait:
		for {
			select {
			case r := <-sess.in:
				if r.err != nil {
					sess.cancel()
					sess = nil
					checkSessionEnd(t, r.err, msg)
					t.Logf("the server ended the session: %v", r.err)
					break wait
				}
				if r.msg.GetAck().GetObservedSequence() == marker {
					break wait
				}
			case <-timeout:
				sess.cancel()
				sess = nil
				t.Fatalf("the server neither answered nor ended the session within 10s of %v", msg)
			}
		}
		// What the daemon's lease loop does every few seconds.
		if err := s.leases.Tick(context.Background()); err != nil {
			t.Fatalf("tick after %v: %v", msg, err)
		}
		if got := rawLease(t, s.st, otherID); !bytes.Equal(got, want) {
			l := &leasev1.Lease{}
			_ = proto.Unmarshal(got, l)
			t.Fatalf("node-a's %v changed lease %s placed on node-b; it is now %v", msg, otherID, l)
		}
	})
}
