//go:build cgo

package nvml

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxh200"
	mockserver "github.com/NVIDIA/go-nvml/pkg/nvml/mock/server"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/pkg/mig"
)

// go-nvml's dgxh200 mock is a smoke check only (RECIPES.md): it enforces
// no MIG rule, its H200 geometry is wrong (profile ids equal enumerators,
// 1g has 18 GiB, PCI id 0x2333), and it panics on every function it does
// not implement. Nothing here asserts geometry.

// panics runs call and returns the panic's message, or "".
func panics(call func()) (msg string) {
	defer func() {
		if r := recover(); r != nil {
			msg = fmt.Sprint(r)
		}
	}()
	call()
	return ""
}

// TestMockDGXH200_CallsThatPanic tries, one by one, every go-nvml call the
// backend makes on a pristine dgxh200 mock (MIG enabled, one GPU instance
// and one compute instance made through the mock itself) and reports
// those the mock does not implement. The backend turns such a panic into
// an error; this list says which backend methods cannot work on the mock
// unpatched.
func TestMockDGXH200_CallsThatPanic(t *testing.T) {
	server := dgxh200.New()
	dev := server.Devices[0].(*mockserver.Device)
	dev.SetMigMode(nvml.DEVICE_MIG_ENABLE)
	info, _ := dev.GetGpuInstanceProfileInfo(nvml.GPU_INSTANCE_PROFILE_1_SLICE)
	gi, _ := dev.CreateGpuInstanceWithPlacement(&info, &nvml.GpuInstancePlacement{Start: 0, Size: 1})
	ciInfo, _ := gi.GetComputeInstanceProfileInfo(nvml.COMPUTE_INSTANCE_PROFILE_1_SLICE, nvml.COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED)
	ci, _ := gi.CreateComputeInstance(&ciInfo)

	calls := []struct {
		name string
		call func()
	}{
		{"Init", func() { server.Init() }},
		{"SystemGetDriverVersion", func() { server.SystemGetDriverVersion() }},
		{"DeviceGetCount", func() { server.DeviceGetCount() }},
		{"DeviceGetHandleByIndex", func() { server.DeviceGetHandleByIndex(0) }},
		{"DeviceGetHandleByUUID", func() { server.DeviceGetHandleByUUID(dev.UUID) }},
		{"Extensions().LookupSymbol", func() { server.Extensions().LookupSymbol(symRemappedRows) }},
		{"EventSetCreate", func() { server.EventSetCreate() }},
		{"Device.GetUUID", func() { dev.GetUUID() }},
		{"Device.GetName", func() { dev.GetName() }},
		{"Device.GetPciInfo", func() { dev.GetPciInfo() }},
		{"Device.GetMemoryInfo", func() { dev.GetMemoryInfo() }},
		{"Device.GetSerial", func() { dev.GetSerial() }},
		{"Device.GetVbiosVersion", func() { dev.GetVbiosVersion() }},
		{"Device.GetMinorNumber", func() { dev.GetMinorNumber() }},
		{"Device.GetMigMode", func() { dev.GetMigMode() }},
		{"Device.GetGpuInstanceProfileInfo", func() { dev.GetGpuInstanceProfileInfo(0) }},
		{"Device.GetGpuInstanceProfileInfoV", func() { dev.GetGpuInstanceProfileInfoV(0) }},
		{"Device.GetGpuInstancePossiblePlacements", func() { dev.GetGpuInstancePossiblePlacements(&info) }},
		{"Device.GetGpuInstanceRemainingCapacity", func() { dev.GetGpuInstanceRemainingCapacity(&info) }},
		{"Device.GetGpuInstances", func() { dev.GetGpuInstances(&info) }},
		{"Device.GetMaxMigDeviceCount", func() { dev.GetMaxMigDeviceCount() }},
		{"Device.GetMigDeviceHandleByIndex", func() { dev.GetMigDeviceHandleByIndex(0) }},
		{"Device.GetGpuInstanceId", func() { dev.GetGpuInstanceId() }},
		{"Device.GetComputeInstanceId", func() { dev.GetComputeInstanceId() }},
		{"Device.IsMigDeviceHandle", func() { dev.IsMigDeviceHandle() }},
		{"Device.GetUtilizationRates", func() { dev.GetUtilizationRates() }},
		{"Device.GetPowerUsage", func() { dev.GetPowerUsage() }},
		{"Device.GetTemperature", func() { dev.GetTemperature(nvml.TEMPERATURE_GPU) }},
		{"Device.GetTotalEccErrors", func() { dev.GetTotalEccErrors(nvml.MEMORY_ERROR_TYPE_CORRECTED, nvml.VOLATILE_ECC) }},
		{"Device.GetRemappedRows", func() { dev.GetRemappedRows() }},
		{"Device.GetClockInfo", func() { dev.GetClockInfo(nvml.CLOCK_SM) }},
		{"Device.GetCurrentClocksEventReasons", func() { dev.GetCurrentClocksEventReasons() }},
		{"Device.GetSupportedEventTypes", func() { dev.GetSupportedEventTypes() }},
		{"Device.RegisterEvents", func() { dev.RegisterEvents(watchedEvents, &mock.EventSet{}) }},
		{"GpuInstance.GetInfo", func() { gi.GetInfo() }},
		{"GpuInstance.GetComputeInstanceProfileInfo", func() { gi.GetComputeInstanceProfileInfo(0, 0) }},
		{"GpuInstance.GetComputeInstances", func() { gi.GetComputeInstances(&ciInfo) }},
		{"ComputeInstance.GetInfo", func() { ci.GetInfo() }},
		{"ComputeInstance.Destroy", func() { ci.Destroy() }},
		{"GpuInstance.Destroy", func() { gi.Destroy() }},
		{"Device.SetMigMode", func() { dev.SetMigMode(nvml.DEVICE_MIG_DISABLE) }},
		{"Shutdown", func() { server.Shutdown() }},
	}
	var panicking []string
	for _, c := range calls {
		if msg := panics(c.call); msg != "" {
			panicking = append(panicking, c.name)
			t.Logf("%s panics: %s", c.name, msg)
		}
	}
	t.Logf("dgxh200 mock: %d of %d calls the backend makes panic: %s", len(panicking), len(calls), strings.Join(panicking, ", "))
	for _, essential := range []string{"Init", "DeviceGetCount", "DeviceGetHandleByUUID", "Device.GetUUID", "Device.GetMigMode", "Device.GetGpuInstanceProfileInfo"} {
		for _, p := range panicking {
			if p == essential {
				t.Errorf("the mock no longer implements %s; the smoke test below cannot run", essential)
			}
		}
	}
}

// TestMockDGXH200_NothingPanicsThroughTheBackend calls every read-only
// method on a pristine mock: each returns a value or an error (a recovered
// panic is an error), never a panic.
func TestMockDGXH200_NothingPanicsThroughTheBackend(t *testing.T) {
	server := dgxh200.New()
	server.Devices[0].(*mockserver.Device).SetMigMode(nvml.DEVICE_MIG_ENABLE)
	b, err := newWithInterface(server, Options{Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	ctx := t.Context()
	uuid := server.Devices[0].(*mockserver.Device).UUID
	calls := map[string]func() error{
		"DriverVersion":       func() error { _, err := b.DriverVersion(ctx); return err },
		"Devices":             func() error { _, err := b.Devices(ctx); return err },
		"MIGMode":             func() error { _, err := b.MIGMode(ctx, uuid); return err },
		"GPUInstanceProfiles": func() error { _, err := b.GPUInstanceProfiles(ctx, uuid); return err },
		"PossiblePlacements":  func() error { _, err := b.PossiblePlacements(ctx, uuid, 0); return err },
		"GPUInstances":        func() error { _, err := b.GPUInstances(ctx, uuid); return err },
		"ComputeInstances":    func() error { _, err := b.ComputeInstances(ctx, uuid, 0); return err },
		"MIGDevices":          func() error { _, err := b.MIGDevices(ctx, uuid); return err },
		"DeviceTelemetry":     func() error { _, err := b.DeviceTelemetry(ctx, uuid); return err },
		"MIGTelemetry":        func() error { _, err := b.MIGTelemetry(ctx, "MIG-x"); return err },
		"DriverProfileNames":  func() error { _, err := b.DriverProfileNames(ctx, uuid); return err },
		"Events":              func() error { _, err := b.Events(ctx); return err },
	}
	for name, call := range calls {
		var err error
		if msg := panics(func() { err = call() }); msg != "" {
			t.Errorf("%s let a panic through: %s", name, msg)
		}
		var perr *panicError
		switch {
		case errors.As(err, &perr):
			t.Logf("%s: error from a mock panic: %v", name, err)
		case err != nil:
			t.Logf("%s: %v", name, err)
		}
	}
}

// patchMock implements, on every device of the mock, the calls dgxh200
// lacks that the backend needs: no serial or VBIOS (NOT_SUPPORTED), a PCI
// bus id, remaining capacity equal to the profile's count minus its
// instances, no MIG device handles, and telemetry that is NOT_SUPPORTED.
func patchMock(server *mockserver.Server) {
	for i, d := range server.Devices {
		dev := d.(*mockserver.Device)
		dev.GetSerialFunc = func() (string, nvml.Return) { return "", nvml.ERROR_NOT_SUPPORTED }
		dev.GetVbiosVersionFunc = func() (string, nvml.Return) { return "", nvml.ERROR_NOT_SUPPORTED }
		dev.GetPciInfoFunc = func() (nvml.PciInfo, nvml.Return) {
			p := nvml.PciInfo{PciDeviceId: dev.Config.PciDeviceId, Bus: uint32(0x18 + i)}
			copy(p.BusId[:], toInt8(fmt.Sprintf("00000000:%02x:00.0", 0x18+i)))
			return p, nvml.SUCCESS
		}
		dev.GetGpuInstanceRemainingCapacityFunc = func(info *nvml.GpuInstanceProfileInfo) (int, nvml.Return) {
			gis, _ := dev.GetGpuInstances(info)
			return int(info.InstanceCount) - len(gis), nvml.SUCCESS
		}
		dev.GetMaxMigDeviceCountFunc = func() (int, nvml.Return) { return 0, nvml.SUCCESS }
		notSupported32 := func() (uint32, nvml.Return) { return 0, nvml.ERROR_NOT_SUPPORTED }
		dev.GetUtilizationRatesFunc = func() (nvml.Utilization, nvml.Return) { return nvml.Utilization{}, nvml.ERROR_NOT_SUPPORTED }
		dev.GetPowerUsageFunc = notSupported32
		dev.GetTemperatureFunc = func(nvml.TemperatureSensors) (uint32, nvml.Return) { return notSupported32() }
		dev.GetTotalEccErrorsFunc = func(nvml.MemoryErrorType, nvml.EccCounterType) (uint64, nvml.Return) {
			return 0, nvml.ERROR_NOT_SUPPORTED
		}
		dev.GetRemappedRowsFunc = func() (int, int, bool, bool, nvml.Return) { return 0, 0, false, false, nvml.ERROR_NOT_SUPPORTED }
		dev.GetClockInfoFunc = func(nvml.ClockType) (uint32, nvml.Return) { return notSupported32() }
		dev.GetCurrentClocksEventReasonsFunc = func() (uint64, nvml.Return) { return 0, nvml.ERROR_NOT_SUPPORTED }
	}
}

func toInt8(s string) []int8 {
	out := make([]int8, len(s))
	for i := range len(s) {
		out[i] = int8(s[i])
	}
	return out
}

// TestMockDGXH200_Smoke drives the backend through inventory, MIG mode,
// profiles, placements and one GPU/compute instance life cycle on the
// patched mock. It checks the backend's own logic (its placement checks,
// listing, not-supported telemetry), not the mock's geometry.
func TestMockDGXH200_Smoke(t *testing.T) {
	server := dgxh200.New()
	patchMock(server)
	b, err := newWithInterface(server, Options{Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	ctx := t.Context()

	if v, err := b.DriverVersion(ctx); err != nil || v != "550.54.15" {
		t.Errorf("DriverVersion = %q, %v", v, err)
	}
	devs, err := b.Devices(ctx)
	if err != nil || len(devs) != 8 {
		t.Fatalf("Devices = %d, %v; want 8", len(devs), err)
	}
	for i, d := range devs {
		if d.Index != i || !strings.HasPrefix(d.UUID, "GPU-") || d.Name == "" || d.MemoryMiB == 0 || !d.MIGCapable ||
			d.PCIDeviceID&0xFFFF != 0x10DE || d.PCIBusID != fmt.Sprintf("00000000:%02X:00.0", 0x18+i) ||
			d.Serial != "" || d.VBIOSVersion != "" || d.MinorNumber != i || d.DriverVersion != "550.54.15" {
			t.Errorf("device %d: %+v", i, d)
		}
	}
	uuid := devs[0].UUID

	if _, err := b.GPUInstanceProfiles(ctx, uuid); !errors.Is(err, gpu.ErrNotSupported) {
		t.Errorf("GPUInstanceProfiles with MIG off = %v, want ErrNotSupported", err)
	}
	if mode, err := b.SetMIGMode(ctx, uuid, true); err != nil || !mode.Current || !mode.Pending {
		t.Fatalf("SetMIGMode(true) = %+v, %v", mode, err)
	}
	profiles, err := b.GPUInstanceProfiles(ctx, uuid)
	if err != nil || len(profiles) == 0 {
		t.Fatalf("GPUInstanceProfiles = %v, %v", profiles, err)
	}
	for _, p := range profiles {
		if p.Name == "" || p.MemorySlots == 0 || p.Remaining != p.InstanceCount {
			t.Errorf("profile %+v: no name, no slots, or capacity used on an empty GPU", p)
		}
	}
	p := profiles[0] // one slice, the least memory
	pls, err := b.PossiblePlacements(ctx, uuid, p.ID)
	if err != nil || len(pls) == 0 {
		t.Fatalf("PossiblePlacements(%d) = %v, %v", p.ID, pls, err)
	}
	if _, err := b.PossiblePlacements(ctx, uuid, 99); !errors.Is(err, gpu.ErrInvalidArgument) {
		t.Errorf("PossiblePlacements(99) = %v, want ErrInvalidArgument", err)
	}

	gi, err := b.CreateGPUInstance(ctx, uuid, p.ID, pls[0])
	if err != nil || gi.ProfileID != p.ID || gi.Placement != pls[0] || gi.GPUUUID != uuid {
		t.Fatalf("CreateGPUInstance = %+v, %v", gi, err)
	}
	// The mock would accept these; the backend's own checks refuse them.
	if _, err := b.CreateGPUInstance(ctx, uuid, p.ID, pls[0]); !errors.Is(err, gpu.ErrInsufficientResources) || !errors.Is(err, mig.ErrOverlap) {
		t.Errorf("create at an occupied placement = %v, want ErrInsufficientResources", err)
	}
	if _, err := b.CreateGPUInstance(ctx, uuid, p.ID, mig.Placement{Start: pls[len(pls)-1].Start, Size: p.MemorySlots + 1}); !errors.Is(err, gpu.ErrInvalidArgument) {
		t.Errorf("create with the wrong size = %v, want ErrInvalidArgument", err)
	}
	if _, err := b.CreateGPUInstance(ctx, uuid, p.ID, mig.Placement{Start: -1, Size: 1}); !errors.Is(err, gpu.ErrInvalidArgument) {
		t.Errorf("create at slot -1 = %v, want ErrInvalidArgument", err)
	}
	if _, err := b.CreateGPUInstance(ctx, uuid, 99, pls[1]); !errors.Is(err, gpu.ErrInvalidArgument) {
		t.Errorf("create of profile 99 = %v, want ErrInvalidArgument", err)
	}
	if after, _ := b.PossiblePlacements(ctx, uuid, p.ID); len(after) != len(pls)-1 {
		t.Errorf("placements after one create = %v, want %v without %s", after, pls, pls[0])
	}
	gis, err := b.GPUInstances(ctx, uuid)
	if err != nil || len(gis) != 1 || gis[0] != gi {
		t.Errorf("GPUInstances = %+v, %v; want [%+v]", gis, err, gi)
	}

	ci, err := b.CreateComputeInstance(ctx, uuid, gi.ID)
	if err != nil || ci.GPUInstanceID != gi.ID || ci.SliceCount != p.SliceCount {
		t.Fatalf("CreateComputeInstance = %+v, %v", ci, err)
	}
	if cis, err := b.ComputeInstances(ctx, uuid, gi.ID); err != nil || len(cis) != 1 || cis[0] != ci {
		t.Errorf("ComputeInstances = %+v, %v; want [%+v]", cis, err, ci)
	}
	if _, err := b.ComputeInstances(ctx, uuid, gi.ID+1); !errors.Is(err, gpu.ErrNotFound) {
		t.Errorf("ComputeInstances(absent) = %v, want ErrNotFound", err)
	}
	if err := b.DestroyComputeInstance(ctx, uuid, gi.ID, ci.ID+1); !errors.Is(err, gpu.ErrNotFound) {
		t.Errorf("DestroyComputeInstance(absent) = %v, want ErrNotFound", err)
	}
	if err := b.DestroyComputeInstance(ctx, uuid, gi.ID, ci.ID); err != nil {
		t.Errorf("DestroyComputeInstance: %v", err)
	}
	if _, err := b.SetMIGMode(ctx, uuid, false); !errors.Is(err, gpu.ErrInUse) {
		t.Errorf("disable MIG with a GPU instance = %v, want ErrInUse", err)
	}
	if err := b.DestroyGPUInstance(ctx, uuid, gi.ID); err != nil {
		t.Errorf("DestroyGPUInstance: %v", err)
	}
	if err := b.DestroyGPUInstance(ctx, uuid, gi.ID); !errors.Is(err, gpu.ErrNotFound) {
		t.Errorf("DestroyGPUInstance twice = %v, want ErrNotFound", err)
	}
	if mds, err := b.MIGDevices(ctx, uuid); err != nil || len(mds) != 0 {
		t.Errorf("MIGDevices = %v, %v; want none", mds, err)
	}
	if _, err := b.MIGMode(ctx, "GPU-00000000-0000-4000-8000-000000000000"); !errors.Is(err, gpu.ErrNotFound) {
		t.Errorf("MIGMode(unknown) = %v, want ErrNotFound", err)
	}
	if _, err := b.MIGMode(ctx, "MIG-"+uuid[4:]); !errors.Is(err, gpu.ErrNotFound) {
		t.Errorf("MIGMode(a MIG UUID) = %v, want ErrNotFound", err)
	}

	tel, err := b.DeviceTelemetry(ctx, uuid)
	if err != nil {
		t.Fatalf("DeviceTelemetry: %v", err)
	}
	if tel.UUID != uuid || tel.MemoryUsedMiB == nil || tel.UtilizationPct != nil || tel.PowerMilliWatt != nil ||
		tel.TemperatureC != nil || tel.ECCCorrectedVolatile != nil || tel.RemappedRowsCorrectable != nil ||
		tel.SMClockMHz != nil || tel.ThrottleReasons != nil {
		t.Errorf("telemetry where the GPU reports only memory: %s", describeTelemetry(tel))
	}
}

// TestTelemetry_OtherErrorsFail: NOT_SUPPORTED leaves a field nil, any
// other failure fails the reading with its class.
func TestTelemetry_OtherErrorsFail(t *testing.T) {
	server := dgxh200.New()
	patchMock(server)
	dev := server.Devices[0].(*mockserver.Device)
	dev.GetPowerUsageFunc = func() (uint32, nvml.Return) { return 0, nvml.ERROR_NO_PERMISSION }
	b, err := newWithInterface(server, Options{Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	_, err = b.DeviceTelemetry(t.Context(), dev.UUID)
	if !errors.Is(err, ErrNoPermission) || !strings.Contains(err.Error(), "read power usage") {
		t.Errorf("DeviceTelemetry = %v, want ErrNoPermission naming the field", err)
	}

	dev.GetPowerUsageFunc = func() (uint32, nvml.Return) { return 280000, nvml.SUCCESS }
	dev.GetCurrentClocksEventReasonsFunc = func() (uint64, nvml.Return) { return 4, nvml.SUCCESS }
	tel, err := b.DeviceTelemetry(t.Context(), dev.UUID)
	if err != nil || tel.PowerMilliWatt == nil || *tel.PowerMilliWatt != 280000 || tel.ThrottleReasons == nil || *tel.ThrottleReasons != 4 {
		t.Errorf("DeviceTelemetry = %s, %v; want power 280000 and reasons 4", describeTelemetry(tel), err)
	}
}
