package session

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"path/filepath"
	"regexp"

	"github.com/gpuaas/gpuaas/agent/runtime/logfile"
	"github.com/gpuaas/gpuaas/pkg/errs"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
)

// Limits on answering log requests.
const (
	// MaxLogChunk is the largest LogChunk sent (the control plane's cap).
	MaxLogChunk = 64 << 10
	// MaxLogBytes caps one answer whatever the request's limit.
	MaxLogBytes = 16 << 20
	// maxLogReads is how many logs are read at once (across sessions).
	maxLogReads = 4
	// maxLogRequests is how many requests one session serves at once;
	// more are refused with TOO_MANY_LOG_REQUESTS.
	maxLogRequests = 16
)

// Logs reads the captured output of the leases on this node.
type Logs interface {
	// OpenLog returns the lease's log, oldest first: only the last
	// tailBytes when > 0, at most limitBytes when > 0. An error the caller
	// may see is an *errs.Error.
	OpenLog(ctx context.Context, leaseID string, tailBytes, limitBytes int64) (LogStream, error)
}

// LogStream is one opened log (a *logfile.Reader).
type LogStream interface {
	io.ReadCloser
	// Truncated reports whether output was cut: rotated away, or cut by the
	// tail or the limit.
	Truncated() bool
}

// leaseIDRE is the shape of a lease id (the control plane's
// lease.ValidLeaseID); it keeps a request from naming any other file.
var leaseIDRE = regexp.MustCompile(`^l-[a-z0-9]{20}$`)

// FileLogs reads the files gpuaas-logdriver writes: <Dir>/<lease id>.log
// and its rotated siblings (package logfile).
type FileLogs struct {
	Dir string
}

// OpenLog implements Logs. A lease whose container wrote nothing yet has
// an empty log.
func (f FileLogs) OpenLog(_ context.Context, leaseID string, tailBytes, limitBytes int64) (LogStream, error) {
	if !leaseIDRE.MatchString(leaseID) {
		return nil, errs.New(errs.ErrInvalidArgument, "INVALID_LEASE_ID", "not a lease id")
	}
	r, err := logfile.Open(filepath.Join(f.Dir, leaseID+".log"), tailBytes, limitBytes)
	if err != nil {
		return nil, err
	}
	return r, nil
}

// logSem bounds the log reads of all sessions.
var logSem = make(chan struct{}, maxLogReads)

// serveLog answers one LogRequest with LogChunks passed to send, which
// returns false once the session is gone.
func serveLog(ctx context.Context, src Logs, log *slog.Logger, req *agentv1.LogRequest, send func(*agentv1.LogChunk) bool) {
	id := req.GetRequestId()
	fail := func(reason, msg string) {
		send(&agentv1.LogChunk{RequestId: id, Eof: true, Error: reason + ": " + msg})
	}
	if src == nil {
		fail("LOGS_UNAVAILABLE", "this agent keeps no logs")
		return
	}
	if req.GetTailBytes() < 0 || req.GetLimitBytes() < 0 {
		fail("INVALID_ARGUMENT", "tail and limit must not be negative")
		return
	}
	limit := req.GetLimitBytes()
	if limit == 0 || limit > MaxLogBytes {
		limit = MaxLogBytes
	}
	select {
	case logSem <- struct{}{}:
		defer func() { <-logSem }()
	case <-ctx.Done():
		return
	}
	r, err := src.OpenLog(ctx, req.GetLeaseId(), req.GetTailBytes(), limit)
	if err != nil {
		var e *errs.Error
		if errors.As(err, &e) {
			fail(e.Reason, e.Message)
			return
		}
		log.Warn("open lease log", "lease", req.GetLeaseId(), "err", err)
		fail("LOG_READ_FAILED", "the log could not be read")
		return
	}
	defer r.Close()
	buf := make([]byte, MaxLogChunk)
	for {
		n, err := io.ReadFull(r, buf)
		eof := errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
		if err != nil && !eof {
			log.Warn("read lease log", "lease", req.GetLeaseId(), "err", err)
			fail("LOG_READ_FAILED", "the log could not be read")
			return
		}
		ch := &agentv1.LogChunk{RequestId: id, Data: append([]byte(nil), buf[:n]...), Eof: eof}
		if eof {
			ch.Truncated = r.Truncated()
		}
		if !send(ch) || eof {
			return
		}
	}
}
