package session_test

import (
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/gpuaas/gpuaas/pkg/auditsig"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
)

// rotatingSource is an SVID source a test can rotate.
type rotatingSource struct {
	mu   sync.Mutex
	svid *x509svid.SVID
}

func (s *rotatingSource) GetX509SVID() (*x509svid.SVID, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.svid, nil
}

func (s *rotatingSource) rotate(v *x509svid.SVID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.svid = v
}

func TestAuditEventsAreSignedWithTheCurrentSVIDAsTheyAreSent(t *testing.T) {
	pki := devPKI(t)
	cp := startFakeControlPlane(t, pki, pki.ControlPlane, "127.0.0.1:0")
	j := openJournal(t)
	if err := j.AddEvents(&agentv1.AuditEvent{Action: "partition.create", Resource: "gpu/GPU-1/gi/1", Outcome: "success"}); err != nil {
		t.Fatal(err)
	}
	first := staticSource(t, pki, pki.Agents["node-a"]).SVID
	src := &rotatingSource{svid: first}
	o := agentOpts(t, pki, cp.addr, j, idleExecutor(j))
	o.Report = time.Hour // batches go out on connect and on ack only
	o.Signer = auditsig.NewSigner(src)
	runAgent(t, o)

	s := cp.nextStream(t)
	ev := s.await(t, "a signed batch", isAudit).GetAudit().GetEvents()[0]
	verify := auditsig.VerifyOptions{Node: "node-a", ID: s.peer, PeerLeaf: first.Certificates[0], Bundle: pki.CA.Bundle()}
	v, err := auditsig.Verify(ev, verify)
	if err != nil {
		t.Fatalf("event as sent does not verify: %v", err)
	}
	if !v.Leaf.Equal(first.Certificates[0]) {
		t.Fatal("not signed with the session's SVID")
	}
	// The journal keeps the event as recorded; the signature covers it.
	stored, _ := j.PendingEvents(1)
	if stored[0].GetId() != ev.GetId() || stored[0].GetResource() != ev.GetResource() {
		t.Fatalf("sent %v, journaled %v", ev, stored[0])
	}

	// The SVID rotates (dev PKI reissue) while the stream stays up: the next
	// event is signed with the new key and verifies through the bundle.
	rotated, err := pki.CA.IssueSVID(first.ID, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	src.rotate(rotated)
	if err := j.AddEvents(&agentv1.AuditEvent{Action: "container.start", Resource: "container/x", Outcome: "success"}); err != nil {
		t.Fatal(err)
	}
	s.push(ack(0, ev.GetId()))
	next := s.await(t, "the batch after the rotation", func(m *agentv1.SessionRequest) bool {
		evs := m.GetAudit().GetEvents()
		return len(evs) == 1 && evs[0].GetAction() == "container.start"
	}).GetAudit().GetEvents()[0]
	v, err = auditsig.Verify(next, verify)
	if err != nil {
		t.Fatalf("event signed after the rotation: %v", err)
	}
	if !v.Leaf.Equal(rotated.Certificates[0]) {
		t.Fatal("the signer did not follow the rotation")
	}
}
