package lease

import (
	"cmp"
	"errors"
	"slices"
	"sort"
	"strconv"
	"sync"

	"github.com/gpuaas/gpuaas/pkg/errs"
	"github.com/gpuaas/gpuaas/pkg/mig"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

// NodeView is what the scheduler knows of a connected node.
type NodeView struct {
	ID   string
	GPUs []*nodev1.Gpu
}

// errNoCapacity is returned when no connected node can hold the request
// now; the lease stays PENDING and is retried.
var errNoCapacity = errs.ResourceExhausted("NO_CAPACITY", "no connected node has capacity for the request")

type modelKey struct {
	pci  uint32
	name string
}

// models caches modelOf: pkg/mig returns a fresh deep copy per lookup, and
// placement looks up every GPU of the fleet per request. The cached models
// are only read.
var models sync.Map // modelKey -> mig.Model

// modelOf finds the MIG model of a reported GPU: by PCI device id first
// (names drift between drivers), then by name.
func modelOf(g *nodev1.Gpu) (mig.Model, bool) {
	k := modelKey{g.GetPciDeviceId(), g.GetModel()}
	if m, ok := models.Load(k); ok {
		return m.(mig.Model), true
	}
	m, ok := mig.ModelByPCIDeviceID(g.GetPciDeviceId())
	if !ok {
		m, ok = mig.ModelByName(g.GetModel())
	}
	if ok {
		models.Store(k, m)
	}
	return m, ok
}

func instanceOf(p *leasev1.Placement) mig.Instance {
	return mig.Instance{Profile: mig.ProfileID(p.GetProfileId()), Placement: mig.Placement{Start: int(p.GetStart()), Size: int(p.GetSize())}}
}

// Allocations indexes the partitions live leases hold (even if not created
// yet) by GPU UUID, as Place takes them.
func Allocations(live []*leasev1.Lease) map[string][]mig.Instance {
	out := map[string][]mig.Instance{}
	for _, l := range live {
		p := l.GetPlacement()
		if p.GetGpuUuid() != "" {
			out[p.GetGpuUuid()] = append(out[p.GetGpuUuid()], instanceOf(p))
		}
	}
	return out
}

// instancesOn is every partition on a GPU: those our live leases hold and
// those the node reports (which may include partitions an operator made by
// hand).
func instancesOn(g *nodev1.Gpu, held []mig.Instance) []mig.Instance {
	return union(held, reportedOn(g))
}

// reportedOn is the partitions a node reports on g.
func reportedOn(g *nodev1.Gpu) []mig.Instance {
	var out []mig.Instance
	for _, in := range g.GetInstances() {
		out = append(out, mig.Instance{Profile: mig.ProfileID(in.GetProfileId()), Placement: mig.Placement{Start: int(in.GetStart()), Size: int(in.GetSize())}})
	}
	return out
}

// union is held then reported, without duplicates, in that order.
func union(held, reported []mig.Instance) []mig.Instance {
	var out []mig.Instance
	var seen map[mig.Instance]bool // for long lists only: a GPU has a few
	for _, list := range [][]mig.Instance{held, reported} {
		for _, in := range list {
			if seen == nil && len(out) > 16 {
				seen = make(map[mig.Instance]bool, 2*len(out))
				for _, o := range out {
					seen[o] = true
				}
			}
			if seen != nil {
				if seen[in] {
					continue
				}
				seen[in] = true
			} else if slices.Contains(out, in) {
				continue
			}
			out = append(out, in)
		}
	}
	return out
}

// Place chooses a node, GPU and MIG placement for the request with the
// fleet planner (pkg/mig.PlanAcross): among every eligible GPU of every
// connected node, the placement that loses the least future capacity, then
// the fullest GPU. Running partitions never move. held is what live leases
// hold, by GPU UUID (the allocation index, or Allocations). Partitions a
// node reports that no lease holds (made by an operator) count as occupied.
func Place(nodes []NodeView, held map[string][]mig.Instance, req *leasev1.GpuRequest) (*leasev1.Placement, error) {
	profileName := req.GetMigProfile()
	if profileName == "" {
		return nil, errs.New(errs.ErrUnimplemented, "WHOLE_GPU_UNSUPPORTED", "whole-GPU leases are not schedulable yet")
	}
	sorted := append([]NodeView(nil), nodes...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].ID < sorted[j].ID })
	type where struct {
		node string
		gpu  *nodev1.Gpu
	}
	var states []mig.GPUState
	var at []where
	seen := map[string]bool{}
	for _, n := range sorted {
		if req.GetNode() != "" && req.GetNode() != n.ID {
			continue
		}
		gpus := append([]*nodev1.Gpu(nil), n.GPUs...)
		sort.Slice(gpus, func(i, j int) bool { return gpus[i].GetIndex() < gpus[j].GetIndex() })
		for _, g := range gpus {
			if req.GetGpuModel() != "" && req.GetGpuModel() != g.GetModel() {
				continue
			}
			model, ok := modelOf(g)
			if !ok {
				continue
			}
			eligible := g.GetMigEnabled() && !g.GetUnhealthy()
			instances := instancesOn(g, held[g.GetUuid()])
			// GPUs in the same state score alike and the planner breaks
			// ties by order, so only the first of each state can win:
			// planning over one per state gives the same decision at a
			// fraction of the cost (a fleet is mostly empty or full GPUs).
			k := stateKey(model.Name, eligible, instances)
			if seen[k] {
				continue
			}
			seen[k] = true
			states = append(states, mig.GPUState{ID: n.ID + "/" + g.GetUuid(), Model: model, Instances: instances, Eligible: eligible})
			at = append(at, where{n.ID, g})
		}
	}
	d, err := mig.PlanAcross(states, mig.Request{ProfileName: profileName})
	if err != nil {
		if errors.Is(err, mig.ErrFragmented) {
			return nil, errs.Wrap(errs.ErrResourceExhausted, "FRAGMENTED", "capacity exists but is fragmented: "+err.Error(), err)
		}
		return nil, errNoCapacity
	}
	w := at[d.Index]
	prof, _ := states[d.Index].Model.Profile(d.Profile)
	return &leasev1.Placement{
		Node: w.node, GpuUuid: w.gpu.GetUuid(), GpuModel: w.gpu.GetModel(), MigProfile: prof.Name,
		ProfileId: int32(d.Profile), Start: uint32(d.Placement.Start), Size: uint32(d.Placement.Size),
	}, nil
}

// stateKey names a GPU's state for Place's deduplication.
func stateKey(model string, eligible bool, in []mig.Instance) string {
	sorted := slices.Clone(in)
	slices.SortFunc(sorted, func(a, b mig.Instance) int {
		if c := cmp.Compare(a.Placement.Start, b.Placement.Start); c != 0 {
			return c
		}
		if c := cmp.Compare(a.Placement.Size, b.Placement.Size); c != 0 {
			return c
		}
		return cmp.Compare(a.Profile, b.Profile)
	})
	b := make([]byte, 0, len(model)+2+12*len(sorted))
	b = append(b, model...)
	if eligible {
		b = append(b, '+')
	}
	for _, i := range sorted {
		b = append(b, '|')
		b = strconv.AppendInt(b, int64(i.Profile), 10)
		b = append(b, ':')
		b = strconv.AppendInt(b, int64(i.Placement.Start), 10)
		b = append(b, ':')
		b = strconv.AppendInt(b, int64(i.Placement.Size), 10)
	}
	return string(b)
}

// Capacity is how many more partitions of each profile fit on each GPU of a
// node, given its live leases.
func Capacity(n NodeView, live []*leasev1.Lease) []*nodev1.GpuCapacity {
	var out []*nodev1.GpuCapacity
	for _, g := range n.GPUs {
		c := &nodev1.GpuCapacity{GpuUuid: g.GetUuid(), Model: g.GetModel()}
		for _, l := range live {
			if l.GetPlacement().GetGpuUuid() == g.GetUuid() {
				c.Leases++
			}
		}
		if model, ok := modelOf(g); ok && g.GetMigEnabled() {
			existing := instancesOn(g, Allocations(live)[g.GetUuid()])
			for _, p := range model.Profiles {
				c.Profiles = append(c.Profiles, &nodev1.ProfileCapacity{Name: p.Name, Id: int32(p.ID), Free: uint32(model.Remaining(existing, p.ID))})
			}
		}
		out = append(out, c)
	}
	return out
}
