package api

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/fleet"
	"github.com/gpuaas/gpuaas/controlplane/lease"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/attestation"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/auditsig"
	"github.com/gpuaas/gpuaas/pkg/errs"
	"github.com/gpuaas/gpuaas/pkg/identity"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

// Limits on what an agent may send in one message.
const (
	maxAuditBatch     = 512
	maxObservedLeases = 4096
)

// AgentServer serves gpuaas.agent.v1.AgentService.
type AgentServer struct {
	agentv1.UnimplementedAgentServiceServer
	Fleet  *fleet.Registry
	Leases *lease.Service
	Store  store.Store
	Log    *slog.Logger
	// Logs relays GetLeaseLogs requests to the sessions (shared with the
	// LeaseServer); nil serves none.
	Logs *LogRelay
	// HelloTimeout bounds the wait for the first message (default 10s).
	HelloTimeout time.Duration
	// Bundle verifies agent audit-event signatures made with an SVID other
	// than the one the session presented (the agent signs with its current
	// SVID, which rotates while a connection stays up); the control plane's
	// identity source. Nil trusts only the session's own certificate.
	Bundle x509bundle.Source
	// RequireAgentSignatures refuses unsigned agent events like badly
	// signed ones. Off, an unsigned event (an agent older than event
	// signing, during a rolling upgrade) is still appended, marked
	// details["agent_sig"]="absent"; a signature that is present is always
	// verified, and a bad one is always refused.
	RequireAgentSignatures bool
	// Attest challenges each agent at connect and periodically, judges its
	// reports and verifies its telemetry; nil sends no challenges and
	// refuses telemetry (no key to verify it with).
	Attest *fleet.Attestor
	// Telemetry, if set, receives each accepted telemetry report with its
	// verified header (attestation.DecodeTelemetryPayload decodes the
	// readings).
	Telemetry func(node string, h attestation.TelemetryHeader, r *agentv1.TelemetryReport)
	// Counts, if set, counts attestation verdicts and telemetry outcomes
	// (kind "attestation" or "telemetry"; result a status, "accepted" or
	// the failed check).
	Counts func(kind, result string)
}

func (s *AgentServer) count(kind, result string) {
	if s.Counts != nil {
		s.Counts(kind, result)
	}
}

// agentPeer is the verified identity of a session's agent.
type agentPeer struct {
	node string
	id   spiffeid.ID
	// leaf is the certificate presented in the session's mTLS handshake
	// (nil if the transport does not expose it).
	leaf *x509.Certificate
}

// peerLeaf is the leaf certificate of a gRPC peer's TLS handshake.
func peerLeaf(ctx context.Context) *x509.Certificate {
	p, ok := peer.FromContext(ctx)
	if !ok || p == nil {
		return nil
	}
	var state tls.ConnectionState
	switch ai := p.AuthInfo.(type) {
	case credentials.TLSInfo:
		state = ai.State
	case *credentials.TLSInfo:
		if ai == nil {
			return nil
		}
		state = ai.State
	default:
		return nil
	}
	if !state.HandshakeComplete || len(state.PeerCertificates) == 0 {
		return nil
	}
	return state.PeerCertificates[0]
}

type recvResult struct {
	msg *agentv1.SessionRequest
	err error
}

// Session runs one agent's session: hello, then desired state out and
// observed state, heartbeats and audit events in, until either side ends.
func (s *AgentServer) Session(stream agentv1.AgentService_SessionServer) error {
	ctx := stream.Context()
	c, err := caller(ctx)
	if err != nil {
		return err
	}
	id, err := identity.PeerID(ctx)
	if err != nil {
		return errs.New(errs.ErrUnauthenticated, "NO_PEER_IDENTITY", "a SPIFFE X.509 SVID is required")
	}
	node, ok := identity.ParseAgentNode(id)
	if !ok {
		return errs.PermissionDenied("NOT_AN_AGENT", "only agents may open a session")
	}

	msgs := make(chan recvResult, 16)
	go func() {
		for {
			m, err := stream.Recv()
			select {
			case msgs <- recvResult{m, err}:
			case <-ctx.Done():
				return
			}
			if err != nil {
				return
			}
		}
	}()

	timeout := s.HelloTimeout
	if timeout == 0 {
		timeout = 10 * time.Second
	}
	var hello *agentv1.Hello
	select {
	case r := <-msgs:
		if r.err != nil {
			return r.err
		}
		hello = r.msg.GetHello()
	case <-time.After(timeout):
		return errs.New(errs.ErrDeadlineExceeded, "NO_HELLO", "no hello received")
	case <-ctx.Done():
		return ctx.Err()
	}
	if hello == nil {
		return errs.InvalidArgument("hello", "the first message of a session must be a hello")
	}
	if err := validateInventory("hello.inventory", hello.GetInventory()); err != nil {
		return err
	}
	if hello.GetNodeId() != node {
		// An agent may speak only for its own node.
		aerr := s.Store.Update(ctx, func(tx store.Tx) error {
			_, err := audit.Append(tx, audit.FromContext(ctx, auditlog.Entry{Actor: c.ID, Action: "session.hello", Resource: "node/" + node,
				Outcome: auditlog.OutcomeDenied, Reason: "hello claims another node", Details: map[string]string{"claimed": truncate(hello.GetNodeId(), 64)}}))
			return err
		})
		if aerr != nil {
			s.Log.Error("audit denied hello", "err", aerr)
		}
		return errs.PermissionDenied("NODE_MISMATCH", "an agent may speak only for its own node")
	}
	remote := ""
	if p, ok := peer.FromContext(ctx); ok {
		remote = p.Addr.String()
	}
	sess, err := s.Fleet.Connect(ctx, node, c.ID, remote, hello.GetAgentVersion(), hello.GetInventory())
	if err != nil {
		return err
	}
	defer s.Fleet.Disconnect(context.WithoutCancel(ctx), sess)
	ap := agentPeer{node: node, id: id, leaf: peerLeaf(ctx)}
	// New capacity may let pending leases be placed.
	if err := s.Leases.Tick(ctx); err != nil {
		s.Log.Warn("tick after connect", "err", err)
	}

	var logReqs <-chan *agentv1.LogRequest
	var logs *logSession
	if s.Logs != nil {
		logs = s.Logs.attach(node)
		defer s.Logs.detach(logs)
		logReqs = logs.out
	}

	var sentGen uint64
	sendDesired := func(force bool) error {
		ds, err := s.Leases.DesiredState(ctx, node)
		if err != nil {
			return err
		}
		if !force && ds.GetGeneration() == sentGen {
			return nil
		}
		sentGen = ds.GetGeneration()
		// The TTL grows with the fleet: tell the agent how often to beat,
		// and time this session by what it was told.
		ds.HeartbeatInterval = durationpb.New(s.Fleet.Advertise(sess))
		if s.Attest != nil {
			s.Attest.SetPlaced(node, ds.GetLeases())
		}
		return stream.Send(&agentv1.SessionResponse{Msg: &agentv1.SessionResponse_Desired{Desired: ds}})
	}
	if err := sendDesired(true); err != nil {
		return err
	}
	var challengeTick <-chan time.Time
	challenge := func() error {
		if err := s.Attest.Expire(ctx, node); err != nil {
			return err
		}
		ch, err := s.Attest.Challenge(ctx, node)
		if err != nil {
			return err
		}
		return stream.Send(&agentv1.SessionResponse{Msg: &agentv1.SessionResponse_Challenge{Challenge: ch}})
	}
	if s.Attest != nil {
		if err := challenge(); err != nil {
			return err
		}
		t := time.NewTicker(s.Attest.Interval())
		defer t.Stop()
		challengeTick = t.C
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-challengeTick:
			if err := challenge(); err != nil {
				return err
			}
		case <-sess.Replaced:
			return errs.New(errs.ErrAborted, "SESSION_REPLACED", fleet.ErrReplaced.Error())
		case <-sess.Wake:
			if err := sendDesired(false); err != nil {
				return err
			}
		case req := <-logReqs:
			if err := stream.Send(&agentv1.SessionResponse{Msg: &agentv1.SessionResponse_LogRequest{LogRequest: req}}); err != nil {
				return err
			}
		case r := <-msgs:
			if r.err != nil {
				if errors.Is(r.err, context.Canceled) {
					return nil
				}
				return r.err
			}
			if ch := r.msg.GetLogChunk(); ch != nil {
				if logs != nil {
					logs.deliver(ch)
				}
				continue
			}
			if err := s.handle(ctx, c, ap, sess, stream, r.msg); err != nil {
				return err
			}
		}
	}
}

func (s *AgentServer) handle(ctx context.Context, c lease.Caller, ap agentPeer, sess *fleet.Session, stream agentv1.AgentService_SessionServer, m *agentv1.SessionRequest) error {
	node := ap.node
	switch msg := m.GetMsg().(type) {
	case *agentv1.SessionRequest_Heartbeat:
		return s.Fleet.Seen(ctx, sess, nil)
	case *agentv1.SessionRequest_Observed:
		obs := msg.Observed
		if len(obs.GetLeases()) > maxObservedLeases {
			return errs.InvalidArgument("observed.leases", "at most %d leases", maxObservedLeases)
		}
		if err := validateInventory("observed.inventory", obs.GetInventory()); err != nil {
			return err
		}
		if err := s.Fleet.Seen(ctx, sess, obs.GetInventory()); err != nil {
			return err
		}
		if err := s.Leases.Observe(ctx, c, node, obs); err != nil {
			return err
		}
		return stream.Send(&agentv1.SessionResponse{Msg: &agentv1.SessionResponse_Ack{Ack: &agentv1.Ack{ObservedSequence: obs.GetSequence()}}})
	case *agentv1.SessionRequest_Audit:
		ids, err := s.appendAgentEvents(ctx, c, ap, msg.Audit.GetEvents())
		if err != nil {
			return err
		}
		return stream.Send(&agentv1.SessionResponse{Msg: &agentv1.SessionResponse_Ack{Ack: &agentv1.Ack{AuditEventIds: ids}}})
	case *agentv1.SessionRequest_Hello:
		return errs.InvalidArgument("hello", "only the first message may be a hello")
	case *agentv1.SessionRequest_ChallengeResponse:
		if s.Attest == nil {
			return nil
		}
		v, err := s.Attest.Judge(ctx, node, msg.ChallengeResponse)
		if err != nil {
			return err
		}
		s.count("attestation", string(v.Status))
		if v.Status == attestation.StatusPass {
			// The node may now take pending leases.
			if err := s.Leases.Tick(ctx); err != nil {
				s.Log.Warn("tick after attestation", "err", err)
			}
		} else {
			s.Log.Warn("attestation not passed", "node", node, "status", v.Status, "failed", checkNames(v.Failed()))
		}
		return nil
	case *agentv1.SessionRequest_Telemetry:
		if s.Attest == nil {
			s.count("telemetry", "no_attestation")
			return nil
		}
		h, err := s.Attest.Telemetry(node, msg.Telemetry)
		if err != nil {
			// A refused report is dropped, not fatal to the session: the
			// next one may pass (e.g. after the next attestation).
			check := "telemetry"
			var ce *attestation.CheckError
			if errors.As(err, &ce) {
				check = ce.Check
			}
			s.count("telemetry", check)
			level := slog.LevelWarn
			if check == attestation.CheckTelemetryKey {
				// Expected until the node's first report is verified.
				level = slog.LevelDebug
			}
			s.Log.Log(ctx, level, "telemetry report refused", "node", node, "check", check, "err", err)
			return nil
		}
		s.count("telemetry", "accepted")
		if s.Telemetry != nil {
			s.Telemetry(node, h, msg.Telemetry)
		}
		return nil
	default:
		return errs.InvalidArgument("msg", "empty or unknown session message")
	}
}

func checkNames(cs []attestation.Check) string {
	names := make([]string, 0, len(cs))
	for _, c := range cs {
		names = append(names, c.Name)
	}
	return strings.Join(names, ",")
}

// appendAgentEvents appends the agent's audit events with the agent as the
// actor, once each (the agent resends until acked). Each event's signature
// must verify (auditsig) against a certificate of the session's own SPIFFE
// ID: the session's certificate, or another SVID of the agent that chains
// to the bundle (across a rotation). An event whose signature does not
// verify is not appended: its refusal is, once, as agent.event.rejected
// with the claim in the details, and the event is acked, so that the
// agent's outbox drains; a refusal left unacked would be resent forever
// and, past one batch of them, hold back every later event.
func (s *AgentServer) appendAgentEvents(ctx context.Context, c lease.Caller, ap agentPeer, events []*agentv1.AuditEvent) ([]string, error) {
	node := ap.node
	if len(events) > maxAuditBatch {
		return nil, errs.InvalidArgument("audit.events", "at most %d events a batch", maxAuditBatch)
	}
	for _, e := range events {
		if id := e.GetId(); id == "" || len(id) > 128 {
			return nil, errs.InvalidArgument("audit.events.id", "1-128 characters required")
		}
		if len(e.GetDetails()) > 32 || len(e.GetAction()) > 64 || len(e.GetResource()) > 256 || len(e.GetReason()) > 1024 {
			return nil, errs.InvalidArgument("audit.events", "event %s is too large", e.GetId())
		}
	}
	// Signatures are checked before the transaction, which may run again.
	verified := make([]*auditsig.Verified, len(events))
	sigErrs := make([]error, len(events))
	now := time.Now()
	for i, e := range events {
		verified[i], sigErrs[i] = auditsig.Verify(e, auditsig.VerifyOptions{Node: node, ID: ap.id, PeerLeaf: ap.leaf, Bundle: s.Bundle, Now: now})
	}
	var ids []string
	err := s.Store.Update(ctx, func(tx store.Tx) error {
		ids = ids[:0]
		for i, e := range events {
			key := "agent-event/" + node + "/" + e.GetId()
			if _, err := tx.Get(store.BucketIdempotency, key); err == nil {
				ids = append(ids, e.GetId())
				continue
			} else if !errors.Is(err, store.ErrNotFound) {
				return err
			}
			sig, sigErr := "verified", sigErrs[i]
			if errors.Is(sigErr, auditsig.ErrUnsigned) && !s.RequireAgentSignatures {
				sig, sigErr = "absent", nil
			}
			if sigErr != nil {
				if err := s.rejectAgentEvent(tx, c, node, e, sigErr); err != nil {
					return err
				}
				if err := tx.Put(store.BucketIdempotency, key, []byte{1}); err != nil {
					return err
				}
				ids = append(ids, e.GetId())
				continue
			}
			details := map[string]string{}
			for k, v := range e.GetDetails() {
				details[truncate(k, 64)] = truncate(v, 256)
			}
			// The server's own fields last: an agent cannot overwrite them.
			details["node"], details["agent_event_id"] = node, e.GetId()
			details["agent_time"] = e.GetTime().AsTime().UTC().Format(time.RFC3339Nano)
			details["agent_sig"] = sig
			if v := verified[i]; v != nil {
				// Which SVID signed: an auditor can match it to the issuer's
				// records.
				details["agent_sig_cert_sha256"] = v.Fingerprint
			}
			res := e.GetResource()
			if res == "" && e.GetLeaseId() != "" {
				res = "lease/" + e.GetLeaseId()
			}
			entry := auditlog.Entry{Actor: c.ID, Action: "agent." + e.GetAction(), Resource: res,
				Outcome: e.GetOutcome(), Reason: e.GetReason(), Details: details}
			if id := e.GetLeaseId(); id != "" {
				owner, err := leaseNode(tx, id)
				if err != nil {
					return err
				}
				if owner != node {
					// An agent may speak only for its own node: record the
					// refusal, not the claim.
					entry = auditlog.Entry{Actor: c.ID, Action: "agent.event", Resource: "lease/" + truncate(id, 64),
						Outcome: auditlog.OutcomeDenied, Reason: "agent event about a lease not on its node", Details: map[string]string{"node": node, "agent_event_id": e.GetId(), "claimed_action": truncate(e.GetAction(), 64)}}
				}
			}
			if _, err := audit.Append(tx, audit.FromContext(ctx, entry)); err != nil {
				return err
			}
			if err := tx.Put(store.BucketIdempotency, key, []byte{1}); err != nil {
				return err
			}
			ids = append(ids, e.GetId())
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("append agent audit events: %w", err)
	}
	return ids, nil
}

// rejectAgentEvent records, in tx, the refusal of an agent event whose
// signature did not verify: the claim is kept in the details for an
// auditor, under the control plane's own action, never as the agent's.
func (s *AgentServer) rejectAgentEvent(tx store.Tx, c lease.Caller, node string, e *agentv1.AuditEvent, sigErr error) error {
	reason := auditsig.Reason(sigErr)
	s.Log.Warn("agent audit event refused", "node", node, "agent_event_id", e.GetId(), "reason", reason, "err", sigErr)
	_, err := audit.Append(tx, auditlog.Entry{Actor: c.ID, Action: "agent.event.rejected", Resource: "node/" + node,
		Outcome: auditlog.OutcomeDenied, Reason: "agent event signature: " + reason, Details: map[string]string{
			"node": node, "agent_event_id": e.GetId(), "agent_sig": "rejected", "sig_error": truncate(sigErr.Error(), 256),
			"claimed_action": truncate(e.GetAction(), 64), "claimed_resource": truncate(e.GetResource(), 256),
			"claimed_outcome": truncate(e.GetOutcome(), 64), "claimed_lease_id": truncate(e.GetLeaseId(), 64),
		}})
	return err
}

// leaseNode is the node a lease is placed on ("" if none or unknown).
func leaseNode(tx store.Tx, id string) (string, error) {
	raw, err := tx.Get(store.BucketLeases, id)
	if errors.Is(err, store.ErrNotFound) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	l := &leasev1.Lease{}
	if err := proto.Unmarshal(raw, l); err != nil {
		return "", fmt.Errorf("decode lease %s: %w", id, err)
	}
	return l.GetPlacement().GetNode(), nil
}

// Limits on a reported inventory.
const (
	maxGPUs         = 64
	maxGPUProfiles  = 64
	maxGPUInstances = 64
	maxInvString    = 256
)

// validateInventory bounds what an agent may report about its host before
// it is stored and used for placement.
func validateInventory(field string, inv *nodev1.Inventory) error {
	if inv == nil {
		return nil
	}
	if len(inv.GetGpus()) > maxGPUs {
		return errs.InvalidArgument(field+".gpus", "at most %d GPUs", maxGPUs)
	}
	if len(inv.GetDriverVersion()) > maxInvString {
		return errs.InvalidArgument(field+".driver_version", "too long")
	}
	for _, g := range inv.GetGpus() {
		if len(g.GetProfiles()) > maxGPUProfiles || len(g.GetInstances()) > maxGPUInstances {
			return errs.InvalidArgument(field+".gpus", "GPU %d reports too many profiles or instances", g.GetIndex())
		}
		for _, str := range []string{g.GetUuid(), g.GetModel(), g.GetSerial(), g.GetVbiosVersion()} {
			if len(str) > maxInvString {
				return errs.InvalidArgument(field+".gpus", "GPU %d has a field over %d bytes", g.GetIndex(), maxInvString)
			}
		}
		for _, in := range g.GetInstances() {
			if in.GetStart() > 64 || in.GetSize() > 64 || len(in.GetMigUuid()) > maxInvString {
				return errs.InvalidArgument(field+".gpus.instances", "GPU %d reports an impossible instance", g.GetIndex())
			}
		}
	}
	return nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}
