package mig

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"strings"
)

// Error classes of the run-time profile catalog.
var (
	// ErrInvalidProfiles: the profiles a backend reported do not describe a
	// GPU the MIG rules can be applied to (a placement outside the memory
	// slots, a duplicate id, an instance count that cannot be reached, ...).
	ErrInvalidProfiles = errors.New("invalid reported mig profiles")
	// ErrModelMismatch: a GPU whose PCI device id is in the built-in table
	// reported a geometry (profile ids, slices, memory slots, starts,
	// instance counts) that differs from the table. The control plane plans
	// with the table, so such a GPU would be given placements its driver
	// refuses.
	ErrModelMismatch = errors.New("reported mig geometry differs from the known model")
	// ErrUnknownModel: a GPU reported no profiles and is not in the
	// built-in table, so nothing is known about its MIG geometry.
	ErrUnknownModel = errors.New("unknown gpu model")
)

// ReportedProfile is one GPU instance profile as a backend reports it at
// run time (NVML's GPU instance profile info and its possible placements on
// an empty GPU). It is the input to ModelFromProfiles.
type ReportedProfile struct {
	ID ProfileID
	// Name as the driver shows it, e.g. "1g.18gb"; informational (names
	// drift between drivers). A "MIG " prefix is dropped.
	Name string
	// Slices is the compute slice count (NVML sliceCount).
	Slices int
	// MemorySlots is the placement size in memory slots.
	MemorySlots int
	// MemoryMiB is the instance memory (NVML memorySizeMB, which is MiB).
	MemoryMiB uint64
	// SMs is the streaming multiprocessor count (NVML multiprocessorCount).
	SMs int
	// InstanceCount is the most instances of the profile on an empty GPU
	// (NVML instanceCount).
	InstanceCount int
	// Placements are every placement of the profile on an empty GPU, in any
	// order (NVML GetGpuInstancePossiblePlacements on an idle GPU).
	Placements []Placement
	// MediaExtensions marks a +me profile. A name ending in "+me" sets it
	// too.
	MediaExtensions bool
}

// ModelFromProfiles builds a Model from what the driver reports, so that
// planning never depends on profile names or sizes compiled into this
// package. The geometry is derived from the profiles: MemorySlots is the
// end of the highest placement, ComputeSlices the most slices any layout of
// one profile can use (the whole-GPU profile's slices on every real GPU).
//
// It checks that the report is consistent (ErrInvalidProfiles): at least
// one profile, unique ids, slices and memory slots positive, every
// placement exactly the profile's size and inside 8 memory slots, no
// placement listed twice, an instance count between 1 and what the
// placements, memory slots and compute slices allow, memory within the
// GPU's.
//
// When the PCI device id is in the built-in table, the reported geometry
// must equal the table's (names and memory sizes may differ: they drift
// between drivers). If it does not, the Model built from the report is
// returned together with an error of class ErrModelMismatch, so a caller
// that trusts its driver over the table can still proceed, knowingly.
// ShortName, the whole GPU's SMs and, where the report lacks them, profile
// SMs and media extensions come from the table.
func ModelFromProfiles(name string, pciDeviceID uint32, memoryMiB uint64, profiles []ReportedProfile) (Model, error) {
	m := Model{Name: name, PCIDeviceID: bareDeviceID(pciDeviceID), MemoryMiB: memoryMiB}
	bad := func(format string, args ...any) (Model, error) {
		return Model{}, fmt.Errorf("profiles of %s (pci 0x%04X): %s: %w", name, m.PCIDeviceID, fmt.Sprintf(format, args...), ErrInvalidProfiles)
	}
	if len(profiles) == 0 {
		return bad("no profiles reported")
	}
	seen := map[ProfileID]bool{}
	for _, r := range profiles {
		label := fmt.Sprintf("profile %d (%s)", r.ID, r.Name)
		switch {
		case r.ID < 0:
			return bad("%s: negative id", label)
		case seen[r.ID]:
			return bad("%s: id reported twice", label)
		case r.Slices <= 0 || r.Slices > MemorySlots:
			return bad("%s: %d compute slices", label, r.Slices)
		case r.MemorySlots <= 0 || r.MemorySlots > MemorySlots:
			return bad("%s: %d memory slots, want 1 to %d", label, r.MemorySlots, MemorySlots)
		case len(r.Placements) == 0:
			return bad("%s: no placements", label)
		case memoryMiB > 0 && r.MemoryMiB > memoryMiB:
			return bad("%s: %d MiB on a %d MiB GPU", label, r.MemoryMiB, memoryMiB)
		}
		seen[r.ID] = true
		starts := make([]int, 0, len(r.Placements))
		for _, at := range r.Placements {
			if at.Size != r.MemorySlots {
				return bad("%s: placement %s is not %d slots", label, at, r.MemorySlots)
			}
			if at.Start < 0 || at.End() > MemorySlots {
				return bad("%s: placement %s outside memory slots 0-%d", label, at, MemorySlots-1)
			}
			if slices.Contains(starts, at.Start) {
				return bad("%s: placement %s listed twice", label, at)
			}
			starts = append(starts, at.Start)
		}
		slices.Sort(starts)
		disjoint, end := 0, -1
		for _, s := range starts {
			if s >= end {
				disjoint++
				end = s + r.MemorySlots
			}
		}
		if r.InstanceCount < 1 || r.InstanceCount > disjoint {
			return bad("%s: instance count %d, but %d placements fit side by side", label, r.InstanceCount, disjoint)
		}
		pname := strings.TrimPrefix(r.Name, "MIG ")
		m.Profiles = append(m.Profiles, Profile{
			ID:              r.ID,
			Name:            pname,
			Slices:          r.Slices,
			MemorySlots:     r.MemorySlots,
			Starts:          starts,
			MaxCount:        r.InstanceCount,
			MemoryMiB:       r.MemoryMiB,
			SMs:             r.SMs,
			MediaExtensions: r.MediaExtensions || strings.HasSuffix(pname, "+me"),
		})
		m.MemorySlots = max(m.MemorySlots, starts[len(starts)-1]+r.MemorySlots)
		m.ComputeSlices = max(m.ComputeSlices, r.Slices, r.Slices*r.InstanceCount)
	}
	if m.ComputeSlices > MemorySlots {
		return bad("profiles use %d compute slices together", m.ComputeSlices)
	}
	// nvidia-smi's order: most memory slots last, then slices; +me after its
	// plain sibling. The table lists 1g, 1g+me, 1g double memory, ...
	slices.SortStableFunc(m.Profiles, func(a, b Profile) int {
		return cmp.Or(
			cmp.Compare(a.Slices, b.Slices),
			cmp.Compare(a.MemorySlots, b.MemorySlots),
			cmpBool(a.MediaExtensions, b.MediaExtensions),
			cmp.Compare(b.ID, a.ID),
		)
	})

	known, ok := ModelByPCIDeviceID(m.PCIDeviceID)
	if !ok {
		m.ShortName = strings.TrimPrefix(name, "NVIDIA ")
		return m, nil
	}
	m.ShortName = known.ShortName
	m.SMs = known.SMs
	for i := range m.Profiles {
		if kp, ok := known.Profile(m.Profiles[i].ID); ok {
			if m.Profiles[i].SMs == 0 {
				m.Profiles[i].SMs = kp.SMs
			}
			m.Profiles[i].MediaExtensions = m.Profiles[i].MediaExtensions || kp.MediaExtensions
		}
	}
	if diffs := geometryDiff(known, m); len(diffs) > 0 {
		return m, fmt.Errorf("%s (pci 0x%04X) reports %s, the table says otherwise: %w",
			name, m.PCIDeviceID, strings.Join(diffs, "; "), ErrModelMismatch)
	}
	return m, nil
}

// ResolveModel is the model a GPU should be planned with: the one built
// from its reported profiles when there are any (see ModelFromProfiles),
// else the built-in table's entry for its PCI device id, else for its name
// (the driver lists no profiles while MIG mode is disabled). A GPU that
// reports nothing and is not in the table gets ErrUnknownModel.
func ResolveModel(name string, pciDeviceID uint32, memoryMiB uint64, profiles []ReportedProfile) (Model, error) {
	if len(profiles) > 0 {
		return ModelFromProfiles(name, pciDeviceID, memoryMiB, profiles)
	}
	if m, ok := ModelByPCIDeviceID(pciDeviceID); ok {
		return m, nil
	}
	if m, ok := ModelByName(name); ok {
		return m, nil
	}
	return Model{}, fmt.Errorf("%s (pci 0x%08X) reports no mig profiles: %w", name, pciDeviceID, ErrUnknownModel)
}

// geometryDiff lists how got's geometry differs from want's, empty when
// they agree.
func geometryDiff(want, got Model) []string {
	var out []string
	if want.ComputeSlices != got.ComputeSlices || want.MemorySlots != got.MemorySlots {
		out = append(out, fmt.Sprintf("%d slices / %d memory slots, want %d / %d",
			got.ComputeSlices, got.MemorySlots, want.ComputeSlices, want.MemorySlots))
	}
	for _, wp := range want.Profiles {
		gp, ok := got.Profile(wp.ID)
		if !ok {
			out = append(out, fmt.Sprintf("no profile %d (%s)", wp.ID, wp.Name))
			continue
		}
		if gp.Slices != wp.Slices || gp.MemorySlots != wp.MemorySlots || gp.MaxCount != wp.MaxCount ||
			!slices.Equal(gp.Starts, wp.Starts) {
			out = append(out, fmt.Sprintf("profile %d: %d slices, %d slots, starts %v, max %d; want %d, %d, %v, %d",
				wp.ID, gp.Slices, gp.MemorySlots, gp.Starts, gp.MaxCount,
				wp.Slices, wp.MemorySlots, wp.Starts, wp.MaxCount))
		}
	}
	for _, gp := range got.Profiles {
		if _, ok := want.Profile(gp.ID); !ok {
			out = append(out, fmt.Sprintf("extra profile %d (%s)", gp.ID, gp.Name))
		}
	}
	return out
}

// bareDeviceID strips NVML's vendor id from a combined pciDeviceId
// (0x233510DE -> 0x2335); a bare id is returned as is.
func bareDeviceID(id uint32) uint32 {
	if id > 0xFFFF && id&0xFFFF == nvidiaVendorID {
		return id >> 16
	}
	return id
}

func cmpBool(a, b bool) int {
	switch {
	case a == b:
		return 0
	case a:
		return 1
	}
	return -1
}
