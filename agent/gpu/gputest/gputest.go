// Package gputest is the conformance suite for gpu.Backend
// implementations: the contract every backend (the simulator today, the
// real NVML backend on a GPU host) must meet, stated as tests. It checks
// behaviour through the interface only, so it must never assume
// simulator-specific ids or names, and RunReadOnly must never change the
// GPUs it inspects.
package gputest

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/pkg/mig"
)

// pciBusID is NVML's bus id form: domain:bus:device.function in upper-case
// hex.
var pciBusID = regexp.MustCompile(`^[0-9A-F]{8}:[0-9A-F]{2}:[0-9A-F]{2}\.[0-7]$`)

// unknownProfile is a GPU instance profile id no GPU has.
const unknownProfile mig.ProfileID = 99

// unknownGPU is a GPU UUID no backend reports.
const unknownGPU = "GPU-00000000-0000-4000-8000-000000000000"

// maxGPUInstanceID bounds GPU instance ids as the driver's capability table
// does (gi0..gi14).
const maxGPUInstanceID = 14

// RunReadOnly checks inventory, MIG mode, profiles, placements, the
// listing of existing instances and MIG devices on every GPU the backend
// reports, and the Observer: telemetry of every GPU and MIG device and the
// life cycle of event subscriptions. It never changes anything, so it may
// run against a production host. The backend must report at least one
// GPU.
func RunReadOnly(t *testing.T, b gpu.Backend) {
	t.Helper()
	ctx := t.Context()

	version, err := b.DriverVersion(ctx)
	if err != nil || version == "" {
		t.Errorf("DriverVersion = %q, %v; want a version", version, err)
	}

	devs, err := b.Devices(ctx)
	if err != nil {
		t.Fatalf("Devices: %v", err)
	}
	if len(devs) == 0 {
		t.Fatal("Devices: no GPUs; the conformance suite needs at least one")
	}
	checkInventory(t, devs)

	if _, err := b.MIGMode(ctx, unknownGPU); !errors.Is(err, gpu.ErrNotFound) {
		t.Errorf("MIGMode(unknown gpu) = %v, want ErrNotFound", err)
	}
	if _, err := b.GPUInstances(ctx, unknownGPU); !errors.Is(err, gpu.ErrNotFound) {
		t.Errorf("GPUInstances(unknown gpu) = %v, want ErrNotFound", err)
	}

	caps := capOwners{}
	for _, d := range devs {
		t.Run(d.UUID, func(t *testing.T) {
			checkDeviceReadOnly(t, b, d, caps)
		})
	}
	t.Run("observer", func(t *testing.T) { checkObserverReadOnly(t, b, devs) })
}

func checkInventory(t *testing.T, devs []gpu.Device) {
	t.Helper()
	uuids, buses, minors := map[string]bool{}, map[string]bool{}, map[int]bool{}
	for i, d := range devs {
		if d.Index != i {
			t.Errorf("device %d has Index %d; want index order", i, d.Index)
		}
		if !strings.HasPrefix(d.UUID, "GPU-") || uuids[d.UUID] {
			t.Errorf("device %d: UUID %q not of the form GPU-... or not unique", i, d.UUID)
		}
		uuids[d.UUID] = true
		if !pciBusID.MatchString(d.PCIBusID) || buses[d.PCIBusID] {
			t.Errorf("device %d: PCI bus id %q malformed or not unique", i, d.PCIBusID)
		}
		buses[d.PCIBusID] = true
		if d.MinorNumber < 0 || minors[d.MinorNumber] {
			t.Errorf("device %d: minor %d negative or not unique", i, d.MinorNumber)
		}
		minors[d.MinorNumber] = true
		if d.Name == "" || d.MemoryMiB == 0 {
			t.Errorf("device %d: name %q, memory %d MiB; want both", i, d.Name, d.MemoryMiB)
		}
		if d.PCIDeviceID&0xFFFF != 0x10DE {
			t.Errorf("device %d: pci device id %#x lacks NVIDIA's vendor id in the low 16 bits", i, d.PCIDeviceID)
		}
	}
}

// capOwners maps a capability minor to the GPU instance (and, for a CI
// capability, compute instance) that owns it, across all GPUs.
type capOwners map[uint32]string

func checkDeviceReadOnly(t *testing.T, b gpu.Backend, d gpu.Device, caps capOwners) {
	ctx := t.Context()
	mode, err := b.MIGMode(ctx, d.UUID)
	if err != nil {
		t.Fatalf("MIGMode: %v", err)
	}
	if !d.MIGCapable {
		return
	}
	if !mode.Current {
		if _, err := b.GPUInstanceProfiles(ctx, d.UUID); !errors.Is(err, gpu.ErrNotSupported) {
			t.Errorf("GPUInstanceProfiles with MIG off = %v, want ErrNotSupported", err)
		}
		if _, err := b.PossiblePlacements(ctx, d.UUID, mig.Profile1g); !errors.Is(err, gpu.ErrNotSupported) {
			t.Errorf("PossiblePlacements with MIG off = %v, want ErrNotSupported", err)
		}
		return
	}

	profiles, err := b.GPUInstanceProfiles(ctx, d.UUID)
	if err != nil {
		t.Fatalf("GPUInstanceProfiles: %v", err)
	}
	if len(profiles) == 0 {
		t.Fatal("GPUInstanceProfiles: none on a MIG-enabled GPU")
	}
	model, modelKnown := mig.ModelByPCIDeviceID(d.PCIDeviceID)
	gis, err := b.GPUInstances(ctx, d.UUID)
	if err != nil {
		t.Fatalf("GPUInstances: %v", err)
	}
	existing := make([]mig.Instance, len(gis))
	for i, gi := range gis {
		existing[i] = mig.Instance{Profile: gi.ProfileID, Placement: gi.Placement}
	}

	byID := map[mig.ProfileID]gpu.GPUInstanceProfile{}
	for _, p := range profiles {
		if _, dup := byID[p.ID]; dup {
			t.Errorf("profile %d listed twice", p.ID)
		}
		byID[p.ID] = p
		if p.SliceCount < 1 || p.SliceCount > mig.ComputeSlices || p.MemorySlots < 1 || p.MemorySlots > mig.MemorySlots ||
			p.InstanceCount < 1 || p.Remaining < 0 || p.Remaining > p.InstanceCount ||
			p.MemoryMiB == 0 || p.MemoryMiB > d.MemoryMiB {
			t.Errorf("profile %d (%s) out of range: %+v", p.ID, p.Name, p)
		}
		if modelKnown {
			mp, ok := model.Profile(p.ID)
			switch {
			case !ok:
				t.Errorf("profile %d (%s) is not in pkg/mig's %s", p.ID, p.Name, model.Name)
			case mp.Slices != p.SliceCount || mp.MemorySlots != p.MemorySlots || mp.MaxCount != p.InstanceCount:
				t.Errorf("profile %d: driver says %d slices, %d slots, max %d; pkg/mig says %d, %d, %d",
					p.ID, p.SliceCount, p.MemorySlots, p.InstanceCount, mp.Slices, mp.MemorySlots, mp.MaxCount)
			case p.Remaining != model.Remaining(existing, p.ID):
				t.Errorf("profile %d: driver says %d remaining, pkg/mig says %d", p.ID, p.Remaining, model.Remaining(existing, p.ID))
			}
		}

		pls, err := b.PossiblePlacements(ctx, d.UUID, p.ID)
		if err != nil {
			t.Errorf("PossiblePlacements(%d): %v", p.ID, err)
			continue
		}
		if (len(pls) > 0) != (p.Remaining > 0) {
			t.Errorf("profile %d: %d remaining but placements %v", p.ID, p.Remaining, pls)
		}
		for i, pl := range pls {
			if pl.Size != p.MemorySlots || pl.Start < 0 || pl.End() > mig.MemorySlots || (i > 0 && pls[i-1].Start >= pl.Start) {
				t.Errorf("profile %d: placements %v not ascending, in range and of size %d", p.ID, pls, p.MemorySlots)
				break
			}
			if modelKnown {
				if err := model.Check(existing, p.ID, pl); err != nil {
					t.Errorf("profile %d: driver offers %s, pkg/mig rejects it: %v", p.ID, pl, err)
				}
			}
		}
	}
	if _, err := b.PossiblePlacements(ctx, d.UUID, unknownProfile); !errors.Is(err, gpu.ErrInvalidArgument) {
		t.Errorf("PossiblePlacements(unknown profile) = %v, want ErrInvalidArgument", err)
	}

	giIDs := map[int]bool{}
	cis := map[[2]int]bool{}
	for i, gi := range gis {
		if gi.GPUUUID != d.UUID || gi.ID < 0 || gi.ID > maxGPUInstanceID || giIDs[gi.ID] {
			t.Errorf("gpu instance %+v: wrong gpu, id out of range or not unique", gi)
		}
		giIDs[gi.ID] = true
		p, ok := byID[gi.ProfileID]
		if !ok || gi.Placement.Size != p.MemorySlots {
			t.Errorf("gpu instance %d: profile %d unknown or placement %s of the wrong size", gi.ID, gi.ProfileID, gi.Placement)
		}
		for _, other := range gis[i+1:] {
			if gi.Placement.Overlaps(other.Placement) {
				t.Errorf("gpu instances %d at %s and %d at %s overlap", gi.ID, gi.Placement, other.ID, other.Placement)
			}
		}
		list, err := b.ComputeInstances(ctx, d.UUID, gi.ID)
		if err != nil {
			t.Errorf("ComputeInstances(%d): %v", gi.ID, err)
			continue
		}
		for _, ci := range list {
			if ci.GPUUUID != d.UUID || ci.GPUInstanceID != gi.ID || cis[[2]int{gi.ID, ci.ID}] ||
				ci.SliceCount < 1 || (ok && ci.SliceCount > p.SliceCount) {
				t.Errorf("compute instance %+v of gpu instance %d inconsistent", ci, gi.ID)
			}
			cis[[2]int{gi.ID, ci.ID}] = true
		}
	}
	if absent, ok := absentGPUInstanceID(giIDs); ok {
		if _, err := b.ComputeInstances(ctx, d.UUID, absent); !errors.Is(err, gpu.ErrNotFound) {
			t.Errorf("ComputeInstances(absent gpu instance %d) = %v, want ErrNotFound", absent, err)
		}
	}

	devices, err := b.MIGDevices(ctx, d.UUID)
	if err != nil {
		t.Fatalf("MIGDevices: %v", err)
	}
	if len(devices) != len(cis) {
		t.Errorf("%d MIG devices for %d compute instances", len(devices), len(cis))
	}
	uuids := map[string]bool{}
	for _, md := range devices {
		if !strings.HasPrefix(md.UUID, "MIG-") || uuids[md.UUID] || md.GPUUUID != d.UUID {
			t.Errorf("MIG device %s: UUID not MIG-..., not unique, or wrong GPU", md.UUID)
		}
		uuids[md.UUID] = true
		if !cis[[2]int{md.GPUInstanceID, md.ComputeInstanceID}] {
			t.Errorf("MIG device %s names gi %d ci %d, which do not exist", md.UUID, md.GPUInstanceID, md.ComputeInstanceID)
		}
		checkDeviceNodes(t, d, md, caps)
	}
}

// absentGPUInstanceID is an id in the driver's range that no GPU instance
// has: a lookup of it must be ErrNotFound, not an invalid argument.
func absentGPUInstanceID(used map[int]bool) (int, bool) {
	for id := 0; id <= maxGPUInstanceID; id++ {
		if !used[id] {
			return id, true
		}
	}
	return 0, false
}

// checkDeviceNodes checks a MIG device's nodes: the parent GPU, nvidiactl,
// UVM, and exactly two capability nodes (GI and CI access), whose minors
// belong to this GPU instance and compute instance alone across the host.
func checkDeviceNodes(t *testing.T, d gpu.Device, md gpu.MIGDevice, caps capOwners) {
	t.Helper()
	var parent, ctl, uvm bool
	var capMinors []uint32
	paths := map[string]bool{}
	for _, n := range md.DeviceNodes {
		if paths[n.Path] {
			t.Errorf("MIG device %s: node %s listed twice", md.UUID, n.Path)
		}
		paths[n.Path] = true
		base := n.Path[strings.LastIndex(n.Path, "/")+1:]
		switch {
		case base == fmt.Sprintf("nvidia%d", d.MinorNumber):
			parent = n.Major == 195 && n.Minor == uint32(d.MinorNumber)
		case base == "nvidiactl":
			ctl = n.Major == 195 && n.Minor == 255
		case base == "nvidia-uvm":
			uvm = true
		case strings.Contains(n.Path, "/nvidia-caps/nvidia-cap"):
			if base != fmt.Sprintf("nvidia-cap%d", n.Minor) {
				t.Errorf("MIG device %s: capability node %s has minor %d", md.UUID, n.Path, n.Minor)
			}
			capMinors = append(capMinors, n.Minor)
		}
	}
	if !parent || !ctl || !uvm {
		t.Errorf("MIG device %s: parent %v, nvidiactl %v, uvm %v; want all: %+v", md.UUID, parent, ctl, uvm, md.DeviceNodes)
	}
	if len(capMinors) != 2 {
		t.Errorf("MIG device %s: %d capability nodes, want GI and CI access", md.UUID, len(capMinors))
		return
	}
	// Which of the two is the GI cap is the backend's business; a minor's
	// owner is recorded as the pair, so the same GI cap seen from two CIs of
	// one GI still agrees, while any minor claimed by two GPU instances (or
	// a CI minor by two compute instances) does not.
	slices.Sort(capMinors)
	giKey := fmt.Sprintf("%s/gi%d", md.GPUUUID, md.GPUInstanceID)
	ciKey := fmt.Sprintf("%s/ci%d", giKey, md.ComputeInstanceID)
	for _, m := range capMinors {
		owner, seen := caps[m]
		switch {
		case !seen:
			caps[m] = ciKey
		case owner == ciKey:
			t.Errorf("MIG device %s: capability minor %d listed twice", md.UUID, m)
		case !strings.HasPrefix(owner, giKey+"/"):
			t.Errorf("capability minor %d claimed by %s and %s", m, owner, ciKey)
		}
	}
}

// RunMutating creates and destroys GPU and compute instances and checks
// every error class of the contract. It needs a GPU with MIG mode enabled
// (current, nothing pending) and no GPU instances (it fails otherwise, saying so), touches only that
// GPU, and destroys what it created, even when it fails.
func RunMutating(t *testing.T, b gpu.Backend) {
	t.Helper()
	ctx := t.Context()
	d := freeMIGGPU(t, b)
	uuid := d.UUID
	t.Cleanup(func() { destroyAll(t, b, uuid) })

	remaining := func(t *testing.T, id mig.ProfileID) int {
		t.Helper()
		ps, err := b.GPUInstanceProfiles(ctx, uuid)
		if err != nil {
			t.Fatalf("GPUInstanceProfiles: %v", err)
		}
		for _, p := range ps {
			if p.ID == id {
				return p.Remaining
			}
		}
		t.Fatalf("profile %d not reported", id)
		return 0
	}
	placements := func(t *testing.T, id mig.ProfileID) []mig.Placement {
		t.Helper()
		pls, err := b.PossiblePlacements(ctx, uuid, id)
		if err != nil {
			t.Fatalf("PossiblePlacements(%d): %v", id, err)
		}
		return pls
	}

	t.Run("unknown gpu", func(t *testing.T) {
		_, err := b.CreateGPUInstance(ctx, unknownGPU, mig.Profile1g, mig.Placement{Start: 0, Size: 1})
		wantErr(t, "CreateGPUInstance", err, gpu.ErrNotFound)
		_, err = b.SetMIGMode(ctx, unknownGPU, true)
		wantErr(t, "SetMIGMode", err, gpu.ErrNotFound)
	})

	t.Run("invalid requests", func(t *testing.T) {
		_, err := b.CreateGPUInstance(ctx, uuid, unknownProfile, mig.Placement{Start: 0, Size: 1})
		wantErr(t, "create unknown profile", err, gpu.ErrInvalidArgument)
		_, err = b.CreateGPUInstance(ctx, uuid, mig.Profile3g, mig.Placement{Start: 2, Size: 4})
		wantErr(t, "create 3g at slot 2", err, gpu.ErrInvalidArgument)
		_, err = b.CreateGPUInstance(ctx, uuid, mig.Profile1g, mig.Placement{Start: 0, Size: 2})
		wantErr(t, "create 1g with size 2", err, gpu.ErrInvalidArgument)
		wantErr(t, "DestroyGPUInstance(absent)", b.DestroyGPUInstance(ctx, uuid, 0), gpu.ErrNotFound)
		_, err = b.CreateComputeInstance(ctx, uuid, 0)
		wantErr(t, "CreateComputeInstance(absent gi)", err, gpu.ErrNotFound)
		noInstances(t, b, uuid)
	})

	t.Run("lifecycle", func(t *testing.T) {
		before := remaining(t, mig.Profile1g)
		pls := placements(t, mig.Profile1g)
		if before < 1 || len(pls) == 0 {
			t.Fatalf("empty GPU: %d 1g remaining, placements %v", before, pls)
		}
		at := pls[0]
		gi, err := b.CreateGPUInstance(ctx, uuid, mig.Profile1g, at)
		if err != nil {
			t.Fatalf("CreateGPUInstance(1g at %s): %v", at, err)
		}
		if gi.GPUUUID != uuid || gi.ProfileID != mig.Profile1g || gi.Placement != at || gi.ID < 0 || gi.ID > maxGPUInstanceID {
			t.Errorf("created %+v, want 1g at %s on %s", gi, at, uuid)
		}
		listed, err := b.GPUInstances(ctx, uuid)
		if err != nil || len(listed) != 1 || listed[0] != gi {
			t.Errorf("GPUInstances = %+v, %v; want [%+v]", listed, err, gi)
		}
		if got := remaining(t, mig.Profile1g); got != before-1 {
			t.Errorf("1g remaining %d after one create, want %d", got, before-1)
		}
		if slices.Contains(placements(t, mig.Profile1g), at) {
			t.Errorf("placement %s still offered after it was used", at)
		}

		_, err = b.CreateGPUInstance(ctx, uuid, mig.Profile1g, at)
		wantErr(t, "create at the same placement", err, gpu.ErrInsufficientResources)
		_, err = b.CreateGPUInstance(ctx, uuid, mig.Profile7g, mig.Placement{Start: 0, Size: 8})
		wantErr(t, "create 7g over it", err, gpu.ErrInsufficientResources)
		_, err = b.SetMIGMode(ctx, uuid, false)
		wantErr(t, "disable MIG with instances", err, gpu.ErrInUse)
		if mode, err := b.MIGMode(ctx, uuid); err != nil || !mode.Current || !mode.Pending {
			t.Errorf("MIG mode after refused disable = %+v, %v; want enabled, nothing pending", mode, err)
		}

		ci, err := b.CreateComputeInstance(ctx, uuid, gi.ID)
		if err != nil {
			t.Fatalf("CreateComputeInstance: %v", err)
		}
		if ci.GPUUUID != uuid || ci.GPUInstanceID != gi.ID || ci.SliceCount != 1 {
			t.Errorf("compute instance %+v, want 1 slice in gpu instance %d", ci, gi.ID)
		}
		_, err = b.CreateComputeInstance(ctx, uuid, gi.ID)
		wantErr(t, "second full-size compute instance", err, gpu.ErrInsufficientResources)
		cis, err := b.ComputeInstances(ctx, uuid, gi.ID)
		if err != nil || len(cis) != 1 || cis[0] != ci {
			t.Errorf("ComputeInstances = %+v, %v; want [%+v]", cis, err, ci)
		}
		devs, err := b.MIGDevices(ctx, uuid)
		if err != nil || len(devs) != 1 {
			t.Fatalf("MIGDevices = %+v, %v; want one", devs, err)
		}
		md := devs[0]
		if !strings.HasPrefix(md.UUID, "MIG-") || md.GPUInstanceID != gi.ID || md.ComputeInstanceID != ci.ID ||
			md.ProfileID != mig.Profile1g || md.Placement != at || md.MemoryMiB == 0 {
			t.Errorf("MIG device %+v does not describe gi %d ci %d", md, gi.ID, ci.ID)
		}
		checkDeviceNodes(t, d, md, capOwners{})
		tel, err := b.MIGTelemetry(ctx, md.UUID)
		if err != nil {
			t.Errorf("MIGTelemetry(%s): %v", md.UUID, err)
		} else {
			checkTelemetry(t, tel, md.UUID, d.MemoryMiB)
			checkMIGTelemetry(t, tel)
		}

		wantErr(t, "destroy gpu instance with a compute instance", b.DestroyGPUInstance(ctx, uuid, gi.ID), gpu.ErrInUse)
		wantErr(t, "destroy absent compute instance", b.DestroyComputeInstance(ctx, uuid, gi.ID, ci.ID+1), gpu.ErrNotFound)
		if err := b.DestroyComputeInstance(ctx, uuid, gi.ID, ci.ID); err != nil {
			t.Fatalf("DestroyComputeInstance: %v", err)
		}
		wantErr(t, "destroy compute instance twice", b.DestroyComputeInstance(ctx, uuid, gi.ID, ci.ID), gpu.ErrNotFound)
		_, err = b.MIGTelemetry(ctx, md.UUID)
		wantErr(t, "MIGTelemetry of a destroyed MIG device", err, gpu.ErrNotFound)
		if devs, err := b.MIGDevices(ctx, uuid); err != nil || len(devs) != 0 {
			t.Errorf("MIGDevices after destroy = %+v, %v; want none", devs, err)
		}
		if err := b.DestroyGPUInstance(ctx, uuid, gi.ID); err != nil {
			t.Fatalf("DestroyGPUInstance: %v", err)
		}
		wantErr(t, "destroy gpu instance twice", b.DestroyGPUInstance(ctx, uuid, gi.ID), gpu.ErrNotFound)
		noInstances(t, b, uuid)
		if got := remaining(t, mig.Profile1g); got != before {
			t.Errorf("1g remaining %d after destroy, want %d", got, before)
		}
	})

	t.Run("fill and drain", func(t *testing.T) {
		want := remaining(t, mig.Profile1g)
		var created []gpu.GPUInstance
		for {
			pls := placements(t, mig.Profile1g)
			if len(pls) == 0 {
				break
			}
			gi, err := b.CreateGPUInstance(ctx, uuid, mig.Profile1g, pls[len(pls)-1])
			if err != nil {
				t.Fatalf("create 1g at offered %s: %v", pls[len(pls)-1], err)
			}
			created = append(created, gi)
			if len(created) > want {
				t.Fatalf("created %d 1g, more than the %d reported remaining", len(created), want)
			}
		}
		if len(created) != want {
			t.Errorf("created %d 1g, %d were reported remaining", len(created), want)
		}
		if got := remaining(t, mig.Profile1g); got != 0 {
			t.Errorf("1g remaining %d on a full GPU", got)
		}
		ids := map[int]bool{}
		for _, gi := range created {
			if ids[gi.ID] {
				t.Errorf("gpu instance id %d given twice", gi.ID)
			}
			ids[gi.ID] = true
		}
		_, err := b.CreateGPUInstance(ctx, uuid, mig.Profile1g, created[0].Placement)
		wantErr(t, "1g on a full GPU", err, gpu.ErrInsufficientResources)
		_, err = b.CreateGPUInstance(ctx, uuid, mig.Profile2g, mig.Placement{Start: 0, Size: 2})
		wantErr(t, "2g on a full GPU", err, gpu.ErrInsufficientResources)
		for _, gi := range created {
			if err := b.DestroyGPUInstance(ctx, uuid, gi.ID); err != nil {
				t.Errorf("DestroyGPUInstance(%d): %v", gi.ID, err)
			}
		}
		noInstances(t, b, uuid)
	})

	t.Run("mixed layout", func(t *testing.T) {
		// A layout every MIG model accepts, created through the offered
		// placements: 3g + 2g + 1g.
		var created []gpu.GPUInstance
		for _, p := range []mig.ProfileID{mig.Profile3g, mig.Profile2g, mig.Profile1g} {
			pls := placements(t, p)
			if len(pls) == 0 {
				t.Fatalf("no placement offered for profile %d after %+v", p, created)
			}
			gi, err := b.CreateGPUInstance(ctx, uuid, p, pls[0])
			if err != nil {
				t.Fatalf("create profile %d at offered %s: %v", p, pls[0], err)
			}
			created = append(created, gi)
		}
		for i, a := range created {
			for _, o := range created[i+1:] {
				if a.Placement.Overlaps(o.Placement) || a.ID == o.ID {
					t.Errorf("gpu instances %+v and %+v overlap or share an id", a, o)
				}
			}
		}
		for _, gi := range created {
			if _, err := b.CreateComputeInstance(ctx, uuid, gi.ID); err != nil {
				t.Errorf("CreateComputeInstance(%d): %v", gi.ID, err)
			}
		}
		devs, err := b.MIGDevices(ctx, uuid)
		if err != nil || len(devs) != len(created) {
			t.Errorf("MIGDevices = %d, %v; want %d", len(devs), err, len(created))
		}
		caps := capOwners{}
		for _, md := range devs {
			checkDeviceNodes(t, d, md, caps)
		}
		destroyAll(t, b, uuid)
		noInstances(t, b, uuid)
	})
}

// freeMIGGPU finds a GPU RunMutating may use.
func freeMIGGPU(t *testing.T, b gpu.Backend) gpu.Device {
	t.Helper()
	ctx := t.Context()
	devs, err := b.Devices(ctx)
	if err != nil {
		t.Fatalf("Devices: %v", err)
	}
	for _, d := range devs {
		if !d.MIGCapable {
			continue
		}
		mode, err := b.MIGMode(ctx, d.UUID)
		if err != nil || !mode.Current || !mode.Pending {
			continue
		}
		gis, err := b.GPUInstances(ctx, d.UUID)
		if err == nil && len(gis) == 0 {
			return d
		}
	}
	t.Fatal("RunMutating needs a GPU with MIG mode enabled and no GPU instances; none found")
	return gpu.Device{}
}

// destroyAll destroys every compute and GPU instance on the GPU; it runs in
// cleanup, after the test's context is done.
func destroyAll(t *testing.T, b gpu.Backend, uuid string) {
	t.Helper()
	ctx := context.Background()
	gis, err := b.GPUInstances(ctx, uuid)
	if err != nil {
		t.Errorf("cleanup: GPUInstances: %v", err)
		return
	}
	for _, gi := range gis {
		cis, err := b.ComputeInstances(ctx, uuid, gi.ID)
		if err != nil {
			t.Errorf("cleanup: ComputeInstances(%d): %v", gi.ID, err)
		}
		for _, ci := range cis {
			if err := b.DestroyComputeInstance(ctx, uuid, gi.ID, ci.ID); err != nil {
				t.Errorf("cleanup: DestroyComputeInstance(%d, %d): %v", gi.ID, ci.ID, err)
			}
		}
		if err := b.DestroyGPUInstance(ctx, uuid, gi.ID); err != nil {
			t.Errorf("cleanup: DestroyGPUInstance(%d): %v", gi.ID, err)
		}
	}
}

func noInstances(t *testing.T, b gpu.Backend, uuid string) {
	t.Helper()
	gis, err := b.GPUInstances(t.Context(), uuid)
	if err != nil || len(gis) != 0 {
		t.Errorf("GPUInstances = %+v, %v; want none", gis, err)
	}
}

func wantErr(t *testing.T, what string, err, want error) {
	t.Helper()
	if !errors.Is(err, want) {
		t.Errorf("%s: error %v, want %v", what, err, want)
	}
}
