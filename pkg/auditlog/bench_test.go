package auditlog

import (
	"encoding/binary"
	"sync"
	"testing"
)

// BenchmarkVerify measures offline verification: decode each stored entry,
// check it is canonical and in sequence, hash it into the tree, and check a
// checkpoint at the end, in chunks of 4096 entries as audit.Verify reads
// them. Reported as entries/s.
func BenchmarkVerify(b *testing.B) {
	const n = 10000
	raws := make([][]byte, n)
	for i := range raws {
		e := entry(uint64(i + 1))
		e.Details = map[string]string{"node": "gpu-host-17", "profile": "1g.18gb"}
		raws[i] = e.Canonical()
	}
	ref := NewVerifier()
	for _, r := range raws {
		ref.Add(r)
	}
	cp := Checkpoint{Origin: "o", Size: n, Root: ref.Root()}
	b.ResetTimer()
	for b.Loop() {
		v := NewVerifier()
		for i := 0; i < n; i += 4096 {
			if err := v.AddAll(raws[i:min(i+4096, n)]); err != nil {
				b.Fatal(err)
			}
		}
		if err := v.Check(cp); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(n*b.N)/b.Elapsed().Seconds(), "entries/s")
}

var (
	bigTreeOnce sync.Once
	bigTree     *MemTree
)

// BenchmarkInclusionProof10M measures generating an inclusion proof in a
// 10-million-entry tree. The tree is held in memory as a MemTree (every
// perfect subtree node, 64 bytes a leaf: 640 MB); leaves are hashes of the
// index, not of entries, to keep the setup to seconds. Generation reads the
// same O(log n) nodes from any NodeReader; the store-backed reader is
// measured by controlplane/audit's BenchmarkInclusionProofStore.
func BenchmarkInclusionProof10M(b *testing.B) {
	const n = 10_000_000
	bigTreeOnce.Do(func() {
		bigTree = NewMemTree()
		var buf [8]byte
		for i := uint64(0); i < n; i++ {
			binary.BigEndian.PutUint64(buf[:], i)
			bigTree.Append(LeafHash(buf[:]))
		}
	})
	root := bigTree.Root()
	b.ResetTimer()
	var i uint64
	for b.Loop() {
		idx := (i * 7919) % n
		i++
		if _, err := InclusionProof(idx, n, bigTree.Node); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	var buf [8]byte
	binary.BigEndian.PutUint64(buf[:], 4242)
	p, _ := InclusionProof(4242, n, bigTree.Node)
	if err := VerifyInclusion(4242, n, LeafHash(buf[:]), p, root); err != nil {
		b.Fatal(err)
	}
}
