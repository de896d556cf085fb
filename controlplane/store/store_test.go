package store

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"

	bolt "go.etcd.io/bbolt"
)

func openTemp(t *testing.T) (*Bolt, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "state.db")
	s, err := OpenBolt(path, BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, path
}

// runConformance is the behaviour every backend must have.
func runConformance(t *testing.T, s Store) {
	ctx := context.Background()
	t.Run("get missing", func(t *testing.T) {
		err := s.View(ctx, func(tx Tx) error { _, err := tx.Get(BucketLeases, "nope"); return err })
		if !errors.Is(err, ErrNotFound) {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("unknown bucket", func(t *testing.T) {
		err := s.Update(ctx, func(tx Tx) error { return tx.Put("bogus", "k", nil) })
		if !errors.Is(err, ErrUnknownBucket) {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("failed update changes nothing", func(t *testing.T) {
		boom := errors.New("boom")
		err := s.Update(ctx, func(tx Tx) error {
			if err := tx.Put(BucketLeases, "half", []byte("x")); err != nil {
				return err
			}
			return boom
		})
		if !errors.Is(err, boom) {
			t.Fatalf("err = %v", err)
		}
		err = s.View(ctx, func(tx Tx) error { _, err := tx.Get(BucketLeases, "half"); return err })
		if !errors.Is(err, ErrNotFound) {
			t.Fatalf("half-written state visible: %v", err)
		}
	})
	t.Run("scan prefix both ways", func(t *testing.T) {
		err := s.Update(ctx, func(tx Tx) error {
			for _, k := range []string{"a/1", "a/2", "a/3", "b/1", "a0"} {
				if err := tx.Put(BucketNodes, k, []byte(k)); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		for _, rev := range []bool{false, true} {
			var got []string
			err := s.View(ctx, func(tx Tx) error {
				return tx.Scan(BucketNodes, "a/", rev, func(k string, v []byte) error {
					if k != string(v) {
						return fmt.Errorf("value %q for key %q", v, k)
					}
					got = append(got, k)
					return nil
				})
			})
			if err != nil {
				t.Fatal(err)
			}
			want := "[a/1 a/2 a/3]"
			if rev {
				want = "[a/3 a/2 a/1]"
			}
			if fmt.Sprint(got) != want {
				t.Fatalf("reverse=%v: %v, want %v", rev, got, want)
			}
		}
	})
	t.Run("stop scan", func(t *testing.T) {
		n := 0
		err := s.View(ctx, func(tx Tx) error {
			return tx.Scan(BucketNodes, "", false, func(string, []byte) error { n++; return ErrStopScan })
		})
		if err != nil || n != 1 {
			t.Fatalf("err=%v n=%d", err, n)
		}
	})
	t.Run("concurrent counters do not lose increments", func(t *testing.T) {
		var wg sync.WaitGroup
		for i := 0; i < 50; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := s.Update(ctx, func(tx Tx) error { _, err := NextU64(tx, "ctr"); return err }); err != nil {
					t.Error(err)
				}
			}()
		}
		wg.Wait()
		var v uint64
		s.View(ctx, func(tx Tx) error { var err error; v, err = GetU64(tx, "ctr"); return err })
		if v != 50 {
			t.Fatalf("counter = %d, want 50", v)
		}
	})
}

func TestBoltConformance(t *testing.T) {
	s, _ := openTemp(t)
	runConformance(t, s)
}

func TestBoltSurvivesReopen(t *testing.T) {
	s, path := openTemp(t)
	ctx := context.Background()
	if err := s.Update(ctx, func(tx Tx) error { return tx.Put(BucketLeases, "l1", []byte("v")) }); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s2, err := OpenBolt(path, BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	err = s2.View(ctx, func(tx Tx) error {
		v, err := tx.Get(BucketLeases, "l1")
		if err == nil && string(v) != "v" {
			err = fmt.Errorf("got %q", v)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestBoltRefusesSecondOpener(t *testing.T) {
	_, path := openTemp(t)
	_, err := OpenBolt(path, BoltOptions{OpenTimeout: 50e6})
	if !errors.Is(err, ErrLocked) {
		t.Fatalf("second open: %v, want ErrLocked", err)
	}
}

func TestBoltSchema(t *testing.T) {
	t.Run("file from a newer binary is refused", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "new.db")
		writeRaw(t, path, map[string][]byte{keySchemaVersion: U64(SchemaVersion + 1)})
		if _, err := OpenBolt(path, BoltOptions{}); !errors.Is(err, ErrSchema) {
			t.Fatalf("err = %v, want ErrSchema", err)
		}
	})
	t.Run("corrupt version is refused", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "bad.db")
		writeRaw(t, path, map[string][]byte{keySchemaVersion: []byte("x")})
		if _, err := OpenBolt(path, BoltOptions{}); !errors.Is(err, ErrSchema) {
			t.Fatalf("err = %v, want ErrSchema", err)
		}
	})
	t.Run("pre-versioned file is upgraded and keeps its data", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "old.db")
		writeRaw(t, path, map[string][]byte{"revision": U64(7)})
		s, err := OpenBolt(path, BoltOptions{})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		s.View(context.Background(), func(tx Tx) error {
			if v, _ := GetU64(tx, keySchemaVersion); v != SchemaVersion {
				t.Errorf("schema_version = %d", v)
			}
			if v, _ := GetU64(tx, "revision"); v != 7 {
				t.Errorf("revision = %d, data lost", v)
			}
			return nil
		})
	})
}

// writeRaw writes a bbolt file by hand, as an older or newer binary would.
func writeRaw(t *testing.T, path string, meta map[string][]byte) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists([]byte(BucketMeta))
		if err != nil {
			return err
		}
		for k, v := range meta {
			if err := b.Put([]byte(k), v); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
