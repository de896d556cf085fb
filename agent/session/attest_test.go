package session_test

import (
	"bytes"
	"context"
	"errors"
	"sync"
	"testing"

	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
)

// fakeAttester answers with the nonce it was given, or fails.
type fakeAttester struct {
	mu     sync.Mutex
	nonces [][]byte
	fail   bool
}

func (a *fakeAttester) Respond(_ context.Context, nonce []byte) (*agentv1.ChallengeResponse, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.nonces = append(a.nonces, nonce)
	if a.fail {
		return nil, errors.New("evidence unavailable")
	}
	return &agentv1.ChallengeResponse{Nonce: nonce, Report: append([]byte("report for "), nonce...), Signature: []byte("sig")}, nil
}

// TestChallengesAreAnsweredAfterAFreshObservedState: each challenge gets
// one answer carrying its nonce, and an observed-state report goes out
// right before it, so the control plane judges the report against lease
// phases at least as new as the evidence.
func TestChallengesAreAnsweredAfterAFreshObservedState(t *testing.T) {
	pki := devPKI(t)
	cp := startFakeControlPlane(t, pki, pki.ControlPlane, "127.0.0.1:0")
	j := openJournal(t)
	o := agentOpts(t, pki, cp.addr, j, idleExecutor(j))
	att := &fakeAttester{}
	o.Attester = att
	runAgent(t, o)

	s := cp.nextStream(t)
	s.await(t, "the first observed state", isObserved)
	for _, nonce := range [][]byte{[]byte("nonce-one-0123456789"), []byte("nonce-two-0123456789")} {
		s.push(&agentv1.SessionResponse{Msg: &agentv1.SessionResponse_Challenge{Challenge: &agentv1.Challenge{Nonce: nonce}}})
		resp := s.await(t, "the answer to "+string(nonce), func(m *agentv1.SessionRequest) bool {
			return bytes.Equal(m.GetChallengeResponse().GetNonce(), nonce)
		}).GetChallengeResponse()
		if !bytes.Equal(resp.GetReport(), append([]byte("report for "), nonce...)) {
			t.Fatalf("answer carries report %q", resp.GetReport())
		}
		msgs := s.all()
		for i, m := range msgs {
			if bytes.Equal(m.GetChallengeResponse().GetNonce(), nonce) {
				if i == 0 || msgs[i-1].GetObserved() == nil {
					t.Fatalf("the answer to %s is not right after an observed-state report", nonce)
				}
			}
		}
	}
	// A challenge without a nonce is not answered.
	s.push(&agentv1.SessionResponse{Msg: &agentv1.SessionResponse_Challenge{Challenge: &agentv1.Challenge{}}})
	s.push(&agentv1.SessionResponse{Msg: &agentv1.SessionResponse_Challenge{Challenge: &agentv1.Challenge{Nonce: []byte("nonce-three-23456789")}}})
	s.await(t, "the third answer", func(m *agentv1.SessionRequest) bool {
		return m.GetChallengeResponse() != nil && string(m.GetChallengeResponse().GetNonce()) == "nonce-three-23456789"
	})
	att.mu.Lock()
	defer att.mu.Unlock()
	if len(att.nonces) != 3 {
		t.Fatalf("attester asked %d times, want 3 (the empty nonce refused)", len(att.nonces))
	}
}

// TestTelemetryReportsAreForwarded: what the sampler publishes goes out on
// the session as is.
func TestTelemetryReportsAreForwarded(t *testing.T) {
	pki := devPKI(t)
	cp := startFakeControlPlane(t, pki, pki.ControlPlane, "127.0.0.1:0")
	j := openJournal(t)
	o := agentOpts(t, pki, cp.addr, j, idleExecutor(j))
	reports := make(chan *agentv1.TelemetryReport, 1)
	o.Telemetry = reports
	runAgent(t, o)
	s := cp.nextStream(t)
	reports <- &agentv1.TelemetryReport{Payload: []byte("payload-1"), Signature: []byte("sig-1")}
	got := s.await(t, "a telemetry report", func(m *agentv1.SessionRequest) bool { return m.GetTelemetry() != nil }).GetTelemetry()
	if string(got.GetPayload()) != "payload-1" || string(got.GetSignature()) != "sig-1" {
		t.Fatalf("telemetry sent = %v", got)
	}
}
