package lease

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/agent/partition"
	"github.com/gpuaas/gpuaas/agent/runtime"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/mig"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// The executor tests run tenant containers on a real containerd; they need
// root (and fail in CI without it, see harness.RequireRoot).

func TestExecutorProvisionsALeaseOnItsPartition(t *testing.T) {
	r := newRig(t)
	ex := r.start()
	l := r.lease(mig.Profile3g, at(4, 4), "sh", "-c", "env; exec sleep 600")

	r.desire(ex, l)

	rec := r.waitPhase(l.GetId(), leasev1.Phase_PHASE_RUNNING)
	cid := ContainerID(l.GetId())
	if !rec.HasGI || !rec.HasCI || rec.GPUUUID != r.gpuUUID || !strings.HasPrefix(rec.MIGUUID, "MIG-") ||
		rec.ContainerID != cid || !rec.StartTime.Equal(r.clock.Now()) || !rec.NotAfter.Equal(l.GetNotAfter().AsTime()) {
		t.Errorf("journal record = %+v, want the partition, container %s, start time and not_after", rec, cid)
	}

	// The partition is at exactly the placement the control plane chose.
	gis := r.gpuInstances()
	want := gpu.GPUInstance{GPUUUID: r.gpuUUID, ID: rec.GIID, ProfileID: mig.Profile3g, Placement: at(4, 4)}
	if len(gis) != 1 || gis[0] != want {
		t.Errorf("gpu instances = %v, want only %v", gis, want)
	}
	dev, err := partition.Device(context.Background(), r.gpu, r.gpuUUID, rec.GIID, rec.CIID)
	if err != nil || dev.UUID != rec.MIGUUID {
		t.Errorf("MIG device of the journaled partition = %v, %v; want %s", dev.UUID, err, rec.MIGUUID)
	}

	// The container runs, bound to that partition.
	st, err := r.status(cid)
	if err != nil || st.State != runtime.StateRunning || st.LeaseID != l.GetId() {
		t.Errorf("container status = %+v, %v; want running for lease %s", st, err, l.GetId())
	}
	logPath := filepath.Join(r.logDir, l.GetId()+".log")
	wantEnv := runtime.EnvVisibleDevices + "=" + rec.MIGUUID
	r.waitFor("the workload's environment in its log", func() (bool, string) {
		b, err := os.ReadFile(logPath)
		return slices.Contains(strings.Split(string(b), "\n"), wantEnv), fmt.Sprintf("%q, %v", b, err)
	})

	// Each privileged step left its audit event.
	evs := r.events(l.GetId())
	if got := r.actions(l.GetId()); !slices.Equal(got, []string{"partition.create", "container.start"}) {
		t.Fatalf("audit events = %v, want partition.create, container.start", got)
	}
	for _, e := range evs {
		if e.GetOutcome() != auditlog.OutcomeSuccess || e.GetDetails()["mig_uuid"] != rec.MIGUUID || e.GetId() == "" || e.GetTime() == nil {
			t.Errorf("audit event %v: want a success with an id, a time and mig_uuid %s", e, rec.MIGUUID)
		}
	}
	if got := evs[0].GetResource(); got != fmt.Sprintf("gpu/%s/gi/%d", r.gpuUUID, rec.GIID) {
		t.Errorf("partition.create resource = %q", got)
	}
	if got := evs[1].GetResource(); got != "container/"+cid {
		t.Errorf("container.start resource = %q", got)
	}

	// And the report says so.
	select {
	case <-ex.Changes():
	default:
		t.Error("no change was signalled")
	}
	obs, ol := observed(t, ex.Executor, l.GetId())
	if obs.GetDesiredGeneration() != r.gen || obs.GetSequence() == 0 {
		t.Errorf("report sequence %d, desired generation %d; want a sequence and generation %d", obs.GetSequence(), obs.GetDesiredGeneration(), r.gen)
	}
	if ol.GetPhase() != leasev1.Phase_PHASE_RUNNING || ol.GetStatus().GetMigUuid() != rec.MIGUUID ||
		ol.GetStatus().GetContainerId() != cid || !ol.GetStatus().GetStartTime().AsTime().Equal(rec.StartTime) || ol.GetStatus().GetExited() {
		t.Errorf("observed lease = %v, want RUNNING on %s in %s", ol, rec.MIGUUID, cid)
	}
}

func TestExecutorCancelStopsTheContainerAndDestroysThePartition(t *testing.T) {
	r := newRig(t)
	ex := r.start()
	keep := r.lease(mig.Profile1g, at(0, 1), sleeper...)
	l := r.lease(mig.Profile2g, at(2, 2), sleeper...)
	r.desire(ex, keep, l)
	r.waitPhase(keep.GetId(), leasev1.Phase_PHASE_RUNNING)
	running := r.waitPhase(l.GetId(), leasev1.Phase_PHASE_RUNNING)

	r.desire(ex, keep) // the control plane cancelled l

	rec := r.waitPhase(l.GetId(), leasev1.Phase_PHASE_TERMINATED)
	if rec.Reason != "cancelled" || rec.HasGI || rec.HasCI || !rec.EndTime.Equal(r.clock.Now()) {
		t.Errorf("record = %+v, want TERMINATED cancelled, partition released, end time set", rec)
	}
	if got := r.containers(); !slices.Equal(got, []string{ContainerID(keep.GetId())}) {
		t.Errorf("containers = %v, want only the kept lease's %s", got, ContainerID(keep.GetId()))
	}
	for _, gi := range r.gpuInstances() {
		if gi.ID == running.GIID {
			t.Errorf("gpu instance %v of the cancelled lease still exists", gi)
		}
	}
	if got := len(r.gpuInstances()); got != 1 {
		t.Errorf("%d gpu instances, want the kept lease's one", got)
	}
	if got := r.actions(l.GetId()); !slices.Equal(got, []string{"partition.create", "container.start", "container.stop", "partition.destroy"}) {
		t.Errorf("audit events = %v, want partition.create, container.start, container.stop, partition.destroy", got)
	}
	for _, e := range r.events(l.GetId())[2:] {
		if e.GetReason() != "cancelled" || e.GetOutcome() != auditlog.OutcomeSuccess {
			t.Errorf("teardown event %v: want a success with reason cancelled", e)
		}
	}
	if st, err := r.status(ContainerID(keep.GetId())); err != nil || st.State != runtime.StateRunning {
		t.Errorf("kept lease's container = %+v, %v; want it still running", st, err)
	}
	_, ol := observed(t, ex.Executor, l.GetId())
	if ol.GetPhase() != leasev1.Phase_PHASE_TERMINATED || ol.GetReason() != "cancelled" || ol.GetStatus().GetEndTime() == nil {
		t.Errorf("observed = %v, want TERMINATED cancelled with an end time", ol)
	}
}

func TestExecutorEndsALeaseAtNotAfterOnItsOwnClock(t *testing.T) {
	r := newRig(t)
	ex := r.start()
	l := r.lease(mig.Profile1g, at(3, 1), sleeper...)
	r.desire(ex, l)
	r.waitPhase(l.GetId(), leasev1.Phase_PHASE_RUNNING)

	// No new desired state comes (the control plane is unreachable); the
	// agent's clock reaches not_after.
	r.clock.Set(l.GetNotAfter().AsTime())

	rec := r.waitPhase(l.GetId(), leasev1.Phase_PHASE_TERMINATED)
	if rec.Reason != "expired" || rec.HasGI {
		t.Errorf("record = %+v, want TERMINATED expired with the partition released", rec)
	}
	if got := r.containers(); len(got) != 0 {
		t.Errorf("containers = %v, want none", got)
	}
	if got := r.gpuInstances(); len(got) != 0 {
		t.Errorf("gpu instances = %v, want none", got)
	}
	if got := r.actions(l.GetId()); !slices.Equal(got, []string{"partition.create", "container.start", "container.stop", "partition.destroy"}) {
		t.Errorf("audit events = %v, want partition.create, container.start, container.stop, partition.destroy", got)
	}
	// The lease is still desired: the agent must not start it again.
	if d, _, _ := r.journal.Desired(); d[l.GetId()] == nil {
		t.Fatal("test setup: the lease left the desired set")
	}
	r.clock.Set(l.GetNotAfter().AsTime().Add(time.Hour))
	time.Sleep(10 * resync)
	if rec, _ := r.record(l.GetId()); rec.Phase != leasev1.Phase_PHASE_TERMINATED || len(r.containers()) != 0 || len(r.gpuInstances()) != 0 {
		t.Errorf("after more passes: record %+v, containers %v, gpu instances %v; want it to stay ended", rec, r.containers(), r.gpuInstances())
	}
}

func TestExecutorNeverStartsALeaseDesiredAfterItsEnd(t *testing.T) {
	r := newRig(t)
	ex := r.start()
	late := r.lease(mig.Profile1g, at(0, 1), sleeper...)
	r.clock.Set(late.GetNotAfter().AsTime().Add(time.Second))
	witness := r.lease(mig.Profile1g, at(1, 1), sleeper...)

	r.desire(ex, late, witness)

	rec := r.waitPhase(late.GetId(), leasev1.Phase_PHASE_TERMINATED)
	if rec.Reason != "expired" || rec.HasGI || rec.ContainerID != "" {
		t.Errorf("record = %+v, want TERMINATED expired without partition or container", rec)
	}
	r.waitPhase(witness.GetId(), leasev1.Phase_PHASE_RUNNING)
	if got := r.containers(); !slices.Equal(got, []string{ContainerID(witness.GetId())}) {
		t.Errorf("containers = %v, want only the witness's", got)
	}
	for _, gi := range r.gpuInstances() {
		if gi.Placement == at(0, 1) {
			t.Errorf("a partition %v was created for the expired lease", gi)
		}
	}
	if got := r.actions(late.GetId()); len(got) != 0 {
		t.Errorf("audit events for the expired lease = %v, want none: nothing was done", got)
	}
}

func TestExecutorEndsALeaseWhenItsWorkloadExits(t *testing.T) {
	r := newRig(t)
	ex := r.start()
	cases := []struct {
		name   string
		lease  *leasev1.Lease
		phase  leasev1.Phase
		reason string
		code   int32
	}{
		{"exit 0 terminates", r.lease(mig.Profile1g, at(0, 1), "sh", "-c", "exit 0"), leasev1.Phase_PHASE_TERMINATED, "exited with code 0", 0},
		{"exit 3 fails", r.lease(mig.Profile1g, at(1, 1), "sh", "-c", "exit 3"), leasev1.Phase_PHASE_FAILED, "exited with code 3", 3},
	}
	var leases []*leasev1.Lease
	for _, c := range cases {
		leases = append(leases, c.lease)
	}

	r.desire(ex, leases...)

	for _, c := range cases {
		// Not subtests: the rig fails the test from this goroutine.
		id := c.lease.GetId()
		rec := r.waitPhase(id, c.phase)
		if rec.Reason != c.reason || !rec.Exited || rec.ExitCode != c.code || rec.HasGI || rec.StartTime.IsZero() || rec.EndTime.IsZero() {
			t.Errorf("%s: record = %+v, want %s %q, exit code %d, partition released", c.name, rec, c.phase, c.reason, c.code)
		}
		if _, err := r.status(ContainerID(id)); !errors.Is(err, runtime.ErrNotFound) {
			t.Errorf("%s: container status = %v, want it deleted (%v)", c.name, err, runtime.ErrNotFound)
		}
		if got := r.actions(id); !slices.Equal(got, []string{"partition.create", "container.start", "container.stop", "partition.destroy"}) {
			t.Errorf("%s: audit events = %v, want partition.create, container.start, container.stop, partition.destroy", c.name, got)
		}
		_, ol := observed(t, ex.Executor, id)
		if ol.GetPhase() != c.phase || !ol.GetStatus().GetExited() || ol.GetStatus().GetExitCode() != c.code {
			t.Errorf("%s: observed = %v, want %s, exited with %d", c.name, ol, c.phase, c.code)
		}
	}
	if got := r.gpuInstances(); len(got) != 0 {
		t.Errorf("gpu instances = %v, want every partition released", got)
	}
}

func TestExecutorHonoursAnExtendedNotAfter(t *testing.T) {
	r := newRig(t)
	ex := r.start()
	extended := r.lease(mig.Profile1g, at(0, 1), sleeper...)
	witness := r.lease(mig.Profile1g, at(1, 1), sleeper...) // ends at the original time
	r.desire(ex, extended, witness)
	r.waitPhase(extended.GetId(), leasev1.Phase_PHASE_RUNNING)
	r.waitPhase(witness.GetId(), leasev1.Phase_PHASE_RUNNING)
	end := extended.GetNotAfter().AsTime()

	extended.NotAfter = timestamppb.New(end.Add(time.Hour))
	r.desire(ex, extended, witness)
	r.waitFor("the new not_after to be journaled", func() (bool, string) {
		rec, _ := r.record(extended.GetId())
		return rec.NotAfter.Equal(extended.GetNotAfter().AsTime()), rec.NotAfter.String()
	})
	r.clock.Set(end)

	r.waitPhase(witness.GetId(), leasev1.Phase_PHASE_TERMINATED)
	for range 10 {
		time.Sleep(resync)
		if rec, _ := r.record(extended.GetId()); rec.Phase != leasev1.Phase_PHASE_RUNNING {
			t.Fatalf("extended lease = %+v at its original end, want RUNNING", rec)
		}
	}
	r.clock.Set(end.Add(time.Hour))
	if rec := r.waitPhase(extended.GetId(), leasev1.Phase_PHASE_TERMINATED); rec.Reason != "expired" {
		t.Errorf("reason = %q at the extended end, want expired", rec.Reason)
	}
}
