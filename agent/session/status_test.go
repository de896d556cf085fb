package session_test

import (
	"context"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/gpuaas/gpuaas/agent/session"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
)

// runClient is runAgent that also returns the client, for its Status.
func runClient(t *testing.T, o session.Options) *session.Client {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	a := &runningAgent{cancel: cancel, done: make(chan error, 1)}
	c := session.New(o)
	go func() { a.done <- c.Run(ctx) }()
	t.Cleanup(func() { a.stop(t) })
	return c
}

// TestStatusFollowsTheLink: the status accessor says whether the control
// plane answered, the last challenge handled (answered or not) and the last
// telemetry report sent, and why and how often the link went down.
func TestStatusFollowsTheLink(t *testing.T) {
	pki := devPKI(t)
	cp := startFakeControlPlane(t, pki, pki.ControlPlane, "127.0.0.1:0")
	j := openJournal(t)
	o := agentOpts(t, pki, cp.addr, j, idleExecutor(j))
	att := &fakeAttester{}
	o.Attester = att
	reports := make(chan *agentv1.TelemetryReport, 1)
	o.Telemetry = reports
	c := runClient(t, o)

	if st := c.Status(); st.Address != cp.addr || st.Connected || st.Reconnects != 0 {
		t.Fatalf("status before any answer = %+v", st)
	}
	s := cp.nextStream(t)
	s.await(t, "the first observed state", isObserved)
	if c.Status().Connected {
		t.Fatal("connected before the control plane said anything")
	}
	s.push(ack(0))
	waitUntil(t, "connected", func() bool { return c.Status().Connected })
	if st := c.Status(); st.Since.IsZero() || st.LastError != "" {
		t.Fatalf("connected status = %+v", st)
	}

	// An answered challenge.
	s.push(&agentv1.SessionResponse{Msg: &agentv1.SessionResponse_Challenge{Challenge: &agentv1.Challenge{Nonce: []byte{0xde, 0xad, 0xbe, 0xef, 0x01, 0x02}}}})
	waitUntil(t, "the challenge recorded", func() bool { return c.Status().Challenge.OK })
	if ch := c.Status().Challenge; ch.NoncePrefix != "deadbeef" || ch.Error != "" || ch.Time.IsZero() {
		t.Fatalf("challenge status = %+v", ch)
	}
	// One the attester could not answer.
	att.mu.Lock()
	att.fail = true
	att.mu.Unlock()
	s.push(&agentv1.SessionResponse{Msg: &agentv1.SessionResponse_Challenge{Challenge: &agentv1.Challenge{Nonce: []byte{0x0a, 0x0b}}}})
	waitUntil(t, "the failed challenge recorded", func() bool { return c.Status().Challenge.NoncePrefix == "0a0b" })
	if ch := c.Status().Challenge; ch.OK || ch.Error != "evidence unavailable" {
		t.Fatalf("failed challenge status = %+v", ch)
	}

	// A telemetry report: its sequence comes from the signed payload.
	payload, err := proto.Marshal(&agentv1.TelemetryPayload{NodeId: "node-a", KeyId: []byte("k"), Sequence: 42})
	if err != nil {
		t.Fatal(err)
	}
	reports <- &agentv1.TelemetryReport{Payload: payload, Signature: []byte("sig")}
	s.await(t, "the telemetry report", func(m *agentv1.SessionRequest) bool { return m.GetTelemetry() != nil })
	waitUntil(t, "the telemetry recorded", func() bool { return c.Status().Telemetry.Sequence == 42 })

	// The control plane goes away: disconnected, with the reason.
	cp.stop()
	waitUntil(t, "disconnected", func() bool { st := c.Status(); return !st.Connected && st.Reconnects >= 1 })
	if st := c.Status(); st.LastError == "" || st.LastErrorTime.IsZero() || st.Challenge.NoncePrefix != "0a0b" {
		t.Fatalf("status after the control plane left = %+v", st)
	}
}
