package session_test

import (
	"context"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/gpuaas/gpuaas/agent/gpu/sim"
	"github.com/gpuaas/gpuaas/agent/lease"
	"github.com/gpuaas/gpuaas/agent/runtime"
	"github.com/gpuaas/gpuaas/agent/session"
	"github.com/gpuaas/gpuaas/pkg/identity"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// The executor is built but not run in most tests: the session only hands
// it desired state and asks it for reports, and a running executor would
// converge leases on the host.
func idleExecutor(j *lease.Journal) *lease.Executor { return lease.New(lease.Options{Journal: j}) }

func testLease(id string, notAfter time.Time) *leasev1.Lease {
	return &leasev1.Lease{
		Id: id, Phase: leasev1.Phase_PHASE_SCHEDULED, NotAfter: timestamppb.New(notAfter),
		Spec: &leasev1.LeaseSpec{Tenant: "acme", Gpu: &leasev1.GpuRequest{Kind: &leasev1.GpuRequest_MigProfile{MigProfile: "1g.18gb"}},
			Workload: &leasev1.Workload{Image: "registry.test/train:1", Env: map[string]string{"TOKEN": "s3cret"}}},
		Placement: &leasev1.Placement{Node: "node-a", GpuUuid: testInventory().GetGpus()[0].GetUuid(), ProfileId: 19, Start: 0, Size: 1, MigProfile: "1g.18gb"},
	}
}

func TestHelloIsTheFirstMessageThenObservedState(t *testing.T) {
	pki := devPKI(t)
	cp := startFakeControlPlane(t, pki, pki.ControlPlane, "127.0.0.1:0")
	j := openJournal(t)
	runAgent(t, agentOpts(t, pki, cp.addr, j, idleExecutor(j)))

	s := cp.nextStream(t)
	if want := pki.Agents["node-a"].ID; s.peer != want {
		t.Errorf("the session's mTLS peer is %s, want the agent's SVID %s", s.peer, want)
	}
	obs := s.await(t, "an observed-state report", isObserved).GetObserved()
	msgs := s.all()
	hello := msgs[0].GetHello()
	if hello == nil {
		t.Fatalf("first message is %T, want a hello", msgs[0].GetMsg())
	}
	if hello.GetNodeId() != "node-a" || hello.GetAgentVersion() != agentVersion {
		t.Errorf("hello = node %q version %q, want node-a %s", hello.GetNodeId(), hello.GetAgentVersion(), agentVersion)
	}
	if !protoEqual(hello.GetInventory(), testInventory()) {
		t.Errorf("hello inventory = %v, want the inventory function's result %v", hello.GetInventory(), testInventory())
	}
	if msgs[1].GetObserved() == nil {
		t.Errorf("second message is %T, want the observed state right after hello", msgs[1].GetMsg())
	}
	if obs.GetSequence() == 0 || !protoEqual(obs.GetInventory(), testInventory()) {
		t.Errorf("observed = sequence %d inventory %v; want a numbered report with fresh inventory", obs.GetSequence(), obs.GetInventory())
	}
	for i, m := range msgs[1:] {
		if m.GetHello() != nil {
			t.Errorf("message %d is a second hello on the same stream", i+1)
		}
	}
}

func TestDesiredStateFromTheControlPlaneIsJournaled(t *testing.T) {
	pki := devPKI(t)
	cp := startFakeControlPlane(t, pki, pki.ControlPlane, "127.0.0.1:0")
	j := openJournal(t)
	runAgent(t, agentOpts(t, pki, cp.addr, j, idleExecutor(j)))
	s := cp.nextStream(t)
	s.await(t, "an observed-state report", isObserved)

	want := testLease("l-aaaaaaaaaaaaaaaaaaaa", time.Now().Add(time.Hour))
	s.push(desired(&agentv1.DesiredState{Generation: 7, Leases: []*leasev1.Lease{want}}))
	waitUntil(t, "desired generation 7 journaled", func() bool {
		_, gen, err := j.Desired()
		return err == nil && gen == 7
	})
	got, gen, err := j.Desired()
	if err != nil || gen != 7 || len(got) != 1 || !protoEqual(got[want.GetId()], want) {
		t.Fatalf("journal.Desired = %v gen %d, %v; want exactly the pushed lease at generation 7", got, gen, err)
	}
	// The next report says which generation the agent holds.
	s.await(t, "an observed report of generation 7", func(m *agentv1.SessionRequest) bool {
		return m.GetObserved().GetDesiredGeneration() == 7
	})

	// A stale desired state (an older generation) changes nothing. The ack
	// behind it is a barrier: messages are handled in order, so once the
	// acked event has left the outbox the stale state has been handled.
	if err := j.AddEvents(&agentv1.AuditEvent{Action: "barrier"}); err != nil {
		t.Fatal(err)
	}
	pending, _ := j.PendingEvents(10)
	s.push(desired(&agentv1.DesiredState{Generation: 3, Leases: []*leasev1.Lease{testLease("l-bbbbbbbbbbbbbbbbbbbb", time.Now().Add(time.Hour))}}))
	s.push(ack(0, pending[0].GetId()))
	waitUntil(t, "the barrier event acked", func() bool { p, err := j.PendingEvents(10); return err == nil && len(p) == 0 })
	got, gen, err = j.Desired()
	if err != nil || gen != 7 || len(got) != 1 || got[want.GetId()] == nil {
		t.Fatalf("after a stale generation 3: journal.Desired = %v gen %d, %v; want generation 7 kept", got, gen, err)
	}
}

func TestAckOfObservedSequencePrunesOnlyReportedUndesiredTerminalRecords(t *testing.T) {
	pki := devPKI(t)
	cp := startFakeControlPlane(t, pki, pki.ControlPlane, "127.0.0.1:0")
	j := openJournal(t)
	now := time.Now()
	put := func(id string, phase leasev1.Phase) {
		t.Helper()
		if err := j.Put(lease.Record{LeaseID: id, Phase: phase, Reason: "test", UpdateTime: now}); err != nil {
			t.Fatal(err)
		}
	}
	const (
		ended       = "l-endedaaaaaaaaaaaaaaa" // terminal, no longer desired: goes once acked
		stillWanted = "l-wantedaaaaaaaaaaaaaa" // terminal but still desired: stays
		running     = "l-runningaaaaaaaaaaaaa" // not terminal: stays
		later       = "l-lateraaaaaaaaaaaaaaa" // terminal, first reported in a later report
	)
	put(ended, leasev1.Phase_PHASE_TERMINATED)
	put(stillWanted, leasev1.Phase_PHASE_FAILED)
	put(running, leasev1.Phase_PHASE_RUNNING)
	if _, err := j.SetDesired(1, []*leasev1.Lease{testLease(stillWanted, now.Add(time.Hour))}); err != nil {
		t.Fatal(err)
	}
	runAgent(t, agentOpts(t, pki, cp.addr, j, idleExecutor(j)))
	s := cp.nextStream(t)

	first := s.await(t, "the first observed report", isObserved).GetObserved()
	phases := map[string]leasev1.Phase{}
	for _, l := range first.GetLeases() {
		phases[l.GetLeaseId()] = l.GetPhase()
	}
	if phases[ended] != leasev1.Phase_PHASE_TERMINATED || phases[stillWanted] != leasev1.Phase_PHASE_FAILED || phases[running] != leasev1.Phase_PHASE_RUNNING {
		t.Fatalf("first report carries %v; want every journaled lease with its phase", phases)
	}
	put(later, leasev1.Phase_PHASE_TERMINATED)
	second := s.await(t, "a report carrying the later lease", func(m *agentv1.SessionRequest) bool {
		return slices.ContainsFunc(m.GetObserved().GetLeases(), func(l *agentv1.ObservedLease) bool { return l.GetLeaseId() == later })
	}).GetObserved()
	if second.GetSequence() <= first.GetSequence() {
		t.Fatalf("report sequences %d then %d; want increasing", first.GetSequence(), second.GetSequence())
	}
	if recs, _ := j.Records(); len(recs) != 4 {
		t.Fatalf("records before any ack: %d, want 4 (nothing is pruned unacked)", len(recs))
	}

	// Acking the first report forgets only what it carried and is no longer desired.
	s.push(ack(first.GetSequence()))
	waitUntil(t, "the ended lease pruned", func() bool { _, ok, _ := j.Record(ended); return !ok })
	for _, id := range []string{stillWanted, running, later} {
		if _, ok, err := j.Record(id); !ok || err != nil {
			t.Errorf("after ack of report %d: record %s gone (%v); want it kept", first.GetSequence(), id, err)
		}
	}

	// Acking the report that first carried the later lease forgets it too.
	s.push(ack(second.GetSequence()))
	waitUntil(t, "the later lease pruned", func() bool { _, ok, _ := j.Record(later); return !ok })
	for _, id := range []string{stillWanted, running} {
		if _, ok, err := j.Record(id); !ok || err != nil {
			t.Errorf("after ack of report %d: record %s gone (%v); want it kept", second.GetSequence(), id, err)
		}
	}
}

// emptyRuntime is a container runtime on a host with no containers and no
// images: everything it is asked to find is not found.
type emptyRuntime struct{}

func (emptyRuntime) ImportArchive(context.Context, string) ([]string, error) {
	return nil, runtime.ErrImageNotFound
}
func (emptyRuntime) Create(context.Context, runtime.Spec) (runtime.Status, error) {
	return runtime.Status{}, runtime.ErrImageNotFound
}
func (emptyRuntime) Start(context.Context, string) (runtime.Status, error) {
	return runtime.Status{}, runtime.ErrNotFound
}
func (emptyRuntime) Status(context.Context, string) (runtime.Status, error) {
	return runtime.Status{}, runtime.ErrNotFound
}
func (emptyRuntime) Stop(context.Context, string, time.Duration) error { return nil }
func (emptyRuntime) List(context.Context) ([]runtime.Status, error)    { return nil, nil }
func (emptyRuntime) Close() error                                      { return nil }

func TestObservedStateIsSentWhenTheExecutorChangesSomething(t *testing.T) {
	pki := devPKI(t)
	cp := startFakeControlPlane(t, pki, pki.ControlPlane, "127.0.0.1:0")
	j := openJournal(t)
	gpus, err := sim.New(sim.Config{GPUs: []sim.GPUConfig{{Model: "H200", MIGEnabled: true}}})
	if err != nil {
		t.Fatal(err)
	}
	ex := lease.New(lease.Options{Journal: j, GPU: gpus, Runtime: emptyRuntime{}, LogDir: t.TempDir(), Resync: time.Hour})
	exCtx, stopEx := context.WithCancel(context.Background())
	exDone := make(chan error, 1)
	go func() { exDone <- ex.Run(exCtx) }()
	t.Cleanup(func() { stopEx(); <-exDone })

	o := agentOpts(t, pki, cp.addr, j, ex)
	o.Report = time.Hour // so every report after the first comes from an executor change
	runAgent(t, o)
	s := cp.nextStream(t)
	s.await(t, "the observed report after connecting", isObserved)

	// A lease past its not_after needs no GPU or container: the executor
	// records it TERMINATED (expired) on its own clock, and that change is
	// reported without waiting for the report timer.
	const id = "l-expiredaaaaaaaaaaaa"
	s.push(desired(&agentv1.DesiredState{Generation: 1, Leases: []*leasev1.Lease{testLease(id, time.Now().Add(-time.Minute))}}))
	obs := s.await(t, "a report of the expired lease as TERMINATED", func(m *agentv1.SessionRequest) bool {
		return slices.ContainsFunc(m.GetObserved().GetLeases(), func(l *agentv1.ObservedLease) bool {
			return l.GetLeaseId() == id && l.GetPhase() == leasev1.Phase_PHASE_TERMINATED
		})
	}).GetObserved()
	if obs.GetDesiredGeneration() != 1 {
		t.Errorf("report desired_generation = %d, want 1", obs.GetDesiredGeneration())
	}
	if l := obs.GetLeases()[0]; l.GetReason() != "expired" {
		t.Errorf("reported reason %q, want expired", l.GetReason())
	}
}

func TestAuditOutboxSurvivesADroppedSessionAndEmptiesOnlyOnAck(t *testing.T) {
	pki := devPKI(t)
	cp := startFakeControlPlane(t, pki, pki.ControlPlane, "127.0.0.1:0")
	j := openJournal(t)
	if err := j.AddEvents(
		&agentv1.AuditEvent{Action: "partition.create", Resource: "gpu/GPU-1/gi/1", Outcome: "success", LeaseId: "l-aaaaaaaaaaaaaaaaaaaa"},
		&agentv1.AuditEvent{Action: "container.start", Resource: "container/gpuaas-l-aaaaaaaaaaaaaaaaaaaa", Outcome: "success", LeaseId: "l-aaaaaaaaaaaaaaaaaaaa"},
	); err != nil {
		t.Fatal(err)
	}
	queued, err := j.PendingEvents(10)
	if err != nil || len(queued) != 2 {
		t.Fatalf("outbox = %v, %v", queued, err)
	}
	e1, e2 := queued[0].GetId(), queued[1].GetId()
	if e1 == "" || e1 == e2 {
		t.Fatalf("event ids %q %q: want distinct non-empty ids", e1, e2)
	}
	o := agentOpts(t, pki, cp.addr, j, idleExecutor(j))
	o.Report = time.Hour // every batch below is sent by connecting or by an ack, not by the timer
	runAgent(t, o)

	// Session 1: both events are sent after connecting; the control plane
	// drops the stream without acking.
	s1 := cp.nextStream(t)
	batch := s1.await(t, "the audit outbox", isAudit).GetAudit()
	if got := eventIDs(batch); !slices.Equal(got, []string{e1, e2}) {
		t.Fatalf("first batch ids %v, want %v oldest first", got, []string{e1, e2})
	}
	if !protoEqual(batch.GetEvents()[0], queued[0]) {
		t.Errorf("sent event %v, want the journaled %v", batch.GetEvents()[0], queued[0])
	}
	s1.dropStream()

	// Session 2, after the agent reconnects by itself: nothing was lost.
	s2 := cp.nextStream(t)
	if s2.await(t, "a hello", func(m *agentv1.SessionRequest) bool { return m.GetHello() != nil }) != s2.all()[0] {
		t.Error("the reconnected session did not open with a hello")
	}
	if p, _ := j.PendingEvents(10); len(p) != 2 {
		t.Fatalf("outbox after an unacked drop holds %d events, want 2", len(p))
	}
	batch = s2.await(t, "the unacked events again", isAudit).GetAudit()
	if got := eventIDs(batch); !slices.Equal(got, []string{e1, e2}) {
		t.Fatalf("resent batch ids %v, want %v", got, []string{e1, e2})
	}

	// An ack removes exactly what it names.
	s2.push(ack(0, e1))
	waitUntil(t, "e1 acked", func() bool { p, _ := j.PendingEvents(10); return len(p) == 1 })
	if p, _ := j.PendingEvents(10); p[0].GetId() != e2 {
		t.Fatalf("outbox after acking %s holds %s, want %s", e1, p[0].GetId(), e2)
	}
	s2.await(t, "a batch with only the unacked event", func(m *agentv1.SessionRequest) bool {
		return slices.Equal(eventIDs(m.GetAudit()), []string{e2})
	})
	s2.push(ack(0, e2))
	waitUntil(t, "the outbox empty", func() bool { p, _ := j.PendingEvents(10); return len(p) == 0 })
}

func TestUnackedAuditEventsAreResentOnTheSameStream(t *testing.T) {
	pki := devPKI(t)
	cp := startFakeControlPlane(t, pki, pki.ControlPlane, "127.0.0.1:0")
	j := openJournal(t)
	if err := j.AddEvents(&agentv1.AuditEvent{Action: "partition.destroy", Outcome: "success"}); err != nil {
		t.Fatal(err)
	}
	runAgent(t, agentOpts(t, pki, cp.addr, j, idleExecutor(j)))
	s := cp.nextStream(t)
	first := eventIDs(s.await(t, "the audit outbox", isAudit).GetAudit())
	// No ack: the report timer sends the batch again (the receiver deduplicates).
	again := eventIDs(s.await(t, "the unacked batch again", isAudit).GetAudit())
	if len(first) != 1 || !slices.Equal(first, again) {
		t.Fatalf("batches %v then %v; want the same unacked event resent", first, again)
	}
	if p, _ := j.PendingEvents(10); len(p) != 1 {
		t.Fatalf("outbox holds %d events before any ack, want 1", len(p))
	}
}

func eventIDs(b *agentv1.AuditEvents) []string {
	var ids []string
	for _, e := range b.GetEvents() {
		ids = append(ids, e.GetId())
	}
	return ids
}

func TestReconnectsToARestartedControlPlaneAndSaysHelloAgain(t *testing.T) {
	pki := devPKI(t)
	cp1 := startFakeControlPlane(t, pki, pki.ControlPlane, "127.0.0.1:0")
	j := openJournal(t)
	runAgent(t, agentOpts(t, pki, cp1.addr, j, idleExecutor(j)))
	s1 := cp1.nextStream(t)
	s1.await(t, "a hello", func(m *agentv1.SessionRequest) bool { return m.GetHello() != nil })

	cp1.stop()
	cp2 := startFakeControlPlane(t, pki, pki.ControlPlane, cp1.addr)
	s2 := cp2.nextStream(t)
	s2.await(t, "an observed report on the new server", isObserved)
	hello := s2.all()[0].GetHello()
	if hello.GetNodeId() != "node-a" || !protoEqual(hello.GetInventory(), testInventory()) {
		t.Fatalf("first message to the restarted control plane = %v, want node-a's hello with inventory", s2.all()[0])
	}
}

func TestRefusesAServerThatIsNotTheControlPlane(t *testing.T) {
	pki := devPKI(t)
	// The impostor holds a valid SVID from the same CA, but an agent's.
	impostor := startFakeControlPlane(t, pki, pki.Agents["node-b"], "127.0.0.1:0")
	j := openJournal(t)
	if err := j.AddEvents(&agentv1.AuditEvent{Action: "container.start"}); err != nil {
		t.Fatal(err)
	}
	runAgent(t, agentOpts(t, pki, impostor.addr, j, idleExecutor(j)))

	// Wait until the agent has dialled and, refused, dialled again: it keeps
	// trying, and no stream (so no hello, no audit event) reaches the server.
	waitUntil(t, "two connection attempts", func() bool { return impostor.accepts.Load() >= 2 })
	select {
	case s := <-impostor.streams:
		t.Fatalf("a session reached a server presenting %s; it sent %d messages", pki.Agents["node-b"].ID, len(s.all()))
	default:
	}
	if p, _ := j.PendingEvents(10); len(p) != 1 {
		t.Errorf("outbox holds %d events, want the unsent one kept", len(p))
	}
}

func TestRunReturnsNilWhenCancelledAndLeaksNoGoroutines(t *testing.T) {
	for _, tc := range []struct {
		name string
		// start serves something for the agent to dial and returns its
		// address, a wait for the state to cancel in, and a stop.
		start func(t *testing.T, pki *identity.DevPKI) (addr string, ready func(), stop func())
	}{
		{name: "connected", start: func(t *testing.T, pki *identity.DevPKI) (string, func(), func()) {
			cp := startFakeControlPlane(t, pki, pki.ControlPlane, "127.0.0.1:0")
			return cp.addr, func() { cp.nextStream(t).await(t, "an observed report", isObserved) }, cp.stop
		}},
		{name: "retrying a server that hangs up", start: func(t *testing.T, _ *identity.DevPKI) (string, func(), func()) {
			addr, accepts, stop := startHangUpListener(t)
			return addr, func() { waitUntil(t, "two connection attempts", func() bool { return accepts.Load() >= 2 }) }, stop
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pki := devPKI(t)
			j := openJournal(t)
			before := goleak.IgnoreCurrent()
			addr, ready, stopServer := tc.start(t, pki)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			done := make(chan error, 1)
			c := session.New(agentOpts(t, pki, addr, j, idleExecutor(j)))
			go func() { done <- c.Run(ctx) }()
			ready()

			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("Run after cancel = %v, want nil", err)
				}
			case <-time.After(waitFor):
				t.Fatalf("Run did not return within %s of cancel", waitFor)
			}
			stopServer()
			goleak.VerifyNone(t, before)
		})
	}
}

// startHangUpListener accepts TCP connections and closes them at once, as a
// port with something other than the control plane behind it would.
func startHangUpListener(t *testing.T) (string, *atomic.Int64, func()) {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	accepts := &atomic.Int64{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			accepts.Add(1)
			c.Close()
		}
	}()
	var once sync.Once
	stop := func() { once.Do(func() { lis.Close(); <-done }) }
	t.Cleanup(stop)
	return lis.Addr().String(), accepts, stop
}

// waitUntil polls cond until it holds, failing the test after waitFor.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", waitFor, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// The control plane deduplicates agent audit events on (node, event id) and
// acks duplicates without recording them. So an agent whose journal is new
// (data directory wiped, disk replaced, reinstall) must not reuse the ids
// an earlier journal of the same node already sent, or its events are
// acked and dropped unrecorded.
func TestAuditEventIDsAreNotReusedByANewJournalOfTheSameNode(t *testing.T) {
	pki := devPKI(t)
	cp := startFakeControlPlane(t, pki, pki.ControlPlane, "127.0.0.1:0")
	sent := map[string]int{}
	for i := range 2 {
		j := openJournal(t) // a fresh journal each time, same node identity
		if err := j.AddEvents(&agentv1.AuditEvent{Action: "container.start", Outcome: "success"}); err != nil {
			t.Fatal(err)
		}
		a := runAgent(t, agentOpts(t, pki, cp.addr, j, idleExecutor(j)))
		for _, id := range eventIDs(cp.nextStream(t).await(t, "the audit outbox", isAudit).GetAudit()) {
			if prev, dup := sent[id]; dup {
				t.Errorf("journal %d sent event id %q, already sent by journal %d for the same node: the control plane would drop it as a duplicate", i, id, prev)
			}
			sent[id] = i
		}
		a.stop(t)
	}
}
