package sink_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/mod/sumdb/note"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/audit/sink"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/errs"
)

const origin = "gpuaas.test/audit"

type keys struct {
	signer  note.Signer
	trusted note.Verifiers
}

func newKeys(t testing.TB, name string) keys {
	t.Helper()
	skey, vkey, err := auditlog.GenerateKey(name)
	if err != nil {
		t.Fatal(err)
	}
	s, _ := auditlog.ParseSigners([]byte(skey))
	v, _, _ := auditlog.ParseVerifiers([]byte(vkey))
	return keys{s[0], v}
}

// controlPlaneLog is a store with a checkpointer, as the control plane has.
type controlPlaneLog struct {
	st *store.Bolt
	cp *audit.Checkpointer
	n  int
}

func newLog(t testing.TB, k keys) *controlPlaneLog {
	t.Helper()
	st, err := store.OpenBolt(filepath.Join(t.TempDir(), "state.db"), store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	cp, err := audit.NewCheckpointer(audit.CheckpointerOptions{Store: st, Signers: []note.Signer{k.signer}, Origin: origin})
	if err != nil {
		t.Fatal(err)
	}
	return &controlPlaneLog{st: st, cp: cp}
}

// grow appends n entries by actor and signs a checkpoint.
func (l *controlPlaneLog) grow(t testing.TB, n int, actor string) {
	t.Helper()
	for range n {
		l.n++
		err := l.st.Update(context.Background(), func(tx store.Tx) error {
			_, err := audit.Append(tx, auditlog.Entry{Time: time.Unix(1700000000, 0), Actor: actor, Action: "lease.create",
				Resource: fmt.Sprintf("lease/%d", l.n), Outcome: auditlog.OutcomeSuccess, RequestID: "r"})
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := l.cp.Checkpoint(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func openSink(t testing.TB, dir string, k keys) *sink.Sink {
	t.Helper()
	s, err := sink.Open(sink.Options{Dir: dir, Origin: origin, Trusted: k.trusted})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// deliver sends the batch after from, of at most 6 entries.
func deliver(t testing.TB, s *sink.Sink, l *controlPlaneLog, from uint64) (uint64, bool, error) {
	t.Helper()
	b, err := audit.ReadBatch(context.Background(), l.st, from, 6)
	if err != nil {
		t.Fatal(err)
	}
	return s.Deliver(context.Background(), b)
}

func TestSinkStoresAndDeduplicates(t *testing.T) {
	k := newKeys(t, origin)
	l := newLog(t, k)
	dir := t.TempDir()
	s := openSink(t, dir, k)
	l.grow(t, 5, "alice")
	if size, dup, err := deliver(t, s, l, 0); err != nil || dup || size != 5 {
		t.Fatalf("first batch: %d %v %v", size, dup, err)
	}
	if size, dup, err := deliver(t, s, l, 0); err != nil || !dup || size != 5 {
		t.Fatalf("repeated batch: %d %v %v, want a duplicate", size, dup, err)
	}
	l.grow(t, 4, "alice")
	if size, dup, err := deliver(t, s, l, 5); err != nil || dup || size != 9 {
		t.Fatalf("second batch: %d %v %v", size, dup, err)
	}
	// A restarted sink rebuilds the same state and still deduplicates.
	s = openSink(t, dir, k)
	if size, cp, err := s.State(origin); err != nil || size != 9 || len(cp) == 0 {
		t.Fatalf("state after restart: %d %v", size, err)
	}
	if _, dup, err := deliver(t, s, l, 5); err != nil || !dup {
		t.Fatalf("repeated batch after restart: %v %v", dup, err)
	}
	res, err := sink.VerifyDir(dir, origin, k.trusted)
	if err != nil || res.Entries != 9 || res.Batches != 2 {
		t.Fatalf("VerifyDir = %+v, %v", res, err)
	}
	if _, _, err := s.State("other/log"); !errors.Is(err, errs.ErrNotFound) {
		t.Fatalf("state of another log: %v", err)
	}
}

func TestSinkRefuses(t *testing.T) {
	k := newKeys(t, origin)
	honest := newLog(t, k)
	honest.grow(t, 6, "alice")
	honest.grow(t, 4, "alice")
	// fork is the same log key signing different entries: what a
	// compromised or buggy control plane would present.
	fork := newLog(t, k)
	fork.grow(t, 6, "mallory")
	fork.grow(t, 4, "mallory")
	fork.grow(t, 5, "mallory")
	rogue := newLog(t, newKeys(t, origin))
	rogue.grow(t, 6, "eve")

	cases := []struct {
		name   string
		batch  func() auditlog.Batch
		reason string
		names  []string
	}{
		{"a fork: another checkpoint of the same size", func() auditlog.Batch {
			b, _ := audit.ReadBatch(context.Background(), fork.st, 6, 4)
			return b
		}, "AUDIT_FORK", []string{"checkpoint 10", "same size and different roots"}},
		{"a fork that grew past the sink", func() auditlog.Batch {
			b, _ := audit.ReadBatch(context.Background(), fork.st, 10, 1000)
			return b
		}, "AUDIT_FORK", []string{"builds on checkpoint 10", "holds checkpoint 10"}},
		{"a rollback to an older checkpoint", func() auditlog.Batch {
			b, _ := audit.ReadBatch(context.Background(), fork.st, 0, 6)
			return b
		}, "AUDIT_ROLLBACK", []string{"checkpoint 6", "smaller than the earlier checkpoint 10"}},
		{"a checkpoint signed by an untrusted key", func() auditlog.Batch {
			b, _ := audit.ReadBatch(context.Background(), rogue.st, 0, 1000)
			return b
		}, "AUDIT_UNTRUSTED_CHECKPOINT", []string{"checkpoint 6", "untrusted key"}},
		{"a gap", func() auditlog.Batch {
			l := newLog(t, k)
			l.grow(t, 6, "alice")
			l.grow(t, 4, "alice")
			l.grow(t, 2, "alice")
			b, _ := audit.ReadBatch(context.Background(), l.st, 10, 1000)
			b.PrevSize = 11
			return b
		}, "AUDIT_BATCH_GAP", []string{"starts after entry 11"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := openSink(t, t.TempDir(), k)
			for _, from := range []uint64{0, 6} {
				if _, _, err := deliver(t, s, honest, from); err != nil {
					t.Fatal(err)
				}
			}
			_, _, err := s.Deliver(context.Background(), tc.batch())
			if got := errs.ReasonOf(err); got != tc.reason {
				t.Fatalf("reason = %q (%v), want %s", got, err, tc.reason)
			}
			for _, n := range tc.names {
				if !strings.Contains(err.Error(), n) {
					t.Errorf("error %q does not name %q", err, n)
				}
			}
			if size, _, _ := s.State(origin); size != 10 {
				t.Errorf("sink size %d after a refusal, want 10", size)
			}
		})
	}
	t.Run("a flipped byte in an entry", func(t *testing.T) {
		s := openSink(t, t.TempDir(), k)
		deliver(t, s, honest, 0)
		b, _ := audit.ReadBatch(context.Background(), honest.st, 6, 1000)
		b.Entries[2] = []byte(strings.Replace(string(b.Entries[2]), "alice", "alicE", 1))
		_, _, err := s.Deliver(context.Background(), b)
		if errs.ReasonOf(err) != "AUDIT_BATCH_TAMPERED" || !strings.Contains(err.Error(), "checkpoint 10") {
			t.Fatalf("err = %v (%s)", err, errs.ReasonOf(err))
		}
	})
	t.Run("fork evidence is kept", func(t *testing.T) {
		dir := t.TempDir()
		s := openSink(t, dir, k)
		deliver(t, s, honest, 0)
		deliver(t, s, honest, 6)
		b, _ := audit.ReadBatch(context.Background(), fork.st, 6, 4)
		s.Deliver(context.Background(), b)
		ev, _ := filepath.Glob(filepath.Join(dir, "evidence", "audit_fork-*.note"))
		if len(ev) != 1 {
			t.Fatalf("evidence = %v", ev)
		}
	})
}

func TestVerifyDirDetectsTampering(t *testing.T) {
	k := newKeys(t, origin)
	l := newLog(t, k)
	l.grow(t, 3, "alice")
	l.grow(t, 3, "alice")
	l.grow(t, 3, "alice")
	build := func(t *testing.T) (string, []string) {
		dir := t.TempDir()
		s := openSink(t, dir, k)
		for _, from := range []uint64{0, 3, 6} {
			b, _ := audit.ReadBatch(context.Background(), l.st, from, 3)
			if _, _, err := s.Deliver(context.Background(), b); err != nil {
				t.Fatal(err)
			}
		}
		files, _ := filepath.Glob(filepath.Join(dir, "batches", "*.json"))
		if len(files) != 3 {
			t.Fatalf("batch files = %v", files)
		}
		return dir, files
	}
	for name, tc := range map[string]struct {
		edit func(files []string)
		want string
	}{
		"flip a byte": {func(f []string) {
			b, _ := os.ReadFile(f[1])
			os.WriteFile(f[1], []byte(strings.Replace(string(b), "lease/5", "lease/6", 1)), 0o600)
		}, "00000000000000000003-00000000000000000006.json"},
		"delete a batch": {func(f []string) { os.Remove(f[1]) }, "starts after entry 6 but the batches before it end at 3"},
		"truncate":       {func(f []string) { os.WriteFile(f[2], nil, 0o600) }, "00000000000000000006-00000000000000000009.json"},
	} {
		t.Run(name, func(t *testing.T) {
			dir, files := build(t)
			tc.edit(files)
			_, err := sink.VerifyDir(dir, origin, k.trusted)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want it to name %q", err, tc.want)
			}
		})
	}
}
