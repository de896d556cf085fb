package partition

// Partition intent journal schema (version 1), one bbolt file in the agent's
// data dir (partition-intents.db beside the lease journal), written only by
// the Reconciler:
//
//   meta     schema_version (uint64 BE) = 1; seq (uint64 BE): the last
//            intent number handed out
//   plans    gpu uuid -> plan (JSON): the layout an apply in progress is
//            moving the GPU to, {"gpu", "mig_enabled", "instances":
//            [{"profile", "start", "size"}], "time"}. Written before the
//            first NVML call on the GPU; rewritten to the GPU's layout as it
//            was when an apply is rolled back; deleted, with the GPU's
//            intents, in one transaction after the last call.
//   intents  gpu uuid (nested bucket) -> seq (uint64 BE) -> intent (JSON):
//            one NVML call, {"seq", "op", "gpu", "profile", "start", "size",
//            "gi", "ci", "enabled", "state", "time"}. op is create-gi,
//            create-ci, destroy-ci, destroy-gi, set-mig-mode or reset; gi is
//            -1 while a create-gi has not returned; state is "pending",
//            written (and synced) BEFORE the call is made, then "done" after
//            it returned, with the GPU instance id a create-gi got.
//
// A GPU with a plan is one whose apply did not finish: the agent was killed
// or a call failed. Recover (and every Reconcile, first) looks at the
// instances at the profile and placement of each of its intents, adopts the
// ones the plan wants and destroys the rest, so a kill between an NVML call
// and its record leaves neither an orphan nor a half-made partition.

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"

	"github.com/gpuaas/gpuaas/pkg/mig"
)

const intentSchema = 1

var (
	bIntentMeta = []byte("meta")
	bPlans      = []byte("plans")
	bIntents    = []byte("intents")
)

// ErrIntentLogLocked: another agent holds the intent journal.
var ErrIntentLogLocked = errors.New("partition intent journal locked by another process")

// Op is the NVML call an intent announces.
type Op string

// The calls the reconciler journals.
const (
	OpCreateGI   Op = "create-gi"
	OpCreateCI   Op = "create-ci"
	OpDestroyCI  Op = "destroy-ci"
	OpDestroyGI  Op = "destroy-gi"
	OpSetMIGMode Op = "set-mig-mode"
	OpReset      Op = "reset"
)

// Intent is one journaled NVML call.
type Intent struct {
	Seq       uint64
	Op        Op
	GPUUUID   string
	Profile   mig.ProfileID
	Placement mig.Placement
	// GIID is the GPU instance, -1 for a create-gi that has not returned.
	GIID int
	CIID int
	// Enabled is the mode a set-mig-mode asks for.
	Enabled bool
	// Done: the call returned (successfully or not). A pending intent is a
	// call that may or may not have reached the driver.
	Done bool
	Time time.Time
}

// Plan is the layout an unfinished apply is moving one GPU to.
type Plan struct {
	GPUUUID    string
	MIGEnabled bool
	Instances  []mig.Instance
	Time       time.Time
}

// Outstanding is what an interrupted apply left in the journal, per GPU.
type Outstanding struct {
	Plans   map[string]Plan
	Intents map[string][]Intent // by GPU, in the order they were made
}

type intentRecord struct {
	Seq     uint64        `json:"seq"`
	Op      Op            `json:"op"`
	GPU     string        `json:"gpu"`
	Profile mig.ProfileID `json:"profile"`
	Start   int           `json:"start"`
	Size    int           `json:"size"`
	GI      int           `json:"gi"`
	CI      int           `json:"ci"`
	Enabled bool          `json:"enabled,omitempty"`
	State   string        `json:"state"`
	Time    time.Time     `json:"time"`
}

type planInstance struct {
	Profile mig.ProfileID `json:"profile"`
	Start   int           `json:"start"`
	Size    int           `json:"size"`
}

type planRecord struct {
	GPU        string         `json:"gpu"`
	MIGEnabled bool           `json:"mig_enabled"`
	Instances  []planInstance `json:"instances"`
	Time       time.Time      `json:"time"`
}

const (
	statePending = "pending"
	stateDone    = "done"
)

// IntentLog is the reconciler's crash journal (see the schema above). It is
// safe for concurrent use; the Reconciler is its only writer.
type IntentLog struct {
	db  *bolt.DB
	now func() time.Time
}

// OpenIntentLog opens (creating) the intent journal at path. A second agent
// on the same file gets ErrIntentLogLocked after a second; a file written
// by a newer schema is refused.
func OpenIntentLog(path string) (*IntentLog, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("open partition intent journal %s: %w", path, err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		if errors.Is(err, berrors.ErrTimeout) {
			return nil, fmt.Errorf("open partition intent journal %s: %w", path, ErrIntentLogLocked)
		}
		return nil, fmt.Errorf("open partition intent journal %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bIntentMeta, bPlans, bIntents} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		m := tx.Bucket(bIntentMeta)
		if raw := m.Get([]byte("schema_version")); raw != nil {
			if len(raw) != 8 || binary.BigEndian.Uint64(raw) > intentSchema {
				return fmt.Errorf("schema %x is not supported by this agent", raw)
			}
		}
		return m.Put([]byte("schema_version"), binary.BigEndian.AppendUint64(nil, intentSchema))
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("open partition intent journal %s: %w", path, err)
	}
	return &IntentLog{db: db, now: time.Now}, nil
}

// Close closes the journal.
func (l *IntentLog) Close() error { return l.db.Close() }

// Outstanding reads what unfinished applies left: every plan and intent.
func (l *IntentLog) Outstanding() (Outstanding, error) {
	out := Outstanding{Plans: map[string]Plan{}, Intents: map[string][]Intent{}}
	err := l.db.View(func(tx *bolt.Tx) error {
		err := tx.Bucket(bPlans).ForEach(func(k, v []byte) error {
			var p planRecord
			if err := json.Unmarshal(v, &p); err != nil {
				return fmt.Errorf("decode plan of %s: %w", k, err)
			}
			out.Plans[string(k)] = p.plan()
			return nil
		})
		if err != nil {
			return err
		}
		return tx.Bucket(bIntents).ForEachBucket(func(gpuKey []byte) error {
			return tx.Bucket(bIntents).Bucket(gpuKey).ForEach(func(k, v []byte) error {
				var r intentRecord
				if err := json.Unmarshal(v, &r); err != nil {
					return fmt.Errorf("decode intent %x of %s: %w", k, gpuKey, err)
				}
				out.Intents[string(gpuKey)] = append(out.Intents[string(gpuKey)], r.intent())
				return nil
			})
		})
	})
	if err != nil {
		return Outstanding{}, fmt.Errorf("read partition intent journal: %w", err)
	}
	return out, nil
}

// Empty reports whether no apply is outstanding.
func (o Outstanding) Empty() bool { return len(o.Plans) == 0 && len(o.Intents) == 0 }

// GPUs lists the GPUs with a plan or an intent, sorted.
func (o Outstanding) GPUs() []string {
	var out []string
	for g := range o.Plans {
		out = append(out, g)
	}
	for g := range o.Intents {
		if _, ok := o.Plans[g]; !ok {
			out = append(out, g)
		}
	}
	slices.Sort(out)
	return out
}

// begin journals the plan for a GPU before its first call (and replaces
// it when an apply is rolled back).
func (l *IntentLog) begin(p Plan) error {
	rec := planRecord{GPU: p.GPUUUID, MIGEnabled: p.MIGEnabled, Instances: []planInstance{}, Time: l.now().UTC()}
	for _, in := range p.Instances {
		rec.Instances = append(rec.Instances, planInstance{Profile: in.Profile, Start: in.Placement.Start, Size: in.Placement.Size})
	}
	raw, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	err = l.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bPlans).Put([]byte(p.GPUUUID), raw) })
	if err != nil {
		return fmt.Errorf("journal plan for %s: %w", p.GPUUUID, err)
	}
	return nil
}

// intend journals a call as pending and returns its sequence number. The
// transaction is synced before it returns, so the call may then be made.
func (l *IntentLog) intend(in Intent) (uint64, error) {
	var seq uint64
	err := l.db.Update(func(tx *bolt.Tx) error {
		m := tx.Bucket(bIntentMeta)
		seq = getU64(m, "seq") + 1
		if err := m.Put([]byte("seq"), binary.BigEndian.AppendUint64(nil, seq)); err != nil {
			return err
		}
		b, err := tx.Bucket(bIntents).CreateBucketIfNotExists([]byte(in.GPUUUID))
		if err != nil {
			return err
		}
		in.Seq, in.Done, in.Time = seq, false, l.now().UTC()
		raw, err := json.Marshal(recordOf(in))
		if err != nil {
			return err
		}
		return b.Put(binary.BigEndian.AppendUint64(nil, seq), raw)
	})
	if err != nil {
		return 0, fmt.Errorf("journal %s on %s: %w", in.Op, in.GPUUUID, err)
	}
	return seq, nil
}

// done marks a call as returned; giID, when not negative, records the GPU
// instance a create-gi made.
func (l *IntentLog) done(gpuUUID string, seq uint64, giID int) error {
	err := l.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bIntents).Bucket([]byte(gpuUUID))
		if b == nil {
			return fmt.Errorf("no intents for the gpu")
		}
		key := binary.BigEndian.AppendUint64(nil, seq)
		v := b.Get(key)
		if v == nil {
			return fmt.Errorf("no intent %d", seq)
		}
		var r intentRecord
		if err := json.Unmarshal(v, &r); err != nil {
			return err
		}
		r.State = stateDone
		if giID >= 0 {
			r.GI = giID
		}
		raw, err := json.Marshal(r)
		if err != nil {
			return err
		}
		return b.Put(key, raw)
	})
	if err != nil {
		return fmt.Errorf("journal intent %d on %s as done: %w", seq, gpuUUID, err)
	}
	return nil
}

// finish forgets a GPU's plan and intents: its apply is complete.
func (l *IntentLog) finish(gpuUUID string) error {
	err := l.db.Update(func(tx *bolt.Tx) error {
		if err := tx.Bucket(bPlans).Delete([]byte(gpuUUID)); err != nil {
			return err
		}
		err := tx.Bucket(bIntents).DeleteBucket([]byte(gpuUUID))
		if errors.Is(err, berrors.ErrBucketNotFound) {
			return nil
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("finish partition intents of %s: %w", gpuUUID, err)
	}
	return nil
}

func getU64(b *bolt.Bucket, k string) uint64 {
	if raw := b.Get([]byte(k)); len(raw) == 8 {
		return binary.BigEndian.Uint64(raw)
	}
	return 0
}

func recordOf(in Intent) intentRecord {
	state := statePending
	if in.Done {
		state = stateDone
	}
	return intentRecord{Seq: in.Seq, Op: in.Op, GPU: in.GPUUUID, Profile: in.Profile, Start: in.Placement.Start,
		Size: in.Placement.Size, GI: in.GIID, CI: in.CIID, Enabled: in.Enabled, State: state, Time: in.Time}
}

func (r intentRecord) intent() Intent {
	return Intent{Seq: r.Seq, Op: r.Op, GPUUUID: r.GPU, Profile: r.Profile, Placement: mig.Placement{Start: r.Start, Size: r.Size},
		GIID: r.GI, CIID: r.CI, Enabled: r.Enabled, Done: r.State == stateDone, Time: r.Time}
}

func (p planRecord) plan() Plan {
	out := Plan{GPUUUID: p.GPU, MIGEnabled: p.MIGEnabled, Time: p.Time}
	for _, in := range p.Instances {
		out.Instances = append(out.Instances, mig.Instance{Profile: in.Profile, Placement: mig.Placement{Start: in.Start, Size: in.Size}})
	}
	return out
}
