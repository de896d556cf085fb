package store_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	bolt "go.etcd.io/bbolt"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/gpuaas/gpuaas/controlplane/store"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

func be64(v uint64) []byte { return store.U64(v) }

// v1Audit are audit entries as version 1 stored them (canonical JSON under
// %020d keys); the store must carry them over byte for byte.
var v1Audit = map[string][]byte{
	"00000000000000000001": []byte(`{"seq":1,"time":"2026-01-02T03:04:05Z","actor":"spiffe://gpuaas.test/gpuaas/operator/alice","action":"lease.create","resource":"lease/l-aaaaaaaaaaaaaaaaaaaa","outcome":"success","prev":"","hash":"6b1c"}`),
	"00000000000000000002": []byte(`{"seq":2,"time":"2026-01-02T03:04:06Z","actor":"gpuaas/controlplane","action":"lease.expire","resource":"lease/l-aaaaaaaaaaaaaaaaaaaa","outcome":"success","prev":"6b1c","hash":"9f00"}`),
}

// writeV1 writes a state file exactly as a version 1 binary did: five
// buckets, schema_version 1, a lease, its idempotency record, two audit
// entries and a node.
func writeV1(t testing.TB, path string) (lease []byte) {
	t.Helper()
	l := &leasev1.Lease{Id: "l-aaaaaaaaaaaaaaaaaaaa", Phase: leasev1.Phase_PHASE_RUNNING, Revision: 3,
		CreateTime: timestamppb.New(timestamppb.Now().AsTime()),
		Placement:  &leasev1.Placement{Node: "node-a", GpuUuid: "GPU-a0", ProfileId: 19, Start: 0, Size: 1}}
	lease, err := proto.Marshal(l)
	if err != nil {
		t.Fatal(err)
	}
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.Update(func(tx *bolt.Tx) error {
		put := func(bucket, key string, v []byte) error {
			b, err := tx.CreateBucketIfNotExists([]byte(bucket))
			if err != nil {
				return err
			}
			return b.Put([]byte(key), v)
		}
		for _, kv := range []struct {
			b, k string
			v    []byte
		}{
			{"meta", "schema_version", be64(1)},
			{"meta", "revision", be64(3)},
			{"meta", "audit_seq", be64(2)},
			{"meta", "audit_head", bytes.Repeat([]byte{0x9f}, 32)},
			{"leases", l.GetId(), lease},
			{"idempotency", "spiffe://gpuaas.test/gpuaas/operator/alice\x00k1", []byte(`{"lease_id":"l-aaaaaaaaaaaaaaaaaaaa","body_hash":"ab"}`)},
			{"nodes", "node-a", []byte{0x0a, 0x06, 'n', 'o', 'd', 'e', '-', 'a'}},
			{"audit", "00000000000000000001", v1Audit["00000000000000000001"]},
			{"audit", "00000000000000000002", v1Audit["00000000000000000002"]},
		} {
			if err := put(kv.b, kv.k, kv.v); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return lease
}

// A read-only open (how evidence is read) of a file older than the
// idempotency log reads its records where that version kept them, and
// writes nothing.
func TestBoltReadOnlyOpenOfAVersion1File(t *testing.T) {
	path := filepath.Join(t.TempDir(), "v1.db")
	writeV1(t, path)
	before, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	ro, err := store.OpenBoltReadOnly(path, 0)
	if err != nil {
		t.Fatal(err)
	}
	err = ro.View(context.Background(), func(tx store.Tx) error {
		v, err := tx.Get(store.BucketIdempotency, "spiffe://gpuaas.test/gpuaas/operator/alice\x00k1")
		if err != nil || !bytes.Contains(v, []byte("l-aaaaaaaaaaaaaaaaaaaa")) {
			t.Errorf("idempotency record = %q, %v", v, err)
		}
		if _, err := tx.Get(store.BucketIdempotency, "spiffe://gpuaas.test/gpuaas/operator/alice\x00k2"); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("absent record = %v, want ErrNotFound", err)
		}
		return nil
	})
	ro.Close()
	if err != nil {
		t.Fatal(err)
	}
	after, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(before, after) {
		t.Fatal("a read-only open changed the file")
	}
}

func TestBoltUpgradesAVersion1File(t *testing.T) {
	path := filepath.Join(t.TempDir(), "v1.db")
	lease := writeV1(t, path)
	s, err := store.OpenBolt(path, store.BoltOptions{})
	if err != nil {
		t.Fatalf("open a version 1 file: %v", err)
	}
	ctx := context.Background()
	check := func(s store.Store) {
		t.Helper()
		err := s.View(ctx, func(tx store.Tx) error {
			if v, err := store.GetU64(tx, "schema_version"); err != nil || v != store.SchemaVersion {
				t.Errorf("schema_version = %d, %v; want %d", v, err, store.SchemaVersion)
			}
			if v, _ := store.GetU64(tx, "revision"); v != 3 {
				t.Errorf("revision = %d, want 3", v)
			}
			if v, _ := store.GetU64(tx, "audit_seq"); v != 2 {
				t.Errorf("audit_seq = %d, want 2", v)
			}
			if v, err := tx.Get(store.BucketLeases, "l-aaaaaaaaaaaaaaaaaaaa"); err != nil || !bytes.Equal(v, lease) {
				t.Errorf("lease after upgrade = %x, %v", v, err)
			} else {
				l := &leasev1.Lease{}
				if err := proto.Unmarshal(v, l); err != nil || l.GetPlacement().GetNode() != "node-a" {
					t.Errorf("lease decodes to %v, %v", l, err)
				}
			}
			n := 0
			if err := tx.Scan(store.BucketAudit, "", false, func(k string, v []byte) error {
				n++
				if !bytes.Equal(v, v1Audit[k]) {
					t.Errorf("audit %s = %s, want it unchanged", k, v)
				}
				return nil
			}); err != nil {
				return err
			}
			if n != 2 {
				t.Errorf("%d audit entries, want 2", n)
			}
			if _, err := tx.Get(store.BucketIdempotency, "spiffe://gpuaas.test/gpuaas/operator/alice\x00k1"); err != nil {
				t.Errorf("idempotency record: %v", err)
			}
			// Every version 2 bucket exists and is usable.
			for _, b := range store.Buckets {
				if err := tx.Scan(b, "", false, func(string, []byte) error { return nil }); err != nil {
					t.Errorf("bucket %s after upgrade: %v", b, err)
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	check(s)
	if err := s.Update(ctx, func(tx store.Tx) error {
		return tx.Put(store.BucketAuditCheckpoints, "00000000000000000002", []byte("checkpoint"))
	}); err != nil {
		t.Fatalf("write to a new bucket: %v", err)
	}
	// The idempotency record written before version 5 is replaced where
	// it is, and a new one goes to the log: a scan finds each once.
	legacy := "spiffe://gpuaas.test/gpuaas/operator/alice\x00k1"
	if err := s.Update(ctx, func(tx store.Tx) error {
		if err := tx.Put(store.BucketIdempotency, legacy, []byte("replaced")); err != nil {
			return err
		}
		return tx.Put(store.BucketIdempotency, legacy[:len(legacy)-1]+"0", []byte("new"))
	}); err != nil {
		t.Fatal(err)
	}
	if err := s.View(ctx, func(tx store.Tx) error {
		var got []string
		err := tx.Scan(store.BucketIdempotency, "", false, func(k string, v []byte) error {
			got = append(got, k[len(k)-2:]+"="+string(v))
			return nil
		})
		if len(got) != 2 || got[0] != "k0=new" || got[1] != "k1=replaced" {
			t.Errorf("idempotency records %q, want [k0=new k1=replaced]", got)
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	// Opening an upgraded file again is a no-op.
	s2, err := store.OpenBolt(path, store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	check(s2)
}

// refusedUntouched opens path, wants err, and checks that not one byte of
// the file changed.
func refusedUntouched(t *testing.T, path string, want error) {
	t.Helper()
	before, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s, err := store.OpenBolt(path, store.BoltOptions{})
	if err == nil {
		s.Close()
		t.Fatal("open succeeded")
	}
	if !errors.Is(err, want) {
		t.Fatalf("open = %v, want %v", err, want)
	}
	t.Logf("refused with: %v", err)
	after, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(before, after) {
		t.Fatal("the refused file was modified")
	}
}

func TestBoltRefusesAFileFromTheFutureAndTouchesNothing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "future.db")
	writeV1(t, path)
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte("meta")).Put([]byte("schema_version"), be64(store.SchemaVersion+1))
	})
	db.Close()
	if err != nil {
		t.Fatal(err)
	}
	refusedUntouched(t, path, store.ErrSchema)
}

func TestBoltRefusesACorruptFileAndTouchesNothing(t *testing.T) {
	t.Run("not a bbolt file", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "garbage.db")
		garbage := bytes.Repeat([]byte("this is not a database "), 2000)
		if err := os.WriteFile(path, garbage, 0o600); err != nil {
			t.Fatal(err)
		}
		refusedUntouched(t, path, store.ErrCorrupt)
	})
	t.Run("both meta pages damaged", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "damaged.db")
		writeV1(t, path)
		raw, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		page := os.Getpagesize()
		for _, off := range []int{0, page} {
			for i := off + 16; i < off+64; i++ {
				raw[i] ^= 0x5a
			}
		}
		if err := os.WriteFile(path, raw, 0o600); err != nil {
			t.Fatal(err)
		}
		refusedUntouched(t, path, store.ErrCorrupt)
	})
	t.Run("a damaged idempotency log record", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "badlog.db")
		writeV1(t, path)
		s, err := store.OpenBolt(path, store.BoltOptions{})
		if err != nil {
			t.Fatal(err)
		}
		s.Close()
		db, err := bolt.Open(path, 0o600, nil)
		if err != nil {
			t.Fatal(err)
		}
		db.Update(func(tx *bolt.Tx) error {
			return tx.Bucket([]byte("idempotency.log")).Put(be64(1), []byte{0x7f, 'x'}) // key length past the end
		})
		db.Close()
		refusedUntouched(t, path, store.ErrCorrupt)
		// Evidence is still readable (gpuaasctl audit verify opens the
		// file read-only); the damaged bucket itself reads as corrupt.
		ro, err := store.OpenBoltReadOnly(path, 0)
		if err != nil {
			t.Fatalf("read-only open: %v", err)
		}
		defer ro.Close()
		ro.View(context.Background(), func(tx store.Tx) error {
			if _, err := tx.Get(store.BucketAudit, "00000000000000000001"); err != nil {
				t.Errorf("audit entry beside a damaged idempotency log: %v", err)
			}
			if _, err := tx.Get(store.BucketIdempotency, "spiffe://gpuaas.test/gpuaas/operator/alice\x00k1"); !errors.Is(err, store.ErrCorrupt) {
				t.Errorf("idempotency read = %v, want ErrCorrupt", err)
			}
			return nil
		})
	})
	t.Run("the idempotency log missing at schema 5", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "nolog.db")
		writeV1(t, path)
		s, err := store.OpenBolt(path, store.BoltOptions{})
		if err != nil {
			t.Fatal(err)
		}
		s.Close()
		db, err := bolt.Open(path, 0o600, nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := db.Update(func(tx *bolt.Tx) error { return tx.DeleteBucket([]byte("idempotency.log")) }); err != nil {
			t.Fatal(err)
		}
		db.Close()
		refusedUntouched(t, path, store.ErrCorrupt)
		ro, err := store.OpenBoltReadOnly(path, 0)
		if err != nil {
			t.Fatalf("read-only open: %v", err)
		}
		defer ro.Close()
		ro.View(context.Background(), func(tx store.Tx) error {
			if _, err := tx.Get(store.BucketIdempotency, "spiffe://gpuaas.test/gpuaas/operator/alice\x00k1"); !errors.Is(err, store.ErrCorrupt) {
				t.Errorf("idempotency read = %v, want ErrCorrupt (a schema 5 file without its log)", err)
			}
			return nil
		})
	})
	t.Run("a corrupt schema version", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "badversion.db")
		writeV1(t, path)
		db, err := bolt.Open(path, 0o600, nil)
		if err != nil {
			t.Fatal(err)
		}
		db.Update(func(tx *bolt.Tx) error { return tx.Bucket([]byte("meta")).Put([]byte("schema_version"), []byte("x")) })
		db.Close()
		refusedUntouched(t, path, store.ErrSchema)
	})
}
