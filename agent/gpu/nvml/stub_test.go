//go:build cgo

package nvml

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/agent/gpu/gputest"
)

// Environment of a stub child process (see TestStubLibrary).
const (
	envStubLibrary  = "GPUAAS_NVML_TEST_STUB_LIBRARY"
	envStubScenario = "GPUAAS_NVML_TEST_STUB_SCENARIO"
	envStubMIG      = "GPUAAS_STUB_MIG"
	envStubInit     = "GPUAAS_STUB_INIT_RETURN"
	envStubXID      = "GPUAAS_STUB_XID"
)

// buildStub compiles testdata/stubnvml.c into a shared library named
// libnvidia-ml.so.1 in a temporary directory. cgo builds need a C
// compiler, so one is always there when this test compiles.
func buildStub(t *testing.T, defines ...string) string {
	t.Helper()
	cc := strings.Fields(os.Getenv("CC")) // may carry flags, as cgo allows
	if len(cc) == 0 {
		cc = []string{"cc"}
	}
	out := filepath.Join(t.TempDir(), DefaultLibrary)
	args := append(cc[1:], "-shared", "-fPIC", "-Wall", "-Werror", "-o", out)
	args = append(append(args, defines...), filepath.Join("testdata", "stubnvml.c"))
	cmd := exec.Command(cc[0], args...)
	if msg, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("compile the stub NVML library: %v\n%s", err, msg)
	}
	return out
}

// runChild runs TestStubChild in a new process of this test binary with
// the stub library and scenario, and fails with the child's output unless
// it passed. Every stub load gets a process of its own: go-nvml binds C
// calls process-wide, so two libraries (or the real driver, on a GPU
// host) must never meet in one process, and a call to a function the stub
// lacks kills only the child ("symbol lookup error"), which this reports.
func runChild(t *testing.T, library, scenario string, env ...string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestStubChild$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), append(env, envStubLibrary+"="+library, envStubScenario+"="+scenario)...)
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS: TestStubChild") {
		t.Fatalf("child %q: %v\n%s", scenario, err, out)
	}
	t.Logf("child %q passed", scenario)
}

// TestStubLibrary runs the backend's real cgo path against a stub
// libnvidia-ml.so.1 (one idle H200): the read-only conformance suite with
// MIG on and off, telemetry, events, close and reopen, a failing Init, and
// a library too old to have every required function.
func TestStubLibrary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a C library and runs child processes")
	}
	full := buildStub(t)
	t.Run("mig enabled", func(t *testing.T) { runChild(t, full, "mig-on", envStubMIG+"=1", envStubXID+"=79") })
	t.Run("mig disabled", func(t *testing.T) { runChild(t, full, "mig-off", envStubMIG+"=0") })
	t.Run("init fails", func(t *testing.T) { runChild(t, full, "init-fails", envStubInit+"=9") })
	t.Run("library lacks a required function", func(t *testing.T) {
		runChild(t, buildStub(t, "-DSTUB_OMIT_PLACEMENT"), "too-old")
	})
}

// TestStubChild is the child process of TestStubLibrary; run directly it
// skips.
func TestStubChild(t *testing.T) {
	library, scenario := os.Getenv(envStubLibrary), os.Getenv(envStubScenario)
	if library == "" {
		t.Skip("runs only as a child process of TestStubLibrary")
	}
	opts := Options{LibraryPath: library, Logger: quiet(), DevRoot: t.TempDir(), ProcRoot: fakeProc(t, procDevices)}
	switch scenario {
	case "mig-on", "mig-off":
		stubReadOnly(t, opts, scenario == "mig-on")
	case "init-fails":
		_, err := New(opts)
		if !errors.Is(err, gpu.ErrDriverUnavailable) || !strings.Contains(err.Error(), "initialise NVML from "+library+": NVML_ERROR_DRIVER_NOT_LOADED") {
			t.Errorf("New = %v; want ErrDriverUnavailable naming the library and DRIVER_NOT_LOADED", err)
		}
	case "too-old":
		_, err := New(opts)
		if !errors.Is(err, gpu.ErrDriverUnavailable) ||
			!strings.Contains(err.Error(), library+" lacks nvmlDeviceCreateGpuInstanceWithPlacement (a driver older than R470?)") {
			t.Errorf("New = %v; want ErrDriverUnavailable naming the missing function", err)
		}
	default:
		t.Fatalf("unknown scenario %q", scenario)
	}
}

func stubReadOnly(t *testing.T, opts Options, migOn bool) {
	ctx := t.Context()
	b, err := New(opts)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	gputest.RunReadOnly(t, b)

	devs, err := b.Devices(ctx)
	if err != nil || len(devs) != 1 {
		t.Fatalf("Devices = %+v, %v", devs, err)
	}
	d := devs[0]
	want := gpu.Device{
		UUID: "GPU-5fb4e2d1-7a3c-4e9b-8d2f-0a1b2c3d4e5f", Name: "NVIDIA H200", PCIBusID: "00000000:18:00.0",
		PCIDeviceID: 0x233510DE, MemoryMiB: 143771, Serial: "1652823054321", VBIOSVersion: "96.00.A5.00.01",
		MIGCapable: true, DriverVersion: "570.172.08-stub",
	}
	if d != want {
		t.Errorf("device\n got %+v\nwant %+v", d, want)
	}

	if migOn {
		profiles, err := b.GPUInstanceProfiles(ctx, d.UUID)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, p := range profiles {
			names = append(names, p.Name)
		}
		if got := strings.Join(names, " "); got != "1g.18gb 1g.18gb+me 1g.35gb 2g.35gb 3g.71gb 4g.71gb 7g.141gb" {
			t.Errorf("profile names %q", got)
		}
		if _, err := b.DriverProfileNames(ctx, d.UUID); !errors.Is(err, gpu.ErrNotSupported) {
			t.Errorf("DriverProfileNames = %v; want ErrNotSupported (the stub lacks versioned profile info)", err)
		}
	}

	tel, err := b.DeviceTelemetry(ctx, d.UUID)
	if err != nil {
		t.Fatalf("DeviceTelemetry: %v", err)
	}
	if migOn != (tel.UtilizationPct == nil) {
		t.Errorf("utilization %v with mig %t; want nil exactly when mig is on", tel.UtilizationPct, migOn)
	}
	if tel.PowerMilliWatt == nil || *tel.PowerMilliWatt != 312000 || tel.TemperatureC == nil || *tel.TemperatureC != 41 ||
		tel.ECCCorrectedVolatile == nil || *tel.ECCCorrectedVolatile != 3 || tel.MemoryUsedMiB == nil || *tel.MemoryUsedMiB != 612 ||
		tel.RemappedRowsCorrectable == nil || *tel.RemappedRowsCorrectable != 2 || tel.RemapPending == nil || !*tel.RemapPending ||
		tel.SMClockMHz == nil || *tel.SMClockMHz != 1980 || tel.ThrottleReasons == nil || *tel.ThrottleReasons != 1 {
		t.Errorf("telemetry %s", describeTelemetry(tel))
	}
	if _, err := b.MIGTelemetry(ctx, "MIG-00000000-0000-4000-8000-000000000000"); !errors.Is(err, gpu.ErrNotFound) {
		t.Errorf("MIGTelemetry(unknown) = %v, want ErrNotFound", err)
	}

	if migOn {
		events, err := b.Events(ctx)
		if err != nil {
			t.Fatalf("Events: %v", err)
		}
		select {
		case ev := <-events:
			if ev.Kind != gpu.EventXID || ev.XID != 79 || ev.GPUUUID != d.UUID || ev.GPUInstanceID != gpu.WholeGPU || ev.ComputeInstanceID != gpu.WholeGPU {
				t.Errorf("event %+v, want XID 79 on the whole GPU", ev)
			}
		case <-time.After(5 * time.Second):
			t.Error("no XID event within 5s")
		}
	}

	// Close stops the monitor and shuts NVML down; the library stays
	// mapped (RTLD_NODELETE), so a second backend in the same process
	// works.
	if err := b.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if maps, err := os.ReadFile("/proc/self/maps"); err != nil || !strings.Contains(string(maps), opts.LibraryPath) {
		t.Errorf("library unmapped after Close (maps read: %v); go-nvml's lazily bound calls would crash", err)
	}
	again, err := New(opts)
	if err != nil {
		t.Fatalf("New after Close: %v", err)
	}
	if _, err := again.Devices(ctx); err != nil {
		t.Errorf("Devices on the second backend: %v", err)
	}
	if err := again.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// describeTelemetry renders a reading with its pointers followed.
func describeTelemetry(t gpu.Telemetry) string {
	var b strings.Builder
	v := func(name string, p any) {
		b.WriteString(name + "=")
		switch p := p.(type) {
		case *uint32:
			if p != nil {
				fmt.Fprint(&b, *p)
			}
		case *uint64:
			if p != nil {
				fmt.Fprint(&b, *p)
			}
		case *bool:
			if p != nil {
				fmt.Fprint(&b, *p)
			}
		}
		b.WriteString(" ")
	}
	v("util", t.UtilizationPct)
	v("used", t.MemoryUsedMiB)
	v("free", t.MemoryFreeMiB)
	v("power", t.PowerMilliWatt)
	v("temp", t.TemperatureC)
	v("ecc-corr", t.ECCCorrectedVolatile)
	v("ecc-unc", t.ECCUncorrectedVolatile)
	v("remap-corr", t.RemappedRowsCorrectable)
	v("remap-unc", t.RemappedRowsUncorrectable)
	v("remap-pending", t.RemapPending)
	v("remap-failed", t.RemapFailed)
	v("sm", t.SMClockMHz)
	v("mem", t.MemoryClockMHz)
	v("throttle", t.ThrottleReasons)
	return strings.TrimSpace(b.String())
}
