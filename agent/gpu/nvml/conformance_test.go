//go:build cgo

package nvml

import (
	"errors"
	"os"
	"testing"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/agent/gpu/gputest"
)

// Environment of TestConformanceReadOnly.
const (
	// envLibrary names the NVML library to load instead of
	// libnvidia-ml.so.1.
	envLibrary = "GPUAAS_NVML_LIBRARY"
	// envRequireDriver=1 makes a missing driver a failure, for GPU hosts
	// whose runs must not pass by skipping.
	envRequireDriver = "GPUAAS_NVML_REQUIRE_DRIVER"
)

// TestConformanceReadOnly runs the read-only conformance suite against the
// real driver: what a GPU host runs. It changes nothing (no MIG mode
// change, no instance created or destroyed), so it may run on a production
// host. Without a driver it skips, saying so, unless
// GPUAAS_NVML_REQUIRE_DRIVER=1.
func TestConformanceReadOnly(t *testing.T) {
	b, err := New(Options{LibraryPath: os.Getenv(envLibrary)})
	if errors.Is(err, gpu.ErrDriverUnavailable) && os.Getenv(envRequireDriver) != "1" {
		t.Skipf("no NVIDIA driver: %v", err)
	}
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		if err := b.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	if v, err := b.DriverVersion(t.Context()); err == nil {
		t.Logf("driver %s (%s)", v, b.libraryPath)
	}
	gputest.RunReadOnly(t, b)
}
