package lease

import (
	"syscall"
	"testing"

	"github.com/gpuaas/gpuaas/pkg/mig"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// A workload the kernel's OOM killer ends (over its memory limit) fails
// its lease as oom-killed, told apart from any other SIGKILL; the status
// still carries the signal.
func TestExecutorReportsAnOOMKill(t *testing.T) {
	r := newRig(t)
	ex := r.start()
	// tail buffers /dev/zero (no newline ever) until the 16 MiB limit.
	l := r.lease(mig.Profile1g, at(2, 1), "tail", "/dev/zero")
	l.Spec.Workload.Resources = &leasev1.Resources{MemoryBytes: 16 << 20}
	r.desire(ex, l)
	rec := r.waitPhase(l.GetId(), leasev1.Phase_PHASE_FAILED)
	if rec.Reason != "oom-killed" || rec.ExitCode != 137 || !rec.OOMKilled {
		t.Fatalf("record: reason %q exit %d oom %t, want oom-killed (137)", rec.Reason, rec.ExitCode, rec.OOMKilled)
	}
	_, ol := observed(t, ex.Executor, l.GetId())
	if st := ol.GetStatus(); st.GetExitSignal() != 9 || !st.GetExited() || !st.GetOomKilled() {
		t.Fatalf("observed status = %v, want exited by signal 9, oom_killed", st)
	}
}

// A workload killed with SIGKILL by someone else (not the OOM killer)
// fails its lease with the signal and oom_killed false.
func TestExecutorReportsTheSignalThatKilledTheWorkload(t *testing.T) {
	r := newRig(t)
	ex := r.start()
	l := r.lease(mig.Profile1g, at(2, 1), sleeper...)
	l.Spec.Workload.Resources = &leasev1.Resources{MemoryBytes: 16 << 20}
	r.desire(ex, l)
	r.waitPhase(l.GetId(), leasev1.Phase_PHASE_RUNNING)
	st, err := r.status(ContainerID(l.GetId()))
	if err != nil || st.Pid == 0 {
		t.Fatalf("status = %+v, %v", st, err)
	}
	if err := syscall.Kill(int(st.Pid), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	rec := r.waitPhase(l.GetId(), leasev1.Phase_PHASE_FAILED)
	if rec.Reason != "killed by signal 9" || rec.ExitCode != 137 || rec.OOMKilled {
		t.Fatalf("record: reason %q exit %d oom %t, want killed by signal 9 (137), not oom", rec.Reason, rec.ExitCode, rec.OOMKilled)
	}
	_, ol := observed(t, ex.Executor, l.GetId())
	if st := ol.GetStatus(); st.GetExitSignal() != 9 || !st.GetExited() || st.GetOomKilled() {
		t.Fatalf("observed status = %v", st)
	}
}

func TestSignalOf(t *testing.T) {
	for code, want := range map[uint32]int{0: 0, 1: 0, 3: 0, 128: 0, 129: 1, 137: 9, 143: 15, 192: 64, 193: 0, 255: 0} {
		if got := signalOf(code); got != want {
			t.Errorf("signalOf(%d) = %d, want %d", code, got, want)
		}
	}
}
