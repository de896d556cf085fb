package lease

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

func openJournal(t *testing.T, path string) *Journal {
	t.Helper()
	j, err := OpenJournal(path)
	if err != nil {
		t.Fatalf("OpenJournal: %v", err)
	}
	t.Cleanup(func() { j.Close() })
	return j
}

func newJournal(t *testing.T) (*Journal, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "data", "journal.db")
	return openJournal(t, path), path
}

func desiredLease(id, image string) *leasev1.Lease {
	return &leasev1.Lease{
		Id:        id,
		Spec:      &leasev1.LeaseSpec{Tenant: "tenant-a", Workload: &leasev1.Workload{Image: image, Args: []string{"sleep", "60"}}},
		Placement: &leasev1.Placement{GpuUuid: "GPU-1", ProfileId: 19, Start: 3, Size: 1, MigProfile: "1g.18gb"},
		NotAfter:  timestamppb.New(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)),
	}
}

func mustSetDesired(t *testing.T, j *Journal, gen uint64, leases ...*leasev1.Lease) bool {
	t.Helper()
	changed, err := j.SetDesired(gen, leases)
	if err != nil {
		t.Fatalf("SetDesired(%d): %v", gen, err)
	}
	return changed
}

func mustDesired(t *testing.T, j *Journal) (map[string]*leasev1.Lease, uint64) {
	t.Helper()
	d, gen, err := j.Desired()
	if err != nil {
		t.Fatalf("Desired: %v", err)
	}
	return d, gen
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

func TestJournalDesiredRoundTrip(t *testing.T) {
	j, _ := newJournal(t)
	if d, gen := mustDesired(t, j); len(d) != 0 || gen != 0 {
		t.Fatalf("fresh journal desires %v at generation %d, want nothing at 0", d, gen)
	}
	a, b := desiredLease("l-aaaaaaaaaaaaaaaaaaaa", "img:a"), desiredLease("l-bbbbbbbbbbbbbbbbbbbb", "img:b")

	if !mustSetDesired(t, j, 3, a, b) {
		t.Error("SetDesired of a first generation reported no change")
	}

	d, gen := mustDesired(t, j)
	if gen != 3 {
		t.Errorf("generation = %d, want 3", gen)
	}
	if len(d) != 2 || !proto.Equal(d[a.GetId()], a) || !proto.Equal(d[b.GetId()], b) {
		t.Errorf("desired = %v, want %v and %v", d, a, b)
	}
}

func TestJournalSetDesiredIgnoresAnOlderGeneration(t *testing.T) {
	j, _ := newJournal(t)
	a, b := desiredLease("l-aaaaaaaaaaaaaaaaaaaa", "img:a"), desiredLease("l-bbbbbbbbbbbbbbbbbbbb", "img:b")
	mustSetDesired(t, j, 5, a)

	// A message from an old session arrives late.
	if mustSetDesired(t, j, 4, b) {
		t.Error("SetDesired of an older generation reported a change")
	}
	if d, gen := mustDesired(t, j); gen != 5 || !slices.Equal(sortedKeys(d), []string{a.GetId()}) {
		t.Errorf("after a stale SetDesired: generation %d, desired %v; want 5 and %s", gen, sortedKeys(d), a.GetId())
	}

	// A newer generation replaces the whole set, leases absent from it
	// included.
	if !mustSetDesired(t, j, 6, b) {
		t.Error("SetDesired of a newer generation reported no change")
	}
	if d, gen := mustDesired(t, j); gen != 6 || !slices.Equal(sortedKeys(d), []string{b.GetId()}) {
		t.Errorf("after generation 6: generation %d, desired %v; want 6 and %s", gen, sortedKeys(d), b.GetId())
	}
	if !mustSetDesired(t, j, 7) {
		t.Error("SetDesired of an empty newer generation reported no change")
	}
	if d, gen := mustDesired(t, j); gen != 7 || len(d) != 0 {
		t.Errorf("after an empty generation 7: generation %d, desired %v; want 7 and nothing", gen, sortedKeys(d))
	}
}

func TestJournalRecordsRoundTrip(t *testing.T) {
	j, _ := newJournal(t)
	if _, ok, err := j.Record("l-missingmissingmissi"); ok || err != nil {
		t.Errorf("Record of an unknown lease = found %t, %v; want not found, nil", ok, err)
	}
	ts := time.Date(2026, 3, 4, 5, 6, 7, 8, time.UTC)
	running := Record{
		LeaseID: "l-aaaaaaaaaaaaaaaaaaaa", Phase: leasev1.Phase_PHASE_RUNNING, Reason: "running",
		GPUUUID: "GPU-1", GIID: 13, CIID: 0, HasGI: true, HasCI: true, MIGUUID: "MIG-1", ContainerID: "gpuaas-l-aaaaaaaaaaaaaaaaaaaa",
		NotAfter: ts.Add(time.Hour), StartTime: ts, UpdateTime: ts,
	}
	failed := Record{
		LeaseID: "l-bbbbbbbbbbbbbbbbbbbb", Phase: leasev1.Phase_PHASE_FAILED, Reason: "exited with code 3",
		Exited: true, ExitCode: 3, StartTime: ts, EndTime: ts.Add(time.Minute), UpdateTime: ts.Add(time.Minute),
	}
	for _, r := range []Record{running, failed} {
		if err := j.Put(r); err != nil {
			t.Fatalf("Put(%s): %v", r.LeaseID, err)
		}
	}

	for _, want := range []Record{running, failed} {
		got, ok, err := j.Record(want.LeaseID)
		if err != nil || !ok || !reflect.DeepEqual(got, want) {
			t.Errorf("Record(%s) = %+v, %t, %v; want %+v", want.LeaseID, got, ok, err, want)
		}
	}
	all, err := j.Records()
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(all, map[string]Record{running.LeaseID: running, failed.LeaseID: failed}) {
		t.Errorf("Records = %+v, want both", all)
	}

	// Put replaces.
	running.Phase, running.Reason = leasev1.Phase_PHASE_TERMINATING, "cancelled"
	if err := j.Put(running); err != nil {
		t.Fatal(err)
	}
	if got, _, _ := j.Record(running.LeaseID); got.Phase != leasev1.Phase_PHASE_TERMINATING || got.Reason != "cancelled" {
		t.Errorf("after a second Put: %+v, want TERMINATING cancelled", got)
	}
}

func auditEvent(action, leaseID string) *agentv1.AuditEvent {
	return &agentv1.AuditEvent{Time: timestamppb.New(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)), Action: action, LeaseId: leaseID, Outcome: "success"}
}

func mustPending(t *testing.T, j *Journal, max int) []*agentv1.AuditEvent {
	t.Helper()
	evs, err := j.PendingEvents(max)
	if err != nil {
		t.Fatalf("PendingEvents: %v", err)
	}
	return evs
}

func actionsOf(evs []*agentv1.AuditEvent) []string {
	var out []string
	for _, e := range evs {
		out = append(out, e.GetAction())
	}
	return out
}

func idsOf(evs []*agentv1.AuditEvent) []string {
	var out []string
	for _, e := range evs {
		out = append(out, e.GetId())
	}
	return out
}

func TestJournalOutboxKeepsEventsInOrderUntilAcked(t *testing.T) {
	j, _ := newJournal(t)
	if err := j.AddEvents(auditEvent("a", "l-1"), auditEvent("b", "l-1")); err != nil {
		t.Fatal(err)
	}
	// Put journals a record and its events in one transaction.
	if err := j.Put(Record{LeaseID: "l-1", Phase: leasev1.Phase_PHASE_RUNNING}, auditEvent("c", "l-1")); err != nil {
		t.Fatal(err)
	}
	if err := j.AddEvents(auditEvent("d", "l-2")); err != nil {
		t.Fatal(err)
	}

	all := mustPending(t, j, 100)
	if !slices.Equal(actionsOf(all), []string{"a", "b", "c", "d"}) {
		t.Fatalf("pending = %v, want a b c d, oldest first", actionsOf(all))
	}
	ids := idsOf(all)
	for i, id := range ids {
		if id == "" {
			t.Errorf("event %d has no id", i)
		}
		if i > 0 && ids[i-1] >= id {
			t.Errorf("ids %v are not increasing", ids)
		}
	}
	if got := mustPending(t, j, 2); !slices.Equal(idsOf(got), ids[:2]) {
		t.Errorf("PendingEvents(2) = %v, want the oldest two %v", idsOf(got), ids[:2])
	}

	if err := j.AckEvents([]string{ids[0], ids[2], "no-such-event"}); err != nil {
		t.Fatalf("AckEvents: %v", err)
	}
	if got := mustPending(t, j, 100); !slices.Equal(actionsOf(got), []string{"b", "d"}) {
		t.Errorf("after acking a and c: pending = %v, want b d", actionsOf(got))
	}
	if err := j.AckEvents([]string{ids[1], ids[3]}); err != nil {
		t.Fatal(err)
	}
	if got := mustPending(t, j, 100); len(got) != 0 {
		t.Errorf("after acking everything: pending = %v, want none", actionsOf(got))
	}
}

func TestJournalAckRemovesEventsByTheIDsPendingReported(t *testing.T) {
	j, _ := newJournal(t)
	// A caller that names its events must still be able to ack them with
	// the ids the outbox hands out.
	named := auditEvent("named", "l-1")
	named.Id = "caller-chosen"
	if err := j.AddEvents(named, auditEvent("unnamed", "l-1")); err != nil {
		t.Fatal(err)
	}

	pending := mustPending(t, j, 100)
	if err := j.AckEvents(idsOf(pending)); err != nil {
		t.Fatal(err)
	}

	if left := mustPending(t, j, 100); len(left) != 0 {
		t.Errorf("after acking %v, still pending: %v (ids %v)", idsOf(pending), actionsOf(left), idsOf(left))
	}
}

func TestJournalEventIDsAreNeverReused(t *testing.T) {
	j, path := newJournal(t)
	if err := j.AddEvents(auditEvent("a", "l-1"), auditEvent("b", "l-1")); err != nil {
		t.Fatal(err)
	}
	first := idsOf(mustPending(t, j, 100))
	if err := j.AckEvents(first); err != nil {
		t.Fatal(err)
	}
	j.Close()

	// The control plane deduplicates on ids: a restarted agent must not
	// hand out an id it already used, even once the outbox is empty.
	j = openJournal(t, path)
	if err := j.AddEvents(auditEvent("c", "l-1")); err != nil {
		t.Fatal(err)
	}
	later := idsOf(mustPending(t, j, 100))
	if len(later) != 1 || slices.Contains(first, later[0]) || later[0] <= first[len(first)-1] {
		t.Errorf("id after reopen = %v, want one new id after %v", later, first)
	}
}

func mustNextSequence(t *testing.T, j *Journal) uint64 {
	t.Helper()
	seq, err := j.NextSequence()
	if err != nil {
		t.Fatalf("NextSequence: %v", err)
	}
	return seq
}

func reportedSeq(t *testing.T, j *Journal, id string) uint64 {
	t.Helper()
	r, ok, err := j.Record(id)
	if err != nil || !ok {
		t.Fatalf("Record(%s) = %t, %v", id, ok, err)
	}
	return r.ReportedSeq
}

func TestJournalNextSequenceMarksTerminalRecordsOnce(t *testing.T) {
	j, _ := newJournal(t)
	put := func(id string, p leasev1.Phase) {
		t.Helper()
		if err := j.Put(Record{LeaseID: id, Phase: p}); err != nil {
			t.Fatal(err)
		}
	}
	put("l-running", leasev1.Phase_PHASE_RUNNING)
	put("l-done", leasev1.Phase_PHASE_TERMINATED)

	if seq := mustNextSequence(t, j); seq != 1 {
		t.Errorf("first sequence = %d, want 1", seq)
	}
	if got := reportedSeq(t, j, "l-done"); got != 1 {
		t.Errorf("terminal record reported at %d, want 1", got)
	}
	if got := reportedSeq(t, j, "l-running"); got != 0 {
		t.Errorf("running record marked reported at %d, want 0", got)
	}

	put("l-running", leasev1.Phase_PHASE_FAILED)
	if seq := mustNextSequence(t, j); seq != 2 {
		t.Errorf("second sequence = %d, want 2", seq)
	}
	if got := reportedSeq(t, j, "l-done"); got != 1 {
		t.Errorf("terminal record re-marked at %d; the first report that carried it was 1", got)
	}
	if got := reportedSeq(t, j, "l-running"); got != 2 {
		t.Errorf("record that failed after report 1 marked at %d, want 2", got)
	}
}

func TestJournalPruneForgetsOnlyAcknowledgedUndesiredTerminalRecords(t *testing.T) {
	j, _ := newJournal(t)
	still := desiredLease("l-stilldesired", "img")
	mustSetDesired(t, j, 1, still)
	for _, r := range []Record{
		{LeaseID: "l-stilldesired", Phase: leasev1.Phase_PHASE_TERMINATED},
		{LeaseID: "l-gone1", Phase: leasev1.Phase_PHASE_TERMINATED},
		{LeaseID: "l-gone2", Phase: leasev1.Phase_PHASE_FAILED},
		{LeaseID: "l-running", Phase: leasev1.Phase_PHASE_RUNNING},
	} {
		if err := j.Put(r); err != nil {
			t.Fatal(err)
		}
	}
	mustNextSequence(t, j) // 1: carries the three terminal records
	if err := j.Put(Record{LeaseID: "l-late", Phase: leasev1.Phase_PHASE_TERMINATED}); err != nil {
		t.Fatal(err)
	}
	mustNextSequence(t, j) // 2: carries l-late

	prune := func(acked uint64) []string {
		t.Helper()
		gone, err := j.Prune(acked)
		if err != nil {
			t.Fatalf("Prune(%d): %v", acked, err)
		}
		slices.Sort(gone)
		return gone
	}
	if gone := prune(0); len(gone) != 0 {
		t.Errorf("Prune(0) forgot %v, want nothing", gone)
	}
	if gone := prune(1); !slices.Equal(gone, []string{"l-gone1", "l-gone2"}) {
		t.Errorf("Prune(1) forgot %v, want l-gone1 l-gone2 (not the still desired one, not l-late reported at 2)", gone)
	}
	if gone := prune(100); !slices.Equal(gone, []string{"l-late"}) {
		t.Errorf("Prune(100) forgot %v, want l-late", gone)
	}
	recs, err := j.Records()
	if err != nil {
		t.Fatal(err)
	}
	if got := sortedKeys(recs); !slices.Equal(got, []string{"l-running", "l-stilldesired"}) {
		t.Errorf("records left = %v, want the running one and the still desired one", got)
	}

	// Once the control plane stops desiring it, it goes too.
	mustSetDesired(t, j, 2)
	if gone := prune(1); !slices.Equal(gone, []string{"l-stilldesired"}) {
		t.Errorf("Prune after it left the desired set forgot %v, want l-stilldesired", gone)
	}
}

func TestJournalPruneKeepsTerminalRecordsNeverReported(t *testing.T) {
	j, _ := newJournal(t)
	if err := j.Put(Record{LeaseID: "l-unreported", Phase: leasev1.Phase_PHASE_TERMINATED}); err != nil {
		t.Fatal(err)
	}
	gone, err := j.Prune(1 << 40)
	if err != nil {
		t.Fatal(err)
	}
	if len(gone) != 0 {
		t.Errorf("Prune forgot %v that no report ever carried", gone)
	}
}

func TestJournalSecondOpenIsLocked(t *testing.T) {
	_, path := newJournal(t)

	j2, err := OpenJournal(path)

	if err == nil {
		j2.Close()
		t.Fatal("a second OpenJournal of a journal in use succeeded")
	}
	if !errors.Is(err, ErrJournalLocked) {
		t.Errorf("second OpenJournal = %v, want %v", err, ErrJournalLocked)
	}
}

func TestJournalFromANewerSchemaIsRefusedAndLeftAlone(t *testing.T) {
	path := filepath.Join(t.TempDir(), "journal.db")
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		m, err := tx.CreateBucket([]byte("meta"))
		if err != nil {
			return err
		}
		return m.Put([]byte("schema_version"), binary.BigEndian.AppendUint64(nil, journalSchema+1))
	})
	if err != nil {
		t.Fatal(err)
	}
	db.Close()

	j, err := OpenJournal(path)

	if err == nil {
		j.Close()
		t.Fatal("OpenJournal of a newer schema succeeded")
	}
	if errors.Is(err, ErrJournalLocked) {
		t.Errorf("OpenJournal = %v; a newer schema is not a lock", err)
	}
	// Not downgraded, not extended, and not left locked.
	db, err = bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second, ReadOnly: true})
	if err != nil {
		t.Fatalf("reopen after the refusal: %v", err)
	}
	defer db.Close()
	err = db.View(func(tx *bolt.Tx) error {
		raw := tx.Bucket([]byte("meta")).Get([]byte("schema_version"))
		if binary.BigEndian.Uint64(raw) != journalSchema+1 {
			return fmt.Errorf("schema_version is now %x", raw)
		}
		if tx.Bucket([]byte("desired")) != nil {
			return errors.New("buckets were added to the refused file")
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}
}

func TestJournalThatIsNotAJournalIsAnError(t *testing.T) {
	path := filepath.Join(t.TempDir(), "journal.db")
	if err := os.WriteFile(path, []byte("this is not a bbolt file, it is much too short and wrong"), 0o600); err != nil {
		t.Fatal(err)
	}
	j, err := OpenJournal(path)
	if err == nil {
		j.Close()
		t.Fatal("OpenJournal of garbage succeeded")
	}
}

func TestJournalReopenKeepsEverything(t *testing.T) {
	j, path := newJournal(t)
	a := desiredLease("l-aaaaaaaaaaaaaaaaaaaa", "img:a")
	mustSetDesired(t, j, 9, a)
	rec := Record{LeaseID: a.GetId(), Phase: leasev1.Phase_PHASE_RUNNING, GPUUUID: "GPU-1", GIID: 10, HasGI: true, HasCI: true,
		MIGUUID: "MIG-1", ContainerID: ContainerID(a.GetId()), NotAfter: time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)}
	done := Record{LeaseID: "l-bbbbbbbbbbbbbbbbbbbb", Phase: leasev1.Phase_PHASE_TERMINATED, Reason: "expired"}
	if err := j.Put(rec, auditEvent("partition.create", a.GetId())); err != nil {
		t.Fatal(err)
	}
	if err := j.Put(done); err != nil {
		t.Fatal(err)
	}
	seq := mustNextSequence(t, j)
	events := mustPending(t, j, 100)
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}

	j = openJournal(t, path)

	d, gen := mustDesired(t, j)
	if gen != 9 || len(d) != 1 || !proto.Equal(d[a.GetId()], a) {
		t.Errorf("desired after reopen = %v at %d, want %v at 9", d, gen, a)
	}
	recs, err := j.Records()
	if err != nil {
		t.Fatal(err)
	}
	done.ReportedSeq = seq
	if !reflect.DeepEqual(recs, map[string]Record{rec.LeaseID: rec, done.LeaseID: done}) {
		t.Errorf("records after reopen = %+v, want %+v and %+v", recs, rec, done)
	}
	got := mustPending(t, j, 100)
	if len(got) != len(events) || !proto.Equal(got[0], events[0]) {
		t.Errorf("outbox after reopen = %v, want %v", got, events)
	}
	if next := mustNextSequence(t, j); next != seq+1 {
		t.Errorf("sequence after reopen = %d, want %d", next, seq+1)
	}
}
