//go:build !cgo

package nvml

import (
	"context"
	"fmt"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/pkg/mig"
)

// Backend stands in for the real backend in a build without cgo, where
// go-nvml cannot be compiled: New never returns one, so its promoted
// methods are never called.
type Backend struct {
	gpu.Backend
}

// New reports that the driver is unavailable: this binary was built
// without cgo.
func New(opts Options) (*Backend, error) {
	opts = opts.withDefaults()
	return nil, fmt.Errorf("load NVIDIA driver library %s: this binary was built without cgo (CGO_ENABLED=0), which the NVML backend needs: %w",
		opts.LibraryPath, gpu.ErrDriverUnavailable)
}

// Close does nothing.
func (b *Backend) Close() error { return nil }

// Dropped is always zero.
func (b *Backend) Dropped() uint64 { return 0 }

// DriverProfileNames is never reached (New fails).
func (b *Backend) DriverProfileNames(context.Context, string) (map[mig.ProfileID]string, error) {
	return nil, gpu.ErrDriverUnavailable
}

// ConfidentialCompute is never reached (New fails).
func (b *Backend) ConfidentialCompute(context.Context, string, []byte) (gpu.CCEvidence, error) {
	return gpu.CCEvidence{}, gpu.ErrDriverUnavailable
}
