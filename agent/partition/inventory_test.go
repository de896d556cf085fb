package partition_test

import (
	"testing"

	"github.com/gpuaas/gpuaas/agent/gpu/sim"
	"github.com/gpuaas/gpuaas/agent/partition"
	"github.com/gpuaas/gpuaas/pkg/mig"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

func TestInventoryReportsEveryGPUItsProfilesAndPartitions(t *testing.T) {
	// No ImmediateModeChange: a requested mode stays pending until a reset.
	s, err := sim.New(sim.Config{GPUs: []sim.GPUConfig{
		{Model: "H200", MIGEnabled: true},
		{Model: "A100-80GB", MIGEnabled: false},
		{Model: "H100", MIGEnabled: false},
	}})
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	devs, err := s.Devices(ctx)
	if err != nil {
		t.Fatal(err)
	}
	h200, h100 := devs[0].UUID, devs[2].UUID
	if _, err := s.SetMIGMode(ctx, h100, true); err != nil { // pending only
		t.Fatal(err)
	}
	full := ensure(t, s, partition.Want{GPUUUID: h200, Profile: mig.Profile3g, Placement: at(0, 4)})
	// A GPU instance without a compute instance has no MIG device yet.
	if _, err := s.CreateGPUInstance(ctx, h200, mig.Profile1g, at(6, 1)); err != nil {
		t.Fatal(err)
	}

	inv, err := partition.Inventory(ctx, s)
	if err != nil {
		t.Fatalf("Inventory: %v", err)
	}

	if inv.GetDriverVersion() != sim.DefaultDriverVersion {
		t.Errorf("driver version = %q, want %q", inv.GetDriverVersion(), sim.DefaultDriverVersion)
	}
	if len(inv.GetGpus()) != len(devs) {
		t.Fatalf("%d gpus reported, want %d", len(inv.GetGpus()), len(devs))
	}
	for i, g := range inv.GetGpus() {
		d := devs[i]
		if g.GetIndex() != uint32(d.Index) || g.GetUuid() != d.UUID || g.GetModel() != d.Name || g.GetMemoryMib() != d.MemoryMiB ||
			!g.GetMigCapable() || g.GetSerial() != d.Serial || g.GetVbiosVersion() != d.VBIOSVersion {
			t.Errorf("gpu %d = %v, want the device %+v", i, g, d)
		}
		// The control plane's scheduler finds the model by PCI device id.
		m, ok := mig.ModelByPCIDeviceID(g.GetPciDeviceId())
		if !ok || m.Name != d.Name {
			t.Errorf("gpu %d: pci device id %#x names model %q (found %t), want %q", i, g.GetPciDeviceId(), m.Name, ok, d.Name)
		}
	}

	h200Inv, a100Inv, h100Inv := inv.GetGpus()[0], inv.GetGpus()[1], inv.GetGpus()[2]
	if !h200Inv.GetMigEnabled() {
		t.Error("H200 with MIG on reported with MIG disabled")
	}
	for _, g := range []*nodev1.Gpu{a100Inv, h100Inv} {
		if g.GetMigEnabled() || len(g.GetProfiles()) != 0 || len(g.GetInstances()) != 0 {
			t.Errorf("gpu %d (MIG off or only pending) = mig %t, %d profiles, %d instances; want MIG off and nothing else",
				g.GetIndex(), g.GetMigEnabled(), len(g.GetProfiles()), len(g.GetInstances()))
		}
	}

	model, _ := mig.LookupModel("H200")
	if len(h200Inv.GetProfiles()) != len(model.Profiles) {
		t.Errorf("H200 reports %d profiles, want %d", len(h200Inv.GetProfiles()), len(model.Profiles))
	}
	byID := map[int32]*nodev1.MigProfile{}
	for _, p := range h200Inv.GetProfiles() {
		byID[p.GetId()] = p
	}
	for _, p := range model.Profiles {
		got := byID[int32(p.ID)]
		if got.GetName() != p.Name || got.GetSlices() != uint32(p.Slices) || got.GetMemorySlots() != uint32(p.MemorySlots) ||
			got.GetMemoryMib() != p.MemoryMiB || got.GetMaxCount() != uint32(p.MaxCount) {
			t.Errorf("profile %d = %v, want %+v", p.ID, got, p)
		}
	}

	type inst struct {
		profile     int32
		start, size uint32
		migUUID     string
	}
	gotInst := map[inst]bool{}
	for _, in := range h200Inv.GetInstances() {
		gotInst[inst{in.GetProfileId(), in.GetStart(), in.GetSize(), in.GetMigUuid()}] = true
	}
	wantInst := []inst{
		{int32(mig.Profile3g), 0, 4, full.Device.UUID},
		{int32(mig.Profile1g), 6, 1, ""},
	}
	if len(gotInst) != len(wantInst) {
		t.Errorf("instances = %v, want %v", h200Inv.GetInstances(), wantInst)
	}
	for _, w := range wantInst {
		if !gotInst[w] {
			t.Errorf("instances = %v, lack %+v", h200Inv.GetInstances(), w)
		}
	}
}
