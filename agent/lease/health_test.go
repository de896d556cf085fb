package lease

import (
	"context"
	"strings"
	"testing"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/agent/gpu/health"
	"github.com/gpuaas/gpuaas/pkg/mig"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// An XID that needs a GPU reset makes the GPU ineligible: a lease placed
// there before the control plane heard of it fails instead of running a
// tenant on failing hardware, and creates no partition.
func TestExecutorRefusesAGPUTheHealthTrackerCondemned(t *testing.T) {
	r := newRig(t)
	tracker := health.NewTracker(health.Options{GPUs: []string{r.gpuUUID}})
	tracker.Observe(gpu.Event{Kind: gpu.EventXID, GPUUUID: r.gpuUUID, XID: 79, GPUInstanceID: gpu.WholeGPU, ComputeInstanceID: gpu.WholeGPU})
	if tracker.Eligible(r.gpuUUID, gpu.WholeGPU) {
		t.Fatal("XID 79 (fallen off the bus) left the GPU eligible")
	}
	opts := r.options()
	opts.Eligible = func(uuid string) bool { return tracker.Eligible(uuid, gpu.WholeGPU) }
	ex := &running{Executor: New(opts), done: make(chan error, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	ex.cancel = cancel
	go func() { ex.done <- ex.Run(ctx) }()
	t.Cleanup(func() { ex.stop(t) })

	l := r.lease(mig.Profile1g, at(0, 1), "sleep", "60")
	r.desire(ex, l)
	rec := r.waitPhase(l.GetId(), leasev1.Phase_PHASE_FAILED)
	if !strings.Contains(rec.Reason, "gpu unhealthy") {
		t.Fatalf("reason = %q", rec.Reason)
	}
	if gis := r.gpuInstances(); len(gis) != 0 {
		t.Fatalf("a partition was created on a condemned GPU: %v", gis)
	}
	if cs := r.containers(); len(cs) != 0 {
		t.Fatalf("containers: %v", cs)
	}
}
