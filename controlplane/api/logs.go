package api

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gpuaas/gpuaas/pkg/errs"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
)

// Limits of the log relay.
const (
	// DefaultLogLimit is the most bytes one GetLeaseLogs call returns.
	DefaultLogLimit = 8 << 20
	// DefaultLogTimeout bounds one GetLeaseLogs call.
	DefaultLogTimeout = 30 * time.Second
	// MaxLogChunk is the largest LogChunk an agent may send.
	MaxLogChunk = 64 << 10
	// logChunkBuffer is how many chunks wait for a slow caller before its
	// request is dropped (2 MiB at the largest chunk).
	logChunkBuffer = 32
	// maxLogCallsPerNode bounds the requests open on one session.
	maxLogCallsPerNode = 16
)

// LogRelay carries GetLeaseLogs requests to the agent session of the node
// that holds the lease and the agent's LogChunks back to the caller. Chunks
// of concurrent requests on one session are told apart by request_id. The
// agent's session never waits for a caller: a caller that does not keep up
// loses its request, with ResourceExhausted. The zero value is ready to use.
type LogRelay struct {
	// MaxBytes caps one call (default DefaultLogLimit); Timeout bounds it
	// (default DefaultLogTimeout).
	MaxBytes int64
	Timeout  time.Duration

	mu    sync.Mutex
	nodes map[string]*logSession
	seq   atomic.Uint64
}

// logSession is one agent session's side of the relay.
type logSession struct {
	node string
	// out holds requests for the session loop to send; it has room for
	// every call the session may have open, so queuing never blocks.
	out chan *agentv1.LogRequest

	mu     sync.Mutex
	calls  map[string]*logCall
	closed bool
}

// logCall is one open request.
type logCall struct {
	chunks chan *agentv1.LogChunk
	failed chan struct{}
	err    error
}

func (c *logCall) fail(err error) {
	c.err = err
	close(c.failed)
}

// attach registers a new session for node, replacing (and failing the
// calls of) any older one. The session loop sends what arrives on out and
// hands the agent's chunks to deliver; it calls detach when it ends.
func (r *LogRelay) attach(node string) *logSession {
	ls := &logSession{node: node, out: make(chan *agentv1.LogRequest, maxLogCallsPerNode), calls: map[string]*logCall{}}
	r.mu.Lock()
	if r.nodes == nil {
		r.nodes = map[string]*logSession{}
	}
	old := r.nodes[node]
	r.nodes[node] = ls
	r.mu.Unlock()
	if old != nil {
		old.close(errs.New(errs.ErrUnavailable, "NODE_DISCONNECTED", "the node's session was replaced"))
	}
	return ls
}

// detach removes ls and fails its open calls.
func (r *LogRelay) detach(ls *logSession) {
	r.mu.Lock()
	if r.nodes[ls.node] == ls {
		delete(r.nodes, ls.node)
	}
	r.mu.Unlock()
	ls.close(errs.New(errs.ErrUnavailable, "NODE_DISCONNECTED", fmt.Sprintf("node %s disconnected", ls.node)))
}

func (ls *logSession) close(err error) {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	ls.closed = true
	for id, c := range ls.calls {
		c.fail(err)
		delete(ls.calls, id)
	}
}

// deliver routes a chunk from the agent to its call without blocking. A
// chunk for a request that is no longer open (cancelled, timed out,
// dropped) is ignored.
func (ls *logSession) deliver(ch *agentv1.LogChunk) {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	c := ls.calls[ch.GetRequestId()]
	if c == nil {
		return
	}
	if len(ch.GetData()) > MaxLogChunk || len(ch.GetError()) > 4096 {
		c.fail(errs.New(errs.ErrInternal, "AGENT_PROTOCOL", "the agent sent an oversized log chunk"))
		delete(ls.calls, ch.GetRequestId())
		return
	}
	select {
	case c.chunks <- ch:
	default:
		c.fail(errs.ResourceExhausted("LOG_CALLER_TOO_SLOW", "the caller did not keep up with the log stream"))
		delete(ls.calls, ch.GetRequestId())
	}
}

// open registers a new call on ls and queues its request.
func (ls *logSession) open(req *agentv1.LogRequest) (*logCall, error) {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	if ls.closed {
		return nil, errs.New(errs.ErrUnavailable, "NODE_NOT_CONNECTED", fmt.Sprintf("node %s is not connected", ls.node))
	}
	if len(ls.calls) >= maxLogCallsPerNode {
		return nil, errs.ResourceExhausted("TOO_MANY_LOG_REQUESTS", "node %s already serves %d log requests", ls.node, maxLogCallsPerNode)
	}
	c := &logCall{chunks: make(chan *agentv1.LogChunk, logChunkBuffer), failed: make(chan struct{})}
	ls.calls[req.GetRequestId()] = c
	// Cannot block: out has room for maxLogCallsPerNode requests and at
	// most that many calls are open.
	ls.out <- req
	return c, nil
}

func (ls *logSession) remove(id string) {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	delete(ls.calls, id)
}

// fetchResult is what a fetch sent.
type fetchResult struct {
	bytes     int64
	truncated bool
}

// connected reports whether node has a session to ask (NODE_NOT_CONNECTED
// if not), so that a call bound to fail is refused before it is granted.
func (r *LogRelay) connected(node string) error {
	r.mu.Lock()
	ls := r.nodes[node]
	r.mu.Unlock()
	if ls == nil {
		return errs.New(errs.ErrUnavailable, "NODE_NOT_CONNECTED", fmt.Sprintf("node %s is not connected", node))
	}
	return nil
}

// maxBytes is the most one call returns.
func (r *LogRelay) maxBytes() int64 {
	if r.MaxBytes <= 0 {
		return DefaultLogLimit
	}
	return r.MaxBytes
}

// fetch asks node's agent for leaseID's log and passes the data to send as
// it arrives, until the agent's last chunk, an error, the limit, the
// timeout or ctx's end.
func (r *LogRelay) fetch(ctx context.Context, node, leaseID string, tailBytes int64, send func(data []byte, truncated bool) error) (fetchResult, error) {
	var res fetchResult
	limit := r.maxBytes()
	timeout := r.Timeout
	if timeout <= 0 {
		timeout = DefaultLogTimeout
	}
	r.mu.Lock()
	ls := r.nodes[node]
	r.mu.Unlock()
	if ls == nil {
		return res, errs.New(errs.ErrUnavailable, "NODE_NOT_CONNECTED", fmt.Sprintf("node %s is not connected", node))
	}
	id := "logs-" + strconv.FormatUint(r.seq.Add(1), 10)
	c, err := ls.open(&agentv1.LogRequest{RequestId: id, LeaseId: leaseID, TailBytes: tailBytes, LimitBytes: limit})
	if err != nil {
		return res, err
	}
	defer ls.remove(id)
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		select {
		case <-c.failed:
			return res, c.err
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return res, errs.New(errs.ErrDeadlineExceeded, "LOG_FETCH_TIMEOUT", fmt.Sprintf("node %s did not send the log within %s", node, timeout))
			}
			return res, errs.New(errs.ErrCanceled, "CANCELED", "the caller went away")
		case ch := <-c.chunks:
			data := ch.GetData()
			truncated := ch.GetTruncated()
			if rest := limit - res.bytes; int64(len(data)) > rest {
				data, truncated = data[:rest], true
			}
			if e := ch.GetError(); e != "" && ch.GetEof() {
				return res, agentError(node, e)
			}
			last := ch.GetEof() || res.bytes+int64(len(data)) >= limit && truncated
			if len(data) > 0 || (last && truncated) {
				if err := send(data, truncated); err != nil {
					return res, err
				}
			}
			res.bytes += int64(len(data))
			res.truncated = res.truncated || truncated
			if last {
				return res, nil
			}
		}
	}
}

var agentReasonRE = regexp.MustCompile(`^[A-Z][A-Z_]{0,63}$`)

// agentErrorClasses are the reasons an agent may give for a failed log
// request and what they mean to the caller; any other is internal.
var agentErrorClasses = map[string]error{
	"INVALID_ARGUMENT":      errs.ErrInvalidArgument,
	"INVALID_LEASE_ID":      errs.ErrInvalidArgument,
	"LOG_NOT_FOUND":         errs.ErrNotFound,
	"TOO_MANY_LOG_REQUESTS": errs.ErrResourceExhausted,
	"LOGS_UNAVAILABLE":      errs.ErrUnavailable,
}

// agentError turns a LogChunk's "<REASON>: <message>" into a canonical
// error; the message is the agent's, bounded and printable.
func agentError(node, s string) error {
	reason, msg, ok := strings.Cut(s, ": ")
	if !ok || !agentReasonRE.MatchString(reason) {
		reason, msg = "AGENT_LOG_ERROR", s
	}
	msg = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return -1
		}
		return r
	}, strings.ToValidUTF8(truncate(msg, 256), ""))
	class, ok := agentErrorClasses[reason]
	if !ok {
		class = errs.ErrInternal
	}
	return errs.New(class, reason, fmt.Sprintf("node %s: %s", node, msg))
}
