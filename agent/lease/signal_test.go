package lease

import (
	"testing"

	"github.com/gpuaas/gpuaas/pkg/mig"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// A workload the kernel kills (here the OOM killer, over its memory
// limit) fails its lease with the signal, not a bare exit code.
func TestExecutorReportsTheSignalThatKilledTheWorkload(t *testing.T) {
	r := newRig(t)
	ex := r.start()
	// tail buffers /dev/zero (no newline ever) until the 16 MiB limit.
	l := r.lease(mig.Profile1g, at(2, 1), "tail", "/dev/zero")
	l.Spec.Workload.Resources = &leasev1.Resources{MemoryBytes: 16 << 20}
	r.desire(ex, l)
	rec := r.waitPhase(l.GetId(), leasev1.Phase_PHASE_FAILED)
	if rec.Reason != "killed by signal 9" || rec.ExitCode != 137 {
		t.Fatalf("record: reason %q exit %d, want killed by signal 9 (137)", rec.Reason, rec.ExitCode)
	}
	_, ol := observed(t, ex.Executor, l.GetId())
	if ol.GetStatus().GetExitSignal() != 9 || !ol.GetStatus().GetExited() {
		t.Fatalf("observed status = %v", ol.GetStatus())
	}
}

func TestSignalOf(t *testing.T) {
	for code, want := range map[uint32]int{0: 0, 1: 0, 3: 0, 128: 0, 129: 1, 137: 9, 143: 15, 192: 64, 193: 0, 255: 0} {
		if got := signalOf(code); got != want {
			t.Errorf("signalOf(%d) = %d, want %d", code, got, want)
		}
	}
}
