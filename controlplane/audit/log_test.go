package audit

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/bits"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/mod/sumdb/note"

	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
)

const testOrigin = "gpuaas.test/audit"

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
	s, err := auditlog.ParseSigners([]byte(skey))
	if err != nil {
		t.Fatal(err)
	}
	v, _, err := auditlog.ParseVerifiers([]byte(vkey))
	if err != nil {
		t.Fatal(err)
	}
	return keys{s[0], v}
}

func openStore(t testing.TB) *store.Bolt {
	t.Helper()
	s, err := store.OpenBolt(filepath.Join(t.TempDir(), "s.db"), store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func appendN(t testing.TB, s store.Store, n int, actor string) {
	t.Helper()
	for i := 0; i < n; i++ {
		err := s.Update(context.Background(), func(tx store.Tx) error {
			_, err := Append(tx, auditlog.Entry{Time: time.Unix(1700000000, 0), Actor: actor, Tenant: "t1", Action: "lease.create",
				Resource: fmt.Sprintf("lease/%s-%d", actor, i), Outcome: auditlog.OutcomeSuccess, RequestID: "req"})
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}

func newCheckpointer(t testing.TB, s store.Store, k keys) *Checkpointer {
	t.Helper()
	c, err := NewCheckpointer(CheckpointerOptions{Store: s, Signers: []note.Signer{k.signer}, Origin: testOrigin})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func mustCheckpoint(t testing.TB, c *Checkpointer) auditlog.Checkpoint {
	t.Helper()
	msg, _, err := c.Checkpoint(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	cp, err := auditlog.ParseSigned(msg)
	if err != nil {
		t.Fatal(err)
	}
	return cp
}

// signedLog is a log of 10 entries with checkpoints at 4, 7 and 10.
func signedLog(t *testing.T) (*store.Bolt, keys) {
	s := openStore(t)
	k := newKeys(t, testOrigin)
	c := newCheckpointer(t, s, k)
	for _, n := range []int{4, 3, 3} {
		appendN(t, s, n, "spiffe://gpuaas.test/gpuaas/operator/alice")
		mustCheckpoint(t, c)
	}
	return s, k
}

func TestSignedLogVerifies(t *testing.T) {
	s, k := signedLog(t)
	res, err := Verify(context.Background(), s, VerifyOptions{Trusted: k.trusted, Origin: testOrigin})
	if err != nil {
		t.Fatal(err)
	}
	if res.Entries != 10 || res.Checkpoints != 3 || !res.SignaturesChecked || res.Latest.Size != 10 {
		t.Fatalf("result = %+v", res)
	}
	// Without keys the roots are still checked, and the result says the
	// signatures were not.
	res, err = Verify(context.Background(), s)
	if err != nil || res.SignaturesChecked || res.Checkpoints != 3 {
		t.Fatalf("keyless verify = %+v, %v", res, err)
	}
}

func TestCheckpointerSignsOnlyWhatIsNew(t *testing.T) {
	s := openStore(t)
	k := newKeys(t, testOrigin)
	c := newCheckpointer(t, s, k)
	if _, created, err := c.Checkpoint(context.Background()); err != nil || created {
		t.Fatalf("empty log: created=%v err=%v", created, err)
	}
	appendN(t, s, 3, "a")
	m1, created, err := c.Checkpoint(context.Background())
	if err != nil || !created {
		t.Fatal(err)
	}
	m2, created, err := c.Checkpoint(context.Background())
	if err != nil || created || string(m1) != string(m2) {
		t.Fatalf("second checkpoint of an unchanged log: created=%v err=%v", created, err)
	}
	if _, err := auditlog.Open(m1, testOrigin, k.trusted); err != nil {
		t.Fatal(err)
	}
	if _, err := NewCheckpointer(CheckpointerOptions{Store: s, Signers: []note.Signer{newKeys(t, "other").signer}, Origin: testOrigin}); err == nil {
		t.Fatal("a key named after another log was accepted")
	}
}

// copyBucket copies every key of a bucket from one store to another.
func copyBucket(t *testing.T, from, to store.Store, bucket string) {
	t.Helper()
	kv := map[string][]byte{}
	from.View(context.Background(), func(tx store.Tx) error {
		return tx.Scan(bucket, "", false, func(k string, v []byte) error { kv[k] = v; return nil })
	})
	err := to.Update(context.Background(), func(tx store.Tx) error {
		for k, v := range kv {
			if err := tx.Put(bucket, k, v); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestCheckpointerRefusesAFork(t *testing.T) {
	// Log A signs a checkpoint at 5. Log B has different entries; given
	// A's checkpoint, B's checkpointer (same key) must refuse to sign,
	// at the same size (a fork) and at a larger one (not an extension).
	a := openStore(t)
	k := newKeys(t, testOrigin)
	appendN(t, a, 5, "alice")
	mustCheckpoint(t, newCheckpointer(t, a, k))
	for _, n := range []int{5, 9} {
		b := openStore(t)
		appendN(t, b, n, "mallory")
		copyBucket(t, a, b, store.BucketAuditCheckpoints)
		_, _, err := newCheckpointer(t, b, k).Checkpoint(context.Background())
		if !errors.Is(err, auditlog.ErrInconsistent) || !strings.Contains(err.Error(), "checkpoint 5") {
			t.Fatalf("size %d: %v, want a refusal naming checkpoint 5", n, err)
		}
		var count int
		b.View(context.Background(), func(tx store.Tx) error {
			return tx.Scan(store.BucketAuditCheckpoints, "", false, func(string, []byte) error { count++; return nil })
		})
		if count != 1 {
			t.Fatalf("size %d: %d checkpoints stored after a refusal", n, count)
		}
	}
}

func TestProofIsCheckableByAThirdParty(t *testing.T) {
	s, k := signedLog(t)
	for seq := uint64(1); seq <= 10; seq++ {
		b, err := Prove(context.Background(), s, seq)
		if err != nil {
			t.Fatal(err)
		}
		js, _ := json.Marshal(b)
		back, err := auditlog.ParseInclusionBundle(js)
		if err != nil {
			t.Fatal(err)
		}
		e, cp, err := back.Verify(testOrigin, k.trusted)
		if err != nil || e.Seq != seq || cp.Size != 10 {
			t.Fatalf("entry %d: %+v %v %v", seq, e, cp, err)
		}
	}
	appendN(t, s, 1, "late")
	if _, err := Prove(context.Background(), s, 11); !errors.Is(err, ErrNotCheckpointed) {
		t.Fatalf("unsigned entry: %v", err)
	}
}

// tamper edits the store directly, as an attacker with the file would.
func tamper(t *testing.T, s store.Store, fn func(tx store.Tx) error) {
	t.Helper()
	if err := s.Update(context.Background(), fn); err != nil {
		t.Fatal(err)
	}
}

func TestTamperingIsDetected(t *testing.T) {
	other := newKeys(t, testOrigin)
	cases := []struct {
		name string
		edit func(t *testing.T, s store.Store, tx store.Tx) error
		want []string // substrings of the error: what it names
	}{
		{"flip a byte in an entry", func(t *testing.T, s store.Store, tx store.Tx) error {
			raw, _ := tx.Get(store.BucketAudit, Key(6))
			raw[strings.Index(string(raw), "alice")] = 'A'
			return tx.Put(store.BucketAudit, Key(6), raw)
		}, []string{"checkpoint 7"}},
		{"rewrite an entry canonically", func(t *testing.T, s store.Store, tx store.Tx) error {
			raw, _ := tx.Get(store.BucketAudit, Key(2))
			e, _ := auditlog.Decode(raw)
			e.Outcome = auditlog.OutcomeDenied
			return tx.Put(store.BucketAudit, Key(2), auditlog.Encode(e))
		}, []string{"checkpoint 4"}},
		{"delete an entry", func(t *testing.T, s store.Store, tx store.Tx) error {
			return tx.Delete(store.BucketAudit, Key(5))
		}, []string{"entry 5", "deleted"}},
		{"reorder two entries", func(t *testing.T, s store.Store, tx store.Tx) error {
			r3, _ := tx.Get(store.BucketAudit, Key(3))
			r8, _ := tx.Get(store.BucketAudit, Key(8))
			tx.Put(store.BucketAudit, Key(3), r8)
			return tx.Put(store.BucketAudit, Key(8), r3)
		}, []string{"entry 3", "found sequence 8"}},
		{"truncate the log and rewind its head", func(t *testing.T, s store.Store, tx store.Tx) error {
			// The attacker also rewrites the sequence and the tree state
			// to what they were at 7, so only the checkpoint tells.
			seven := auditlog.NewTree()
			for i := uint64(1); i <= 7; i++ {
				raw, _ := tx.Get(store.BucketAudit, Key(i))
				seven.Append(auditlog.LeafHash(raw), nil)
			}
			tb, _ := seven.MarshalBinary()
			tx.Put(store.BucketMeta, keyTree, tb)
			tx.Put(store.BucketMeta, keySeq, store.U64(7))
			for i := uint64(8); i <= 10; i++ {
				tx.Delete(store.BucketAudit, Key(i))
			}
			return nil
		}, []string{"checkpoint 10", "truncated"}},
		{"truncate the tail only", func(t *testing.T, s store.Store, tx store.Tx) error {
			return tx.Delete(store.BucketAudit, Key(10))
		}, []string{"entry 10"}},
		{"replace the last checkpoint with one signed by an untrusted key", func(t *testing.T, s store.Store, tx store.Tx) error {
			raw, _ := tx.Get(store.BucketAuditCheckpoints, Key(10))
			cp, _ := auditlog.ParseSigned(raw)
			forged, err := auditlog.Sign(cp, other.signer)
			if err != nil {
				return err
			}
			return tx.Put(store.BucketAuditCheckpoints, Key(10), forged)
		}, []string{"checkpoint 10", "untrusted key"}},
		{"swap in a checkpoint of another size", func(t *testing.T, s store.Store, tx store.Tx) error {
			raw, _ := tx.Get(store.BucketAuditCheckpoints, Key(7))
			return tx.Put(store.BucketAuditCheckpoints, Key(10), raw)
		}, []string{"checkpoint 7", "stored under key"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s, k := signedLog(t)
			tamper(t, s, func(tx store.Tx) error { return tc.edit(t, s, tx) })
			_, err := Verify(context.Background(), s, VerifyOptions{Trusted: k.trusted, Origin: testOrigin})
			if err == nil {
				t.Fatal("verify passed")
			}
			if !errors.Is(err, auditlog.ErrTampered) && !errors.Is(err, auditlog.ErrUntrusted) {
				t.Errorf("error %v is neither ErrTampered nor ErrUntrusted", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not name %q", err, w)
				}
			}
		})
	}
}

func TestSearchTailAndList(t *testing.T) {
	s := openStore(t)
	appendN(t, s, 3, "alice")
	appendN(t, s, 2, "bob")
	ctx := context.Background()
	got, err := Search(ctx, s, Filter{Actor: "bob"})
	if err != nil || len(got) != 2 || got[0].Seq != 4 {
		t.Fatalf("search actor = %v, %v", got, err)
	}
	got, _ = Search(ctx, s, Filter{Resource: "lease/alice-*", Limit: 2})
	if len(got) != 2 || got[1].Resource != "lease/alice-1" {
		t.Fatalf("search resource prefix = %v", got)
	}
	got, _ = Search(ctx, s, Filter{Since: time.Unix(1700000001, 0)})
	if len(got) != 0 {
		t.Fatalf("search since = %v", got)
	}
	got, _ = Tail(ctx, s, 2)
	if len(got) != 2 || got[0].Seq != 4 || got[1].Seq != 5 {
		t.Fatalf("tail = %v", got)
	}
	got, _ = List(ctx, s, 1, 2)
	if len(got) != 2 || got[0].Seq != 2 {
		t.Fatalf("list = %v", got)
	}
}

func TestReadsCrossBlocksOfTenThousand(t *testing.T) {
	// Reads go in blocks of 10^4 entries, one short transaction each; the
	// log here spans three of them.
	s := openStore(t)
	k := newKeys(t, testOrigin)
	ctx := context.Background()
	const n = 20_050
	for i := 0; i < n; i += 5000 {
		err := s.Update(ctx, func(tx store.Tx) error {
			for j := i; j < min(i+5000, n); j++ {
				if _, err := Append(tx, auditlog.Entry{Time: time.Unix(1700000000, 0), Actor: "a", Action: "lease.create",
					Resource: fmt.Sprintf("lease/%d", j+1), Outcome: auditlog.OutcomeSuccess}); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if i == 5000 {
			mustCheckpoint(t, newCheckpointer(t, s, k))
		}
	}
	mustCheckpoint(t, newCheckpointer(t, s, k))
	res, err := Verify(ctx, s, VerifyOptions{Trusted: k.trusted})
	if err != nil || res.Entries != n || res.Checkpoints != 2 {
		t.Fatalf("verify = %+v, %v", res, err)
	}
	es, err := List(ctx, s, 9_995, 10)
	if err != nil || len(es) != 10 || es[0].Seq != 9_996 || es[9].Seq != 10_005 {
		t.Fatalf("list across a block boundary = %d entries, %v", len(es), err)
	}
	es, _ = Tail(ctx, s, 3)
	if len(es) != 3 || es[2].Seq != n {
		t.Fatalf("tail = %v", es)
	}
	es, _ = Search(ctx, s, Filter{Resource: "lease/20001"})
	if len(es) != 1 || es[0].Seq != 20_001 {
		t.Fatalf("search = %v", es)
	}
	b, err := Prove(ctx, s, 10_000)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := b.Verify(testOrigin, k.trusted); err != nil {
		t.Fatal(err)
	}
	// A deleted entry in a middle block is named.
	tamper(t, s, func(tx store.Tx) error { return tx.Delete(store.BucketAudit, Key(15_000)) })
	if _, err := Verify(ctx, s); err == nil || !strings.Contains(err.Error(), "entry 15000") {
		t.Fatalf("verify after deleting 15000: %v", err)
	}
}

func TestKeysArePadded(t *testing.T) {
	for _, seq := range []uint64{0, 1, 42, 1<<64 - 1} {
		if got, want := Key(seq), fmt.Sprintf("%020d", seq); got != want {
			t.Errorf("Key(%d) = %q, want %q", seq, got, want)
		}
	}
	if got := nodeKey(3, 17); got != "node/00000000000000000143/03" {
		t.Errorf("nodeKey = %q", got)
	}
	if got := legacyNodeKey(3, 17); got != "tree/03/00000000000000000017" {
		t.Errorf("legacyNodeKey = %q", got)
	}
}

// Nodes are keyed in the order they complete, so every append's nodes go
// after all earlier ones (one tail page per commit, not one per level).
func TestNodeKeysGrowWithTheLog(t *testing.T) {
	tree := auditlog.NewTree()
	last := ""
	n := 0
	for i := range 5000 {
		tree.Append(auditlog.LeafHash([]byte(fmt.Sprint(i))), func(level uint, index uint64, _ []byte) {
			if level == 0 {
				return
			}
			n++
			k := nodeKey(level, index)
			if k <= last {
				t.Fatalf("leaf %d: node (%d, %d) key %q not after %q", i, level, index, k, last)
			}
			last = k
		})
	}
	// A tree of n leaves has n - popcount(n) perfect internal nodes.
	if want := 5000 - bits.OnesCount(5000); n != want {
		t.Fatalf("%d nodes completed, want %d", n, want)
	}
}

// A log upgraded from schema 3 keeps its old nodes under the legacy keys
// and writes new ones under the new keys; proofs read both.
func TestProofsReadNodesWrittenBeforeSchema4(t *testing.T) {
	for _, name := range []string{"all legacy", "upgraded after entry 6"} {
		t.Run(name, func(t *testing.T) {
			s, k := signedLog(t)
			tamper(t, s, func(tx store.Tx) error {
				var keys []string
				err := tx.Scan(store.BucketAudit, nodePrefix, false, func(key string, _ []byte) error {
					keys = append(keys, key)
					return nil
				})
				if err != nil {
					return err
				}
				moved := 0
				for _, key := range keys {
					var lastLeaf, level uint64
					if _, err := fmt.Sscanf(key, "node/%020d/%02d", &lastLeaf, &level); err != nil {
						return err
					}
					if name != "all legacy" && lastLeaf >= 6 {
						continue
					}
					h, err := tx.Get(store.BucketAudit, key)
					if err != nil {
						return err
					}
					if err := tx.Put(store.BucketAudit, legacyNodeKey(uint(level), (lastLeaf+1)>>level-1), h); err != nil {
						return err
					}
					if err := tx.Delete(store.BucketAudit, key); err != nil {
						return err
					}
					moved++
				}
				// Not t.Fatal: this runs on the store's committer goroutine.
				if moved == 0 || (name == "all legacy") != (moved == len(keys)) {
					return fmt.Errorf("moved %d of %d nodes", moved, len(keys))
				}
				return nil
			})
			for seq := uint64(1); seq <= 10; seq++ {
				b, err := Prove(context.Background(), s, seq)
				if err != nil {
					t.Fatalf("entry %d: %v", seq, err)
				}
				if e, cp, err := b.Verify(testOrigin, k.trusted); err != nil || e.Seq != seq || cp.Size != 10 {
					t.Fatalf("entry %d: %+v %v %v", seq, e, cp, err)
				}
			}
		})
	}
}

func TestCheckpointerSignsOnStop(t *testing.T) {
	s := openStore(t)
	k := newKeys(t, testOrigin)
	c, err := NewCheckpointer(CheckpointerOptions{Store: s, Signers: []note.Signer{k.signer}, Origin: testOrigin, Every: 1000, Interval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	appendN(t, s, 3, "a")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	c.Run(ctx)
	res, err := Verify(context.Background(), s, VerifyOptions{Trusted: k.trusted})
	if err != nil || res.Latest == nil || res.Latest.Size != 3 {
		t.Fatalf("after stop: %+v, %v", res, err)
	}
}
