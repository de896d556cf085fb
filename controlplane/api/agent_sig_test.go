package api

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/auditsig"
	"github.com/gpuaas/gpuaas/pkg/identity"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
)

// startSigServer is startServer with agent event signatures required and,
// if withBundle, the dev CA's bundle to verify rotated SVIDs against.
func startSigServer(t *testing.T, withBundle bool) *server {
	t.Helper()
	return startServerWith(t, &LogRelay{}, func(as *AgentServer, src identity.Source) {
		as.RequireAgentSignatures = true
		if withBundle {
			as.Bundle = src
		}
	})
}

func loadSVID(t *testing.T, f identity.SVIDFiles) *x509svid.SVID {
	t.Helper()
	s, err := x509svid.Load(f.CertPath, f.KeyPath)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func agentEvent(id, action, resource string) *agentv1.AuditEvent {
	return &agentv1.AuditEvent{Id: id, Time: timestamppb.New(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)), Action: action, Resource: resource,
		Outcome: "success", Details: map[string]string{"gi": "1"}}
}

func signed(t *testing.T, svid *x509svid.SVID, node string, e *agentv1.AuditEvent) *agentv1.AuditEvent {
	t.Helper()
	if err := auditsig.SignWith(svid, node, e); err != nil {
		t.Fatal(err)
	}
	return e
}

// sendEvents sends one batch and returns the ids the control plane acked.
func sendEvents(t *testing.T, stream agentv1.AgentService_SessionClient, evs ...*agentv1.AuditEvent) []string {
	t.Helper()
	if err := stream.Send(&agentv1.SessionRequest{Msg: &agentv1.SessionRequest_Audit{Audit: &agentv1.AuditEvents{Events: evs}}}); err != nil {
		t.Fatal(err)
	}
	for {
		m, err := stream.Recv()
		if err != nil {
			t.Fatalf("waiting for the audit ack: %v", err)
		}
		if ids := m.GetAck().GetAuditEventIds(); len(ids) > 0 {
			return ids
		}
	}
}

// entriesWith lists the audit entries of action.
func entriesWith(t *testing.T, s *server, action string) []auditlog.Entry {
	t.Helper()
	es, err := audit.List(context.Background(), s.st, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	var out []auditlog.Entry
	for _, e := range es {
		if e.Action == action {
			out = append(out, e)
		}
	}
	return out
}

func TestSignedAgentEventIsAppendedOnceAndAcked(t *testing.T) {
	s := startSigServer(t, true)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream := openSession(t, ctx, s, "node-a")
	ev := signed(t, loadSVID(t, s.pki.Agents["node-a"]), "node-a", agentEvent("e1", "partition.create", "gpu/GPU-node-a/gi/1"))
	for i := 0; i < 2; i++ { // a resend (lost ack) is deduplicated
		if ids := sendEvents(t, stream, ev); !slices.Equal(ids, []string{"e1"}) {
			t.Fatalf("acked %v, want [e1]", ids)
		}
	}
	got := entriesWith(t, s, "agent.partition.create")
	if len(got) != 1 {
		t.Fatalf("signed event appended %d times, want once", len(got))
	}
	e := got[0]
	if e.Actor != s.pki.Agents["node-a"].ID.String() || e.Resource != "gpu/GPU-node-a/gi/1" || e.Details["gi"] != "1" {
		t.Fatalf("entry = %+v", e)
	}
	if e.Details["agent_sig"] != "verified" || len(e.Details["agent_sig_cert_sha256"]) != 64 {
		t.Fatalf("the entry does not record the verified signature: %v", e.Details)
	}
	if n := len(entriesWith(t, s, "agent.event.rejected")); n != 0 {
		t.Fatalf("%d rejections for a good event", n)
	}
}

// assertRejected checks that event id was refused once with reason and
// never appended as the agent's own entry.
func assertRejected(t *testing.T, s *server, id, claimed, reason string) auditlog.Entry {
	t.Helper()
	if got := entriesWith(t, s, "agent."+claimed); len(got) != 0 {
		t.Fatalf("a refused event reached the log as the agent's: %+v", got)
	}
	var rej []auditlog.Entry
	for _, e := range entriesWith(t, s, "agent.event.rejected") {
		if e.Details["agent_event_id"] == id {
			rej = append(rej, e)
		}
	}
	if len(rej) != 1 {
		t.Fatalf("refusal of %s audited %d times, want once", id, len(rej))
	}
	r := rej[0]
	if r.Outcome != auditlog.OutcomeDenied || r.Reason != "agent event signature: "+reason || r.Details["claimed_action"] != claimed ||
		r.Details["node"] != "node-a" || r.Actor != s.pki.Agents["node-a"].ID.String() {
		t.Fatalf("refusal = %+v", r)
	}
	return r
}

func TestTamperedAgentEventIsRefusedAndAuditedOnce(t *testing.T) {
	s := startSigServer(t, true)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream := openSession(t, ctx, s, "node-a")
	ev := signed(t, loadSVID(t, s.pki.Agents["node-a"]), "node-a", agentEvent("e1", "partition.destroy", "gpu/GPU-node-a/gi/1"))
	ev.Resource = "gpu/GPU-node-a/gi/2" // changed after signing
	for i := 0; i < 2; i++ {
		// Acked so the agent's outbox drains; the refusal stands for it.
		if ids := sendEvents(t, stream, ev); !slices.Equal(ids, []string{"e1"}) {
			t.Fatalf("acked %v, want [e1]", ids)
		}
	}
	r := assertRejected(t, s, "e1", "partition.destroy", "bad signature")
	if r.Details["claimed_resource"] != "gpu/GPU-node-a/gi/2" || r.Details["agent_sig"] != "rejected" {
		t.Fatalf("refusal details = %v", r.Details)
	}
}

func TestAgentEventSignedByAnotherNodesKeyIsRefused(t *testing.T) {
	s := startSigServer(t, true)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream := openSession(t, ctx, s, "node-a")
	// node-b's SVID is valid in the bundle and signs for node-a.
	ev := signed(t, loadSVID(t, s.pki.Agents["node-b"]), "node-a", agentEvent("e1", "container.start", "container/x"))
	good := signed(t, loadSVID(t, s.pki.Agents["node-a"]), "node-a", agentEvent("e2", "container.stop", "container/x"))
	if ids := sendEvents(t, stream, ev, good); !slices.Equal(ids, []string{"e1", "e2"}) {
		t.Fatalf("acked %v", ids)
	}
	assertRejected(t, s, "e1", "container.start", "wrong signer")
	// A refusal does not hold back the rest of the batch.
	if n := len(entriesWith(t, s, "agent.container.stop")); n != 1 {
		t.Fatalf("the good event of the batch appended %d times", n)
	}
}

func TestUnsignedAgentEventIsRefusedWhenSignaturesAreRequired(t *testing.T) {
	s := startSigServer(t, true)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream := openSession(t, ctx, s, "node-a")
	if ids := sendEvents(t, stream, agentEvent("e1", "fence.deny", "lease/x")); !slices.Equal(ids, []string{"e1"}) {
		t.Fatalf("acked %v", ids)
	}
	assertRejected(t, s, "e1", "fence.deny", "unsigned")
}

func TestUnsignedAgentEventIsMarkedAbsentWhenSignaturesAreNotRequired(t *testing.T) {
	s := startServer(t) // RequireAgentSignatures off: a rolling upgrade
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream := openSession(t, ctx, s, "node-a")
	tampered := signed(t, loadSVID(t, s.pki.Agents["node-a"]), "node-a", agentEvent("e2", "gpu.health", "gpu/x"))
	tampered.Outcome = "failure"
	if ids := sendEvents(t, stream, agentEvent("e1", "fence.deny", "lease/x"), tampered); !slices.Equal(ids, []string{"e1", "e2"}) {
		t.Fatalf("acked %v", ids)
	}
	got := entriesWith(t, s, "agent.fence.deny")
	if len(got) != 1 || got[0].Details["agent_sig"] != "absent" {
		t.Fatalf("unsigned event = %+v, want appended with agent_sig=absent", got)
	}
	// A signature that is present is verified even so.
	if got := entriesWith(t, s, "agent.gpu.health"); len(got) != 0 {
		t.Fatalf("a badly signed event was appended: %+v", got)
	}
	if n := len(entriesWith(t, s, "agent.event.rejected")); n != 1 {
		t.Fatalf("%d refusals, want 1", n)
	}
}

func TestAgentEventsSignedAcrossAnSVIDRotationVerify(t *testing.T) {
	s := startSigServer(t, true)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// The session stays on the SVID it connected with; the agent's SVID is
	// reissued (dev PKI) and the next event is signed with the new one.
	stream := openSession(t, ctx, s, "node-a")
	old := loadSVID(t, s.pki.Agents["node-a"])
	rotated, err := s.pki.CA.IssueSVID(old.ID, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	before := signed(t, old, "node-a", agentEvent("e1", "container.start", "container/x"))
	after := signed(t, rotated, "node-a", agentEvent("e2", "container.stop", "container/x"))
	if ids := sendEvents(t, stream, before, after); !slices.Equal(ids, []string{"e1", "e2"}) {
		t.Fatalf("acked %v", ids)
	}
	a, b := entriesWith(t, s, "agent.container.start"), entriesWith(t, s, "agent.container.stop")
	if len(a) != 1 || len(b) != 1 || a[0].Details["agent_sig"] != "verified" || b[0].Details["agent_sig"] != "verified" {
		t.Fatalf("entries = %+v %+v", a, b)
	}
	if a[0].Details["agent_sig_cert_sha256"] == b[0].Details["agent_sig_cert_sha256"] {
		t.Fatal("both entries name the same signer certificate")
	}
}

func TestRotatedSignerIsRefusedWithoutABundle(t *testing.T) {
	s := startSigServer(t, false)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream := openSession(t, ctx, s, "node-a")
	old := loadSVID(t, s.pki.Agents["node-a"])
	rotated, err := s.pki.CA.IssueSVID(old.ID, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	ev := signed(t, rotated, "node-a", agentEvent("e1", "container.start", "container/x"))
	if ids := sendEvents(t, stream, ev, signed(t, old, "node-a", agentEvent("e2", "container.stop", "container/x"))); len(ids) != 2 {
		t.Fatalf("acked %v", ids)
	}
	assertRejected(t, s, "e1", "container.start", "untrusted signer")
	if n := len(entriesWith(t, s, "agent.container.stop")); n != 1 {
		t.Fatalf("the session's own certificate needs no bundle: appended %d times", n)
	}
}
