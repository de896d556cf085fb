package sim_test

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/agent/gpu/sim"
	"github.com/gpuaas/gpuaas/pkg/mig"
)

var epoch = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

func fixedClock() time.Time { return epoch }

func readGPU(t *testing.T, s *sim.Sim, uuid string) gpu.Telemetry {
	t.Helper()
	tel, err := s.DeviceTelemetry(t.Context(), uuid)
	if err != nil {
		t.Fatalf("DeviceTelemetry: %v", err)
	}
	return tel
}

func readMIG(t *testing.T, s *sim.Sim, uuid string) gpu.Telemetry {
	t.Helper()
	tel, err := s.MIGTelemetry(t.Context(), uuid)
	if err != nil {
		t.Fatalf("MIGTelemetry: %v", err)
	}
	return tel
}

// board is each model's idle and board power in watts, to check readings
// against.
var board = map[string][2]uint32{
	"A100-40GB": {55, 400}, "A100-80GB": {60, 400}, "H100-80GB": {70, 700}, "H200-141GB": {75, 700},
}

func TestDeviceTelemetry_IdleGPU(t *testing.T) {
	for _, m := range mig.Models() {
		for _, migOn := range []bool{false, true} {
			t.Run(m.ShortName+map[bool]string{false: "/mig off", true: "/mig on"}[migOn], func(t *testing.T) {
				s := newSim(t, sim.Config{GPUs: []sim.GPUConfig{{Model: m.Name, MIGEnabled: migOn}}, Now: fixedClock})
				devs, _ := s.Devices(t.Context())
				tel := readGPU(t, s, devs[0].UUID)
				if tel.UUID != devs[0].UUID || !tel.Time.Equal(epoch) {
					t.Errorf("reading of %q at %v", tel.UUID, tel.Time)
				}
				w := board[m.ShortName]
				if p := *tel.PowerMilliWatt; p < w[0]*1000 || p > w[0]*1000+5000 {
					t.Errorf("idle power %d mW, want about %d W", p, w[0])
				}
				if *tel.MemoryUsedMiB != 0 || *tel.MemoryFreeMiB != m.MemoryMiB {
					t.Errorf("idle memory %d used, %d free; want 0, %d", *tel.MemoryUsedMiB, *tel.MemoryFreeMiB, m.MemoryMiB)
				}
				if c := *tel.TemperatureC; c < 25 || c > 40 {
					t.Errorf("idle temperature %d C", c)
				}
				if *tel.ThrottleReasons != 0x1 {
					t.Errorf("idle throttle reasons %#x, want GpuIdle", *tel.ThrottleReasons)
				}
				// NVML has no utilization for a MIG-enabled GPU; an idle
				// GPU without MIG reads 0.
				if migOn != (tel.UtilizationPct == nil) || (!migOn && *tel.UtilizationPct != 0) {
					t.Errorf("utilization %v with MIG %t", tel.UtilizationPct, migOn)
				}
				for name, v := range map[string]bool{
					"ecc corrected":   tel.ECCCorrectedVolatile != nil && *tel.ECCCorrectedVolatile == 0,
					"ecc uncorrected": tel.ECCUncorrectedVolatile != nil && *tel.ECCUncorrectedVolatile == 0,
					"remapped rows": tel.RemappedRowsCorrectable != nil && tel.RemappedRowsUncorrectable != nil &&
						*tel.RemappedRowsCorrectable+*tel.RemappedRowsUncorrectable == 0,
					"remap flags": tel.RemapPending != nil && tel.RemapFailed != nil && !*tel.RemapPending && !*tel.RemapFailed,
					"clocks":      tel.SMClockMHz != nil && tel.MemoryClockMHz != nil && *tel.SMClockMHz > 0 && *tel.MemoryClockMHz > 0,
				} {
					if !v {
						t.Errorf("%s: not set or not idle: %+v", name, tel)
					}
				}
			})
		}
	}
}

func TestTelemetry_ProcessesDriveTheReadings(t *testing.T) {
	s, uuid := oneGPU(t, "H100")
	idle := readGPU(t, s, uuid)
	gi := mustCreate(t, s, uuid, mig.Profile3g, pl(0, 4))
	mustCreateCI(t, s, uuid, gi.ID)
	other := mustCreate(t, s, uuid, mig.Profile2g, pl(4, 2))
	mustCreateCI(t, s, uuid, other.ID)
	mds, _ := s.MIGDevices(t.Context(), uuid)
	busy, quiet := mds[0], mds[1]

	before := readMIG(t, s, busy.UUID)
	if *before.UtilizationPct != 0 || *before.MemoryUsedMiB != 0 || *before.MemoryFreeMiB != busy.MemoryMiB {
		t.Errorf("MIG device without processes: %+v", before)
	}
	if err := s.AttachProcess(busy.UUID, 100); err != nil {
		t.Fatal(err)
	}
	one := readMIG(t, s, busy.UUID)
	if u := *one.UtilizationPct; u < 60 || u > 95 {
		t.Errorf("MIG device with a process: utilization %d%%", u)
	}
	if *one.MemoryUsedMiB == 0 || *one.MemoryUsedMiB+*one.MemoryFreeMiB != busy.MemoryMiB {
		t.Errorf("MIG device with a process: memory %d used, %d free of %d", *one.MemoryUsedMiB, *one.MemoryFreeMiB, busy.MemoryMiB)
	}
	if err := s.AttachProcess(busy.UUID, 200); err != nil {
		t.Fatal(err)
	}
	two := readMIG(t, s, busy.UUID)
	if *two.MemoryUsedMiB <= *one.MemoryUsedMiB {
		t.Errorf("memory used %d MiB with two processes, %d with one", *two.MemoryUsedMiB, *one.MemoryUsedMiB)
	}
	for _, tel := range []gpu.Telemetry{before, one, two, readMIG(t, s, quiet.UUID)} {
		if tel.PowerMilliWatt != nil || tel.TemperatureC != nil || tel.ECCCorrectedVolatile != nil || tel.SMClockMHz != nil {
			t.Errorf("MIG device reports what only the parent has: %+v", tel)
		}
	}
	if q := readMIG(t, s, quiet.UUID); *q.UtilizationPct != 0 {
		t.Errorf("the other MIG device shows activity: %d%%", *q.UtilizationPct)
	}

	loaded := readGPU(t, s, uuid)
	if *loaded.PowerMilliWatt <= *idle.PowerMilliWatt+50_000 || *loaded.PowerMilliWatt > 700_000 {
		t.Errorf("power %d mW with a busy 3g, %d idle", *loaded.PowerMilliWatt, *idle.PowerMilliWatt)
	}
	if *loaded.TemperatureC <= *idle.TemperatureC || *loaded.SMClockMHz <= *idle.SMClockMHz || *loaded.ThrottleReasons != 0 {
		t.Errorf("busy GPU %+v not warmer, faster and unthrottled than idle %+v", loaded, idle)
	}
	if *loaded.MemoryUsedMiB != *two.MemoryUsedMiB {
		t.Errorf("GPU memory used %d MiB, its MIG devices use %d", *loaded.MemoryUsedMiB, *two.MemoryUsedMiB)
	}

	for _, pid := range []int{100, 200} {
		if err := s.DetachProcess(busy.UUID, pid); err != nil {
			t.Fatal(err)
		}
	}
	if after := readMIG(t, s, busy.UUID); *after.UtilizationPct != 0 || *after.MemoryUsedMiB != 0 {
		t.Errorf("MIG device after its processes left: %+v", after)
	}
}

func TestTelemetry_DeterministicPerSeed(t *testing.T) {
	series := func(hostID string) []uint32 {
		s := newSim(t, sim.Config{GPUs: []sim.GPUConfig{{Model: "H200", MIGEnabled: true}}, HostID: hostID, Now: fixedClock})
		devs, _ := s.Devices(t.Context())
		gi := mustCreate(t, s, devs[0].UUID, mig.Profile7g, pl(0, 8))
		mustCreateCI(t, s, devs[0].UUID, gi.ID)
		mds, _ := s.MIGDevices(t.Context(), devs[0].UUID)
		if err := s.AttachProcess(mds[0].UUID, 1); err != nil {
			t.Fatal(err)
		}
		var out []uint32
		for range 8 {
			g := readGPU(t, s, devs[0].UUID)
			m := readMIG(t, s, mds[0].UUID)
			out = append(out, *g.PowerMilliWatt, *g.TemperatureC, *m.UtilizationPct)
		}
		return out
	}
	a, b, c := series("host-a"), series("host-a"), series("host-b")
	for i := range a {
		if a[i] != b[i] {
			t.Fatalf("same seed, reading %d: %d and %d", i, a[i], b[i])
		}
	}
	differ := false
	for i := range a {
		differ = differ || a[i] != c[i]
	}
	if !differ {
		t.Error("different seeds gave identical readings")
	}
}

func TestTelemetry_UnknownDevice(t *testing.T) {
	s, uuid := oneGPU(t, "H200")
	_, err := s.DeviceTelemetry(t.Context(), "GPU-nope")
	wantErr(t, err, gpu.ErrNotFound)
	_, err = s.MIGTelemetry(t.Context(), "MIG-nope")
	wantErr(t, err, gpu.ErrNotFound)
	// A GPU UUID is not a MIG device.
	_, err = s.MIGTelemetry(t.Context(), uuid)
	wantErr(t, err, gpu.ErrNotFound)
}

func TestInjectECC_CountersAndRowRemapping(t *testing.T) {
	cfg := sim.Config{GPUs: []sim.GPUConfig{{Model: "A100-80GB", MIGEnabled: true}}, StatePath: filepath.Join(t.TempDir(), "state.json")}
	s := newSim(t, cfg)
	devs, _ := s.Devices(t.Context())
	uuid := devs[0].UUID
	wantErr(t, s.InjectECC("GPU-nope", true), gpu.ErrNotFound)

	for range 3 {
		if err := s.InjectECC(uuid, false); err != nil {
			t.Fatal(err)
		}
	}
	tel := readGPU(t, s, uuid)
	if *tel.ECCCorrectedVolatile != 3 || *tel.ECCUncorrectedVolatile != 0 || *tel.RemapPending {
		t.Errorf("after 3 single-bit errors: %+v", tel)
	}
	if err := s.InjectECC(uuid, true); err != nil {
		t.Fatal(err)
	}
	tel = readGPU(t, s, uuid)
	if *tel.ECCUncorrectedVolatile != 1 || *tel.RemappedRowsUncorrectable != 1 || !*tel.RemapPending || *tel.RemapFailed {
		t.Errorf("after a double-bit error: %+v", tel)
	}

	// The agent restarts: the "driver" still counts.
	r := newSim(t, cfg)
	if again := readGPU(t, r, uuid); *again.ECCCorrectedVolatile != 3 || *again.ECCUncorrectedVolatile != 1 || !*again.RemapPending {
		t.Errorf("after restart: %+v", again)
	}

	// A reset activates the remap; counters since driver load stay.
	if err := r.ResetGPU(uuid); err != nil {
		t.Fatal(err)
	}
	tel = readGPU(t, r, uuid)
	if *tel.RemapPending || *tel.RemappedRowsUncorrectable != 1 || *tel.ECCUncorrectedVolatile != 1 {
		t.Errorf("after reset: %+v", tel)
	}
}

func TestInjectECC_RemapFailsWhenTheRemapperIsFull(t *testing.T) {
	s, uuid := oneGPU(t, "H100")
	for range 512 {
		if err := s.InjectECC(uuid, true); err != nil {
			t.Fatal(err)
		}
	}
	if tel := readGPU(t, s, uuid); *tel.RemapFailed || *tel.RemappedRowsUncorrectable != 512 {
		t.Fatalf("after 512 remaps: failed %t, %d rows", *tel.RemapFailed, *tel.RemappedRowsUncorrectable)
	}
	if err := s.InjectECC(uuid, true); err != nil {
		t.Fatal(err)
	}
	if tel := readGPU(t, s, uuid); !*tel.RemapFailed || *tel.RemappedRowsUncorrectable != 512 || *tel.ECCUncorrectedVolatile != 513 {
		t.Errorf("513th uncorrectable error: %+v", tel)
	}
}
