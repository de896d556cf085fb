package store

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
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

// A missing key's error is ErrNotFound and names the bucket and key.
func TestNotFoundNamesTheKey(t *testing.T) {
	err := notFound(BucketLeases, "l-x")
	if !errors.Is(err, ErrNotFound) || err.Error() != "leases/l-x: store: key not found" {
		t.Fatalf("notFound = %q (Is ErrNotFound: %v)", err, errors.Is(err, ErrNotFound))
	}
}
