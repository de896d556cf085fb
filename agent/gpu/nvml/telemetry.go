//go:build cgo

package nvml

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/gpuaas/gpuaas/agent/gpu"
)

// field stores v in *dst when NVML answered, leaves *dst nil when it says
// NOT_SUPPORTED (the device does not report it: never a made-up zero), and
// fails on any other answer.
func field[T any](what string, v T, ret nvml.Return, dst **T) error {
	switch ret {
	case nvml.SUCCESS:
		*dst = &v
	case nvml.ERROR_NOT_SUPPORTED:
	default:
		return mapReturn("read "+what, ret)
	}
	return nil
}

// DeviceTelemetry reads a physical GPU: utilization (nil on a GPU in MIG
// mode, which reports it per MIG device only through DCGM), memory, power,
// temperature, volatile ECC totals, remapped rows, SM and memory clocks and
// the clocks event (throttle) reasons. A field the GPU or driver does not
// report is nil.
func (b *Backend) DeviceTelemetry(ctx context.Context, gpuUUID string) (t gpu.Telemetry, err error) {
	done, err := b.enter(ctx, "read telemetry of "+gpuUUID)
	if err != nil {
		return gpu.Telemetry{}, err
	}
	defer done(&err)
	dev, err := b.gpuByUUID(gpuUUID)
	if err != nil {
		return gpu.Telemetry{}, err
	}
	t = gpu.Telemetry{Time: time.Now(), UUID: gpuUUID}
	if err := readCommon(dev, &t); err != nil {
		return gpu.Telemetry{}, err
	}
	power, ret := dev.GetPowerUsage()
	if err := field("power usage", power, ret, &t.PowerMilliWatt); err != nil {
		return gpu.Telemetry{}, err
	}
	temp, ret := dev.GetTemperature(nvml.TEMPERATURE_GPU)
	if err := field("temperature", temp, ret, &t.TemperatureC); err != nil {
		return gpu.Telemetry{}, err
	}
	corrected, ret := dev.GetTotalEccErrors(nvml.MEMORY_ERROR_TYPE_CORRECTED, nvml.VOLATILE_ECC)
	if err := field("corrected ecc errors", corrected, ret, &t.ECCCorrectedVolatile); err != nil {
		return gpu.Telemetry{}, err
	}
	uncorrected, ret := dev.GetTotalEccErrors(nvml.MEMORY_ERROR_TYPE_UNCORRECTED, nvml.VOLATILE_ECC)
	if err := field("uncorrected ecc errors", uncorrected, ret, &t.ECCUncorrectedVolatile); err != nil {
		return gpu.Telemetry{}, err
	}
	if b.has(symRemappedRows) {
		corr, unc, pending, failed, ret := dev.GetRemappedRows()
		for _, f := range []error{
			field("remapped rows", uint32(corr), ret, &t.RemappedRowsCorrectable),
			field("remapped rows", uint32(unc), ret, &t.RemappedRowsUncorrectable),
			field("remapped rows", pending, ret, &t.RemapPending),
			field("remapped rows", failed, ret, &t.RemapFailed),
		} {
			if f != nil {
				return gpu.Telemetry{}, f
			}
		}
	}
	sm, ret := dev.GetClockInfo(nvml.CLOCK_SM)
	if err := field("sm clock", sm, ret, &t.SMClockMHz); err != nil {
		return gpu.Telemetry{}, err
	}
	memClock, ret := dev.GetClockInfo(nvml.CLOCK_MEM)
	if err := field("memory clock", memClock, ret, &t.MemoryClockMHz); err != nil {
		return gpu.Telemetry{}, err
	}
	var reasons uint64
	switch {
	case b.has(symClocksEvent):
		reasons, ret = dev.GetCurrentClocksEventReasons()
	case b.has(symClocksThrottle):
		reasons, ret = dev.GetCurrentClocksThrottleReasons()
	default:
		ret = nvml.ERROR_NOT_SUPPORTED
	}
	if err := field("clocks event reasons", reasons, ret, &t.ThrottleReasons); err != nil {
		return gpu.Telemetry{}, err
	}
	return t, nil
}

// readCommon reads what a GPU and a MIG device both report: utilization
// and memory.
func readCommon(dev nvml.Device, t *gpu.Telemetry) error {
	util, ret := dev.GetUtilizationRates()
	if err := field("utilization", util.Gpu, ret, &t.UtilizationPct); err != nil {
		return err
	}
	mem, ret := dev.GetMemoryInfo()
	if err := field("memory used", mem.Used/mib, ret, &t.MemoryUsedMiB); err != nil {
		return err
	}
	return field("memory free", mem.Free/mib, ret, &t.MemoryFreeMiB)
}

// MIGTelemetry reads one MIG device by its "MIG-..." UUID: its memory and,
// where the driver reports it, utilization. Power, temperature, ECC and
// clocks belong to the parent GPU (DeviceTelemetry) and are nil here.
// gpu.ErrNotFound for a UUID that is not a MIG device NVML knows.
func (b *Backend) MIGTelemetry(ctx context.Context, migUUID string) (t gpu.Telemetry, err error) {
	done, err := b.enter(ctx, "read telemetry of "+migUUID)
	if err != nil {
		return gpu.Telemetry{}, err
	}
	defer done(&err)
	if !strings.HasPrefix(migUUID, "MIG-") {
		return gpu.Telemetry{}, fmt.Errorf("no mig device %q: %w", migUUID, gpu.ErrNotFound)
	}
	dev, ret := b.lib.DeviceGetHandleByUUID(migUUID)
	switch ret {
	case nvml.SUCCESS:
	case nvml.ERROR_NOT_FOUND, nvml.ERROR_INVALID_ARGUMENT:
		return gpu.Telemetry{}, fmt.Errorf("no mig device %q: %w", migUUID, gpu.ErrNotFound)
	default:
		return gpu.Telemetry{}, mapReturn("look up mig device", ret)
	}
	isMIG, ret := dev.IsMigDeviceHandle()
	if err := mapReturn("check the mig device handle", ret); err != nil {
		return gpu.Telemetry{}, err
	}
	if !isMIG {
		return gpu.Telemetry{}, fmt.Errorf("%q is not a mig device: %w", migUUID, gpu.ErrNotFound)
	}
	t = gpu.Telemetry{Time: time.Now(), UUID: migUUID}
	if err := readCommon(dev, &t); err != nil {
		return gpu.Telemetry{}, err
	}
	return t, nil
}
