package audit

import (
	"context"
	"errors"
	"path/filepath"
	"testing"

	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
)

func TestAppendAndVerify(t *testing.T) {
	ctx := context.Background()
	s, err := store.OpenBolt(filepath.Join(t.TempDir(), "s.db"), store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for i := 0; i < 10; i++ {
		err := s.Update(ctx, func(tx store.Tx) error {
			_, err := Append(tx, auditlog.Entry{Actor: "a", Action: "lease.create", Outcome: auditlog.OutcomeSuccess})
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	// An update that fails leaves no entry behind.
	_ = s.Update(ctx, func(tx store.Tx) error {
		if _, err := Append(tx, auditlog.Entry{Action: "x"}); err != nil {
			return err
		}
		return errors.New("state change failed")
	})
	res, err := Verify(ctx, s)
	if err != nil {
		t.Fatal(err)
	}
	if res.Entries != 10 {
		t.Fatalf("entries = %d, want 10", res.Entries)
	}

	// Rewriting a stored entry is detected.
	err = s.Update(ctx, func(tx store.Tx) error {
		raw, err := tx.Get(store.BucketAudit, Key(4))
		if err != nil {
			return err
		}
		e, _ := auditlog.Decode(raw)
		e.Outcome = auditlog.OutcomeDenied
		return tx.Put(store.BucketAudit, Key(4), auditlog.Encode(e))
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Verify(ctx, s); !errors.Is(err, auditlog.ErrTampered) {
		t.Fatalf("err = %v, want ErrTampered", err)
	}
}

func TestVerifyDetectsTruncation(t *testing.T) {
	ctx := context.Background()
	s, err := store.OpenBolt(filepath.Join(t.TempDir(), "s.db"), store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for i := 0; i < 3; i++ {
		s.Update(ctx, func(tx store.Tx) error { _, err := Append(tx, auditlog.Entry{Action: "a"}); return err })
	}
	s.Update(ctx, func(tx store.Tx) error { return tx.Delete(store.BucketAudit, Key(3)) })
	if _, err := Verify(ctx, s); !errors.Is(err, auditlog.ErrTampered) {
		t.Fatalf("err = %v, want ErrTampered", err)
	}
}
