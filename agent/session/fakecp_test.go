package session_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/gpuaas/gpuaas/agent/lease"
	"github.com/gpuaas/gpuaas/agent/session"
	"github.com/gpuaas/gpuaas/pkg/identity"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

// waitFor bounds every wait in these tests. It is generous on purpose: the
// tests assert what happens, never how fast.
const waitFor = 20 * time.Second

// fakeControlPlane is the control plane's side of the session contract and
// nothing more: a real gRPC AgentService over real mTLS (dev PKI) that
// records every message each stream carries and lets the test push
// responses or drop the stream. The agent must never import controlplane/,
// so this stands in for it.
type fakeControlPlane struct {
	agentv1.UnimplementedAgentServiceServer

	addr    string
	srv     *grpc.Server
	accepts atomic.Int64 // TCP connections accepted, handshake or not
	streams chan *fakeStream
	once    sync.Once
}

// fakeStream is one Session call as the fake control plane saw it.
type fakeStream struct {
	peer spiffeid.ID
	send chan *agentv1.SessionResponse
	drop chan struct{}

	mu     sync.Mutex
	msgs   []*agentv1.SessionRequest
	ended  bool
	cursor int // next message await looks at
}

// countingListener counts accepted connections, so a test can tell that a
// client dialled even when no RPC ever reached the server.
type countingListener struct {
	net.Listener
	n *atomic.Int64
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// startFakeControlPlane serves on addr ("127.0.0.1:0" for any port) with the
// SVID in f, admitting agents of the PKI's trust domain only.
func startFakeControlPlane(t *testing.T, pki *identity.DevPKI, f identity.SVIDFiles, addr string) *fakeControlPlane {
	t.Helper()
	var lis net.Listener
	var err error
	// Re-listening on a just-closed port can race the kernel briefly.
	for deadline := time.Now().Add(waitFor); ; {
		if lis, err = net.Listen("tcp", addr); err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("listen on %s: %v", addr, err)
	}
	fcp := &fakeControlPlane{addr: lis.Addr().String(), streams: make(chan *fakeStream, 64)}
	fcp.srv = grpc.NewServer(grpc.Creds(identity.ServerCredentials(staticSource(t, pki, f), identity.AuthorizeKinds(pki.TrustDomain, identity.PeerAgent))))
	agentv1.RegisterAgentServiceServer(fcp.srv, fcp)
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = fcp.srv.Serve(countingListener{Listener: lis, n: &fcp.accepts})
	}()
	t.Cleanup(func() {
		fcp.stop()
		<-served
	})
	return fcp
}

// stop ends every stream and closes the listener.
func (f *fakeControlPlane) stop() { f.once.Do(f.srv.Stop) }

func (f *fakeControlPlane) Session(stream agentv1.AgentService_SessionServer) error {
	peer, err := identity.PeerID(stream.Context())
	if err != nil {
		return status.Error(codes.Unauthenticated, "no peer id")
	}
	s := &fakeStream{peer: peer, send: make(chan *agentv1.SessionResponse, 64), drop: make(chan struct{})}
	select {
	case f.streams <- s:
	default:
		return status.Error(codes.ResourceExhausted, "fake control plane: too many streams for one test")
	}
	recvErr := make(chan error, 1)
	go func() {
		for {
			m, err := stream.Recv()
			if err != nil {
				s.mu.Lock()
				s.ended = true
				s.mu.Unlock()
				recvErr <- err
				return
			}
			s.mu.Lock()
			s.msgs = append(s.msgs, m)
			s.mu.Unlock()
		}
	}()
	for {
		select {
		case m := <-s.send:
			if err := stream.Send(m); err != nil {
				return err
			}
		case <-s.drop:
			return status.Error(codes.Unavailable, "fake control plane dropped the session")
		case err := <-recvErr:
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		case <-stream.Context().Done():
			return nil
		}
	}
}

// nextStream waits for the next Session call.
func (f *fakeControlPlane) nextStream(t *testing.T) *fakeStream {
	t.Helper()
	select {
	case s := <-f.streams:
		return s
	case <-time.After(waitFor):
		t.Fatalf("no session opened on the fake control plane within %s", waitFor)
		return nil
	}
}

// push sends a response to the agent on this stream.
func (s *fakeStream) push(m *agentv1.SessionResponse) { s.send <- m }

// dropStream ends the stream from the control plane's side, without acking
// anything.
func (s *fakeStream) dropStream() { close(s.drop) }

// all returns every message the agent sent on this stream so far.
func (s *fakeStream) all() []*agentv1.SessionRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]*agentv1.SessionRequest(nil), s.msgs...)
}

// await returns the first message after the previous await's match that
// satisfies match, failing the test if none arrives.
func (s *fakeStream) await(t *testing.T, what string, match func(*agentv1.SessionRequest) bool) *agentv1.SessionRequest {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for {
		s.mu.Lock()
		for i := s.cursor; i < len(s.msgs); i++ {
			if match(s.msgs[i]) {
				s.cursor = i + 1
				m := s.msgs[i]
				s.mu.Unlock()
				return m
			}
		}
		ended := s.ended
		s.mu.Unlock()
		if ended || time.Now().After(deadline) {
			t.Fatalf("the agent never sent %s (stream ended: %v; got %d messages)", what, ended, len(s.all()))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func isObserved(m *agentv1.SessionRequest) bool { return m.GetObserved() != nil }
func isAudit(m *agentv1.SessionRequest) bool    { return m.GetAudit() != nil }

func ack(observedSeq uint64, auditIDs ...string) *agentv1.SessionResponse {
	return &agentv1.SessionResponse{Msg: &agentv1.SessionResponse_Ack{Ack: &agentv1.Ack{ObservedSequence: observedSeq, AuditEventIds: auditIDs}}}
}

func desired(ds *agentv1.DesiredState) *agentv1.SessionResponse {
	return &agentv1.SessionResponse{Msg: &agentv1.SessionResponse_Desired{Desired: ds}}
}

// staticSource loads an SVID written by the dev PKI, trusting the dev CA.
// A static source has no goroutines, which keeps leak checks exact.
func staticSource(t *testing.T, pki *identity.DevPKI, f identity.SVIDFiles) identity.StaticSource {
	t.Helper()
	svid, err := x509svid.Load(f.CertPath, f.KeyPath)
	if err != nil {
		t.Fatalf("load svid %s: %v", f.ID, err)
	}
	return identity.StaticSource{SVID: svid, Bundle: pki.CA.Bundle()}
}

func devPKI(t *testing.T) *identity.DevPKI {
	t.Helper()
	pki, err := identity.WriteDevPKI(filepath.Join(t.TempDir(), "pki"), identity.DevPKIOptions{TrustDomain: "gpuaas.test", Agents: []string{"node-a", "node-b"}})
	if err != nil {
		t.Fatal(err)
	}
	return pki
}

func openJournal(t *testing.T) *lease.Journal {
	t.Helper()
	j, err := lease.OpenJournal(filepath.Join(t.TempDir(), "journal.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { j.Close() })
	return j
}

const agentVersion = "v1.2.3-test"

// testInventory is what the agent's inventory function reports.
func testInventory() *nodev1.Inventory {
	return &nodev1.Inventory{DriverVersion: "550.90.07", Gpus: []*nodev1.Gpu{{
		Index: 0, Uuid: "GPU-11111111-2222-4333-8444-555555555555", Model: "NVIDIA H200", PciDeviceId: 0x2335,
		MemoryMib: 143771, MigCapable: true, MigEnabled: true,
	}}}
}

// agentOpts are the options of an agent for node-a, speaking to addr and
// accepting only the control plane's SPIFFE ID, as the agent's main wires it.
func agentOpts(t *testing.T, pki *identity.DevPKI, addr string, j *lease.Journal, ex *lease.Executor) session.Options {
	t.Helper()
	return session.Options{
		Addresses: []string{addr}, Node: "node-a", AgentVersion: agentVersion,
		Creds:     identity.ClientCredentials(staticSource(t, pki, pki.Agents["node-a"]), tlsconfig.AuthorizeID(identity.ControlPlaneID(pki.TrustDomain))),
		Executor:  ex,
		Journal:   j,
		Inventory: func(context.Context) (*nodev1.Inventory, error) { return testInventory(), nil },
		Logger:    slog.New(slog.DiscardHandler),
		Heartbeat: 50 * time.Millisecond,
		Report:    100 * time.Millisecond,
		// Reconnects stay quick; grpc's own connect backoff still applies.
		MaxBackoff: 100 * time.Millisecond,
	}
}

// runningAgent is a session.Client's Run in a goroutine.
type runningAgent struct {
	cancel context.CancelFunc
	done   chan error
}

// runAgent starts Run; the test's cleanup cancels it and requires it to
// return nil.
func runAgent(t *testing.T, o session.Options) *runningAgent {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	a := &runningAgent{cancel: cancel, done: make(chan error, 1)}
	c := session.New(o)
	go func() { a.done <- c.Run(ctx) }()
	t.Cleanup(func() { a.stop(t) })
	return a
}

// stop cancels Run and waits for it; Run must return nil.
func (a *runningAgent) stop(t *testing.T) {
	t.Helper()
	a.cancel()
	select {
	case err, ok := <-a.done:
		if ok && err != nil {
			t.Errorf("Run after cancel = %v, want nil", err)
		}
		if ok {
			close(a.done)
		}
	case <-time.After(waitFor):
		t.Errorf("Run did not return within %s of its context being cancelled", waitFor)
	}
}

func protoEqual(a, b proto.Message) bool { return proto.Equal(a, b) }
