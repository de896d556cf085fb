package session_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/agent/runtime/logfile"
	"github.com/gpuaas/gpuaas/agent/session"
	"github.com/gpuaas/gpuaas/pkg/errs"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
)

const logLease = "l-aaaaaaaaaaaaaaaaaaaa"

// writeLog writes n numbered lines to the lease's log in dir, through the
// writer gpuaas-logdriver uses.
func writeLog(t *testing.T, dir, leaseID string, n int) []byte {
	t.Helper()
	path := filepath.Join(dir, leaseID+".log")
	w, err := logfile.NewWriter(path, logfile.Options{MaxBytes: 1 << 20, MaxFiles: 3})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i++ {
		if err := w.Write(logfile.Stdout, []byte(strings.Repeat("x", 80)), false); err != nil {
			t.Fatal(err)
		}
	}
	w.Close()
	data, _, err := logfile.Read(path, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func logRequest(id, leaseID string, tail, limit int64) *agentv1.SessionResponse {
	return &agentv1.SessionResponse{Msg: &agentv1.SessionResponse_LogRequest{LogRequest: &agentv1.LogRequest{RequestId: id, LeaseId: leaseID, TailBytes: tail, LimitBytes: limit}}}
}

// collect awaits the chunks of request id up to the one with eof.
func collect(t *testing.T, s *fakeStream, id string) (data []byte, last *agentv1.LogChunk, chunks int) {
	t.Helper()
	for {
		m := s.await(t, "a log chunk for "+id, func(m *agentv1.SessionRequest) bool { return m.GetLogChunk().GetRequestId() == id })
		ch := m.GetLogChunk()
		if len(ch.GetData()) > session.MaxLogChunk {
			t.Fatalf("chunk of %d bytes", len(ch.GetData()))
		}
		chunks++
		data = append(data, ch.GetData()...)
		if ch.GetEof() {
			return data, ch, chunks
		}
		if ch.GetError() != "" || ch.GetTruncated() {
			t.Fatalf("error or truncated before the last chunk: %v", ch)
		}
	}
}

type answer struct {
	data []byte
	last *agentv1.LogChunk
}

// collectConcurrent awaits every chunk of each request id, up to the one
// with eof, whatever the order the answers interleave in.
func collectConcurrent(t *testing.T, s *fakeStream, ids ...string) map[string]answer {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for {
		out := map[string]answer{}
		for _, m := range s.all() {
			ch := m.GetLogChunk()
			if ch == nil {
				continue
			}
			a, ok := out[ch.GetRequestId()]
			if ok && a.last != nil {
				t.Fatalf("chunk after the last one for %s", ch.GetRequestId())
			}
			if len(ch.GetData()) > session.MaxLogChunk {
				t.Fatalf("chunk of %d bytes", len(ch.GetData()))
			}
			a.data = append(a.data, ch.GetData()...)
			if ch.GetEof() {
				a.last = ch
			}
			out[ch.GetRequestId()] = a
		}
		done := true
		for _, id := range ids {
			if out[id].last == nil {
				done = false
			}
		}
		if done {
			return out
		}
		if time.Now().After(deadline) {
			t.Fatalf("no complete answer to every one of %v", ids)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestLogRequestsAreAnsweredInChunksBetweenHeartbeats(t *testing.T) {
	pki := devPKI(t)
	cp := startFakeControlPlane(t, pki, pki.ControlPlane, "127.0.0.1:0")
	j := openJournal(t)
	dir := t.TempDir()
	want := writeLog(t, dir, logLease, 3000) // ~350 KB: several chunks
	o := agentOpts(t, pki, cp.addr, j, idleExecutor(j))
	o.Logs = session.FileLogs{Dir: dir}
	runAgent(t, o)
	s := cp.nextStream(t)
	s.await(t, "an observed-state report", isObserved)

	s.push(logRequest("r1", logLease, 0, 0))
	data, last, chunks := collect(t, s, "r1")
	if !bytes.Equal(data, want) || chunks < 3 || last.GetTruncated() || last.GetError() != "" {
		t.Fatalf("got %d bytes in %d chunks (truncated %v, error %q), want the %d-byte log", len(data), chunks, last.GetTruncated(), last.GetError(), len(want))
	}

	// Tail and limit, answered concurrently and told apart by id: their
	// chunks may interleave in any order.
	s.push(logRequest("tail", logLease, 1000, 0))
	s.push(logRequest("limit", logLease, 0, 100<<10))
	got := collectConcurrent(t, s, "tail", "limit")
	tail, tl := got["tail"].data, got["tail"].last
	if !tl.GetTruncated() || len(tail) > 1000 || !bytes.HasSuffix(want, tail) || len(tail) == 0 {
		t.Fatalf("tail: %d bytes, truncated %v", len(tail), tl.GetTruncated())
	}
	limited, ll := got["limit"].data, got["limit"].last
	if !ll.GetTruncated() || len(limited) > 100<<10 || !bytes.HasPrefix(want, limited) {
		t.Fatalf("limit: %d bytes, truncated %v", len(limited), ll.GetTruncated())
	}
	// The session goes on.
	s.await(t, "a heartbeat after the logs", func(m *agentv1.SessionRequest) bool { return m.GetHeartbeat() != nil })
}

func TestLogRequestsThatMustFailSayWhy(t *testing.T) {
	pki := devPKI(t)
	cp := startFakeControlPlane(t, pki, pki.ControlPlane, "127.0.0.1:0")
	j := openJournal(t)
	dir := t.TempDir()
	o := agentOpts(t, pki, cp.addr, j, idleExecutor(j))
	o.Logs = session.FileLogs{Dir: dir}
	runAgent(t, o)
	s := cp.nextStream(t)
	s.await(t, "an observed-state report", isObserved)

	for _, tc := range []struct {
		id, lease string
		tail      int64
		reason    string
	}{
		{"traversal", "../../etc/passwd", 0, "INVALID_LEASE_ID:"},
		{"absolute", "/etc/shadow", 0, "INVALID_LEASE_ID:"},
		{"suffix", logLease + "/../x", 0, "INVALID_LEASE_ID:"},
		{"negative", logLease, -1, "INVALID_ARGUMENT:"},
	} {
		s.push(logRequest(tc.id, tc.lease, tc.tail, 0))
		data, last, _ := collect(t, s, tc.id)
		if len(data) != 0 || !strings.HasPrefix(last.GetError(), tc.reason) {
			t.Errorf("%s: %d bytes, error %q, want %s", tc.id, len(data), last.GetError(), tc.reason)
		}
	}
	// A lease whose container wrote nothing yet has an empty log.
	s.push(logRequest("empty", "l-bbbbbbbbbbbbbbbbbbbb", 0, 0))
	if data, last, _ := collect(t, s, "empty"); len(data) != 0 || last.GetError() != "" || last.GetTruncated() {
		t.Errorf("empty log: %q %v", data, last)
	}
}

func TestAnAgentWithoutLogsRefusesLogRequests(t *testing.T) {
	pki := devPKI(t)
	cp := startFakeControlPlane(t, pki, pki.ControlPlane, "127.0.0.1:0")
	j := openJournal(t)
	runAgent(t, agentOpts(t, pki, cp.addr, j, idleExecutor(j)))
	s := cp.nextStream(t)
	s.await(t, "an observed-state report", isObserved)
	s.push(logRequest("r", logLease, 0, 0))
	if _, last, _ := collect(t, s, "r"); !strings.HasPrefix(last.GetError(), "LOGS_UNAVAILABLE:") {
		t.Fatalf("error %q", last.GetError())
	}
}

// blockingLogs holds every OpenLog until release is closed.
type blockingLogs struct {
	opened  chan struct{}
	release chan struct{}
}

func (b blockingLogs) OpenLog(ctx context.Context, _ string, _, _ int64) (session.LogStream, error) {
	b.opened <- struct{}{}
	select {
	case <-b.release:
		return nopStream{strings.NewReader("late\n")}, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

type nopStream struct{ io.Reader }

func (nopStream) Close() error    { return nil }
func (nopStream) Truncated() bool { return false }

func TestASlowLogReadDoesNotHoldUpTheSession(t *testing.T) {
	pki := devPKI(t)
	cp := startFakeControlPlane(t, pki, pki.ControlPlane, "127.0.0.1:0")
	j := openJournal(t)
	b := blockingLogs{opened: make(chan struct{}, 1), release: make(chan struct{})}
	o := agentOpts(t, pki, cp.addr, j, idleExecutor(j))
	o.Logs = b
	runAgent(t, o)
	s := cp.nextStream(t)
	s.await(t, "an observed-state report", isObserved)
	s.push(logRequest("slow", logLease, 0, 0))
	<-b.opened
	// While the read hangs, heartbeats and reports go on.
	s.await(t, "a heartbeat during the read", func(m *agentv1.SessionRequest) bool { return m.GetHeartbeat() != nil })
	s.await(t, "a report during the read", isObserved)
	close(b.release)
	if data, last, _ := collect(t, s, "slow"); string(data) != "late\n" || last.GetError() != "" {
		t.Fatalf("slow read: %q %v", data, last)
	}
}

func TestFileLogsRefusesAnythingButALeaseID(t *testing.T) {
	dir := t.TempDir()
	for _, id := range []string{"", "..", "l-AAAAAAAAAAAAAAAAAAAA", "l-aaaaaaaaaaaaaaaaaaa", "l-aaaaaaaaaaaaaaaaaaaaa", "x/l-aaaaaaaaaaaaaaaaaaaa", "l-aaaaaaaaaaaaaaaaaaa\x00"} {
		if r, err := (session.FileLogs{Dir: dir}).OpenLog(context.Background(), id, 0, 0); err == nil {
			r.Close()
			t.Errorf("%q accepted", id)
		} else if !errors.Is(err, errs.ErrInvalidArgument) || errs.ReasonOf(err) != "INVALID_LEASE_ID" {
			t.Errorf("%q: %v", id, err)
		}
	}
}
