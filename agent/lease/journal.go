package lease

// Agent journal schema (version 1), one bbolt file in the agent's data dir.
//
//   meta     schema_version (uint64 BE) = 1; generation (uint64 BE): last
//            desired generation journaled; sequence (uint64 BE): last
//            observed-state report number; event_seq (uint64 BE);
//            instance: 16 random hex characters made when the journal is
//            created, prefixed to every audit event id so a rebuilt journal
//            never reuses an id the control plane has deduplicated
//   desired  lease id -> gpuaas.lease.v1.Lease (proto): the desired set
//   leases   lease id -> Record (JSON): what the agent did for the lease
//   outbox   event id -> gpuaas.agent.v1.AuditEvent (proto), until acked
//
// The journal is written before and after every step that touches the
// hardware or containerd, so a restarted agent re-adopts what exists
// instead of duplicating or orphaning it.

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
	"google.golang.org/protobuf/proto"

	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

const journalSchema = 1

var (
	bMeta    = []byte("meta")
	bDesired = []byte("desired")
	bLeases  = []byte("leases")
	bOutbox  = []byte("outbox")
)

// ErrJournalLocked: another agent holds the journal.
var ErrJournalLocked = errors.New("journal locked by another process")

// Record is what the agent knows of one lease it runs.
type Record struct {
	LeaseID     string        `json:"lease_id"`
	Phase       leasev1.Phase `json:"phase"`
	Reason      string        `json:"reason,omitempty"`
	GPUUUID     string        `json:"gpu_uuid,omitempty"`
	GIID        int           `json:"gi_id,omitempty"`
	CIID        int           `json:"ci_id,omitempty"`
	HasGI       bool          `json:"has_gi,omitempty"`
	HasCI       bool          `json:"has_ci,omitempty"`
	MIGUUID     string        `json:"mig_uuid,omitempty"`
	ContainerID string        `json:"container_id,omitempty"`
	// ImageDigest is the manifest digest the container was created from.
	ImageDigest string `json:"image_digest,omitempty"`
	// Created is set once the runtime created the container, so teardown
	// audits a stop only for a container that existed.
	Created bool `json:"created,omitempty"`
	// Fenced is set once the lease's eBPF fence is attached; teardown
	// detaches it.
	Fenced bool `json:"fenced,omitempty"`
	// Final is the phase a teardown in progress ends in; a TERMINATING
	// record with Final set resumes its teardown and never provisions again.
	Final leasev1.Phase `json:"final,omitempty"`
	// NotAfter is the lease's end as last desired, kept so the reason a
	// lease left the desired set (expired or cancelled) is known after it
	// left.
	NotAfter  time.Time `json:"not_after,omitzero"`
	StartTime time.Time `json:"start_time,omitzero"`
	EndTime   time.Time `json:"end_time,omitzero"`
	Exited    bool      `json:"exited,omitempty"`
	ExitCode  int32     `json:"exit_code,omitempty"`
	// OOMKilled: the kernel's OOM killer killed a process of the workload
	// (as the runtime read it from the task's memory cgroup before the
	// task was deleted).
	OOMKilled bool `json:"oom_killed,omitempty"`
	// IP is the workload's address on the node's bridge network; empty
	// without a network.
	IP         string    `json:"ip,omitempty"`
	UpdateTime time.Time `json:"update_time"`
	// ReportedSeq is the first observed-state report that carried the
	// terminal phase; once the control plane acks it, the record may go.
	ReportedSeq uint64 `json:"reported_seq,omitempty"`
}

// Journal is the agent's durable memory.
type Journal struct {
	db *bolt.DB
}

// OpenJournal opens (creating) the journal at path.
func OpenJournal(path string) (*Journal, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("open journal %s: %w", path, err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		if errors.Is(err, berrors.ErrTimeout) {
			return nil, fmt.Errorf("open journal %s: %w", path, ErrJournalLocked)
		}
		return nil, fmt.Errorf("open journal %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bMeta, bDesired, bLeases, bOutbox} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		m := tx.Bucket(bMeta)
		if raw := m.Get([]byte("schema_version")); raw != nil {
			if len(raw) != 8 || binary.BigEndian.Uint64(raw) > journalSchema {
				return fmt.Errorf("journal schema %x is not supported by this agent", raw)
			}
		}
		if m.Get([]byte("instance")) == nil {
			var b [8]byte
			if _, err := rand.Read(b[:]); err != nil {
				return err
			}
			if err := m.Put([]byte("instance"), []byte(hex.EncodeToString(b[:]))); err != nil {
				return err
			}
		}
		return m.Put([]byte("schema_version"), binary.BigEndian.AppendUint64(nil, journalSchema))
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("open journal %s: %w", path, err)
	}
	return &Journal{db: db}, nil
}

// Close closes the journal.
func (j *Journal) Close() error { return j.db.Close() }

func getU64(b *bolt.Bucket, k string) uint64 {
	if raw := b.Get([]byte(k)); len(raw) == 8 {
		return binary.BigEndian.Uint64(raw)
	}
	return 0
}

func putU64(b *bolt.Bucket, k string, v uint64) error {
	return b.Put([]byte(k), binary.BigEndian.AppendUint64(nil, v))
}

// SetDesired replaces the desired set if gen is not older than the
// journaled one. It reports whether it changed anything.
func (j *Journal) SetDesired(gen uint64, leases []*leasev1.Lease) (bool, error) {
	changed := false
	err := j.db.Update(func(tx *bolt.Tx) error {
		m := tx.Bucket(bMeta)
		if gen < getU64(m, "generation") {
			return nil // stale (an old session's message)
		}
		changed = true
		if err := tx.DeleteBucket(bDesired); err != nil {
			return err
		}
		d, err := tx.CreateBucket(bDesired)
		if err != nil {
			return err
		}
		for _, l := range leases {
			raw, err := proto.Marshal(l)
			if err != nil {
				return err
			}
			if err := d.Put([]byte(l.GetId()), raw); err != nil {
				return err
			}
		}
		return putU64(m, "generation", gen)
	})
	return changed, err
}

// Desired returns the journaled desired set and its generation.
func (j *Journal) Desired() (map[string]*leasev1.Lease, uint64, error) {
	out := map[string]*leasev1.Lease{}
	var gen uint64
	err := j.db.View(func(tx *bolt.Tx) error {
		gen = getU64(tx.Bucket(bMeta), "generation")
		return tx.Bucket(bDesired).ForEach(func(k, v []byte) error {
			l := &leasev1.Lease{}
			if err := proto.Unmarshal(v, l); err != nil {
				return fmt.Errorf("decode desired lease %s: %w", k, err)
			}
			out[string(k)] = l
			return nil
		})
	})
	return out, gen, err
}

// Records returns every lease record.
func (j *Journal) Records() (map[string]Record, error) {
	out := map[string]Record{}
	err := j.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bLeases).ForEach(func(k, v []byte) error {
			var r Record
			if err := json.Unmarshal(v, &r); err != nil {
				return fmt.Errorf("decode lease record %s: %w", k, err)
			}
			out[string(k)] = r
			return nil
		})
	})
	return out, err
}

// Record returns one lease record.
func (j *Journal) Record(id string) (Record, bool, error) {
	var r Record
	var ok bool
	err := j.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bLeases).Get([]byte(id))
		if v == nil {
			return nil
		}
		ok = true
		return json.Unmarshal(v, &r)
	})
	return r, ok, err
}

// Put stores a record and, in the same transaction, the audit events that
// describe what changed.
func (j *Journal) Put(r Record, events ...*agentv1.AuditEvent) error {
	return j.db.Update(func(tx *bolt.Tx) error {
		raw, err := json.Marshal(r)
		if err != nil {
			return err
		}
		if err := tx.Bucket(bLeases).Put([]byte(r.LeaseID), raw); err != nil {
			return err
		}
		return addEvents(tx, events)
	})
}

func addEvents(tx *bolt.Tx, events []*agentv1.AuditEvent) error {
	m, ob := tx.Bucket(bMeta), tx.Bucket(bOutbox)
	for _, e := range events {
		seq := getU64(m, "event_seq") + 1
		if err := putU64(m, "event_seq", seq); err != nil {
			return err
		}
		// The id is the outbox key, so AckEvents finds it; the instance
		// prefix is constant, so keys still sort by sequence.
		e.Id = fmt.Sprintf("%s-%020d", m.Get([]byte("instance")), seq)
		raw, err := proto.Marshal(e)
		if err != nil {
			return err
		}
		if err := ob.Put([]byte(e.Id), raw); err != nil {
			return err
		}
	}
	return nil
}

// AddEvents appends audit events to the outbox.
func (j *Journal) AddEvents(events ...*agentv1.AuditEvent) error {
	return j.db.Update(func(tx *bolt.Tx) error { return addEvents(tx, events) })
}

// PendingEvents returns up to max unacknowledged audit events, oldest first.
func (j *Journal) PendingEvents(max int) ([]*agentv1.AuditEvent, error) {
	var out []*agentv1.AuditEvent
	err := j.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bOutbox).Cursor()
		for k, v := c.First(); k != nil && len(out) < max; k, v = c.Next() {
			e := &agentv1.AuditEvent{}
			if err := proto.Unmarshal(v, e); err != nil {
				return fmt.Errorf("decode outbox event %s: %w", k, err)
			}
			out = append(out, e)
		}
		return nil
	})
	return out, err
}

// AckEvents removes acknowledged events from the outbox.
func (j *Journal) AckEvents(ids []string) error {
	return j.db.Update(func(tx *bolt.Tx) error {
		ob := tx.Bucket(bOutbox)
		for _, id := range ids {
			if err := ob.Delete([]byte(id)); err != nil {
				return err
			}
		}
		return nil
	})
}

// NextSequence numbers an observed-state report and marks every terminal
// record not yet reported as carried by it.
func (j *Journal) NextSequence() (uint64, error) {
	var seq uint64
	err := j.db.Update(func(tx *bolt.Tx) error {
		m := tx.Bucket(bMeta)
		seq = getU64(m, "sequence") + 1
		if err := putU64(m, "sequence", seq); err != nil {
			return err
		}
		lb := tx.Bucket(bLeases)
		var updates [][2][]byte
		err := lb.ForEach(func(k, v []byte) error {
			var r Record
			if err := json.Unmarshal(v, &r); err != nil {
				return err
			}
			if terminal(r.Phase) && r.ReportedSeq == 0 {
				r.ReportedSeq = seq
				raw, err := json.Marshal(r)
				if err != nil {
					return err
				}
				updates = append(updates, [2][]byte{append([]byte(nil), k...), raw})
			}
			return nil
		})
		if err != nil {
			return err
		}
		for _, u := range updates {
			if err := lb.Put(u[0], u[1]); err != nil {
				return err
			}
		}
		return nil
	})
	return seq, err
}

// Prune forgets terminal records the control plane has acknowledged
// (reported at or before acked) and that are no longer desired.
func (j *Journal) Prune(acked uint64) ([]string, error) {
	var gone []string
	err := j.db.Update(func(tx *bolt.Tx) error {
		lb, d := tx.Bucket(bLeases), tx.Bucket(bDesired)
		err := lb.ForEach(func(k, v []byte) error {
			var r Record
			if err := json.Unmarshal(v, &r); err != nil {
				return err
			}
			if terminal(r.Phase) && r.ReportedSeq != 0 && r.ReportedSeq <= acked && d.Get(k) == nil {
				gone = append(gone, string(k))
			}
			return nil
		})
		if err != nil {
			return err
		}
		for _, id := range gone {
			if err := lb.Delete([]byte(id)); err != nil {
				return err
			}
		}
		return nil
	})
	return gone, err
}

func terminal(p leasev1.Phase) bool {
	return p == leasev1.Phase_PHASE_TERMINATED || p == leasev1.Phase_PHASE_FAILED
}
