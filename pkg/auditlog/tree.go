package auditlog

import (
	"bytes"
	"fmt"
	"math/bits"

	"github.com/transparency-dev/merkle/compact"
	"github.com/transparency-dev/merkle/proof"
)

var rangeFactory = &compact.RangeFactory{Hash: NodeHash}

// Tree is the right edge of an append-only RFC 6962 tree: the compact range
// [0, size), one hash per set bit of size. Appending is O(log n) and needs
// no earlier leaf, so a store can keep just this between appends.
type Tree struct {
	r *compact.Range
}

// NewTree is the empty tree.
func NewTree() *Tree { return &Tree{r: rangeFactory.NewEmptyRange(0)} }

// Size is the number of leaves.
func (t *Tree) Size() uint64 { return t.r.End() }

// Append adds a leaf hash. visit, if not nil, is called with every perfect
// subtree node the append completes (the leaf itself at level 0, then each
// new parent), so a caller can store them for proofs.
func (t *Tree) Append(leafHash []byte, visit func(level uint, index uint64, hash []byte)) {
	var v compact.VisitFn
	if visit != nil {
		v = func(id compact.NodeID, h []byte) { visit(id.Level, id.Index, h) }
	}
	// Append fails only for ranges of different factories: impossible here.
	if err := t.r.Append(leafHash, v); err != nil {
		panic(fmt.Sprintf("auditlog: append to compact range: %v", err))
	}
}

// Root is the tree's root hash; EmptyRoot for the empty tree.
func (t *Tree) Root() []byte {
	if t.r.End() == 0 {
		return EmptyRoot()
	}
	root, err := t.r.GetRootHash(nil)
	if err != nil {
		panic(fmt.Sprintf("auditlog: root of compact range: %v", err))
	}
	return root
}

// Clone is an independent copy.
func (t *Tree) Clone() *Tree {
	hs := make([][]byte, len(t.r.Hashes()))
	copy(hs, t.r.Hashes())
	r, _ := rangeFactory.NewRange(0, t.r.End(), hs)
	return &Tree{r: r}
}

// MarshalBinary encodes the tree as the 8-byte big-endian size followed by
// the range's hashes, left to right.
func (t *Tree) MarshalBinary() ([]byte, error) {
	out := make([]byte, 8, 8+HashSize*len(t.r.Hashes()))
	size := t.r.End()
	for i := range 8 {
		out[i] = byte(size >> (56 - 8*i))
	}
	for _, h := range t.r.Hashes() {
		out = append(out, h...)
	}
	return out, nil
}

// UnmarshalTree decodes MarshalBinary's output.
func UnmarshalTree(b []byte) (*Tree, error) {
	if len(b) < 8 {
		return nil, fmt.Errorf("decode tree: %d bytes", len(b))
	}
	var size uint64
	for i := range 8 {
		size = size<<8 | uint64(b[i])
	}
	n := bits.OnesCount64(size)
	if len(b) != 8+n*HashSize {
		return nil, fmt.Errorf("decode tree of size %d: %d bytes of hashes, want %d", size, len(b)-8, n*HashSize)
	}
	hs := make([][]byte, n)
	for i := range hs {
		hs[i] = bytes.Clone(b[8+i*HashSize : 8+(i+1)*HashSize])
	}
	r, err := rangeFactory.NewRange(0, size, hs)
	if err != nil {
		return nil, fmt.Errorf("decode tree: %w", err)
	}
	return &Tree{r: r}, nil
}

// NodeReader returns the hash of the perfect subtree node at (level,
// index): the leaves [index<<level, (index+1)<<level). Level 0 is a leaf
// hash. Proof generation reads only nodes of complete subtrees.
type NodeReader func(level uint, index uint64) ([]byte, error)

// InclusionProof returns the audit path of leaf index in the tree of the
// given size, reading O(log size) nodes.
func InclusionProof(index, size uint64, read NodeReader) ([][]byte, error) {
	n, err := proof.Inclusion(index, size)
	if err != nil {
		return nil, fmt.Errorf("inclusion proof: %w", err)
	}
	return fetch(n, read)
}

// ConsistencyProof returns the proof that the tree of size1 is a prefix of
// the tree of size2.
func ConsistencyProof(size1, size2 uint64, read NodeReader) ([][]byte, error) {
	n, err := proof.Consistency(size1, size2)
	if err != nil {
		return nil, fmt.Errorf("consistency proof: %w", err)
	}
	return fetch(n, read)
}

func fetch(n proof.Nodes, read NodeReader) ([][]byte, error) {
	hs := make([][]byte, len(n.IDs))
	for i, id := range n.IDs {
		h, err := read(id.Level, id.Index)
		if err != nil {
			return nil, fmt.Errorf("read tree node (%d, %d): %w", id.Level, id.Index, err)
		}
		if len(h) != HashSize {
			return nil, fmt.Errorf("tree node (%d, %d) is %d bytes", id.Level, id.Index, len(h))
		}
		hs[i] = h
	}
	return n.Rehash(hs, NodeHash)
}

// VerifyInclusion checks that leafHash is leaf index of the tree of the
// given size and root.
func VerifyInclusion(index, size uint64, leafHash []byte, path [][]byte, root []byte) error {
	if err := proof.VerifyInclusion(hasher, index, size, leafHash, path, root); err != nil {
		return fmt.Errorf("%w: inclusion of leaf %d in tree of size %d: %v", ErrTampered, index, size, err)
	}
	return nil
}

// VerifyConsistency checks that the tree (size1, root1) is a prefix of the
// tree (size2, root2).
func VerifyConsistency(size1, size2 uint64, path [][]byte, root1, root2 []byte) error {
	if size1 == 0 {
		// Every tree extends the empty one; the proof must be empty.
		if len(path) != 0 {
			return fmt.Errorf("%w: consistency from the empty tree carries %d hashes", ErrTampered, len(path))
		}
		return nil
	}
	if err := proof.VerifyConsistency(hasher, size1, size2, path, root1, root2); err != nil {
		return fmt.Errorf("%w: tree of size %d is not a prefix of tree of size %d: %v", ErrTampered, size1, size2, err)
	}
	return nil
}

// MemTree keeps every perfect subtree node in memory, one flat byte slice
// per level: 2n hashes for n leaves (64 bytes a leaf). It is for tools and
// benchmarks that hold a whole log; the control plane keeps its nodes in
// the store instead.
type MemTree struct {
	levels [][]byte
	tree   *Tree
}

// NewMemTree is an empty in-memory tree.
func NewMemTree() *MemTree { return &MemTree{tree: NewTree()} }

// Append adds a leaf hash.
func (m *MemTree) Append(leafHash []byte) {
	m.tree.Append(leafHash, func(level uint, index uint64, h []byte) {
		for uint(len(m.levels)) <= level {
			m.levels = append(m.levels, nil)
		}
		// Nodes of a level complete left to right, so index is the end.
		m.levels[level] = append(m.levels[level], h...)
		_ = index
	})
}

// Size is the number of leaves.
func (m *MemTree) Size() uint64 { return m.tree.Size() }

// Root is the root hash of the whole tree.
func (m *MemTree) Root() []byte { return m.tree.Root() }

// Tree is the compact range of the whole tree.
func (m *MemTree) Tree() *Tree { return m.tree.Clone() }

// Node implements NodeReader.
func (m *MemTree) Node(level uint, index uint64) ([]byte, error) {
	if level >= uint(len(m.levels)) || (index+1)*HashSize > uint64(len(m.levels[level])) {
		return nil, fmt.Errorf("no complete node (%d, %d) in a tree of %d leaves", level, index, m.Size())
	}
	return m.levels[level][index*HashSize : (index+1)*HashSize], nil
}
