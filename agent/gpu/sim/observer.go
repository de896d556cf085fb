package sim

import (
	"context"
	"encoding/binary"
	"fmt"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/pkg/mig"
)

// maxRemappedRows is how many rows the simulated row remapper records
// before it reports a remap failure (NVML's bFailureOccurred). Hardware
// limits remaps per memory bank; one budget per GPU is the simulator's
// simplification.
const maxRemappedRows = 512

// Throttle (clocks event) reason bits, as NVML defines them.
const clocksEventReasonGPUIdle = 0x1

// power is one model's electrical and clock envelope: idle and board power
// (TDP), and the SM and memory clocks at idle and under load.
type power struct {
	idleW, tdpW       uint32
	smIdle, smMax     uint32
	memClock, idleTmp uint32
}

// powerByPCIID is by PCI device id; published board powers and clocks of
// the SXM parts.
var powerByPCIID = map[uint32]power{
	0x20B0: {idleW: 55, tdpW: 400, smIdle: 210, smMax: 1410, memClock: 1215, idleTmp: 31},
	0x20B2: {idleW: 60, tdpW: 400, smIdle: 210, smMax: 1410, memClock: 1593, idleTmp: 32},
	0x2330: {idleW: 70, tdpW: 700, smIdle: 345, smMax: 1980, memClock: 2619, idleTmp: 33},
	0x2335: {idleW: 75, tdpW: 700, smIdle: 345, smMax: 1980, memClock: 3201, idleTmp: 34},
}

// defaultPower covers a model added to pkg/mig without an entry above.
var defaultPower = power{idleW: 60, tdpW: 400, smIdle: 210, smMax: 1410, memClock: 1593, idleTmp: 32}

// jitter is a deterministic value in [0, n) for the current reading of
// uuid under the simulator's seed (HostID); the caller holds s.mu.
func (s *Sim) jitter(uuid, what string, n uint32) uint32 {
	if n == 0 {
		return 0
	}
	h := digest(s.cfg.HostID, "telemetry", uuid, what, fmt.Sprint(s.readings))
	return binary.BigEndian.Uint32(h[:4]) % n
}

// migLoad is one MIG device's share of the work: its processes and its
// memory in use. Each attached process is taken to hold an eighth of the
// instance's memory, up to all of it.
func migLoad(p mig.Profile, ci ciRecord) (procs int, usedMiB uint64) {
	procs = len(ci.Processes)
	used := uint64(procs) * max(p.MemoryMiB/8, 1)
	return procs, min(used, p.MemoryMiB)
}

func ptr[T any](v T) *T { return &v }

// DeviceTelemetry reads a simulated GPU. Every field is set except
// utilization while MIG mode is current (NVML reports it as not supported
// on a MIG-enabled GPU; read the MIG devices). The readings follow the
// state: compute slices of GPU instances with attached processes raise
// power, temperature and clocks, their processes' memory is in use, and
// the ECC counters and row remapper show what InjectECC injected.
func (s *Sim) DeviceTelemetry(ctx context.Context, gpuUUID string) (gpu.Telemetry, error) {
	if err := ctx.Err(); err != nil {
		return gpu.Telemetry{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	g, err := s.gpuByUUID(gpuUUID)
	if err != nil {
		return gpu.Telemetry{}, fmt.Errorf("read telemetry of %s: %w", gpuUUID, err)
	}
	pw, ok := powerByPCIID[g.model.PCIDeviceID]
	if !ok {
		pw = defaultPower
	}
	var busySlices int
	var usedMiB uint64
	for _, gi := range g.rec.GPUInstances {
		p, _ := g.model.Profile(gi.Profile)
		busy := false
		for _, ci := range gi.ComputeInstances {
			procs, used := migLoad(p, ci)
			busy = busy || procs > 0
			usedMiB += used
		}
		if busy {
			busySlices += p.Slices
		}
	}
	activity := float64(busySlices) / float64(mig.ComputeSlices)
	s.readings++

	t := gpu.Telemetry{
		Time:            s.cfg.Now(),
		UUID:            gpuUUID,
		MemoryUsedMiB:   ptr(usedMiB),
		MemoryFreeMiB:   ptr(g.model.MemoryMiB - usedMiB),
		PowerMilliWatt:  ptr(uint32((float64(pw.idleW)+float64(pw.tdpW-pw.idleW)*0.85*activity)*1000) + s.jitter(gpuUUID, "power", 4000)),
		TemperatureC:    ptr(pw.idleTmp + uint32(40*activity) + s.jitter(gpuUUID, "temperature", 3)),
		SMClockMHz:      ptr(pw.smIdle),
		MemoryClockMHz:  ptr(pw.memClock),
		ThrottleReasons: ptr(uint64(clocksEventReasonGPUIdle)),

		ECCCorrectedVolatile:      ptr(g.rec.ECC.Corrected),
		ECCUncorrectedVolatile:    ptr(g.rec.ECC.Uncorrected),
		RemappedRowsCorrectable:   ptr(g.rec.ECC.RemappedCorrectable),
		RemappedRowsUncorrectable: ptr(g.rec.ECC.RemappedUncorrectable),
		RemapPending:              ptr(g.rec.ECC.RemapPending),
		RemapFailed:               ptr(g.rec.ECC.RemapFailed),
	}
	if busySlices > 0 {
		t.SMClockMHz = ptr(pw.smMax)
		t.ThrottleReasons = ptr(uint64(0))
	}
	if !g.rec.MIGCurrent {
		// Processes attach only to MIG devices, so a GPU without MIG mode
		// is idle.
		t.UtilizationPct = ptr(uint32(0))
	}
	return t, nil
}

// MIGTelemetry reads a simulated MIG device: utilization (its GR engine
// activity) is 0 while no process is attached and 60-95% while one is,
// memory in use grows with the attached processes; power, temperature,
// ECC, remapping, clocks and throttle reasons are nil, as NVML gives them
// only for the parent GPU. gpu.ErrNotFound for a UUID that is not a
// current MIG device.
func (s *Sim) MIGTelemetry(ctx context.Context, migUUID string) (gpu.Telemetry, error) {
	if err := ctx.Err(); err != nil {
		return gpu.Telemetry{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, g := range s.gpus {
		for _, gi := range g.rec.GPUInstances {
			for _, ci := range gi.ComputeInstances {
				if s.migUUID(g, gi.ID, ci.ID) != migUUID {
					continue
				}
				p, _ := g.model.Profile(gi.Profile)
				procs, used := migLoad(p, ci)
				s.readings++
				util := uint32(0)
				if procs > 0 {
					util = 60 + s.jitter(migUUID, "utilization", 36)
				}
				return gpu.Telemetry{
					Time:           s.cfg.Now(),
					UUID:           migUUID,
					UtilizationPct: ptr(util),
					MemoryUsedMiB:  ptr(used),
					MemoryFreeMiB:  ptr(p.MemoryMiB - used),
				}, nil
			}
		}
	}
	return gpu.Telemetry{}, fmt.Errorf("read telemetry of %s: no such mig device: %w", migUUID, gpu.ErrNotFound)
}
