package partition

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/pkg/mig"
)

// Static mode is for operators who pre-partition their GPUs with NVIDIA's
// mig-parted config format instead of letting leases carve them: the named
// config says, per GPU, whether MIG is on and how many instances of each
// profile to have, and ApplyStatic converges to it with the Reconciler.

// ApplyStatic applies the named mig-parted config to the host's GPUs. The
// whole config is checked against the host (b.Devices: index, PCI device
// id, MIG support) before any GPU is touched: an unknown name, an unknown
// profile, too many instances, a filter that matches nothing all return
// pkg/mig's error naming the line (class mig.ErrInvalidConfig), and nothing
// changes. GPUs no entry selects are left alone.
//
// mig-parted asks for counts, not placements; where a GPU already has
// instances that fit the counts (made by an earlier apply, by hand, or
// running leases), they are kept and only the rest is placed around them,
// so re-applying a config, or switching to one that shares instances, only
// touches what differs. Otherwise the placements are mig.Layout's
// (PlanLayout's, deterministic). b must be the host the Reconciler drives.
func ApplyStatic(ctx context.Context, r *Reconciler, cfg *mig.MigPartedConfig, name string, b gpu.Backend, protected func(gpuUUID string, giID int) bool) (Report, error) {
	if r == nil || cfg == nil || b == nil {
		return Report{}, errors.New("apply mig-parted config: a reconciler, a config and a backend are required")
	}
	if protected == nil {
		protected = noneProtected
	}
	devs, err := b.Devices(ctx)
	if err != nil {
		return Report{}, fmt.Errorf("apply mig-parted config %q: list gpus: %w", name, err)
	}
	infos := make([]mig.DeviceInfo, len(devs))
	models := make(map[int]*mig.Model, len(devs))
	for i, d := range devs {
		infos[i] = mig.DeviceInfo{Index: d.Index, PCIDeviceID: d.PCIDeviceID, NoMIG: !d.MIGCapable}
		// Plan with the model the Reconciler checks with; an unknown one is
		// left to Layout, which names the entry that needs it.
		if m, err := r.model(d); err == nil && d.MIGCapable {
			models[d.Index] = &m
			infos[i].Model = &m
		}
	}
	layouts, err := cfg.Layout(name, infos)
	if err != nil {
		return Report{}, fmt.Errorf("apply mig-parted config %q: %w", name, err)
	}
	byIndex := make(map[int]gpu.Device, len(devs))
	for _, d := range devs {
		byIndex[d.Index] = d
	}
	desired := make([]Desired, 0, len(layouts))
	for _, dl := range layouts {
		d := byIndex[dl.Index]
		want := Desired{GPUUUID: d.UUID, MIGEnabled: dl.MIGEnabled, Instances: dl.Instances}
		if m := models[dl.Index]; dl.MIGEnabled && m != nil {
			existing, err := existingInstances(ctx, b, d.UUID, protected)
			if err != nil {
				return Report{}, fmt.Errorf("apply mig-parted config %q: gpu %d: %w", name, dl.Index, err)
			}
			want.Instances = preferExisting(*m, dl, existing)
		}
		desired = append(desired, want)
	}
	rep, err := r.Reconcile(ctx, desired, protected)
	if err != nil {
		return rep, fmt.Errorf("apply mig-parted config %q: %w", name, err)
	}
	return rep, nil
}

// existingInstances lists a GPU's instances, protected ones first, then by
// GPU instance id; none while MIG is not current.
func existingInstances(ctx context.Context, b gpu.Backend, uuid string, protected func(string, int) bool) ([]gpu.GPUInstance, error) {
	mode, err := b.MIGMode(ctx, uuid)
	if err != nil || !mode.Current {
		return nil, err
	}
	gis, err := b.GPUInstances(ctx, uuid)
	if err != nil {
		return nil, err
	}
	slices.SortStableFunc(gis, func(a, c gpu.GPUInstance) int {
		pa, pc := protected(uuid, a.ID), protected(uuid, c.ID)
		switch {
		case pa && !pc:
			return -1
		case pc && !pa:
			return 1
		}
		return cmp.Compare(a.ID, c.ID)
	})
	return gis, nil
}

// preferExisting chooses placements for the layout's counts that keep as
// many existing instances as possible: first all that the counts allow,
// then (in the order given, protected first) fewer, and the rest placed
// around them; PlanLayout's placements when no existing instance can stay.
func preferExisting(m mig.Model, dl mig.DeviceLayout, existing []gpu.GPUInstance) []mig.Instance {
	for n := len(existing); n > 0; n-- {
		need := make(map[mig.ProfileID]int, len(dl.Counts))
		for id, c := range dl.Counts {
			need[id] = c
		}
		var keep []mig.Instance
		for _, gi := range existing {
			if need[gi.ProfileID] > 0 && len(keep) < n {
				need[gi.ProfileID]--
				keep = append(keep, mig.Instance{Profile: gi.ProfileID, Placement: gi.Placement})
			}
		}
		if len(keep) < n {
			continue // fewer candidates than n: try a smaller n
		}
		if m.CheckLayout(keep) != nil {
			continue
		}
		if out, ok := fillAround(m, keep, need); ok {
			return out
		}
	}
	return dl.Instances
}

// fillAround places the needed instances around the fixed ones, largest
// profiles first, each at the lowest start that still lets the rest fit
// (an exhaustive search: at most 7 instances). The result is sorted by
// start.
func fillAround(m mig.Model, fixed []mig.Instance, need map[mig.ProfileID]int) ([]mig.Instance, bool) {
	var order []mig.Profile
	for id, n := range need {
		if n <= 0 {
			continue
		}
		p, ok := m.Profile(id)
		if !ok {
			return nil, false
		}
		order = append(order, p)
	}
	slices.SortFunc(order, func(a, b mig.Profile) int {
		return cmp.Or(cmp.Compare(b.Slices, a.Slices), cmp.Compare(b.MemorySlots, a.MemorySlots), cmp.Compare(a.ID, b.ID))
	})
	placed := slices.Clone(fixed)
	var walk func(pi, left, minStart int) bool
	walk = func(pi, left, minStart int) bool {
		if pi == len(order) {
			return true
		}
		if left == 0 {
			next := 0
			if pi+1 < len(order) {
				next = need[order[pi+1].ID]
			}
			return walk(pi+1, next, 0)
		}
		p := order[pi]
		for _, at := range m.Free(placed, p.ID) {
			if at.Start < minStart {
				continue
			}
			placed = append(placed, mig.Instance{Profile: p.ID, Placement: at})
			if walk(pi, left-1, at.Start+1) {
				return true
			}
			placed = placed[:len(placed)-1]
		}
		return false
	}
	if len(order) > 0 && !walk(0, need[order[0].ID], 0) {
		return nil, false
	}
	slices.SortFunc(placed, func(a, b mig.Instance) int {
		return cmp.Or(cmp.Compare(a.Placement.Start, b.Placement.Start), cmp.Compare(a.Profile, b.Profile))
	})
	return placed, true
}
