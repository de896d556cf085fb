package lease

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/mig"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// The allocation index (bucket allocations) holds one row per live lease,
// the partition it holds, so that placement, a node's desired state and a
// node failure read only live leases instead of every lease ever made. It is
// written by putLease, in the transaction that changes the lease, so it can
// never disagree with the leases bucket.

// keyIndexBuilt in meta is 1 once the index holds every live lease (stores
// written before the index existed get it built on first use).
const keyIndexBuilt = "alloc_index"

// keyIndexToken in meta is rewritten with a fresh random value by every
// transaction that changes the index, so a token names one exact index
// content: a cache keyed by it can never serve a stale or rolled-back
// state, and on etcd the compare on it is what makes concurrent placements
// by other replicas conflict.
const keyIndexToken = "alloc_token"

func newIndexToken(tx store.Tx) error {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return err
	}
	return tx.Put(store.BucketMeta, keyIndexToken, b[:])
}

func indexToken(tx store.Tx) (string, error) {
	v, err := tx.Get(store.BucketMeta, keyIndexToken)
	if errors.Is(err, store.ErrNotFound) {
		return "", nil
	}
	return string(v), err
}

// heldCache maps index tokens to the partitions the index held then. Maps
// in it are never modified.
type heldCache struct {
	mu    sync.Mutex
	m     map[string]map[string][]mig.Instance
	order []string
}

const heldCacheSize = 64

func (c *heldCache) get(tok string) (map[string][]mig.Instance, bool) {
	if tok == "" {
		return nil, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	h, ok := c.m[tok]
	return h, ok
}

func (c *heldCache) put(tok string, h map[string][]mig.Instance) {
	if tok == "" {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[string]map[string][]mig.Instance{}
	}
	if _, ok := c.m[tok]; ok {
		return
	}
	if len(c.order) == heldCacheSize {
		delete(c.m, c.order[0])
		c.order = c.order[1:]
	}
	c.m[tok] = h
	c.order = append(c.order, tok)
}

// allocRow is an index row's value. Placement decodes every row per
// request, so it is a fixed binary layout, not JSON: a version byte (1),
// profile id (int32), start and size (uint32), all big-endian, then the
// node id.
type allocRow struct {
	Node      string
	ProfileID int32
	Start     uint32
	Size      uint32
}

const allocRowVersion = 1

func (a allocRow) marshal() []byte {
	b := make([]byte, 0, 13+len(a.Node))
	b = append(b, allocRowVersion)
	b = binary.BigEndian.AppendUint32(b, uint32(a.ProfileID))
	b = binary.BigEndian.AppendUint32(b, a.Start)
	b = binary.BigEndian.AppendUint32(b, a.Size)
	return append(b, a.Node...)
}

func (a *allocRow) unmarshal(b []byte) error {
	if len(b) < 13 || b[0] != allocRowVersion {
		return fmt.Errorf("allocation row of %d bytes, version %v", len(b), b[:min(len(b), 1)])
	}
	a.ProfileID = int32(binary.BigEndian.Uint32(b[1:]))
	a.Start = binary.BigEndian.Uint32(b[5:])
	a.Size = binary.BigEndian.Uint32(b[9:])
	a.Node = string(b[13:])
	return nil
}

func allocKey(gpu, id string) string { return gpu + "/" + id }

// indexed reports whether a lease in phase p with placement pl has an
// index row.
func indexed(p leasev1.Phase, pl *leasev1.Placement) bool {
	return Live(p) && pl.GetGpuUuid() != ""
}

// reindex keeps l's row in step with its phase change from prev.
func reindex(tx store.Tx, l *leasev1.Lease, prev leasev1.Phase) error {
	was, is := indexed(prev, l.GetPlacement()), indexed(l.GetPhase(), l.GetPlacement())
	switch {
	case is && !was:
		if err := putAlloc(tx, l); err != nil {
			return err
		}
	case was && !is:
		if err := tx.Delete(store.BucketAllocations, allocKey(l.GetPlacement().GetGpuUuid(), l.GetId())); err != nil {
			return err
		}
	default:
		return nil
	}
	return newIndexToken(tx)
}

func putAlloc(tx store.Tx, l *leasev1.Lease) error {
	p := l.GetPlacement()
	row := allocRow{Node: p.GetNode(), ProfileID: p.GetProfileId(), Start: p.GetStart(), Size: p.GetSize()}
	return tx.Put(store.BucketAllocations, allocKey(p.GetGpuUuid(), l.GetId()), row.marshal())
}

// ensureIndex builds the index from the leases once.
func ensureIndex(tx store.Tx) error {
	built, err := store.GetU64(tx, keyIndexBuilt)
	if err != nil || built == 1 {
		return err
	}
	err = scanLeases(tx, func(l *leasev1.Lease) error {
		if indexed(l.GetPhase(), l.GetPlacement()) {
			return putAlloc(tx, l)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("build allocation index: %w", err)
	}
	if err := newIndexToken(tx); err != nil {
		return err
	}
	return tx.Put(store.BucketMeta, keyIndexBuilt, store.U64(1))
}

// allocation is one index row with its key's parts.
type allocation struct {
	GPU, Lease string
	allocRow
}

// indexReady reports whether the index has been built.
func indexReady(tx store.Tx) (bool, error) {
	built, err := store.GetU64(tx, keyIndexBuilt)
	return built == 1, err
}

// scanAllocations reads the index; in an Update call ensureIndex first.
func scanAllocations(tx store.Tx, fn func(allocation) error) error {
	return tx.Scan(store.BucketAllocations, "", false, func(k string, v []byte) error {
		gpu, id, ok := strings.Cut(k, "/")
		if !ok {
			return fmt.Errorf("allocation index key %q has no lease id", k)
		}
		a := allocation{GPU: gpu, Lease: id}
		if err := a.allocRow.unmarshal(v); err != nil {
			return fmt.Errorf("decode allocation %s: %w", k, err)
		}
		return fn(a)
	})
}

// heldPartitions is every partition live leases hold, by GPU UUID, and the
// index token it was read at. It builds the index if needed, so it runs in
// an Update. The result is shared (cached): callers must not modify it.
func (s *Service) heldPartitions(tx store.Tx) (map[string][]mig.Instance, string, error) {
	if err := ensureIndex(tx); err != nil {
		return nil, "", err
	}
	tok, err := indexToken(tx)
	if err != nil {
		return nil, "", err
	}
	if h, ok := s.held.get(tok); ok {
		return h, tok, nil
	}
	if h, ok := s.placer.heldAt(tok); ok {
		return h, tok, nil
	}
	h, err := scanHeld(tx)
	if err != nil {
		return nil, "", err
	}
	s.held.put(tok, h)
	return h, tok, nil
}

func scanHeld(tx store.Tx) (map[string][]mig.Instance, error) {
	out := map[string][]mig.Instance{}
	err := scanAllocations(tx, func(a allocation) error {
		out[a.GPU] = append(out[a.GPU], mig.Instance{Profile: mig.ProfileID(a.ProfileID), Placement: mig.Placement{Start: int(a.Start), Size: int(a.Size)}})
		return nil
	})
	return out, err
}

// liveOn returns the live leases placed on node (all nodes if node is
// empty), read through the index, or through every lease if the index is
// not built yet (a read-only transaction cannot build it).
func liveOn(tx store.Tx, node string) ([]*leasev1.Lease, error) {
	if ok, err := indexReady(tx); err != nil || !ok {
		if err != nil {
			return nil, err
		}
		var out []*leasev1.Lease
		err := scanLeases(tx, func(l *leasev1.Lease) error {
			if indexed(l.GetPhase(), l.GetPlacement()) && (node == "" || l.GetPlacement().GetNode() == node) {
				out = append(out, l)
			}
			return nil
		})
		return out, err
	}
	var ids []string
	err := scanAllocations(tx, func(a allocation) error {
		if node == "" || a.Node == node {
			ids = append(ids, a.Lease)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	out := make([]*leasev1.Lease, 0, len(ids))
	for _, id := range ids {
		l, err := getLease(tx, id)
		if err != nil {
			return nil, fmt.Errorf("allocation index names lease %s: %w", id, err)
		}
		out = append(out, l)
	}
	return out, nil
}

// errIndexMismatch is what CheckIndex reports.
var errIndexMismatch = errors.New("allocation index does not match the leases")

// CheckIndex compares the allocation index with a full scan of the leases;
// an error names the first difference. Tests and operators' consistency
// checks use it.
func CheckIndex(tx store.Tx) error {
	if ok, err := indexReady(tx); err != nil || !ok {
		return fmt.Errorf("%w: index not built (%v)", errIndexMismatch, err)
	}
	want := map[string]allocRow{}
	err := scanLeases(tx, func(l *leasev1.Lease) error {
		if indexed(l.GetPhase(), l.GetPlacement()) {
			p := l.GetPlacement()
			want[allocKey(p.GetGpuUuid(), l.GetId())] = allocRow{Node: p.GetNode(), ProfileID: p.GetProfileId(), Start: p.GetStart(), Size: p.GetSize()}
		}
		return nil
	})
	if err != nil {
		return err
	}
	got := 0
	err = scanAllocations(tx, func(a allocation) error {
		got++
		k := allocKey(a.GPU, a.Lease)
		w, ok := want[k]
		if !ok {
			return fmt.Errorf("%w: row %s has no live lease", errIndexMismatch, k)
		}
		if w != a.allocRow {
			return fmt.Errorf("%w: row %s is %+v, lease says %+v", errIndexMismatch, k, a.allocRow, w)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if got != len(want) {
		return fmt.Errorf("%w: %d rows for %d live leases", errIndexMismatch, got, len(want))
	}
	return nil
}
