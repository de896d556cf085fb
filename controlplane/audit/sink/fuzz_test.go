package sink_test

import (
	"bytes"
	"context"
	"testing"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/audit/sink"
)

// FuzzDeliverBatch feeds the sink batches made of arbitrary bytes: it must
// never panic, and whatever it accepts must verify offline afterwards.
func FuzzDeliverBatch(f *testing.F) {
	k := newKeys(f, origin)
	l := newLog(f, k)
	l.grow(f, 3, "alice")
	b, err := audit.ReadBatch(context.Background(), l.st, 0, 10)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b.ID, uint64(0), bytes.Join(b.Entries, []byte("\n")), b.Checkpoint, []byte(nil))
	f.Add("x", uint64(1), []byte("{}"), []byte("o\n1\nAAAA\n\n— o AAAA\n"), []byte("p"))
	f.Fuzz(func(t *testing.T, id string, prev uint64, entries, checkpoint, prevCheckpoint []byte) {
		dir := t.TempDir()
		s, err := sink.Open(sink.Options{Dir: dir, Origin: origin, Trusted: k.trusted})
		if err != nil {
			t.Fatal(err)
		}
		batch := b
		batch.ID, batch.PrevSize, batch.Checkpoint, batch.PrevCheckpoint = id, prev, checkpoint, prevCheckpoint
		batch.Entries = bytes.Split(entries, []byte("\n"))
		if _, _, err := s.Deliver(context.Background(), batch); err == nil {
			if _, err := sink.VerifyDir(dir, origin, k.trusted); err != nil {
				t.Fatalf("the sink accepted a batch its directory does not verify with: %v", err)
			}
		}
	})
}
