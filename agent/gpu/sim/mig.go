package sim

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/pkg/mig"
)

// requireMIG fails with gpu.ErrNotSupported unless MIG mode is current, as
// the driver refuses MIG calls on a GPU whose MIG mode is off or only
// pending.
func requireMIG(rec gpuRecord) error {
	if !rec.MIGCurrent {
		return fmt.Errorf("mig mode is not enabled (pending %t): %w", rec.MIGPending, gpu.ErrNotSupported)
	}
	return nil
}

// MIGMode reports the GPU's MIG mode. As in NVML, Pending is the mode the
// GPU will have after the next reset: equal to Current when no change is
// pending.
func (s *Sim) MIGMode(ctx context.Context, gpuUUID string) (gpu.MIGMode, error) {
	var mode gpu.MIGMode
	err := s.view(ctx, gpuUUID, func(g *simGPU) error {
		mode = gpu.MIGMode{Current: g.rec.MIGCurrent, Pending: g.rec.MIGPending}
		return nil
	})
	if err != nil {
		return gpu.MIGMode{}, fmt.Errorf("get mig mode of %s: %w", gpuUUID, err)
	}
	return mode, nil
}

// SetMIGMode requests a MIG mode. The change is pending until ResetGPU, or
// current at once with Config.ImmediateModeChange. Requesting a mode other
// than the current one while the GPU has GPU instances fails with
// gpu.ErrInUse; requesting the current mode is always allowed and cancels a
// pending change.
func (s *Sim) SetMIGMode(ctx context.Context, gpuUUID string, enabled bool) (gpu.MIGMode, error) {
	if err := ctx.Err(); err != nil {
		return gpu.MIGMode{}, err
	}
	var mode gpu.MIGMode
	err := s.update(gpuUUID, func(_ *simGPU, rec *gpuRecord) error {
		if enabled != rec.MIGCurrent && len(rec.GPUInstances) > 0 {
			return fmt.Errorf("gpu has %d gpu instances: %w", len(rec.GPUInstances), gpu.ErrInUse)
		}
		rec.MIGPending = enabled
		if s.cfg.ImmediateModeChange {
			rec.MIGCurrent = enabled
		}
		mode = gpu.MIGMode{Current: rec.MIGCurrent, Pending: rec.MIGPending}
		return nil
	})
	if err != nil {
		return gpu.MIGMode{}, fmt.Errorf("set mig mode of %s to %t: %w", gpuUUID, enabled, err)
	}
	return mode, nil
}

// instances lists a GPU's GPU instances in pkg/mig terms.
func instances(rec gpuRecord) []mig.Instance {
	out := make([]mig.Instance, len(rec.GPUInstances))
	for i, gi := range rec.GPUInstances {
		out[i] = mig.Instance{Profile: gi.Profile, Placement: gi.placement()}
	}
	return out
}

// GPUInstanceProfiles lists every GPU instance profile of the GPU's model
// with InstanceCount (the most on an empty GPU) and Remaining (how many more
// fit now, mig.Model.Remaining).
func (s *Sim) GPUInstanceProfiles(ctx context.Context, gpuUUID string) ([]gpu.GPUInstanceProfile, error) {
	var out []gpu.GPUInstanceProfile
	err := s.view(ctx, gpuUUID, func(g *simGPU) error {
		if err := requireMIG(g.rec); err != nil {
			return err
		}
		existing := instances(g.rec)
		for _, p := range g.model.Profiles {
			out = append(out, gpu.GPUInstanceProfile{
				ID:                  p.ID,
				Name:                p.Name,
				SliceCount:          p.Slices,
				MemorySlots:         p.MemorySlots,
				MemoryMiB:           p.MemoryMiB,
				MultiprocessorCount: p.SMs,
				InstanceCount:       p.MaxCount,
				Remaining:           g.model.Remaining(existing, p.ID),
			})
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list gpu instance profiles of %s: %w", gpuUUID, err)
	}
	return out, nil
}

// PossiblePlacements lists where the profile could be created now
// (mig.Model.Free), ascending; empty, not nil, when nowhere.
// gpu.ErrInvalidArgument for a profile the model does not have.
func (s *Sim) PossiblePlacements(ctx context.Context, gpuUUID string, profile mig.ProfileID) ([]mig.Placement, error) {
	var out []mig.Placement
	err := s.view(ctx, gpuUUID, func(g *simGPU) error {
		if err := requireMIG(g.rec); err != nil {
			return err
		}
		if _, ok := g.model.Profile(profile); !ok {
			return fmt.Errorf("profile %d: %w: %w", profile, gpu.ErrInvalidArgument, mig.ErrUnknownProfile)
		}
		out = append([]mig.Placement{}, g.model.Free(instances(g.rec), profile)...)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list possible placements of profile %d on %s: %w", profile, gpuUUID, err)
	}
	return out, nil
}

// gpuInstanceID is the id the driver gives a GPU instance at a placement:
// the index of its memory range in the binary tree of the 8 memory slots
// (0 the whole GPU, 1-2 the halves, 3-6 the quarters, 7-14 the eighths).
// So a 7g is always GPU instance 0, 3g/4g instances are 1 or 2, and a 1g at
// slot s is 7+s, as nvidia-smi shows on hardware. Two valid instances never
// share an id because they never share a slot, and ids stay below 15, the
// size of the driver's per-GPU capability table. ok is false for a
// placement that is not an aligned power-of-two range.
func gpuInstanceID(at mig.Placement) (int, bool) {
	switch at.Size {
	case 1, 2, 4, 8:
	default:
		return 0, false
	}
	if at.Start < 0 || at.Start%at.Size != 0 || at.End() > mig.MemorySlots {
		return 0, false
	}
	return mig.MemorySlots/at.Size - 1 + at.Start/at.Size, true
}

// CreateGPUInstance creates a GPU instance of the profile at exactly the
// placement. Errors, as NVML returns them: gpu.ErrNotSupported when MIG mode
// is not current; gpu.ErrInvalidArgument for a profile the model lacks or a
// placement the profile does not allow; gpu.ErrInsufficientResources for an
// overlap, a reached instance limit or exhausted compute slices. The pkg/mig
// class (mig.ErrOverlap, ...) is wrapped too.
func (s *Sim) CreateGPUInstance(ctx context.Context, gpuUUID string, profile mig.ProfileID, at mig.Placement) (gpu.GPUInstance, error) {
	if err := ctx.Err(); err != nil {
		return gpu.GPUInstance{}, err
	}
	var created gpu.GPUInstance
	err := s.update(gpuUUID, func(g *simGPU, rec *gpuRecord) error {
		if err := requireMIG(*rec); err != nil {
			return err
		}
		if err := g.model.Check(instances(*rec), profile, at); err != nil {
			switch {
			case errors.Is(err, mig.ErrUnknownProfile), errors.Is(err, mig.ErrPlacementNotAllowed):
				return fmt.Errorf("%w: %w", gpu.ErrInvalidArgument, err)
			default:
				return fmt.Errorf("%w: %w", gpu.ErrInsufficientResources, err)
			}
		}
		id, ok := gpuInstanceID(at)
		if !ok || slices.ContainsFunc(rec.GPUInstances, func(gi giRecord) bool { return gi.ID == id }) {
			// Unreachable with the model table's geometry; kept so a
			// wrong table fails loudly instead of aliasing two instances.
			return fmt.Errorf("no gpu instance id for placement %s: %w", at, gpu.ErrInsufficientResources)
		}
		rec.GPUInstances = append(rec.GPUInstances, giRecord{ID: id, Profile: profile, Start: at.Start, Size: at.Size})
		slices.SortFunc(rec.GPUInstances, func(a, b giRecord) int { return a.ID - b.ID })
		created = gpu.GPUInstance{GPUUUID: gpuUUID, ID: id, ProfileID: profile, Placement: at}
		return nil
	})
	if err != nil {
		return gpu.GPUInstance{}, fmt.Errorf("create gpu instance of profile %d at %s on %s: %w", profile, at, gpuUUID, err)
	}
	return created, nil
}

// GPUInstances lists the GPU's GPU instances by id.
func (s *Sim) GPUInstances(ctx context.Context, gpuUUID string) ([]gpu.GPUInstance, error) {
	var out []gpu.GPUInstance
	err := s.view(ctx, gpuUUID, func(g *simGPU) error {
		if err := requireMIG(g.rec); err != nil {
			return err
		}
		out = make([]gpu.GPUInstance, 0, len(g.rec.GPUInstances))
		for _, gi := range g.rec.GPUInstances {
			out = append(out, gpu.GPUInstance{GPUUUID: gpuUUID, ID: gi.ID, ProfileID: gi.Profile, Placement: gi.placement()})
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list gpu instances of %s: %w", gpuUUID, err)
	}
	return out, nil
}

// findGI returns the index of GPU instance id in rec, or gpu.ErrNotFound.
func findGI(rec gpuRecord, id int) (int, error) {
	i := slices.IndexFunc(rec.GPUInstances, func(gi giRecord) bool { return gi.ID == id })
	if i < 0 {
		return 0, fmt.Errorf("gpu instance %d: %w", id, gpu.ErrNotFound)
	}
	return i, nil
}

// DestroyGPUInstance destroys a GPU instance: gpu.ErrInUse while it has
// compute instances, gpu.ErrNotFound for an unknown id.
func (s *Sim) DestroyGPUInstance(ctx context.Context, gpuUUID string, gpuInstanceID int) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	err := s.update(gpuUUID, func(_ *simGPU, rec *gpuRecord) error {
		if err := requireMIG(*rec); err != nil {
			return err
		}
		i, err := findGI(*rec, gpuInstanceID)
		if err != nil {
			return err
		}
		if n := len(rec.GPUInstances[i].ComputeInstances); n > 0 {
			return fmt.Errorf("gpu instance %d has %d compute instances: %w", gpuInstanceID, n, gpu.ErrInUse)
		}
		rec.GPUInstances = slices.Delete(rec.GPUInstances, i, i+1)
		return nil
	})
	if err != nil {
		return fmt.Errorf("destroy gpu instance %d on %s: %w", gpuInstanceID, gpuUUID, err)
	}
	return nil
}

// computeProfileID is NVML's compute instance profile id for a compute
// instance of n slices (NVML_COMPUTE_INSTANCE_PROFILE_*_SLICE).
func computeProfileID(n int) int {
	switch n {
	case 1:
		return 0
	case 2:
		return 1
	case 3:
		return 2
	case 4:
		return 3
	case 7:
		return 4
	default:
		return -1
	}
}

func (s *Sim) computeInstance(g *simGPU, gi giRecord, ci ciRecord) gpu.ComputeInstance {
	p, _ := g.model.Profile(gi.Profile)
	return gpu.ComputeInstance{
		GPUUUID:       g.dev.UUID,
		GPUInstanceID: gi.ID,
		ID:            ci.ID,
		ProfileID:     computeProfileID(p.Slices),
		SliceCount:    p.Slices,
	}
}

// CreateComputeInstance creates the GPU instance's full-size compute
// instance (id 0). The simulator models only that default profile, so a
// second compute instance finds no free slices:
// gpu.ErrInsufficientResources. gpu.ErrNotFound for an unknown GPU instance.
func (s *Sim) CreateComputeInstance(ctx context.Context, gpuUUID string, gpuInstanceID int) (gpu.ComputeInstance, error) {
	if err := ctx.Err(); err != nil {
		return gpu.ComputeInstance{}, err
	}
	var created gpu.ComputeInstance
	err := s.update(gpuUUID, func(g *simGPU, rec *gpuRecord) error {
		if err := requireMIG(*rec); err != nil {
			return err
		}
		i, err := findGI(*rec, gpuInstanceID)
		if err != nil {
			return err
		}
		gi := &rec.GPUInstances[i]
		if len(gi.ComputeInstances) > 0 {
			return fmt.Errorf("gpu instance %d already has its full-size compute instance: %w", gpuInstanceID, gpu.ErrInsufficientResources)
		}
		ci := ciRecord{ID: 0}
		gi.ComputeInstances = append(gi.ComputeInstances, ci)
		created = s.computeInstance(g, *gi, ci)
		return nil
	})
	if err != nil {
		return gpu.ComputeInstance{}, fmt.Errorf("create compute instance in gpu instance %d on %s: %w", gpuInstanceID, gpuUUID, err)
	}
	return created, nil
}

// ComputeInstances lists the compute instances of a GPU instance;
// gpu.ErrNotFound for an unknown GPU instance.
func (s *Sim) ComputeInstances(ctx context.Context, gpuUUID string, gpuInstanceID int) ([]gpu.ComputeInstance, error) {
	var out []gpu.ComputeInstance
	err := s.view(ctx, gpuUUID, func(g *simGPU) error {
		if err := requireMIG(g.rec); err != nil {
			return err
		}
		i, err := findGI(g.rec, gpuInstanceID)
		if err != nil {
			return err
		}
		gi := g.rec.GPUInstances[i]
		out = make([]gpu.ComputeInstance, 0, len(gi.ComputeInstances))
		for _, ci := range gi.ComputeInstances {
			out = append(out, s.computeInstance(g, gi, ci))
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list compute instances of gpu instance %d on %s: %w", gpuInstanceID, gpuUUID, err)
	}
	return out, nil
}

// DestroyComputeInstance destroys a compute instance: gpu.ErrInUse while a
// process is attached (AttachProcess), gpu.ErrNotFound for unknown ids.
func (s *Sim) DestroyComputeInstance(ctx context.Context, gpuUUID string, gpuInstanceID, computeInstanceID int) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	err := s.update(gpuUUID, func(g *simGPU, rec *gpuRecord) error {
		if err := requireMIG(*rec); err != nil {
			return err
		}
		i, err := findGI(*rec, gpuInstanceID)
		if err != nil {
			return err
		}
		gi := &rec.GPUInstances[i]
		j := slices.IndexFunc(gi.ComputeInstances, func(ci ciRecord) bool { return ci.ID == computeInstanceID })
		if j < 0 {
			return fmt.Errorf("compute instance %d: %w", computeInstanceID, gpu.ErrNotFound)
		}
		if procs := gi.ComputeInstances[j].Processes; len(procs) > 0 {
			return fmt.Errorf("process %d holds %s: %w", procs[0], s.migUUID(g, gi.ID, computeInstanceID), gpu.ErrInUse)
		}
		gi.ComputeInstances = slices.Delete(gi.ComputeInstances, j, j+1)
		return nil
	})
	if err != nil {
		return fmt.Errorf("destroy compute instance %d of gpu instance %d on %s: %w", computeInstanceID, gpuInstanceID, gpuUUID, err)
	}
	return nil
}

// MIGDevices lists one MIG device per compute instance, by GPU instance id
// then compute instance id, with the device nodes a container needs.
func (s *Sim) MIGDevices(ctx context.Context, gpuUUID string) ([]gpu.MIGDevice, error) {
	var out []gpu.MIGDevice
	err := s.view(ctx, gpuUUID, func(g *simGPU) error {
		if err := requireMIG(g.rec); err != nil {
			return err
		}
		out = []gpu.MIGDevice{}
		for _, gi := range g.rec.GPUInstances {
			p, _ := g.model.Profile(gi.Profile)
			for _, ci := range gi.ComputeInstances {
				out = append(out, gpu.MIGDevice{
					UUID:              s.migUUID(g, gi.ID, ci.ID),
					GPUUUID:           gpuUUID,
					GPUInstanceID:     gi.ID,
					ComputeInstanceID: ci.ID,
					ProfileID:         gi.Profile,
					Placement:         gi.placement(),
					MemoryMiB:         p.MemoryMiB,
					DeviceNodes:       s.deviceNodes(g.dev.MinorNumber, gi.ID, ci.ID),
				})
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list mig devices of %s: %w", gpuUUID, err)
	}
	return out, nil
}
