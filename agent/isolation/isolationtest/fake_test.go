package isolationtest

import (
	"context"
	"errors"
	"testing"

	"github.com/gpuaas/gpuaas/agent/isolation"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestFakeKeepsTheContract runs the conformance suite on Fake (the
// Enforcer runs it in agent/isolation, as root).
func TestFakeKeepsTheContract(t *testing.T) {
	Run(t, func(t *testing.T) isolation.Fencer {
		f := NewFake()
		t.Cleanup(func() { f.Close() })
		return f
	}, func(t *testing.T) string { return t.TempDir() })
}

// TestFakeInjectsFailuresAndEvents shows the Fake's test hooks: a failed
// Fence records nothing, and Deny reaches the Events reader.
func TestFakeInjectsFailuresAndEvents(t *testing.T) {
	f := NewFake()
	defer f.Close()
	f.Fail = func(op, _ string) error {
		if op == "fence" {
			return isolation.ErrAttach
		}
		return nil
	}
	if _, err := f.Fence("lease-1", t.TempDir(), isolation.Policy{}); !errors.Is(err, isolation.ErrAttach) {
		t.Errorf("Fence: %v, want ErrAttach", err)
	}
	if ls, _ := f.Leases(); len(ls) != 0 {
		t.Errorf("a failed Fence recorded %v", ls)
	}
	ctx, cancel := context.WithCancel(context.Background())
	events, err := f.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	f.Deny(isolation.DenyEvent{LeaseID: "lease-1", Kind: isolation.KindDevice})
	if ev := <-events; ev.LeaseID != "lease-1" {
		t.Errorf("event %+v", ev)
	}
	cancel()
	for range events {
	}
	f.Close()
	if _, err := f.Fence("lease-1", t.TempDir(), isolation.Policy{}); !errors.Is(err, isolation.ErrClosed) {
		t.Errorf("Fence after Close: %v, want ErrClosed", err)
	}
}
