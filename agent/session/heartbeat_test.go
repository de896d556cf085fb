package session_test

import (
	"context"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gpuaas/gpuaas/agent/session"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
)

// The control plane sets the heartbeat interval (its TTL grows with the
// fleet); the agent clamps it to [1s, 10m] and beats at it.
func TestHeartbeatIntervalFollowsTheControlPlane(t *testing.T) {
	pki := devPKI(t)
	cp := startFakeControlPlane(t, pki, pki.ControlPlane, "127.0.0.1:0")
	j := openJournal(t)
	o := agentOpts(t, pki, cp.addr, j, idleExecutor(j))
	o.Heartbeat = time.Hour // it would never beat on its own
	c := session.New(o)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run = %v", err)
		}
	})
	s := cp.nextStream(t)
	s.await(t, "an observed-state report", isObserved)
	if c.Status().HeartbeatInterval != 0 {
		t.Fatalf("interval %v before the control plane set one", c.Status().HeartbeatInterval)
	}
	// Below the floor: clamped to 1s.
	s.push(desired(&agentv1.DesiredState{Generation: 1, HeartbeatInterval: durationpb.New(time.Millisecond)}))
	s.await(t, "a heartbeat at the interval the control plane set", func(m *agentv1.SessionRequest) bool { return m.GetHeartbeat() != nil })
	if got := c.Status().HeartbeatInterval; got != time.Second {
		t.Fatalf("interval %v, want 1s (clamped)", got)
	}
	s.push(desired(&agentv1.DesiredState{Generation: 2, HeartbeatInterval: durationpb.New(time.Hour)}))
	waitUntil(t, "the interval clamped to 10m", func() bool { return c.Status().HeartbeatInterval == 10*time.Minute })
}
