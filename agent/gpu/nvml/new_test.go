//go:build cgo

package nvml

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxh200"

	"github.com/gpuaas/gpuaas/agent/gpu"
)

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// TestNew_NoDriverNamesLibrary loads a library that does not exist, as on
// a host without the driver: the error is ErrDriverUnavailable, names the
// library and carries the loader's reason, and nothing panics.
func TestNew_NoDriverNamesLibrary(t *testing.T) {
	path := filepath.Join(t.TempDir(), DefaultLibrary)
	b, err := New(Options{LibraryPath: path, Logger: quiet()})
	if b != nil || !errors.Is(err, gpu.ErrDriverUnavailable) {
		t.Fatalf("New = %v, %v; want nil, ErrDriverUnavailable", b, err)
	}
	for _, want := range []string{"load NVIDIA driver library " + path, "cannot open shared object file"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
}

// TestNew_DefaultLibrary loads libnvidia-ml.so.1 by its soname. On a host
// without the driver (this one) that fails naming the library; on a GPU
// host it succeeds and is closed again.
func TestNew_DefaultLibrary(t *testing.T) {
	b, err := New(Options{Logger: quiet()})
	if err == nil {
		if err := b.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		t.Skip("an NVIDIA driver is installed; the no-driver path is covered by TestNew_NoDriverNamesLibrary")
	}
	if !errors.Is(err, gpu.ErrDriverUnavailable) || !strings.Contains(err.Error(), "load NVIDIA driver library libnvidia-ml.so.1: ") {
		t.Errorf("New() = %v; want ErrDriverUnavailable naming libnvidia-ml.so.1", err)
	}
}

// TestNewWithInterface_InitFailures maps what Init can return on a broken
// host to the driver-unavailable class.
func TestNewWithInterface_InitFailures(t *testing.T) {
	for _, ret := range []nvml.Return{nvml.ERROR_DRIVER_NOT_LOADED, nvml.ERROR_LIB_RM_VERSION_MISMATCH, nvml.ERROR_LIBRARY_NOT_FOUND} {
		t.Run(returnName(ret), func(t *testing.T) {
			server := dgxh200.New()
			server.InitFunc = func() nvml.Return { return ret }
			_, err := newWithInterface(server, Options{LibraryPath: "libstub.so", Logger: quiet()})
			if !errors.Is(err, gpu.ErrDriverUnavailable) || !strings.Contains(err.Error(), "initialise NVML from libstub.so: "+returnName(ret)) {
				t.Errorf("error %v, want ErrDriverUnavailable naming the library and %s", err, returnName(ret))
			}
		})
	}
	t.Run("Init panics", func(t *testing.T) {
		server := dgxh200.New()
		server.InitFunc = nil
		_, err := newWithInterface(server, Options{Logger: quiet()})
		var perr *panicError
		if !errors.As(err, &perr) {
			t.Errorf("error %v, want the recovered panic", err)
		}
	})
}

// TestClose_FailsLaterCalls: after Close every call fails with
// ErrDriverUnavailable without reaching the library, and Close twice is
// fine.
func TestClose_FailsLaterCalls(t *testing.T) {
	server := dgxh200.New()
	shutdowns := 0
	server.ShutdownFunc = func() nvml.Return { shutdowns++; return nvml.SUCCESS }
	b, err := newWithInterface(server, Options{Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(); err != nil || shutdowns != 1 {
		t.Errorf("second Close = %v after %d shutdowns; want nil after 1", err, shutdowns)
	}
	server.DeviceGetCountFunc = func() (int, nvml.Return) {
		t.Error("the library was called after Close")
		return 0, nvml.ERROR_UNINITIALIZED
	}
	if _, err := b.Devices(t.Context()); !errors.Is(err, gpu.ErrDriverUnavailable) {
		t.Errorf("Devices after Close = %v, want ErrDriverUnavailable", err)
	}
	if _, err := b.Events(t.Context()); !errors.Is(err, gpu.ErrDriverUnavailable) {
		t.Errorf("Events after Close = %v, want ErrDriverUnavailable", err)
	}
}

// TestCancelledContext: a done context is refused before any NVML call.
func TestCancelledContext(t *testing.T) {
	server := dgxh200.New()
	b, err := newWithInterface(server, Options{Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	server.DeviceGetCountFunc = func() (int, nvml.Return) {
		t.Error("the library was called with a cancelled context")
		return 0, nvml.SUCCESS
	}
	if _, err := b.Devices(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Devices = %v, want context.Canceled", err)
	}
}
