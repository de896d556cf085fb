package api

import (
	"bytes"
	"context"
	"errors"
	"io"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/errs"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// waitFor bounds every wait: the tests assert what happens, not how fast.
const waitFor = 20 * time.Second

// fakeAgent is an agent session the test drives: the control plane's log
// requests arrive on reqs and the test answers with chunk.
type fakeAgent struct {
	stream agentv1.AgentService_SessionClient
	reqs   chan *agentv1.LogRequest
	mu     sync.Mutex
	cancel context.CancelFunc
	done   chan struct{}
}

func startAgent(t *testing.T, s *server, node string) *fakeAgent {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	a := &fakeAgent{stream: openSession(t, ctx, s, node), reqs: make(chan *agentv1.LogRequest, 64), cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(a.done)
		for {
			m, err := a.stream.Recv()
			if err != nil {
				return
			}
			if r := m.GetLogRequest(); r != nil {
				a.reqs <- r
			}
		}
	}()
	t.Cleanup(a.stop)
	return a
}

// stop ends the session as an agent going away does.
func (a *fakeAgent) stop() {
	a.cancel()
	<-a.done
}

func (a *fakeAgent) next(t *testing.T) *agentv1.LogRequest {
	t.Helper()
	select {
	case r := <-a.reqs:
		return r
	case <-time.After(waitFor):
		t.Fatal("no log request reached the agent")
		return nil
	}
}

func (a *fakeAgent) chunk(t *testing.T, c *agentv1.LogChunk) {
	t.Helper()
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.stream.Send(&agentv1.SessionRequest{Msg: &agentv1.SessionRequest_LogChunk{LogChunk: c}}); err != nil {
		t.Fatal(err)
	}
}

// placedLease creates a lease; with node's agent connected it lands there.
func placedLease(t *testing.T, lc leasev1.LeaseServiceClient, key string) string {
	t.Helper()
	resp, err := lc.CreateLease(context.Background(), createReq(key))
	if err != nil {
		t.Fatal(err)
	}
	return resp.GetLease().GetId()
}

// readLogs reads a GetLeaseLogs stream to its end.
func readLogs(stream leasev1.LeaseService_GetLeaseLogsClient) ([]byte, bool, error) {
	var data []byte
	truncated := false
	for {
		r, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return data, truncated, nil
		}
		if err != nil {
			return data, truncated, errs.FromStatus(err)
		}
		data = append(data, r.GetData()...)
		truncated = truncated || r.GetTruncated()
	}
}

// logsEntries returns the audit log's lease.logs entries.
func logsEntries(t *testing.T, s *server) []auditlog.Entry {
	t.Helper()
	es, err := audit.List(context.Background(), s.st, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	var out []auditlog.Entry
	for _, e := range es {
		if e.Action == "lease.logs" {
			out = append(out, e)
		}
	}
	return out
}

func pattern(n int, b byte) []byte { return bytes.Repeat([]byte{b}, n) }

func TestGetLeaseLogsRelaysTheAgentsChunksAndIsAudited(t *testing.T) {
	s := startServer(t)
	a := startAgent(t, s, "node-a")
	alice := s.pki.Operators["alice"]
	lc := leasev1.NewLeaseServiceClient(s.dial(t, sourceFor(t, s.pki, alice)))
	id := placedLease(t, lc, "k")

	stream, err := lc.GetLeaseLogs(context.Background(), &leasev1.GetLeaseLogsRequest{LeaseId: id, TailBytes: 300000})
	if err != nil {
		t.Fatal(err)
	}
	req := a.next(t)
	if req.GetLeaseId() != id || req.GetTailBytes() != 300000 || req.GetLimitBytes() != DefaultLogLimit || req.GetRequestId() == "" {
		t.Fatalf("request to the agent: %v", req)
	}
	// Fail closed: the grant is committed before the agent is even asked.
	if n := len(logsEntries(t, s)); n != 1 {
		t.Fatalf("%d lease.logs entries when the agent was asked, want the grant's", n)
	}
	var want []byte
	for i, b := range []byte("abc") {
		data := pattern(MaxLogChunk, b)
		want = append(want, data...)
		a.chunk(t, &agentv1.LogChunk{RequestId: req.GetRequestId(), Data: data, Eof: i == 2, Truncated: i == 2})
	}
	got, truncated, err := readLogs(stream)
	if err != nil || !bytes.Equal(got, want) || !truncated {
		t.Fatalf("read %d bytes (truncated %v): %v", len(got), truncated, err)
	}

	es := logsEntries(t, s)
	if len(es) != 1 {
		t.Fatalf("%d lease.logs entries, want 1", len(es))
	}
	e := es[0]
	if e.Actor != alice.ID.String() || e.Resource != "lease/"+id || e.Outcome != auditlog.OutcomeSuccess || e.Tenant != "acme" ||
		e.Details["node"] != "node-a" || e.Details["limit_bytes"] != strconv.Itoa(DefaultLogLimit) || e.Details["tail_bytes"] != "300000" {
		t.Fatalf("audit entry %+v", e)
	}
}

func TestGetLeaseLogsErrorsAreCanonicalAndAudited(t *testing.T) {
	s := startServer(t)
	lc := leasev1.NewLeaseServiceClient(s.dial(t, sourceFor(t, s.pki, s.pki.Operators["alice"])))
	call := func(id string, tail int64) error {
		t.Helper()
		stream, err := lc.GetLeaseLogs(context.Background(), &leasev1.GetLeaseLogsRequest{LeaseId: id, TailBytes: tail})
		if err != nil {
			return errs.FromStatus(err)
		}
		_, _, err = readLogs(stream)
		return err
	}
	check := func(what string, err error, class error, reason string) {
		t.Helper()
		if !errors.Is(err, class) || errs.ReasonOf(err) != reason {
			t.Errorf("%s: %v (reason %q), want %v %s", what, err, errs.ReasonOf(err), class, reason)
		}
	}
	check("unknown lease", call("l-aaaaaaaaaaaaaaaaaaaa", 0), errs.ErrNotFound, "LEASE_NOT_FOUND")
	check("not a lease id", call("../etc", 0), errs.ErrInvalidArgument, "INVALID_ARGUMENT")
	pending := placedLease(t, lc, "pending") // no node connected: not placed
	check("negative tail", call(pending, -1), errs.ErrInvalidArgument, "INVALID_ARGUMENT")
	check("lease without a node", call(pending, 0), errs.ErrFailedPrecondition, "LEASE_NOT_PLACED")

	a := startAgent(t, s, "node-a")
	id := placedLease(t, lc, "placed")
	// The agent reports an error.
	errc := make(chan error, 1)
	go func() { errc <- call(id, 0) }()
	req := a.next(t)
	a.chunk(t, &agentv1.LogChunk{RequestId: req.GetRequestId(), Eof: true, Error: "LOG_READ_FAILED: the log could not be read"})
	err := <-errc
	check("agent error", err, errs.ErrInternal, "LOG_READ_FAILED")
	if !strings.Contains(err.Error(), "node-a: the log could not be read") {
		t.Errorf("agent error message: %v", err)
	}
	// An oversized chunk is a protocol error, not data.
	go func() { errc <- call(id, 0) }()
	req = a.next(t)
	a.chunk(t, &agentv1.LogChunk{RequestId: req.GetRequestId(), Data: pattern(MaxLogChunk+1, 'x'), Eof: true})
	check("oversized chunk", <-errc, errs.ErrInternal, "AGENT_PROTOCOL")
	// The node goes away in the middle of a request.
	go func() { errc <- call(id, 0) }()
	a.next(t)
	a.stop()
	check("node disconnected", <-errc, errs.ErrUnavailable, "NODE_DISCONNECTED")
	// And stays away.
	deadline := time.Now().Add(waitFor)
	for {
		err := call(id, 0)
		if errs.ReasonOf(err) == "NODE_NOT_CONNECTED" {
			check("node not connected", err, errs.ErrUnavailable, "NODE_NOT_CONNECTED")
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the agent left: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}

	// Calls refused before the agent is asked are audited as refused;
	// calls that reached an agent were granted first (and audited then),
	// whatever the agent answered: one entry each either way.
	es := logsEntries(t, s)
	reasons := map[string]int{}
	for _, e := range es {
		if (e.Outcome == auditlog.OutcomeSuccess) != (e.Reason == "access granted") {
			t.Errorf("entry %+v", e)
		}
		reasons[e.Reason]++
	}
	for _, r := range []string{"LEASE_NOT_FOUND", "INVALID_ARGUMENT", "LEASE_NOT_PLACED", "NODE_NOT_CONNECTED"} {
		if reasons[r] == 0 {
			t.Errorf("no audit entry with reason %s (got %v)", r, reasons)
		}
	}
	if reasons["access granted"] != 3 {
		t.Errorf("%d grants, want 3 (the calls the agent answered: unreadable log, oversized chunk, disconnected)", reasons["access granted"])
	}
}

func TestConcurrentLogRequestsToOneNodeAreToldApart(t *testing.T) {
	s := startServer(t)
	a := startAgent(t, s, "node-a")
	lc := leasev1.NewLeaseServiceClient(s.dial(t, sourceFor(t, s.pki, s.pki.Operators["alice"])))
	id1, id2 := placedLease(t, lc, "k1"), placedLease(t, lc, "k2")
	type result struct {
		data []byte
		err  error
	}
	results := map[string]chan result{id1: make(chan result, 1), id2: make(chan result, 1)}
	for _, id := range []string{id1, id2} {
		go func() {
			stream, err := lc.GetLeaseLogs(context.Background(), &leasev1.GetLeaseLogsRequest{LeaseId: id})
			if err != nil {
				results[id] <- result{err: err}
				return
			}
			data, _, err := readLogs(stream)
			results[id] <- result{data, err}
		}()
	}
	reqs := map[string]string{} // lease -> request id
	for i := 0; i < 2; i++ {
		r := a.next(t)
		reqs[r.GetLeaseId()] = r.GetRequestId()
	}
	if len(reqs) != 2 || reqs[id1] == reqs[id2] {
		t.Fatalf("requests %v", reqs)
	}
	// Interleaved answers, the second request's first.
	for i := 0; i < 3; i++ {
		for _, id := range []string{id2, id1} {
			a.chunk(t, &agentv1.LogChunk{RequestId: reqs[id], Data: []byte(id + "-" + strconv.Itoa(i) + "\n"), Eof: i == 2})
		}
	}
	for _, id := range []string{id1, id2} {
		r := <-results[id]
		if want := id + "-0\n" + id + "-1\n" + id + "-2\n"; r.err != nil || string(r.data) != want {
			t.Fatalf("%s: %q %v, want %q", id, r.data, r.err, want)
		}
	}
}

func TestACallerThatGoesAwayEndsItsRequestOnly(t *testing.T) {
	s := startServer(t)
	a := startAgent(t, s, "node-a")
	lc := leasev1.NewLeaseServiceClient(s.dial(t, sourceFor(t, s.pki, s.pki.Operators["alice"])))
	id := placedLease(t, lc, "k")
	ctx, cancel := context.WithCancel(context.Background())
	stream, err := lc.GetLeaseLogs(ctx, &leasev1.GetLeaseLogsRequest{LeaseId: id})
	if err != nil {
		t.Fatal(err)
	}
	req := a.next(t)
	a.chunk(t, &agentv1.LogChunk{RequestId: req.GetRequestId(), Data: []byte("first\n")})
	if r, err := stream.Recv(); err != nil || string(r.GetData()) != "first\n" {
		t.Fatalf("first chunk: %v %v", r, err)
	}
	cancel()
	// The call was audited once, when it was granted, and is forgotten by
	// the relay.
	deadline := time.Now().Add(waitFor)
	for openCalls(s.logs, "node-a") != 0 {
		if time.Now().After(deadline) {
			t.Fatal("the cancelled call is still open")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if es := logsEntries(t, s); len(es) != 1 || es[0].Outcome != auditlog.OutcomeSuccess || es[0].Reason != "access granted" {
		t.Fatalf("audit entries %+v, want the grant only", es)
	}
	// The agent's late chunks are dropped; the session serves the next call.
	a.chunk(t, &agentv1.LogChunk{RequestId: req.GetRequestId(), Data: []byte("late\n"), Eof: true})
	stream, err = lc.GetLeaseLogs(context.Background(), &leasev1.GetLeaseLogsRequest{LeaseId: id})
	if err != nil {
		t.Fatal(err)
	}
	req2 := a.next(t)
	if req2.GetRequestId() == req.GetRequestId() {
		t.Fatal("a request id was reused")
	}
	a.chunk(t, &agentv1.LogChunk{RequestId: req2.GetRequestId(), Data: []byte("second\n"), Eof: true})
	if data, _, err := readLogs(stream); err != nil || string(data) != "second\n" {
		t.Fatalf("next call: %q %v", data, err)
	}
}

func openCalls(r *LogRelay, node string) int {
	r.mu.Lock()
	ls := r.nodes[node]
	r.mu.Unlock()
	if ls == nil {
		return 0
	}
	ls.mu.Lock()
	defer ls.mu.Unlock()
	return len(ls.calls)
}

func TestTheServerLimitAndDeadlineBoundACall(t *testing.T) {
	s := startServerWith(t, &LogRelay{MaxBytes: 100 << 10, Timeout: 200 * time.Millisecond})
	a := startAgent(t, s, "node-a")
	lc := leasev1.NewLeaseServiceClient(s.dial(t, sourceFor(t, s.pki, s.pki.Operators["alice"])))
	id := placedLease(t, lc, "k")

	stream, err := lc.GetLeaseLogs(context.Background(), &leasev1.GetLeaseLogsRequest{LeaseId: id})
	if err != nil {
		t.Fatal(err)
	}
	req := a.next(t)
	if req.GetLimitBytes() != 100<<10 {
		t.Fatalf("limit asked of the agent: %d", req.GetLimitBytes())
	}
	// An agent that ignores the limit is cut off at it.
	for i := 0; i < 3; i++ {
		a.chunk(t, &agentv1.LogChunk{RequestId: req.GetRequestId(), Data: pattern(MaxLogChunk, 'x')})
	}
	data, truncated, err := readLogs(stream)
	if err != nil || len(data) != 100<<10 || !truncated {
		t.Fatalf("read %d bytes, truncated %v: %v", len(data), truncated, err)
	}
	// An agent that never answers runs into the deadline.
	stream, err = lc.GetLeaseLogs(context.Background(), &leasev1.GetLeaseLogsRequest{LeaseId: id})
	if err != nil {
		t.Fatal(err)
	}
	a.next(t)
	if _, _, err := readLogs(stream); !errors.Is(err, errs.ErrDeadlineExceeded) || errs.ReasonOf(err) != "LOG_FETCH_TIMEOUT" {
		t.Fatalf("silent agent: %v", err)
	}
}

// TestASlowCallerLosesItsRequestWithoutBlockingTheAgent drives the relay's
// session side directly: deliver, which the agent's session loop calls,
// never waits for the caller.
func TestASlowCallerLosesItsRequestWithoutBlockingTheAgent(t *testing.T) {
	r := &LogRelay{}
	ls := r.attach("node-a")
	defer r.detach(ls)
	c, err := ls.open(&agentv1.LogRequest{RequestId: "r1"})
	if err != nil {
		t.Fatal(err)
	}
	if got := <-ls.out; got.GetRequestId() != "r1" {
		t.Fatalf("queued %v", got)
	}
	// Nobody reads c.chunks: the buffer fills, then the call is dropped.
	for i := 0; i < logChunkBuffer+10; i++ {
		ls.deliver(&agentv1.LogChunk{RequestId: "r1", Data: []byte("x")})
	}
	select {
	case <-c.failed:
	default:
		t.Fatal("the slow call was not failed")
	}
	if !errors.Is(c.err, errs.ErrResourceExhausted) || errs.ReasonOf(c.err) != "LOG_CALLER_TOO_SLOW" {
		t.Fatalf("err = %v", c.err)
	}
	if n := openCalls(r, "node-a"); n != 0 {
		t.Fatalf("%d calls open", n)
	}
	// The session takes new requests, up to its bound.
	for i := 0; i < maxLogCallsPerNode; i++ {
		if _, err := ls.open(&agentv1.LogRequest{RequestId: "n" + strconv.Itoa(i)}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := ls.open(&agentv1.LogRequest{RequestId: "over"}); !errors.Is(err, errs.ErrResourceExhausted) {
		t.Fatalf("request over the bound: %v", err)
	}
}

// TestLeaseLogsAreNotDisclosedUnlessAudited: when the grant cannot be
// audited the call fails with AUDIT_FAILED and the agent is never asked.
func TestLeaseLogsAreNotDisclosedUnlessAudited(t *testing.T) {
	s := startServer(t)
	a := startAgent(t, s, "node-a")
	lc := leasev1.NewLeaseServiceClient(s.dial(t, sourceFor(t, s.pki, s.pki.Operators["alice"])))
	id := placedLease(t, lc, "k")
	s.leaseStore.fail.Store(true)
	stream, err := lc.GetLeaseLogs(context.Background(), &leasev1.GetLeaseLogsRequest{LeaseId: id})
	if err == nil {
		_, _, err = readLogs(stream)
	}
	if errs.ReasonOf(errs.FromStatus(err)) != "AUDIT_FAILED" {
		t.Fatalf("an unaudited call: %v", err)
	}
	select {
	case req := <-a.reqs:
		t.Fatalf("the agent was asked for the logs of an unaudited call: %v", req)
	default:
	}
	if es := logsEntries(t, s); len(es) != 0 {
		t.Fatalf("entries %+v", es)
	}
}
