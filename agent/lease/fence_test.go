package lease

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/gpuaas/gpuaas/pkg/mig"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// Fail closed: when the host cannot fence (no cgroup BPF, no bpffs), a
// lease never starts; it fails with the reason, its container is removed
// before its first instruction and its partition released.
func TestExecutorNeverStartsALeaseItCannotFence(t *testing.T) {
	r := newRig(t)
	opts := r.options()
	opts.FenceUnavailable = errors.New("kernel lacks cgroup BPF")
	ex := &running{Executor: New(opts), done: make(chan error, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	ex.cancel = cancel
	go func() { ex.done <- ex.Run(ctx) }()
	t.Cleanup(func() { ex.stop(t) })

	l := r.lease(mig.Profile1g, at(0, 1), "sh", "-c", "echo ran; sleep 60")
	r.desire(ex, l)
	rec := r.waitPhase(l.GetId(), leasev1.Phase_PHASE_FAILED)
	if !strings.HasPrefix(rec.Reason, "fence:") {
		t.Fatalf("reason = %q", rec.Reason)
	}
	for _, a := range r.actions(l.GetId()) {
		if a == "container.start" {
			t.Fatal("an unfenced container was started")
		}
	}
	if cs := r.containers(); len(cs) != 0 {
		t.Fatalf("containers left: %v", cs)
	}
	if gis := r.gpuInstances(); len(gis) != 0 {
		t.Fatalf("partition left: %v", gis)
	}
}
