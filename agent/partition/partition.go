// Package partition turns a lease's placement into a MIG partition on the
// host and back: it creates the GPU instance at exactly the placement the
// control plane chose and its compute instance, adopts what a crashed agent
// left half-done, and destroys children before parents. It never touches a
// partition it was not asked about: the lease path (Ensure, Destroy) works
// on one lease's partition, and the reconciler (Reconcile, ApplyStatic) only
// on the GPUs it is given, never on an instance a running lease holds.
package partition

import (
	"context"
	"errors"
	"fmt"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/pkg/mig"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

// Want is a partition to create.
type Want struct {
	GPUUUID   string
	Profile   mig.ProfileID
	Placement mig.Placement
}

// Handle identifies a created partition.
type Handle struct {
	GPUUUID string
	GIID    int
	CIID    int
	HasCI   bool
	Device  gpu.MIGDevice
}

// Ensure creates the partition, or adopts one that already exists at
// exactly that profile and placement (an agent that crashed after creating
// it but before journaling it). onGI is called as soon as the GPU instance
// exists, so the caller can journal it before going on.
func Ensure(ctx context.Context, b gpu.Backend, w Want, onGI func(giID int) error) (Handle, error) {
	h := Handle{GPUUUID: w.GPUUUID}
	gis, err := b.GPUInstances(ctx, w.GPUUUID)
	if err != nil {
		return h, fmt.Errorf("list gpu instances on %s: %w", w.GPUUUID, err)
	}
	found := false
	for _, gi := range gis {
		if gi.ProfileID == w.Profile && gi.Placement == w.Placement {
			h.GIID, found = gi.ID, true
			break
		}
	}
	if !found {
		gi, err := b.CreateGPUInstance(ctx, w.GPUUUID, w.Profile, w.Placement)
		if err != nil {
			return h, fmt.Errorf("create gpu instance profile %d at %s on %s: %w", w.Profile, w.Placement, w.GPUUUID, err)
		}
		h.GIID = gi.ID
	}
	if onGI != nil {
		if err := onGI(h.GIID); err != nil {
			return h, err
		}
	}
	cis, err := b.ComputeInstances(ctx, w.GPUUUID, h.GIID)
	if err != nil {
		return h, fmt.Errorf("list compute instances of gi %d on %s: %w", h.GIID, w.GPUUUID, err)
	}
	if len(cis) > 0 {
		h.CIID = cis[0].ID
	} else {
		ci, err := b.CreateComputeInstance(ctx, w.GPUUUID, h.GIID)
		if err != nil {
			return h, fmt.Errorf("create compute instance in gi %d on %s: %w", h.GIID, w.GPUUUID, err)
		}
		h.CIID = ci.ID
	}
	h.HasCI = true
	devs, err := b.MIGDevices(ctx, w.GPUUUID)
	if err != nil {
		return h, fmt.Errorf("list mig devices on %s: %w", w.GPUUUID, err)
	}
	for _, d := range devs {
		if d.GPUInstanceID == h.GIID && d.ComputeInstanceID == h.CIID {
			h.Device = d
			return h, nil
		}
	}
	return h, fmt.Errorf("mig device for gi %d ci %d on %s: %w", h.GIID, h.CIID, w.GPUUUID, gpu.ErrNotFound)
}

// Device returns the MIG device of an existing partition.
func Device(ctx context.Context, b gpu.Backend, gpuUUID string, giID, ciID int) (gpu.MIGDevice, error) {
	devs, err := b.MIGDevices(ctx, gpuUUID)
	if err != nil {
		return gpu.MIGDevice{}, fmt.Errorf("list mig devices on %s: %w", gpuUUID, err)
	}
	for _, d := range devs {
		if d.GPUInstanceID == giID && d.ComputeInstanceID == ciID {
			return d, nil
		}
	}
	return gpu.MIGDevice{}, fmt.Errorf("mig device gi %d ci %d on %s: %w", giID, ciID, gpuUUID, gpu.ErrNotFound)
}

// Destroy removes the GPU instance and its compute instances. What is
// already gone is not an error.
func Destroy(ctx context.Context, b gpu.Backend, gpuUUID string, giID int) error {
	cis, err := b.ComputeInstances(ctx, gpuUUID, giID)
	if errors.Is(err, gpu.ErrNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("list compute instances of gi %d on %s: %w", giID, gpuUUID, err)
	}
	for _, ci := range cis {
		if err := b.DestroyComputeInstance(ctx, gpuUUID, giID, ci.ID); err != nil && !errors.Is(err, gpu.ErrNotFound) {
			return fmt.Errorf("destroy compute instance %d of gi %d on %s: %w", ci.ID, giID, gpuUUID, err)
		}
	}
	if err := b.DestroyGPUInstance(ctx, gpuUUID, giID); err != nil && !errors.Is(err, gpu.ErrNotFound) {
		return fmt.Errorf("destroy gpu instance %d on %s: %w", giID, gpuUUID, err)
	}
	return nil
}

// Inventory reads the host's GPUs, their MIG profiles and partitions.
func Inventory(ctx context.Context, b gpu.Backend) (*nodev1.Inventory, error) {
	inv := &nodev1.Inventory{}
	dv, err := b.DriverVersion(ctx)
	if err != nil {
		return nil, fmt.Errorf("driver version: %w", err)
	}
	inv.DriverVersion = dv
	devs, err := b.Devices(ctx)
	if err != nil {
		return nil, fmt.Errorf("list gpus: %w", err)
	}
	for _, d := range devs {
		g := &nodev1.Gpu{Index: uint32(d.Index), Uuid: d.UUID, Model: d.Name, PciDeviceId: d.PCIDeviceID >> 16,
			MemoryMib: d.MemoryMiB, MigCapable: d.MIGCapable, Serial: d.Serial, VbiosVersion: d.VBIOSVersion}
		if d.MIGCapable {
			mode, err := b.MIGMode(ctx, d.UUID)
			if err != nil {
				return nil, fmt.Errorf("mig mode of %s: %w", d.UUID, err)
			}
			g.MigEnabled = mode.Current
		}
		if g.MigEnabled {
			profiles, err := b.GPUInstanceProfiles(ctx, d.UUID)
			if err != nil {
				return nil, fmt.Errorf("mig profiles of %s: %w", d.UUID, err)
			}
			for _, p := range profiles {
				g.Profiles = append(g.Profiles, &nodev1.MigProfile{Id: int32(p.ID), Name: p.Name, Slices: uint32(p.SliceCount),
					MemorySlots: uint32(p.MemorySlots), MemoryMib: p.MemoryMiB, MaxCount: uint32(p.InstanceCount)})
			}
			gis, err := b.GPUInstances(ctx, d.UUID)
			if err != nil {
				return nil, fmt.Errorf("gpu instances of %s: %w", d.UUID, err)
			}
			migs, err := b.MIGDevices(ctx, d.UUID)
			if err != nil {
				return nil, fmt.Errorf("mig devices of %s: %w", d.UUID, err)
			}
			for _, gi := range gis {
				in := &nodev1.MigInstance{ProfileId: int32(gi.ProfileID), Start: uint32(gi.Placement.Start), Size: uint32(gi.Placement.Size)}
				for _, m := range migs {
					if m.GPUInstanceID == gi.ID {
						in.MigUuid = m.UUID
					}
				}
				g.Instances = append(g.Instances, in)
			}
		}
		inv.Gpus = append(inv.Gpus, g)
	}
	return inv, nil
}

// MarkHealth sets each GPU's health in an inventory from the agent's health
// verdict: unhealthy(uuid) says whether the GPU, or any partition on it, is
// unhealthy and why.
func MarkHealth(inv *nodev1.Inventory, unhealthy func(gpuUUID string) (bool, string)) {
	for _, g := range inv.GetGpus() {
		g.Unhealthy, g.HealthReason = unhealthy(g.GetUuid())
	}
}
