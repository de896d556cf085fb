// Package session keeps the agent's one stream to the control plane: it
// dials out over mTLS, says hello with the node's inventory, hands desired
// state to the executor, sends observed state, heartbeats and the audit
// outbox (each event signed as it is sent with the agent's current SVID),
// and answers the control plane's requests for lease logs. It
// reconnects with jittered exponential backoff; the executor keeps
// enforcing the journaled state while it is away.
package session

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v5"
	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/gpuaas/gpuaas/agent/lease"
	"github.com/gpuaas/gpuaas/pkg/endpoint"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

// Options configures the client.
type Options struct {
	// Addresses are the control plane's replicas, host:port each
	// (pkg/endpoint): the first that answers is used.
	Addresses    []string
	Node         string
	AgentVersion string
	Creds        credentials.TransportCredentials
	Executor     *lease.Executor
	Journal      *lease.Journal
	Inventory    func(context.Context) (*nodev1.Inventory, error)
	// Logs answers the control plane's log requests (FileLogs over the
	// log directory); nil answers each with LOGS_UNAVAILABLE.
	Logs   Logs
	Logger *slog.Logger
	// Heartbeat is the heartbeat interval (default 5s); Report the longest
	// time between observed-state reports (default 10s).
	Heartbeat time.Duration
	Report    time.Duration
	// MaxBackoff caps the reconnect delay (default 30s).
	MaxBackoff time.Duration
	// Signer signs each audit event as it is sent (pkg/auditsig with the
	// agent's identity source, so each send uses the current SVID and
	// follows rotations); nil sends events unsigned, which a control plane
	// that requires signatures refuses.
	Signer EventSigner
	// Attester answers the control plane's attestation challenges
	// (attest.Collector with the agent's current SVID); nil leaves them
	// unanswered, and the control plane then gives the node no leases.
	Attester Attester
	// Telemetry delivers signed telemetry reports to send (the sampler's
	// newest); nil sends none. A report that finds no session is dropped:
	// telemetry is a sample, not a ledger.
	Telemetry <-chan *agentv1.TelemetryReport
}

// Attester answers an attestation challenge with a signed report.
type Attester interface {
	Respond(ctx context.Context, nonce []byte) (*agentv1.ChallengeResponse, error)
}

// EventSigner signs an audit event of node in place (auditsig.Signer).
type EventSigner interface {
	Sign(node string, e *agentv1.AuditEvent) error
}

// Client is the agent's side of the session.
type Client struct {
	o Options

	mu sync.Mutex
	st Status // guarded by mu; read with Status
}

// Status is what the client knows of its link to the control plane, for
// the agent's status socket. The zero time means "never".
type Status struct {
	Address string `json:"address"`
	// Connected is true from the control plane's first message on a
	// session (it answers the hello with the desired state) until that
	// session ends. Since is when Connected last changed (or when Run
	// started, before the first session).
	Connected bool      `json:"connected"`
	Since     time.Time `json:"since,omitzero"`
	// LastError is why the last session ended or failed to open, and
	// LastErrorTime when; Reconnects counts the sessions that ended and
	// were retried.
	LastError     string    `json:"last_error,omitempty"`
	LastErrorTime time.Time `json:"last_error_time,omitzero"`
	Reconnects    uint64    `json:"reconnects"`
	// HeartbeatInterval is the interval the control plane last asked for
	// (zero: the configured one is in use).
	HeartbeatInterval time.Duration `json:"heartbeat_interval,omitempty"`
	// Challenge is the last attestation challenge handled, Telemetry the
	// last signed telemetry report sent.
	Challenge ChallengeStatus `json:"challenge"`
	Telemetry TelemetryStatus `json:"telemetry"`
}

// ChallengeStatus is the last attestation challenge the agent handled.
type ChallengeStatus struct {
	Time time.Time `json:"time,omitzero"`
	// NoncePrefix is the first bytes of the challenge's nonce, in hex:
	// enough to match it with the control plane's records.
	NoncePrefix string `json:"nonce_prefix,omitempty"`
	// OK: the signed report was sent; Error says why not otherwise.
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
}

// TelemetryStatus is the last telemetry report sent.
type TelemetryStatus struct {
	Time     time.Time `json:"time,omitzero"`
	Sequence uint64    `json:"sequence,omitempty"`
}

// noncePrefixBytes is how much of a nonce Status shows.
const noncePrefixBytes = 4

// Status returns a snapshot of the client's link state; safe to call from
// any goroutine while Run runs.
func (c *Client) Status() Status {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.st
}

// update changes the status under the lock.
func (c *Client) update(f func(*Status)) {
	c.mu.Lock()
	defer c.mu.Unlock()
	f(&c.st)
}

// setConnected records a change of the link, and why it went down.
func (c *Client) setConnected(up bool, err error) {
	c.update(func(st *Status) {
		now := time.Now()
		if st.Connected != up {
			st.Connected, st.Since = up, now
		}
		if err != nil {
			st.LastError, st.LastErrorTime = err.Error(), now
		}
	})
}

// telemetrySequence reads a report's sequence number from its signed
// payload without decoding the readings; 0 if the payload has none.
func telemetrySequence(r *agentv1.TelemetryReport) uint64 {
	b := r.GetPayload()
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return 0
		}
		b = b[n:]
		if num == telemetrySequenceField && typ == protowire.VarintType {
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return 0
			}
			return v
		}
		if n = protowire.ConsumeFieldValue(num, typ, b); n < 0 {
			return 0
		}
		b = b[n:]
	}
	return 0
}

// telemetrySequenceField is TelemetryPayload.sequence's field number.
var telemetrySequenceField = (&agentv1.TelemetryPayload{}).ProtoReflect().Descriptor().Fields().ByName("sequence").Number()

// The heartbeat intervals an agent accepts from the control plane.
const (
	minHeartbeat = time.Second
	maxHeartbeat = 10 * time.Minute
)

// New returns a client.
func New(o Options) *Client {
	if o.Heartbeat == 0 {
		o.Heartbeat = 5 * time.Second
	}
	if o.Report == 0 {
		o.Report = 10 * time.Second
	}
	if o.MaxBackoff == 0 {
		o.MaxBackoff = 30 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return &Client{o: o, st: Status{Address: strings.Join(o.Addresses, ",")}}
}

// Run keeps a session open until ctx ends.
func (c *Client) Run(ctx context.Context) error {
	target, opts := endpoint.Target(c.o.Addresses)
	conn, err := grpc.NewClient(target, append(opts,
		grpc.WithTransportCredentials(c.o.Creds),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 20 * time.Second, Timeout: 10 * time.Second, PermitWithoutStream: true}),
		// gRPC's own reconnect delay must not exceed ours (its default
		// grows to 120 s).
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: grpcbackoff.Config{BaseDelay: 200 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: c.o.MaxBackoff}, MinConnectTimeout: 5 * time.Second}),
	)...)
	if err != nil {
		return fmt.Errorf("control plane client for %s: %w", strings.Join(c.o.Addresses, ","), err)
	}
	defer conn.Close()
	client := agentv1.NewAgentServiceClient(conn)

	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval = 200 * time.Millisecond
	bo.MaxInterval = c.o.MaxBackoff
	c.update(func(st *Status) { st.Since = time.Now() })
	defer c.setConnected(false, nil)
	for {
		start := time.Now()
		err := c.session(ctx, client)
		if ctx.Err() != nil {
			return nil
		}
		c.setConnected(false, err)
		c.update(func(st *Status) { st.Reconnects++ })
		if time.Since(start) > 30*time.Second {
			bo.Reset()
		}
		wait := bo.NextBackOff()
		c.o.Logger.Warn("session ended, reconnecting", "err", err, "in", wait.Round(time.Millisecond))
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
	}
}

// session runs one stream until it fails.
func (c *Client) session(ctx context.Context, client agentv1.AgentServiceClient) error {
	// Log readers stop with the session (cancel runs first).
	var logReaders sync.WaitGroup
	defer logReaders.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := client.Session(ctx)
	if err != nil {
		return fmt.Errorf("open session: %w", err)
	}
	inv, err := c.o.Inventory(ctx)
	if err != nil {
		return fmt.Errorf("read inventory: %w", err)
	}
	if err := stream.Send(&agentv1.SessionRequest{Msg: &agentv1.SessionRequest_Hello{Hello: &agentv1.Hello{
		NodeId: c.o.Node, AgentVersion: c.o.AgentVersion, Inventory: inv}}}); err != nil {
		return fmt.Errorf("send hello: %w", err)
	}

	recvd := make(chan *agentv1.SessionResponse, 8)
	recvErr := make(chan error, 1)
	go func() {
		for {
			m, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			select {
			case recvd <- m:
			case <-ctx.Done():
				return
			}
		}
	}()

	// Log requests are read in their own goroutines; their chunks come
	// back here to be sent between the session's other messages, so a
	// large log never holds up a heartbeat for more than one chunk.
	logChunks := make(chan *agentv1.LogChunk)
	sendChunk := func(ch *agentv1.LogChunk) bool {
		select {
		case logChunks <- ch:
			return true
		case <-ctx.Done():
			return false
		}
	}
	logsOpen := 0
	logDone := make(chan struct{}, maxLogRequests)

	interval := c.o.Heartbeat
	heartbeat := time.NewTicker(interval)
	defer heartbeat.Stop()
	report := time.NewTicker(c.o.Report)
	defer report.Stop()
	sendObserved := func() error {
		obs, err := c.o.Executor.Observed()
		if err != nil {
			return err
		}
		if obs.Inventory, err = c.o.Inventory(ctx); err != nil {
			return err
		}
		return stream.Send(&agentv1.SessionRequest{Msg: &agentv1.SessionRequest_Observed{Observed: obs}})
	}
	// auditInFlight: a batch was sent and not yet acked; the next batch
	// waits for the ack (or the report timer, which resends).
	auditInFlight := false
	sendAudit := func() error {
		events, err := c.o.Journal.PendingEvents(256)
		if err != nil || len(events) == 0 {
			auditInFlight = false
			return err
		}
		if c.o.Signer != nil {
			// The signature covers the event exactly as journaled; an
			// unsigned send would only be refused, so a failure ends the
			// session and the events wait in the outbox.
			for _, e := range events {
				if err := c.o.Signer.Sign(c.o.Node, e); err != nil {
					return err
				}
			}
		}
		auditInFlight = true
		return stream.Send(&agentv1.SessionRequest{Msg: &agentv1.SessionRequest_Audit{Audit: &agentv1.AuditEvents{Events: events}}})
	}
	if err := sendObserved(); err != nil {
		return err
	}
	if err := sendAudit(); err != nil {
		return err
	}
	// Challenges are answered one at a time, off the loop (evidence
	// collection reads the driver and may quote a TPM); a challenge that
	// comes while one is being answered waits for it.
	type answer struct {
		nonce []byte
		resp  *agentv1.ChallengeResponse
		err   error
	}
	answers := make(chan answer, 1)
	var queued [][]byte
	answering := false
	startAnswer := func(nonce []byte) {
		answering = true
		go func() {
			resp, err := c.o.Attester.Respond(ctx, nonce)
			select {
			case answers <- answer{nonce, resp, err}:
			case <-ctx.Done():
			}
		}()
	}
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-recvErr:
			if errors.Is(err, io.EOF) {
				return errors.New("control plane closed the session")
			}
			return err
		case m := <-recvd:
			if !c.Status().Connected {
				c.setConnected(true, nil)
			}
			switch msg := m.GetMsg().(type) {
			case *agentv1.SessionResponse_Desired:
				c.o.Logger.Debug("desired state", "generation", msg.Desired.GetGeneration(), "leases", len(msg.Desired.GetLeases()))
				if hb := msg.Desired.GetHeartbeatInterval(); hb != nil {
					d := min(max(hb.AsDuration(), minHeartbeat), maxHeartbeat)
					if d != interval {
						c.o.Logger.Info("heartbeat interval set by the control plane", "interval", d)
						interval = d
						heartbeat.Reset(d)
						c.update(func(st *Status) { st.HeartbeatInterval = d })
					}
				}
				if err := c.o.Executor.SetDesired(msg.Desired); err != nil {
					return err
				}
			case *agentv1.SessionResponse_Ack:
				if ids := msg.Ack.GetAuditEventIds(); len(ids) > 0 {
					if err := c.o.Journal.AckEvents(ids); err != nil {
						return err
					}
					if err := sendAudit(); err != nil {
						return err
					}
				}
				if seq := msg.Ack.GetObservedSequence(); seq > 0 {
					if err := c.o.Executor.Acked(seq); err != nil {
						return err
					}
				}
			case *agentv1.SessionResponse_Challenge:
				nonce := msg.Challenge.GetNonce()
				switch {
				case c.o.Attester == nil:
					c.o.Logger.Warn("attestation challenge left unanswered: no attester configured")
				case len(nonce) == 0 || len(nonce) > 64:
					c.o.Logger.Warn("attestation challenge with an invalid nonce", "bytes", len(nonce))
				case answering:
					if len(queued) < 4 {
						queued = append(queued, nonce)
					}
				default:
					startAnswer(nonce)
				}
			case *agentv1.SessionResponse_LogRequest:
				req := msg.LogRequest
				if id := req.GetRequestId(); id == "" || len(id) > 128 {
					c.o.Logger.Warn("log request without a valid id")
					continue
				}
				if logsOpen >= maxLogRequests {
					if err := stream.Send(&agentv1.SessionRequest{Msg: &agentv1.SessionRequest_LogChunk{LogChunk: &agentv1.LogChunk{
						RequestId: req.GetRequestId(), Eof: true, Error: "TOO_MANY_LOG_REQUESTS: the agent is serving too many log requests"}}}); err != nil {
						return err
					}
					continue
				}
				logsOpen++
				logReaders.Add(1)
				go func() {
					defer logReaders.Done()
					defer func() { logDone <- struct{}{} }()
					serveLog(ctx, c.o.Logs, c.o.Logger, req, sendChunk)
				}()
			}
		case a := <-answers:
			answering = false
			if len(queued) > 0 {
				startAnswer(queued[0])
				queued = queued[1:]
			}
			if a.err != nil {
				// Unanswered, the challenge expires and the node reads
				// STALE; the next challenge tries again.
				c.o.Logger.Warn("attestation challenge not answered", "err", a.err)
				c.recordChallenge(a.nonce, a.err)
				continue
			}
			// The observed state goes first: the report was collected
			// before it, so the control plane judges the report against
			// lease phases at least as new as the evidence.
			if err := sendObserved(); err != nil {
				c.recordChallenge(a.nonce, err)
				return err
			}
			if err := stream.Send(&agentv1.SessionRequest{Msg: &agentv1.SessionRequest_ChallengeResponse{ChallengeResponse: a.resp}}); err != nil {
				c.recordChallenge(a.nonce, err)
				return err
			}
			c.recordChallenge(a.nonce, nil)
		case r := <-c.o.Telemetry:
			if err := stream.Send(&agentv1.SessionRequest{Msg: &agentv1.SessionRequest_Telemetry{Telemetry: r}}); err != nil {
				return err
			}
			seq := telemetrySequence(r)
			c.update(func(st *Status) { st.Telemetry = TelemetryStatus{Time: time.Now(), Sequence: seq} })
		case ch := <-logChunks:
			if err := stream.Send(&agentv1.SessionRequest{Msg: &agentv1.SessionRequest_LogChunk{LogChunk: ch}}); err != nil {
				return err
			}
		case <-logDone:
			logsOpen--
		case <-c.o.Executor.Changes():
			if err := sendObserved(); err != nil {
				return err
			}
			if !auditInFlight {
				if err := sendAudit(); err != nil {
					return err
				}
			}
		case <-report.C:
			if err := sendObserved(); err != nil {
				return err
			}
			// Resend unacknowledged events: the receiver deduplicates.
			if err := sendAudit(); err != nil {
				return err
			}
		case <-heartbeat.C:
			if err := stream.Send(&agentv1.SessionRequest{Msg: &agentv1.SessionRequest_Heartbeat{Heartbeat: &agentv1.Heartbeat{Time: timestamppb.Now()}}}); err != nil {
				return err
			}
		}
	}
}

// recordChallenge records the outcome of answering a challenge.
func (c *Client) recordChallenge(nonce []byte, err error) {
	cs := ChallengeStatus{Time: time.Now(), NoncePrefix: hex.EncodeToString(nonce[:min(len(nonce), noncePrefixBytes)]), OK: err == nil}
	if err != nil {
		cs.Error = err.Error()
	}
	c.update(func(st *Status) { st.Challenge = cs })
}
