package store_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/controlplane/store"
)

// FuzzOpenBolt opens arbitrary bytes as a state file (the daemon's input
// at start): it must never panic, and a file it refuses must be left
// exactly as it was.
func FuzzOpenBolt(f *testing.F) {
	dir := f.TempDir()
	v1 := filepath.Join(dir, "v1.db")
	writeV1(f, v1)
	good, err := os.ReadFile(v1)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add(good[:len(good)/2])
	f.Add([]byte("not a database"))
	damaged := bytes.Clone(good)
	damaged[os.Getpagesize()*2+20] ^= 0xff
	f.Add(damaged)
	f.Fuzz(func(t *testing.T, data []byte) {
		path := filepath.Join(t.TempDir(), "state.db")
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		type result struct {
			s   *store.Bolt
			err error
		}
		done := make(chan result, 1)
		go func() {
			s, err := store.OpenBolt(path, store.BoltOptions{})
			done <- result{s, err}
		}()
		var r result
		select {
		case r = <-done:
		case <-time.After(10 * time.Second):
			t.Fatalf("OpenBolt of %d bytes hung", len(data))
		}
		s, err := r.s, r.err
		if err == nil {
			s.Close()
			return
		}
		if errors.Is(err, store.ErrLocked) {
			t.Fatalf("no other opener, yet: %v", err)
		}
		after, rerr := os.ReadFile(path)
		if rerr != nil {
			t.Fatal(rerr)
		}
		if !bytes.Equal(after, data) {
			t.Fatalf("refused (%v) but the file changed", err)
		}
	})
}
