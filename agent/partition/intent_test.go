package partition_test

import (
	"encoding/binary"
	"errors"
	"path/filepath"
	"slices"
	"testing"

	bolt "go.etcd.io/bbolt"

	"github.com/gpuaas/gpuaas/agent/partition"
	"github.com/gpuaas/gpuaas/pkg/mig"
)

func TestOpenIntentLogRefusesASecondAgent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "partition-intents.db")
	first, err := partition.OpenIntentLog(path)
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()

	_, err = partition.OpenIntentLog(path)

	if !errors.Is(err, partition.ErrIntentLogLocked) {
		t.Errorf("second OpenIntentLog = %v, want %v", err, partition.ErrIntentLogLocked)
	}
}

func TestOpenIntentLogRefusesANewerSchema(t *testing.T) {
	path := filepath.Join(t.TempDir(), "partition-intents.db")
	l, err := partition.OpenIntentLog(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte("meta")).Put([]byte("schema_version"), binary.BigEndian.AppendUint64(nil, 2))
	})
	if err != nil {
		t.Fatal(err)
	}
	db.Close()

	if l, err := partition.OpenIntentLog(path); err == nil {
		l.Close()
		t.Fatal("OpenIntentLog accepted a journal of schema 2")
	}
}

// Every mutating call must find its intent journaled, pending, before it
// is made: that is what lets Recover repair a kill right after the call.
func TestEveryCallIsJournaledBeforeItIsMade(t *testing.T) {
	g := newRig(t, false, h200s(2, false)...)
	a, b := g.uuids[0], g.uuids[1]
	if _, err := g.sim.SetMIGMode(t.Context(), b, true); err != nil {
		t.Fatal(err)
	}
	if err := g.sim.ResetGPU(b); err != nil {
		t.Fatal(err)
	}
	g.seed(b, false, inst(mig.Profile1g, 0, 1), inst(mig.Profile1g, 1, 1))
	ops := map[string]partition.Op{
		"SetMIGMode": partition.OpSetMIGMode, "Reset": partition.OpReset,
		"CreateGPUInstance": partition.OpCreateGI, "CreateComputeInstance": partition.OpCreateCI,
		"DestroyGPUInstance": partition.OpDestroyGI, "DestroyComputeInstance": partition.OpDestroyCI,
	}
	seen := 0
	g.rec.onCall = func(c call) {
		seen++
		o, err := g.log.Outstanding()
		if err != nil {
			t.Errorf("Outstanding during %s: %v", c.Op, err)
			return
		}
		if _, ok := o.Plans[c.GPU]; !ok {
			t.Errorf("%s on %s without a journaled plan", c.Op, c.GPU)
		}
		intents := o.Intents[c.GPU]
		if len(intents) == 0 {
			t.Errorf("%s on %s with no intent journaled", c.Op, c.GPU)
			return
		}
		last := intents[len(intents)-1]
		if last.Done || last.Op != ops[c.Op] {
			t.Errorf("%s on %s: last intent %+v, want a pending %s", c.Op, c.GPU, last, ops[c.Op])
		}
		switch c.Op {
		case "CreateGPUInstance":
			if last.Profile != c.Profile || last.Placement != c.Placement || last.GIID != -1 {
				t.Errorf("intent %+v, want profile %d at %s", last, c.Profile, c.Placement)
			}
		case "CreateComputeInstance", "DestroyComputeInstance", "DestroyGPUInstance":
			if last.GIID != c.GIID {
				t.Errorf("intent %+v, want gi %d", last, c.GIID)
			}
		}
		for _, in := range intents[:len(intents)-1] {
			if !in.Done {
				t.Errorf("intent %+v still pending when the next call is made", in)
			}
		}
	}

	g.reconcile(
		partition.Desired{GPUUUID: a, MIGEnabled: true, Instances: []mig.Instance{inst(mig.Profile3g, 0, 4), inst(mig.Profile3g, 4, 4)}},
		partition.Desired{GPUUUID: b, MIGEnabled: true, Instances: []mig.Instance{inst(mig.Profile2g, 0, 2)}},
	)

	if want := 1 + 1 + 4 + 2 + 2 + 2; seen != want {
		t.Errorf("%d calls seen, want %d", seen, want)
	}
	if o, err := g.log.Outstanding(); err != nil || !o.Empty() {
		t.Errorf("journal after the apply = %+v, %v; want empty", o, err)
	}
}

// killAt runs a Reconcile that the recorder kills after call n, then
// restarts the agent.
func (g *rig) killAt(n int, desired ...partition.Desired) {
	g.t.Helper()
	g.rec.killAfter = n
	func() {
		defer func() {
			if p := recover(); p == nil {
				g.t.Fatalf("the agent was not killed at call %d", n)
			} else if _, ok := p.(killed); !ok {
				panic(p)
			}
		}()
		_, _ = g.r.Reconcile(g.t.Context(), desired, g.isProtected)
	}()
	g.restart()
}

func TestRecoverAdoptsAnInstanceCreatedBeforeTheKill(t *testing.T) {
	g := newRig(t, true, h200s(1, true)...)
	uuid := g.uuids[0]
	want := inst(mig.Profile3g, 4, 4)
	// Killed right after CreateGPUInstance: the instance exists, has no
	// compute instance, and the journal says only "pending".
	g.killAt(1, partition.Desired{GPUUUID: uuid, MIGEnabled: true, Instances: []mig.Instance{want}})
	if got := g.layout(uuid); got[want].cis != 0 || len(got) != 1 {
		t.Fatalf("after the kill the gpu holds %v, want a bare %v", got, want)
	}
	o, err := g.log.Outstanding()
	if err != nil || len(o.Intents[uuid]) != 1 || o.Intents[uuid][0].Done {
		t.Fatalf("journal after the kill = %+v, %v; want the pending create", o, err)
	}

	rep, err := g.r.Recover(t.Context(), nil)

	if err != nil {
		t.Fatalf("Recover: %v", err)
	}
	g.requireLayout(uuid, []mig.Instance{want})
	if gr, _ := rep.GPU(uuid); !sameInstances(refInstances(gr.Adopted), []mig.Instance{want}) {
		t.Errorf("report adopted %v, want %v", gr.Adopted, want)
	}
	if got := countOps(g.rec.taken()); !maps1(got, "CreateComputeInstance", 1) {
		t.Errorf("Recover calls %v, want one CreateComputeInstance", got)
	}
}

func maps1(m map[string]int, k string, v int) bool { return len(m) == 1 && m[k] == v }

func TestReconcileAfterAKillDestroysWhatIsNoLongerDesired(t *testing.T) {
	g := newRig(t, true, h200s(1, true)...)
	uuid := g.uuids[0]
	first := inst(mig.Profile7g, 0, 8)
	g.killAt(1, partition.Desired{GPUUUID: uuid, MIGEnabled: true, Instances: []mig.Instance{first}})

	// While the agent was down the desired state changed.
	then := []mig.Instance{inst(mig.Profile3g, 0, 4), inst(mig.Profile2g, 4, 2)}
	rep := g.reconcile(partition.Desired{GPUUUID: uuid, MIGEnabled: true, Instances: then})

	g.requireLayout(uuid, then)
	gr, _ := rep.GPU(uuid)
	if !sameInstances(refInstances(gr.Destroyed), []mig.Instance{first}) || !sameInstances(refInstances(gr.Created), then) {
		t.Errorf("report destroyed %v created %v, want %v destroyed and %v created", gr.Destroyed, gr.Created, first, then)
	}
}

func TestRecoverCompletesAnIntendedDestroy(t *testing.T) {
	g := newRig(t, true, h200s(1, true)...)
	uuid := g.uuids[0]
	old := inst(mig.Profile4g, 0, 4)
	g.seed(uuid, false, old)
	// Killed after DestroyComputeInstance: a bare GPU instance is left.
	g.killAt(1, partition.Desired{GPUUUID: uuid, MIGEnabled: true})

	rep, err := g.r.Recover(t.Context(), nil)

	if err != nil {
		t.Fatalf("Recover: %v", err)
	}
	g.requireLayout(uuid, []mig.Instance{})
	if gr, _ := rep.GPU(uuid); !sameInstances(refInstances(gr.Destroyed), []mig.Instance{old}) {
		t.Errorf("report destroyed %v, want %v", gr.Destroyed, old)
	}
}

func TestRecoverLeavesALeasedInstanceAlone(t *testing.T) {
	g := newRig(t, true, h200s(1, true)...)
	uuid := g.uuids[0]
	want := inst(mig.Profile2g, 2, 2)
	g.killAt(2, partition.Desired{GPUUUID: uuid, MIGEnabled: true, Instances: []mig.Instance{want}})
	// Something (a lease) now holds the instance the apply made.
	gi := g.lease(uuid, want, 42)
	n := len(g.rec.taken())

	rep, err := g.r.Recover(t.Context(), g.isProtected)

	if err != nil {
		t.Fatalf("Recover: %v", err)
	}
	if calls := g.rec.taken()[n:]; len(calls) != 0 {
		t.Errorf("Recover made calls %v on a leased instance", calls)
	}
	gr, _ := rep.GPU(uuid)
	if !slices.ContainsFunc(gr.Untouched, func(r partition.InstanceRef) bool { return r.GIID == gi }) {
		t.Errorf("report untouched %v, want gi %d", gr.Untouched, gi)
	}
	if o, err := g.log.Outstanding(); err != nil || !o.Empty() {
		t.Errorf("journal after Recover = %+v, %v; want empty", o, err)
	}
}

func TestRecoverWithNothingOutstandingDoesNothing(t *testing.T) {
	g := newRig(t, true, h200s(2, true)...)
	g.seed(g.uuids[0], true, inst(mig.Profile1g, 3, 1)) // not the reconciler's: not its to repair

	rep, err := g.r.Recover(t.Context(), nil)

	if err != nil || len(rep.GPUs) != 0 {
		t.Errorf("Recover = %+v, %v; want an empty report", rep, err)
	}
	if calls := g.rec.taken(); len(calls) != 0 {
		t.Errorf("Recover made calls %v", calls)
	}
}
