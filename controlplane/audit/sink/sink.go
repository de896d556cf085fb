// Package sink is the reference upstream audit sink: it receives signed
// batches from control planes (gpuaas.audit.v1.AuditSinkService), verifies
// every signature, consistency proof and entry, stores each batch as one
// file in its directory and deduplicates on batch id, so a forwarder that
// delivers at least once produces a log held exactly once. It refuses a
// fork or a rollback with an error that names both checkpoints, and keeps
// the refused checkpoint as evidence.
//
// It is what the tests deliver to and what an upstream team can copy; it
// holds one log (one origin) per directory. Layout:
//
//	DIR/batches/%020d-%020d.json   one delivered batch (from, to], JSON
//	DIR/evidence/*.note            checkpoints refused as a fork or rollback
//
// A batch file is written to a temporary name, synced and renamed, so a
// crash leaves either the whole batch or none; on start every batch is
// verified again (VerifyDir), which rebuilds the state.
package sink

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"golang.org/x/mod/sumdb/note"

	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/errs"
)

// Options configures a Sink.
type Options struct {
	Dir string
	// Origin is the log this sink holds.
	Origin string
	// Trusted are the keys the log's checkpoints may be signed with.
	Trusted note.Verifiers
	Logger  *slog.Logger
}

// Sink holds one log. It is safe for concurrent use.
type Sink struct {
	o  Options
	mu sync.Mutex
	st state
}

// state is what the stored batches add up to.
type state struct {
	tree   *auditlog.Tree
	last   *auditlog.Checkpoint
	signed []byte
	ids    map[string]uint64 // batch id -> its checkpoint size
}

// record is a batch file.
type record struct {
	BatchID            string    `json:"batch_id"`
	PreviousTreeSize   uint64    `json:"previous_tree_size"`
	PreviousCheckpoint string    `json:"previous_checkpoint"`
	Entries            []string  `json:"entries"`
	Checkpoint         string    `json:"checkpoint"`
	ConsistencyProof   [][]byte  `json:"consistency_proof"`
	Received           time.Time `json:"received"`
}

func (r record) batch() auditlog.Batch {
	b := auditlog.Batch{ID: r.BatchID, PrevSize: r.PreviousTreeSize, Checkpoint: []byte(r.Checkpoint), Consistency: r.ConsistencyProof}
	if r.PreviousCheckpoint != "" {
		b.PrevCheckpoint = []byte(r.PreviousCheckpoint)
	}
	for _, e := range r.Entries {
		b.Entries = append(b.Entries, []byte(e))
	}
	return b
}

// Open loads and verifies the batches in o.Dir (creating it if needed).
func Open(o Options) (*Sink, error) {
	if o.Dir == "" || o.Origin == "" || o.Trusted == nil {
		return nil, errors.New("audit sink: a directory, an origin and trusted keys are required")
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	for _, d := range []string{"batches", "evidence"} {
		if err := os.MkdirAll(filepath.Join(o.Dir, d), 0o700); err != nil {
			return nil, fmt.Errorf("audit sink: %w", err)
		}
	}
	st, err := load(o.Dir, o.Origin, o.Trusted)
	if err != nil {
		return nil, fmt.Errorf("audit sink %s: %w", o.Dir, err)
	}
	return &Sink{o: o, st: st}, nil
}

// Result is what VerifyDir found.
type Result struct {
	Entries uint64
	Batches int
	Latest  *auditlog.Checkpoint
}

// VerifyDir verifies a sink directory offline: every batch, in order,
// contiguous, signed by a trusted key, consistent with the one before, its
// entries hashing to its checkpoint. Errors name the batch file and the
// entry or checkpoint.
func VerifyDir(dir, origin string, trusted note.Verifiers) (Result, error) {
	st, err := load(dir, origin, trusted)
	if err != nil {
		return Result{}, err
	}
	return Result{Entries: st.tree.Size(), Batches: len(st.ids), Latest: st.last}, nil
}

func load(dir, origin string, trusted note.Verifiers) (state, error) {
	st := state{tree: auditlog.NewTree(), ids: map[string]uint64{}}
	names, err := filepath.Glob(filepath.Join(dir, "batches", "*.json"))
	if err != nil {
		return st, err
	}
	if _, err := os.Stat(filepath.Join(dir, "batches")); err != nil {
		return st, fmt.Errorf("not a sink directory: %w", err)
	}
	sort.Strings(names)
	for _, name := range names {
		base := filepath.Base(name)
		raw, err := os.ReadFile(name)
		if err != nil {
			return st, err
		}
		var r record
		dec := json.NewDecoder(bytes.NewReader(raw))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&r); err != nil {
			return st, fmt.Errorf("%w: batch file %s: %v", auditlog.ErrTampered, base, err)
		}
		if r.PreviousTreeSize != st.tree.Size() {
			return st, fmt.Errorf("%w: batch file %s starts after entry %d but the batches before it end at %d (a batch was removed or reordered)", auditlog.ErrTampered, base, r.PreviousTreeSize, st.tree.Size())
		}
		cp, tree, err := auditlog.VerifyBatch(r.batch(), origin, trusted, st.tree, st.last)
		if err != nil {
			return st, fmt.Errorf("batch file %s: %w", base, err)
		}
		if want := fileName(r.PreviousTreeSize, cp.Size); base != want {
			return st, fmt.Errorf("%w: batch file %s holds entries after %d up to %d (want name %s)", auditlog.ErrTampered, base, r.PreviousTreeSize, cp.Size, want)
		}
		if _, dup := st.ids[r.BatchID]; dup {
			return st, fmt.Errorf("%w: batch file %s repeats batch id %s", auditlog.ErrTampered, base, r.BatchID)
		}
		st.tree, st.last, st.signed = tree, &cp, []byte(r.Checkpoint)
		st.ids[r.BatchID] = cp.Size
	}
	return st, nil
}

func fileName(from, to uint64) string { return fmt.Sprintf("%020d-%020d.json", from, to) }

// State is the sink's size and latest signed checkpoint for origin.
func (s *Sink) State(origin string) (uint64, []byte, error) {
	if origin != s.o.Origin {
		return 0, nil, errs.NotFound("AUDIT_UNKNOWN_LOG", "this sink holds log %q, not %q", s.o.Origin, origin)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.st.tree.Size(), bytes.Clone(s.st.signed), nil
}

// Deliver verifies and stores one batch. It returns the sink's size after
// it and whether the batch was a duplicate. Errors are pkg/errs errors
// with the reasons listed on AuditSinkService.DeliverBatch.
func (s *Sink) Deliver(ctx context.Context, b auditlog.Batch) (uint64, bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return 0, false, err
	}
	if size, ok := s.st.ids[b.ID]; ok && b.ID != "" {
		return max(size, s.st.tree.Size()), true, nil
	}
	next, tree, err := auditlog.VerifyBatch(b, s.o.Origin, s.o.Trusted, s.st.tree, s.st.last)
	if err != nil {
		return s.st.tree.Size(), false, s.refuse(b, next, err)
	}
	r := record{BatchID: b.ID, PreviousTreeSize: b.PrevSize, PreviousCheckpoint: string(b.PrevCheckpoint),
		Checkpoint: string(b.Checkpoint), ConsistencyProof: b.Consistency, Received: time.Now().UTC()}
	for _, e := range b.Entries {
		r.Entries = append(r.Entries, string(e))
	}
	data, err := json.Marshal(r)
	if err != nil {
		return s.st.tree.Size(), false, err
	}
	if err := writeAtomic(filepath.Join(s.o.Dir, "batches"), fileName(b.PrevSize, next.Size), data); err != nil {
		return s.st.tree.Size(), false, errs.Wrap(errs.ErrUnavailable, "AUDIT_SINK_STORAGE", "the sink could not store the batch", err)
	}
	s.st.tree, s.st.last, s.st.signed = tree, &next, bytes.Clone(b.Checkpoint)
	s.st.ids[b.ID] = next.Size
	s.o.Logger.Info("audit batch stored", "batch", b.ID, "from", b.PrevSize, "to", next.Size)
	return next.Size, false, nil
}

// refuse classifies a verification failure, keeping fork and rollback
// checkpoints as evidence.
func (s *Sink) refuse(b auditlog.Batch, next auditlog.Checkpoint, err error) error {
	msg := err.Error()
	s.o.Logger.Warn("audit batch refused", "batch", b.ID, "from", b.PrevSize, "err", err)
	switch {
	case errors.Is(err, auditlog.ErrUntrusted):
		return errs.Wrap(errs.ErrPermissionDenied, "AUDIT_UNTRUSTED_CHECKPOINT", msg, err)
	case errors.Is(err, auditlog.ErrInconsistent):
		reason := "AUDIT_FORK"
		if strings.Contains(msg, "rollback") {
			reason = "AUDIT_ROLLBACK"
		}
		if next.Size > 0 {
			name := fmt.Sprintf("%s-%020d-%d.note", strings.ToLower(reason), next.Size, time.Now().UnixNano())
			if werr := writeAtomic(filepath.Join(s.o.Dir, "evidence"), name, b.Checkpoint); werr != nil {
				s.o.Logger.Error("audit sink: keep evidence", "err", werr)
			}
		}
		return errs.Wrap(errs.ErrFailedPrecondition, reason, msg, err)
	case errors.Is(err, auditlog.ErrTampered):
		return errs.Wrap(errs.ErrInvalidArgument, "AUDIT_BATCH_TAMPERED", msg, err)
	case b.PrevSize > s.st.tree.Size():
		return errs.Wrap(errs.ErrFailedPrecondition, "AUDIT_BATCH_GAP", msg, err)
	case b.PrevSize < s.st.tree.Size():
		return errs.Wrap(errs.ErrFailedPrecondition, "AUDIT_BATCH_STALE", msg, err)
	default:
		return errs.Wrap(errs.ErrInvalidArgument, "AUDIT_BATCH_INVALID", msg, err)
	}
}

func writeAtomic(dir, name string, data []byte) error {
	f, err := os.CreateTemp(dir, ".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(f.Name(), filepath.Join(dir, name)); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
