package lease

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/agent/runtime"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/mig"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	"github.com/gpuaas/gpuaas/test/harness"
)

// What a restarted or interrupted agent finds, and what it does about it.

func TestExecutorRestartAdoptsTheRunningContainer(t *testing.T) {
	r := newRig(t)
	first := r.start()
	l := r.lease(mig.Profile2g, at(0, 2), sleeper...)
	cid := ContainerID(l.GetId())
	r.desire(first, l)
	before := r.waitPhase(l.GetId(), leasev1.Phase_PHASE_RUNNING)
	stBefore, err := r.status(cid)
	if err != nil || stBefore.State != runtime.StateRunning || stBefore.Pid == 0 {
		t.Fatalf("container before the restart = %+v, %v", stBefore, err)
	}

	// The agent exits: its journal and containerd connection close; the
	// container (a child of its shim) and the partition (held by the
	// driver) stay.
	first.stop(t)
	if err := r.journal.Close(); err != nil {
		t.Fatal(err)
	}
	if err := r.rt.Close(); err != nil {
		t.Fatal(err)
	}
	r.journal, r.rt, r.gpu = r.openJournal(), r.connect(), r.loadSim()
	second := r.start()
	// A second lease shows that the new executor is converging.
	witness := r.lease(mig.Profile1g, at(4, 1), sleeper...)
	r.desire(second, l, witness)
	r.waitPhase(witness.GetId(), leasev1.Phase_PHASE_RUNNING)
	second.stop(t) // every converge step it started has returned

	stAfter, err := r.status(cid)
	if err != nil || stAfter.State != runtime.StateRunning || stAfter.Pid != stBefore.Pid {
		t.Errorf("container after the restart = %+v, %v; want the same task (pid %d) still running", stAfter, err, stBefore.Pid)
	}
	if got, want := r.containers(), []string{cid, ContainerID(witness.GetId())}; !slices.Equal(got, sorted(want)) {
		t.Errorf("containers = %v, want %v", got, sorted(want))
	}
	gis := r.gpuInstances()
	if len(gis) != 2 || !slices.ContainsFunc(gis, func(gi gpu.GPUInstance) bool { return gi.ID == before.GIID && gi.Placement == at(0, 2) }) {
		t.Errorf("gpu instances = %v, want the lease's gi %d and the witness's", gis, before.GIID)
	}
	if got := r.actions(l.GetId()); !slices.Equal(got, []string{"partition.create", "container.start"}) {
		t.Errorf("audit events = %v, want one partition.create and one container.start in all", got)
	}
	after, _ := r.record(l.GetId())
	if after.Phase != leasev1.Phase_PHASE_RUNNING || after.GIID != before.GIID || after.MIGUUID != before.MIGUUID || !after.StartTime.Equal(before.StartTime) {
		t.Errorf("record after the restart = %+v, want it as before: %+v", after, before)
	}

	// The adopted lease is the new agent's to end.
	third := r.start()
	r.desire(third, witness)
	ended := r.waitPhase(l.GetId(), leasev1.Phase_PHASE_TERMINATED)
	if ended.Reason != "cancelled" {
		t.Errorf("reason = %q, want cancelled", ended.Reason)
	}
	if got := r.containers(); !slices.Equal(got, []string{ContainerID(witness.GetId())}) {
		t.Errorf("containers = %v, want only the witness's", got)
	}
	if slices.ContainsFunc(r.gpuInstances(), func(gi gpu.GPUInstance) bool { return gi.ID == before.GIID }) {
		t.Errorf("gpu instance %d of the cancelled lease still exists", before.GIID)
	}
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}

func TestExecutorAdoptsAPartitionCreatedBeforeACrash(t *testing.T) {
	r := newRig(t)
	l := r.lease(mig.Profile3g, at(4, 4), sleeper...)
	// The agent created the GPU instance and died before journaling it:
	// the driver has it, the journal knows only the desired lease.
	gi, err := r.gpu.CreateGPUInstance(context.Background(), r.gpuUUID, mig.Profile3g, at(4, 4))
	if err != nil {
		t.Fatal(err)
	}
	ex := r.start()

	r.desire(ex, l)

	rec := r.waitPhase(l.GetId(), leasev1.Phase_PHASE_RUNNING)
	if rec.GIID != gi.ID {
		t.Errorf("lease runs on gi %d, want the existing gi %d", rec.GIID, gi.ID)
	}
	if gis := r.gpuInstances(); len(gis) != 1 || gis[0] != gi {
		t.Errorf("gpu instances = %v, want only %v", gis, gi)
	}
}

func TestExecutorRemovesContainersNoLeaseAccountsFor(t *testing.T) {
	r := newRig(t)
	orphan, ended := newLeaseID(), newLeaseID()
	for _, id := range []string{orphan, ended} {
		spec := runtime.Spec{ID: ContainerID(id), LeaseID: id, Tenant: "tenant-a", Image: testImage, Args: sleeper,
			LogPath: filepath.Join(r.logDir, id+".log")}
		if _, err := r.rt.Create(context.Background(), spec); err != nil {
			t.Fatalf("create %s: %v", spec.ID, err)
		}
		if st, err := r.rt.Start(context.Background(), spec.ID); err != nil || st.State != runtime.StateRunning {
			t.Fatalf("start %s: %+v, %v", spec.ID, st, err)
		}
	}
	// One lease the journal has never heard of; one it has already ended.
	if err := r.journal.Put(Record{LeaseID: ended, Phase: leasev1.Phase_PHASE_TERMINATED, Reason: "cancelled", ContainerID: ContainerID(ended)}); err != nil {
		t.Fatal(err)
	}

	r.start()

	r.waitFor("the orphans to be removed", func() (bool, string) {
		got := r.containers()
		return len(got) == 0, fmt.Sprint(got)
	})
	for _, id := range []string{orphan, ended} {
		r.waitFor("the removal of "+id+" to be audited", func() (bool, string) {
			got := r.actions(id)
			return slices.Equal(got, []string{"container.orphan_removed"}), fmt.Sprint(got)
		})
		e := r.events(id)[0]
		if e.GetResource() != "container/"+ContainerID(id) || e.GetOutcome() != auditlog.OutcomeSuccess {
			t.Errorf("orphan event = %v, want a success on container/%s", e, ContainerID(id))
		}
	}
	if _, ok := r.record(orphan); ok {
		t.Error("the executor journaled a lease for an orphan; it must only remove it")
	}
}

func TestExecutorFailsALeaseWhoseImageIsMissing(t *testing.T) {
	r := newRig(t)
	ex := r.start()
	l := r.lease(mig.Profile3g, at(0, 4), sleeper...)
	l.Spec.Workload.Image = "localhost/gpuaas/absent:nope"

	r.desire(ex, l)

	rec := r.waitPhase(l.GetId(), leasev1.Phase_PHASE_FAILED)
	// Not in containerd, and its registry (localhost:80) does not answer:
	// retried a few passes, then the lease fails with the reason.
	const reason = "image: image unavailable"
	if rec.Reason != reason || rec.HasGI || rec.HasCI {
		t.Errorf("record = %+v, want FAILED %q with the partition released", rec, reason)
	}
	if got := r.gpuInstances(); len(got) != 0 {
		t.Errorf("gpu instances = %v, want none left", got)
	}
	if got := r.containers(); len(got) != 0 {
		t.Errorf("containers = %v, want none", got)
	}
	var failure, destroyed bool
	for _, e := range r.events(l.GetId()) {
		switch e.GetAction() {
		case "lease.provision":
			failure = e.GetOutcome() == auditlog.OutcomeFailure && e.GetReason() == reason
		case "partition.destroy":
			destroyed = true
		case "container.start":
			t.Errorf("audit event %v: nothing was started", e)
		}
	}
	if !failure || !destroyed {
		t.Errorf("audit events = %v, want a lease.provision failure %q and partition.destroy", r.actions(l.GetId()), reason)
	}
	_, ol := observed(t, ex.Executor, l.GetId())
	if ol.GetPhase() != leasev1.Phase_PHASE_FAILED || ol.GetReason() != reason {
		t.Errorf("observed = %v, want FAILED %q", ol, reason)
	}
}

func TestExecutorAuditsNoContainerStopForAContainerThatNeverExisted(t *testing.T) {
	r := newRig(t)
	ex := r.start()
	l := r.lease(mig.Profile1g, at(0, 1), sleeper...)
	l.Spec.Workload.Image = "localhost/gpuaas/absent:nope"

	r.desire(ex, l)

	r.waitPhase(l.GetId(), leasev1.Phase_PHASE_FAILED)
	if got := r.actions(l.GetId()); !slices.Equal(got, []string{"partition.create", "lease.provision", "partition.destroy"}) {
		t.Errorf("audit events = %v, want partition.create, lease.provision, partition.destroy: the audit log must not record a stop of a container that was never created", got)
	}
}

func TestExecutorFailsALeaseWhosePlacementIsTaken(t *testing.T) {
	r := newRig(t)
	// An operator made a partition by hand where the lease is placed.
	foreign, err := r.gpu.CreateGPUInstance(context.Background(), r.gpuUUID, mig.Profile3g, at(0, 4))
	if err != nil {
		t.Fatal(err)
	}
	ex := r.start()
	l := r.lease(mig.Profile1g, at(2, 1), sleeper...)

	r.desire(ex, l)

	rec := r.waitPhase(l.GetId(), leasev1.Phase_PHASE_FAILED)
	const reason = "create partition: insufficient resources"
	if rec.Reason != reason || rec.HasGI {
		t.Errorf("record = %+v, want FAILED %q", rec, reason)
	}
	if gis := r.gpuInstances(); len(gis) != 1 || gis[0] != foreign {
		t.Errorf("gpu instances = %v, want the foreign %v untouched", gis, foreign)
	}
	if got := r.containers(); len(got) != 0 {
		t.Errorf("containers = %v, want none", got)
	}
	if got := r.actions(l.GetId()); !slices.Equal(got, []string{"lease.provision"}) {
		t.Errorf("audit events = %v, want only the lease.provision failure", got)
	}
}

// restartable is a containerd in a directory the test owns, so that it can
// stop and start again on the same socket, as a host's containerd does.
type restartable struct {
	t   *testing.T
	dir string
	cur *harness.Containerd
}

func newRestartable(t *testing.T) *restartable {
	t.Helper()
	harness.RequireRoot(t)
	// Short, so the socket path stays in the directory (and so the same).
	dir, err := os.MkdirTemp("/tmp", "ctrd-lease")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	c := &restartable{t: t, dir: dir}
	c.start()
	return c
}

func (c *restartable) start() {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	d, err := harness.StartContainerd(ctx, harness.Options{Dir: c.dir})
	if err != nil {
		c.t.Fatalf("start containerd: %v", err)
	}
	if c.cur != nil && d.Address() != c.cur.Address() {
		c.t.Fatalf("containerd restarted on %s, was %s", d.Address(), c.cur.Address())
	}
	c.cur = d
	c.t.Cleanup(func() {
		if err := d.Close(); err != nil {
			c.t.Errorf("close containerd: %v", err)
		}
	})
}

func (c *restartable) stop() {
	c.t.Helper()
	if err := c.cur.Close(); err != nil {
		c.t.Fatalf("stop containerd: %v", err)
	}
}

func TestExecutorRetriesWhileContainerdIsDown(t *testing.T) {
	ctrd := newRestartable(t)
	r := newRigAt(t, ctrd.cur.Address())
	ctrd.stop()
	ex := r.start()
	l := r.lease(mig.Profile1g, at(5, 1), sleeper...)

	r.desire(ex, l)

	r.waitFor("two failed attempts at the container", func() (bool, string) {
		n := r.logs.count("converge lease", l.GetId(), "will retry")
		return n >= 2, fmt.Sprintf("%d attempts", n)
	})
	rec, _ := r.record(l.GetId())
	if rec.Phase != leasev1.Phase_PHASE_PROVISIONING || !rec.HasCI {
		t.Errorf("while containerd is down: record = %+v, want PROVISIONING with its partition kept", rec)
	}

	ctrd.start()

	rec = r.waitPhase(l.GetId(), leasev1.Phase_PHASE_RUNNING)
	if gis := r.gpuInstances(); len(gis) != 1 || gis[0].ID != rec.GIID {
		t.Errorf("gpu instances = %v, want the lease's gi %d only", gis, rec.GIID)
	}
	if got := r.containers(); !slices.Equal(got, []string{ContainerID(l.GetId())}) {
		t.Errorf("containers = %v, want the lease's", got)
	}
	if got := r.actions(l.GetId()); !slices.Equal(got, []string{"partition.create", "container.start"}) {
		t.Errorf("audit events = %v, want one partition.create and one container.start despite the retries", got)
	}
	// Before this containerd's cleanup kills the container under it (and
	// through the runtime, so that its network is released too).
	ex.stop(t)
	if err := r.rt.Stop(context.Background(), ContainerID(l.GetId()), 0); err != nil {
		t.Errorf("stop the lease's container: %v", err)
	}
}

func TestExecutorKeepsTearingDownAnEndedLeaseUntilItsPartitionIsReleased(t *testing.T) {
	r := newRig(t)
	ex := r.start()
	l := r.lease(mig.Profile1g, at(6, 1), sleeper...)
	cid := ContainerID(l.GetId())
	r.desire(ex, l)
	rec := r.waitPhase(l.GetId(), leasev1.Phase_PHASE_RUNNING)
	st, err := r.status(cid)
	if err != nil || st.Pid == 0 {
		t.Fatalf("container status = %+v, %v", st, err)
	}
	// Something on the host holds the partition (the driver refuses to
	// destroy it: IN_USE) when the workload dies.
	const holder = 4242
	if err := r.gpu.AttachProcess(rec.MIGUUID, holder); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(int(st.Pid), syscall.SIGKILL); err != nil {
		t.Fatalf("kill the workload (pid %d): %v", st.Pid, err)
	}

	r.waitFor("the partition's destruction to be refused", func() (bool, string) {
		n := r.logs.count("converge lease", l.GetId(), "destroy partition")
		return n >= 1, fmt.Sprintf("%d refusals", n)
	})
	// The lease is still desired, but it has ended: however many passes
	// retry the teardown, the workload must not be started again.
	for range 20 {
		time.Sleep(resync)
		rec, _ := r.record(l.GetId())
		if rec.Phase != leasev1.Phase_PHASE_TERMINATING || len(r.containers()) != 0 {
			t.Fatalf("while the partition is held: record %+v, containers %v; want TERMINATING and no container", rec, r.containers())
		}
	}

	if err := r.gpu.DetachProcess(rec.MIGUUID, holder); err != nil {
		t.Fatal(err)
	}
	ended := r.waitPhase(l.GetId(), leasev1.Phase_PHASE_FAILED)
	if ended.Reason != "killed by signal 9" || ended.HasGI {
		t.Errorf("record = %+v, want FAILED killed by signal 9, partition released", ended)
	}
	if got := r.gpuInstances(); len(got) != 0 {
		t.Errorf("gpu instances = %v, want none", got)
	}
	if got := r.actions(l.GetId()); !slices.Equal(got, []string{"partition.create", "container.start", "container.stop", "partition.destroy"}) {
		t.Errorf("audit events = %v, want partition.create, container.start, container.stop, partition.destroy", got)
	}
}
