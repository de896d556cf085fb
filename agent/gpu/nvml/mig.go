//go:build cgo

package nvml

import (
	"cmp"
	"context"
	"fmt"
	"slices"

	"github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/pkg/mig"
)

// migMode reads a GPU's MIG mode; ErrNotSupported for a GPU without MIG.
func migMode(dev nvml.Device) (gpu.MIGMode, error) {
	current, pending, ret := dev.GetMigMode()
	if ret == nvml.ERROR_NOT_SUPPORTED {
		return gpu.MIGMode{}, fmt.Errorf("gpu does not support mig: %w", gpu.ErrNotSupported)
	}
	if err := mapReturn("read mig mode", ret); err != nil {
		return gpu.MIGMode{}, err
	}
	return gpu.MIGMode{Current: current == nvml.DEVICE_MIG_ENABLE, Pending: pending == nvml.DEVICE_MIG_ENABLE}, nil
}

// requireMIG fails with gpu.ErrNotSupported unless MIG mode is current:
// the driver answers NOT_SUPPORTED to MIG calls then too, but checking
// first tells "mig is off" apart from "this profile is not supported".
func requireMIG(dev nvml.Device) error {
	mode, err := migMode(dev)
	if err != nil {
		return err
	}
	if !mode.Current {
		return fmt.Errorf("mig mode is not enabled (pending %t): %w", mode.Pending, gpu.ErrNotSupported)
	}
	return nil
}

// MIGMode reports the GPU's current and pending MIG mode. A GPU without
// MIG reports both false, as it would never be in MIG mode.
func (b *Backend) MIGMode(ctx context.Context, gpuUUID string) (mode gpu.MIGMode, err error) {
	done, err := b.enter(ctx, "get mig mode of "+gpuUUID)
	if err != nil {
		return gpu.MIGMode{}, err
	}
	defer done(&err)
	dev, err := b.gpuByUUID(gpuUUID)
	if err != nil {
		return gpu.MIGMode{}, err
	}
	current, pending, ret := dev.GetMigMode()
	if ret == nvml.ERROR_NOT_SUPPORTED {
		return gpu.MIGMode{}, nil
	}
	if err := mapReturn("read mig mode", ret); err != nil {
		return gpu.MIGMode{}, err
	}
	return gpu.MIGMode{Current: current == nvml.DEVICE_MIG_ENABLE, Pending: pending == nvml.DEVICE_MIG_ENABLE}, nil
}

// SetMIGMode requests a MIG mode and reports the mode afterwards, as NVML
// reads it: the change is current at once when the driver could activate
// it (the activation status NVML returns is then success) and pending
// until a GPU reset otherwise. Disabling MIG while the GPU has GPU
// instances fails with gpu.ErrInUse, without asking the driver.
func (b *Backend) SetMIGMode(ctx context.Context, gpuUUID string, enabled bool) (mode gpu.MIGMode, err error) {
	done, err := b.enter(ctx, fmt.Sprintf("set mig mode of %s to %t", gpuUUID, enabled))
	if err != nil {
		return gpu.MIGMode{}, err
	}
	defer done(&err)
	b.migMu.Lock()
	defer b.migMu.Unlock()
	dev, err := b.gpuByUUID(gpuUUID)
	if err != nil {
		return gpu.MIGMode{}, err
	}
	before, err := migMode(dev)
	if err != nil {
		return gpu.MIGMode{}, err
	}
	if before.Current && !enabled {
		gis, err := b.gpuInstances(dev)
		if err != nil {
			return gpu.MIGMode{}, err
		}
		if len(gis) > 0 {
			return gpu.MIGMode{}, fmt.Errorf("gpu has %d gpu instances: %w", len(gis), gpu.ErrInUse)
		}
	}
	want := nvml.DEVICE_MIG_DISABLE
	if enabled {
		want = nvml.DEVICE_MIG_ENABLE
	}
	activation, ret := dev.SetMigMode(want)
	if err := mapReturn("request mig mode", ret); err != nil {
		return gpu.MIGMode{}, err
	}
	after, err := migMode(dev)
	if err != nil {
		return gpu.MIGMode{}, err
	}
	if activation != nvml.SUCCESS {
		b.log.Info("mig mode change pending", "gpu", gpuUUID, "enabled", enabled,
			"activation", returnName(activation), "current", after.Current, "pending", after.Pending)
	}
	return after, nil
}

// giProfile is one GPU instance profile as the driver reports it on one
// GPU.
type giProfile struct {
	// index is the NVML_GPU_INSTANCE_PROFILE_* enumerator it was read
	// with; info.Id is the profile id (mig.ProfileID) every other call
	// takes.
	index int
	info  nvml.GpuInstanceProfileInfo
}

func (p giProfile) id() mig.ProfileID { return mig.ProfileID(p.info.Id) }

// giProfiles lists the GPU instance profiles the GPU supports (MIG mode
// must be current), by asking for every profile enumerator NVML knows and
// skipping those the GPU lacks.
func giProfiles(dev nvml.Device) ([]giProfile, error) {
	var out []giProfile
	for i := range nvml.GPU_INSTANCE_PROFILE_COUNT {
		info, ret := dev.GetGpuInstanceProfileInfo(i)
		switch ret {
		case nvml.SUCCESS:
		case nvml.ERROR_NOT_SUPPORTED, nvml.ERROR_INVALID_ARGUMENT:
			continue // not on this GPU, or an enumerator this driver predates
		default:
			return nil, mapReturn(fmt.Sprintf("read gpu instance profile %d", i), ret)
		}
		if !slices.ContainsFunc(out, func(p giProfile) bool { return p.info.Id == info.Id }) {
			out = append(out, giProfile{index: i, info: info})
		}
	}
	return out, nil
}

// findProfile finds the GPU's profile with the id; gpu.ErrInvalidArgument
// when it has none.
func findProfile(profiles []giProfile, id mig.ProfileID) (giProfile, error) {
	for _, p := range profiles {
		if p.id() == id {
			return p, nil
		}
	}
	return giProfile{}, fmt.Errorf("profile %d: %w: %w", id, gpu.ErrInvalidArgument, mig.ErrUnknownProfile)
}

// profileSuffix names a profile enumerator's variant.
func profileSuffix(index int) string {
	switch index {
	case nvml.GPU_INSTANCE_PROFILE_1_SLICE_REV1, nvml.GPU_INSTANCE_PROFILE_2_SLICE_REV1:
		return suffixMediaExtensions
	case nvml.GPU_INSTANCE_PROFILE_1_SLICE_ALL_ME, nvml.GPU_INSTANCE_PROFILE_2_SLICE_ALL_ME:
		return suffixAllMediaExtensions
	case nvml.GPU_INSTANCE_PROFILE_1_SLICE_NO_ME, nvml.GPU_INSTANCE_PROFILE_2_SLICE_NO_ME:
		return suffixNoMediaExtensions
	case nvml.GPU_INSTANCE_PROFILE_1_SLICE_GFX, nvml.GPU_INSTANCE_PROFILE_2_SLICE_GFX,
		nvml.GPU_INSTANCE_PROFILE_3_SLICE_GFX, nvml.GPU_INSTANCE_PROFILE_4_SLICE_GFX:
		return suffixGraphics
	default:
		return ""
	}
}

// allPlacements lists every placement the driver allows the profile
// (NVML's possible placements), ascending by start.
func allPlacements(dev nvml.Device, p giProfile) ([]mig.Placement, error) {
	raw, ret := dev.GetGpuInstancePossiblePlacements(&p.info)
	if err := mapReturn(fmt.Sprintf("read placements of profile %d", p.id()), ret); err != nil {
		return nil, err
	}
	out := make([]mig.Placement, 0, len(raw))
	for _, r := range raw {
		out = append(out, mig.Placement{Start: int(r.Start), Size: int(r.Size)})
	}
	slices.SortFunc(out, func(a, b mig.Placement) int { return cmp.Compare(a.Start, b.Start) })
	return out, nil
}

// remaining is how many more instances of the profile the driver could
// create now.
func remaining(dev nvml.Device, p giProfile) (int, error) {
	n, ret := dev.GetGpuInstanceRemainingCapacity(&p.info)
	if err := mapReturn(fmt.Sprintf("read remaining capacity of profile %d", p.id()), ret); err != nil {
		return 0, err
	}
	return n, nil
}

// model is pkg/mig's model of the GPU, when it has one.
func model(dev nvml.Device) (mig.Model, bool) {
	pci, ret := dev.GetPciInfo()
	if ret != nvml.SUCCESS {
		return mig.Model{}, false
	}
	return mig.ModelByPCIDeviceID(pci.PciDeviceId)
}

// memorySlots is the profile's placement size: from the driver's
// placements, else from existing instances of it, else from pkg/mig's
// model of the GPU; 0 when none knows.
func memorySlots(dev nvml.Device, p giProfile, placements []mig.Placement, gis []giHandle) int {
	if len(placements) > 0 {
		return placements[0].Size
	}
	for _, gi := range gis {
		if gi.profile.id() == p.id() {
			return gi.placement().Size
		}
	}
	if m, ok := model(dev); ok {
		if mp, ok := m.Profile(p.id()); ok {
			return mp.MemorySlots
		}
	}
	return 0
}

// GPUInstanceProfiles lists the GPU's GPU instance profiles as the driver
// reports them (ordered by slices, memory, id), with the remaining
// capacity the driver reports. gpu.ErrNotSupported unless MIG mode is
// current.
func (b *Backend) GPUInstanceProfiles(ctx context.Context, gpuUUID string) (out []gpu.GPUInstanceProfile, err error) {
	done, err := b.enter(ctx, "list gpu instance profiles of "+gpuUUID)
	if err != nil {
		return nil, err
	}
	defer done(&err)
	dev, err := b.migDevice(gpuUUID)
	if err != nil {
		return nil, err
	}
	profiles, err := giProfiles(dev)
	if err != nil {
		return nil, err
	}
	mem, ret := dev.GetMemoryInfo()
	if err := mapReturn("read memory info", ret); err != nil {
		return nil, err
	}
	gis, err := listGPUInstances(dev, profiles)
	if err != nil {
		return nil, err
	}
	for _, p := range profiles {
		left, err := remaining(dev, p)
		if err != nil {
			return nil, err
		}
		pls, err := allPlacements(dev, p)
		if err != nil {
			return nil, err
		}
		out = append(out, gpu.GPUInstanceProfile{
			ID:                  p.id(),
			Name:                profileName(int(p.info.SliceCount), p.info.MemorySizeMB, mem.Total, profileSuffix(p.index)),
			SliceCount:          int(p.info.SliceCount),
			MemorySlots:         memorySlots(dev, p, pls, gis),
			MemoryMiB:           p.info.MemorySizeMB,
			MultiprocessorCount: int(p.info.MultiprocessorCount),
			InstanceCount:       int(p.info.InstanceCount),
			Remaining:           left,
		})
	}
	slices.SortFunc(out, func(a, b gpu.GPUInstanceProfile) int {
		return cmp.Or(cmp.Compare(a.SliceCount, b.SliceCount), cmp.Compare(a.MemoryMiB, b.MemoryMiB), cmp.Compare(a.ID, b.ID))
	})
	return out, nil
}

// PossiblePlacements lists where an instance of the profile could be
// created now, ascending: the driver's placements for the profile that
// overlap no existing GPU instance, and none when the driver reports no
// remaining capacity (a count limit or exhausted compute slices).
// gpu.ErrInvalidArgument for a profile the GPU lacks.
func (b *Backend) PossiblePlacements(ctx context.Context, gpuUUID string, profile mig.ProfileID) (out []mig.Placement, err error) {
	done, err := b.enter(ctx, fmt.Sprintf("list possible placements of profile %d on %s", profile, gpuUUID))
	if err != nil {
		return nil, err
	}
	defer done(&err)
	dev, err := b.migDevice(gpuUUID)
	if err != nil {
		return nil, err
	}
	profiles, err := giProfiles(dev)
	if err != nil {
		return nil, err
	}
	p, err := findProfile(profiles, profile)
	if err != nil {
		return nil, err
	}
	out = []mig.Placement{}
	left, err := remaining(dev, p)
	if err != nil || left == 0 {
		return out, err
	}
	pls, err := allPlacements(dev, p)
	if err != nil {
		return nil, err
	}
	gis, err := listGPUInstances(dev, profiles)
	if err != nil {
		return nil, err
	}
	for _, pl := range pls {
		if overlapping(gis, pl) == nil {
			out = append(out, pl)
		}
	}
	return out, nil
}

// giHandle is an existing GPU instance.
type giHandle struct {
	h       nvml.GpuInstance
	info    nvml.GpuInstanceInfo
	profile giProfile
}

func (g giHandle) id() int { return int(g.info.Id) }

func (g giHandle) placement() mig.Placement {
	return mig.Placement{Start: int(g.info.Placement.Start), Size: int(g.info.Placement.Size)}
}

func (g giHandle) public(gpuUUID string) gpu.GPUInstance {
	return gpu.GPUInstance{GPUUUID: gpuUUID, ID: g.id(), ProfileID: g.profile.id(), Placement: g.placement()}
}

// overlapping returns the instance whose placement overlaps pl, or nil.
func overlapping(gis []giHandle, pl mig.Placement) *giHandle {
	for i := range gis {
		if gis[i].placement().Overlaps(pl) {
			return &gis[i]
		}
	}
	return nil
}

// gpuInstances lists the GPU's GPU instances (MIG mode must be current).
func (b *Backend) gpuInstances(dev nvml.Device) ([]giHandle, error) {
	profiles, err := giProfiles(dev)
	if err != nil {
		return nil, err
	}
	return listGPUInstances(dev, profiles)
}

// listGPUInstances lists the GPU instances of every profile, by id.
func listGPUInstances(dev nvml.Device, profiles []giProfile) ([]giHandle, error) {
	var out []giHandle
	for _, p := range profiles {
		if p.info.InstanceCount == 0 {
			continue // go-nvml sizes its buffer by InstanceCount
		}
		list, ret := dev.GetGpuInstances(&p.info)
		if err := mapReturn(fmt.Sprintf("list gpu instances of profile %d", p.id()), ret); err != nil {
			return nil, err
		}
		for _, h := range list {
			info, ret := h.GetInfo()
			if err := mapReturn("read gpu instance info", ret); err != nil {
				return nil, err
			}
			out = append(out, giHandle{h: h, info: info, profile: p})
		}
	}
	slices.SortFunc(out, func(a, b giHandle) int { return cmp.Compare(a.id(), b.id()) })
	return out, nil
}

// migDevice finds a GPU that has MIG mode enabled now.
func (b *Backend) migDevice(gpuUUID string) (nvml.Device, error) {
	dev, err := b.gpuByUUID(gpuUUID)
	if err != nil {
		return nil, err
	}
	return dev, requireMIG(dev)
}

// lookupGPUInstance finds a GPU instance of a GPU that has MIG enabled.
func (b *Backend) lookupGPUInstance(gpuUUID string, id int) (giHandle, error) {
	dev, err := b.migDevice(gpuUUID)
	if err != nil {
		return giHandle{}, err
	}
	return b.findGPUInstance(dev, id)
}

// findGPUInstance finds a GPU instance by id among the listed ones, so an
// absent id is gpu.ErrNotFound whatever code the driver would give an id
// it considers out of range.
func (b *Backend) findGPUInstance(dev nvml.Device, id int) (giHandle, error) {
	gis, err := b.gpuInstances(dev)
	if err != nil {
		return giHandle{}, err
	}
	for _, gi := range gis {
		if gi.id() == id {
			return gi, nil
		}
	}
	return giHandle{}, fmt.Errorf("gpu instance %d: %w", id, gpu.ErrNotFound)
}

// GPUInstances lists the GPU's GPU instances by id.
func (b *Backend) GPUInstances(ctx context.Context, gpuUUID string) (out []gpu.GPUInstance, err error) {
	done, err := b.enter(ctx, "list gpu instances of "+gpuUUID)
	if err != nil {
		return nil, err
	}
	defer done(&err)
	dev, err := b.migDevice(gpuUUID)
	if err != nil {
		return nil, err
	}
	gis, err := b.gpuInstances(dev)
	if err != nil {
		return nil, err
	}
	out = make([]gpu.GPUInstance, 0, len(gis))
	for _, gi := range gis {
		out = append(out, gi.public(gpuUUID))
	}
	return out, nil
}

// CreateGPUInstance creates a GPU instance of the profile at exactly the
// placement. Checked before the driver is asked: gpu.ErrInvalidArgument
// for a profile the GPU lacks, a placement of the wrong size, or one the
// profile does not allow (by the driver's placements, or pkg/mig's model
// when the driver does not list it); gpu.ErrInsufficientResources for a
// placement overlapping an existing instance. Capacity is the driver's
// call (NVML_ERROR_INSUFFICIENT_RESOURCES).
func (b *Backend) CreateGPUInstance(ctx context.Context, gpuUUID string, profile mig.ProfileID, at mig.Placement) (created gpu.GPUInstance, err error) {
	done, err := b.enter(ctx, fmt.Sprintf("create gpu instance of profile %d at %s on %s", profile, at, gpuUUID))
	if err != nil {
		return gpu.GPUInstance{}, err
	}
	defer done(&err)
	b.migMu.Lock()
	defer b.migMu.Unlock()
	dev, err := b.migDevice(gpuUUID)
	if err != nil {
		return gpu.GPUInstance{}, err
	}
	profiles, err := giProfiles(dev)
	if err != nil {
		return gpu.GPUInstance{}, err
	}
	p, err := findProfile(profiles, profile)
	if err != nil {
		return gpu.GPUInstance{}, err
	}
	pls, err := allPlacements(dev, p)
	if err != nil {
		return gpu.GPUInstance{}, err
	}
	gis, err := listGPUInstances(dev, profiles)
	if err != nil {
		return gpu.GPUInstance{}, err
	}
	if err := checkPlacement(dev, p, at, pls, gis); err != nil {
		return gpu.GPUInstance{}, err
	}
	h, ret := dev.CreateGpuInstanceWithPlacement(&p.info, &nvml.GpuInstancePlacement{Start: uint32(at.Start), Size: uint32(at.Size)})
	if err := mapReturn("create", ret); err != nil {
		return gpu.GPUInstance{}, err
	}
	info, ret := h.GetInfo()
	if err := mapReturn("read the created gpu instance", ret); err != nil {
		return gpu.GPUInstance{}, err
	}
	return giHandle{h: h, info: info, profile: p}.public(gpuUUID), nil
}

// checkPlacement applies the rules CreateGPUInstance checks itself.
func checkPlacement(dev nvml.Device, p giProfile, at mig.Placement, allowed []mig.Placement, gis []giHandle) error {
	if at.Start < 0 || at.Size <= 0 || at.End() > mig.MemorySlots {
		return fmt.Errorf("placement %s is outside the gpu's %d memory slots: %w: %w", at, mig.MemorySlots, gpu.ErrInvalidArgument, mig.ErrPlacementNotAllowed)
	}
	if slots := memorySlots(dev, p, allowed, gis); slots != 0 && at.Size != slots {
		return fmt.Errorf("profile %d takes %d memory slots, not %d: %w: %w", p.id(), slots, at.Size, gpu.ErrInvalidArgument, mig.ErrPlacementNotAllowed)
	}
	if !slices.Contains(allowed, at) {
		if m, ok := model(dev); ok {
			if mp, ok := m.Profile(p.id()); ok && !mp.Allows(at) {
				return fmt.Errorf("profile %d cannot start at slot %d: %w: %w", p.id(), at.Start, gpu.ErrInvalidArgument, mig.ErrPlacementNotAllowed)
			}
		}
	}
	if o := overlapping(gis, at); o != nil {
		return fmt.Errorf("placement %s overlaps gpu instance %d at %s: %w: %w", at, o.id(), o.placement(), gpu.ErrInsufficientResources, mig.ErrOverlap)
	}
	return nil
}

// DestroyGPUInstance destroys a GPU instance: gpu.ErrNotFound for an id no
// instance has, gpu.ErrInUse (the driver's IN_USE) while it has compute
// instances or processes.
func (b *Backend) DestroyGPUInstance(ctx context.Context, gpuUUID string, gpuInstanceID int) (err error) {
	done, err := b.enter(ctx, fmt.Sprintf("destroy gpu instance %d on %s", gpuInstanceID, gpuUUID))
	if err != nil {
		return err
	}
	defer done(&err)
	b.migMu.Lock()
	defer b.migMu.Unlock()
	gi, err := b.lookupGPUInstance(gpuUUID, gpuInstanceID)
	if err != nil {
		return err
	}
	return mapReturn("destroy", gi.h.Destroy())
}

// ciProfile is one compute instance profile of a GPU instance.
type ciProfile struct {
	index int
	info  nvml.ComputeInstanceProfileInfo
}

// ciProfiles lists the compute instance profiles the GPU instance supports
// with shared engines, by enumerator.
func ciProfiles(gi nvml.GpuInstance) ([]ciProfile, error) {
	var out []ciProfile
	for i := range nvml.COMPUTE_INSTANCE_PROFILE_COUNT {
		info, ret := gi.GetComputeInstanceProfileInfo(i, nvml.COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED)
		switch ret {
		case nvml.SUCCESS:
		case nvml.ERROR_NOT_SUPPORTED, nvml.ERROR_INVALID_ARGUMENT:
			continue
		default:
			return nil, mapReturn(fmt.Sprintf("read compute instance profile %d", i), ret)
		}
		if !slices.ContainsFunc(out, func(p ciProfile) bool { return p.info.Id == info.Id }) {
			out = append(out, ciProfile{index: i, info: info})
		}
	}
	return out, nil
}

// ciHandle is an existing compute instance.
type ciHandle struct {
	h       nvml.ComputeInstance
	info    nvml.ComputeInstanceInfo
	profile ciProfile
}

func (c ciHandle) public(gpuUUID string, gi int) gpu.ComputeInstance {
	return gpu.ComputeInstance{
		GPUUUID:       gpuUUID,
		GPUInstanceID: gi,
		ID:            int(c.info.Id),
		ProfileID:     int(c.info.ProfileId),
		SliceCount:    int(c.profile.info.SliceCount),
	}
}

// computeInstances lists a GPU instance's compute instances by id.
func computeInstances(gi giHandle) ([]ciHandle, error) {
	profiles, err := ciProfiles(gi.h)
	if err != nil {
		return nil, err
	}
	var out []ciHandle
	for _, p := range profiles {
		if p.info.InstanceCount == 0 {
			continue
		}
		list, ret := gi.h.GetComputeInstances(&p.info)
		if err := mapReturn(fmt.Sprintf("list compute instances of profile %d", p.info.Id), ret); err != nil {
			return nil, err
		}
		for _, h := range list {
			info, ret := h.GetInfo()
			if err := mapReturn("read compute instance info", ret); err != nil {
				return nil, err
			}
			out = append(out, ciHandle{h: h, info: info, profile: p})
		}
	}
	slices.SortFunc(out, func(a, b ciHandle) int { return cmp.Compare(a.info.Id, b.info.Id) })
	return out, nil
}

// CreateComputeInstance creates the GPU instance's full-size compute
// instance: the first compute profile (by NVML enumerator) whose slices
// equal the GPU instance's, what nvidia-smi mig -cgi ... -C creates.
// gpu.ErrNotFound for an absent GPU instance; the driver's
// INSUFFICIENT_RESOURCES when it already has one.
func (b *Backend) CreateComputeInstance(ctx context.Context, gpuUUID string, gpuInstanceID int) (created gpu.ComputeInstance, err error) {
	done, err := b.enter(ctx, fmt.Sprintf("create compute instance in gpu instance %d on %s", gpuInstanceID, gpuUUID))
	if err != nil {
		return gpu.ComputeInstance{}, err
	}
	defer done(&err)
	b.migMu.Lock()
	defer b.migMu.Unlock()
	gi, err := b.lookupGPUInstance(gpuUUID, gpuInstanceID)
	if err != nil {
		return gpu.ComputeInstance{}, err
	}
	profiles, err := ciProfiles(gi.h)
	if err != nil {
		return gpu.ComputeInstance{}, err
	}
	i := slices.IndexFunc(profiles, func(p ciProfile) bool { return p.info.SliceCount == gi.profile.info.SliceCount })
	if i < 0 {
		return gpu.ComputeInstance{}, fmt.Errorf("no compute instance profile spans the gpu instance's %d slices: %w", gi.profile.info.SliceCount, gpu.ErrNotSupported)
	}
	full := profiles[i]
	h, ret := gi.h.CreateComputeInstance(&full.info)
	if err := mapReturn(fmt.Sprintf("create with compute profile %d", full.info.Id), ret); err != nil {
		return gpu.ComputeInstance{}, err
	}
	info, ret := h.GetInfo()
	if err := mapReturn("read the created compute instance", ret); err != nil {
		return gpu.ComputeInstance{}, err
	}
	return ciHandle{h: h, info: info, profile: full}.public(gpuUUID, gpuInstanceID), nil
}

// ComputeInstances lists a GPU instance's compute instances by id;
// gpu.ErrNotFound for an absent GPU instance.
func (b *Backend) ComputeInstances(ctx context.Context, gpuUUID string, gpuInstanceID int) (out []gpu.ComputeInstance, err error) {
	done, err := b.enter(ctx, fmt.Sprintf("list compute instances of gpu instance %d on %s", gpuInstanceID, gpuUUID))
	if err != nil {
		return nil, err
	}
	defer done(&err)
	gi, err := b.lookupGPUInstance(gpuUUID, gpuInstanceID)
	if err != nil {
		return nil, err
	}
	cis, err := computeInstances(gi)
	if err != nil {
		return nil, err
	}
	out = make([]gpu.ComputeInstance, 0, len(cis))
	for _, ci := range cis {
		out = append(out, ci.public(gpuUUID, gpuInstanceID))
	}
	return out, nil
}

// DestroyComputeInstance destroys a compute instance: gpu.ErrNotFound for
// absent ids, gpu.ErrInUse (the driver's IN_USE) while a process runs on
// it.
func (b *Backend) DestroyComputeInstance(ctx context.Context, gpuUUID string, gpuInstanceID, computeInstanceID int) (err error) {
	done, err := b.enter(ctx, fmt.Sprintf("destroy compute instance %d of gpu instance %d on %s", computeInstanceID, gpuInstanceID, gpuUUID))
	if err != nil {
		return err
	}
	defer done(&err)
	b.migMu.Lock()
	defer b.migMu.Unlock()
	gi, err := b.lookupGPUInstance(gpuUUID, gpuInstanceID)
	if err != nil {
		return err
	}
	cis, err := computeInstances(gi)
	if err != nil {
		return err
	}
	for _, ci := range cis {
		if int(ci.info.Id) == computeInstanceID {
			return mapReturn("destroy", ci.h.Destroy())
		}
	}
	return fmt.Errorf("compute instance %d: %w", computeInstanceID, gpu.ErrNotFound)
}

// MIGDevices lists the GPU's MIG devices (one per compute instance) by GPU
// instance and compute instance id, with the device nodes a container
// needs. Node numbers come from the nodes themselves when they exist, else
// from the documented major (195) or /proc/devices; capability minors
// from /proc/driver/nvidia-caps/mig-minors. When a MIG device exists but
// its nodes cannot be named (nvidia-uvm not loaded, no capability table)
// the call fails with gpu.ErrDriverUnavailable rather than hand a
// container an incomplete set.
func (b *Backend) MIGDevices(ctx context.Context, gpuUUID string) (out []gpu.MIGDevice, err error) {
	done, err := b.enter(ctx, "list mig devices of "+gpuUUID)
	if err != nil {
		return nil, err
	}
	defer done(&err)
	dev, err := b.migDevice(gpuUUID)
	if err != nil {
		return nil, err
	}
	minor, ret := dev.GetMinorNumber()
	if err := mapReturn("read minor number", ret); err != nil {
		return nil, err
	}
	gis, err := b.gpuInstances(dev)
	if err != nil {
		return nil, err
	}
	n, ret := dev.GetMaxMigDeviceCount()
	if err := mapReturn("read the mig device count", ret); err != nil {
		return nil, err
	}
	out = []gpu.MIGDevice{}
	var nodes *nodeTable
	for i := range n {
		md, ret := dev.GetMigDeviceHandleByIndex(i)
		if ret == nvml.ERROR_NOT_FOUND || ret == nvml.ERROR_INVALID_ARGUMENT {
			continue // no MIG device at this index
		}
		if err := mapReturn(fmt.Sprintf("get mig device %d", i), ret); err != nil {
			return nil, err
		}
		d, err := describeMIGDevice(md, gpuUUID, gis)
		if err != nil {
			return nil, fmt.Errorf("mig device %d: %w", i, err)
		}
		if nodes == nil {
			t, err := b.nodes.read()
			if err != nil {
				return nil, err
			}
			nodes = &t
		}
		if d.DeviceNodes, err = nodes.migDeviceNodes(minor, d.GPUInstanceID, d.ComputeInstanceID); err != nil {
			return nil, fmt.Errorf("device nodes of %s: %w", d.UUID, err)
		}
		out = append(out, d)
	}
	slices.SortFunc(out, func(a, b gpu.MIGDevice) int {
		return cmp.Or(cmp.Compare(a.GPUInstanceID, b.GPUInstanceID), cmp.Compare(a.ComputeInstanceID, b.ComputeInstanceID))
	})
	return out, nil
}

// describeMIGDevice reads a MIG device handle's identity.
func describeMIGDevice(md nvml.Device, gpuUUID string, gis []giHandle) (gpu.MIGDevice, error) {
	d := gpu.MIGDevice{GPUUUID: gpuUUID}
	var ret nvml.Return
	if d.UUID, ret = md.GetUUID(); ret != nvml.SUCCESS {
		return gpu.MIGDevice{}, mapReturn("read uuid", ret)
	}
	if d.GPUInstanceID, ret = md.GetGpuInstanceId(); ret != nvml.SUCCESS {
		return gpu.MIGDevice{}, mapReturn("read gpu instance id", ret)
	}
	if d.ComputeInstanceID, ret = md.GetComputeInstanceId(); ret != nvml.SUCCESS {
		return gpu.MIGDevice{}, mapReturn("read compute instance id", ret)
	}
	mem, ret := md.GetMemoryInfo()
	if ret != nvml.SUCCESS {
		return gpu.MIGDevice{}, mapReturn("read memory info", ret)
	}
	d.MemoryMiB = mem.Total / mib
	i := slices.IndexFunc(gis, func(g giHandle) bool { return g.id() == d.GPUInstanceID })
	if i < 0 {
		return gpu.MIGDevice{}, fmt.Errorf("%s names gpu instance %d, which the driver does not list: %w", d.UUID, d.GPUInstanceID, gpu.ErrNotFound)
	}
	d.ProfileID, d.Placement = gis[i].profile.id(), gis[i].placement()
	return d, nil
}

// DriverProfileNames reports the profile names the driver itself gives
// (GpuInstanceProfileInfo_v2.Name, e.g. "MIG 1g.18gb") by profile id, to
// check the derived names against on a real host. gpu.ErrNotSupported when
// the library predates versioned profile info.
func (b *Backend) DriverProfileNames(ctx context.Context, gpuUUID string) (names map[mig.ProfileID]string, err error) {
	done, err := b.enter(ctx, "read driver profile names of "+gpuUUID)
	if err != nil {
		return nil, err
	}
	defer done(&err)
	if !b.has(symProfileInfoVersion) {
		return nil, fmt.Errorf("library lacks %s: %w", symProfileInfoVersion, gpu.ErrNotSupported)
	}
	dev, err := b.migDevice(gpuUUID)
	if err != nil {
		return nil, err
	}
	names = map[mig.ProfileID]string{}
	for i := range nvml.GPU_INSTANCE_PROFILE_COUNT {
		info, ret := dev.GetGpuInstanceProfileInfoV(i).V2()
		switch ret {
		case nvml.SUCCESS:
			names[mig.ProfileID(info.Id)] = cString(info.Name[:])
		case nvml.ERROR_NOT_SUPPORTED, nvml.ERROR_INVALID_ARGUMENT:
		default:
			return nil, mapReturn(fmt.Sprintf("read gpu instance profile %d", i), ret)
		}
	}
	return names, nil
}
