//go:build cgo

package nvml

import (
	"errors"
	"strings"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/gpuaas/gpuaas/agent/gpu"
)

// classes are every error class mapReturn may give.
var classes = []error{
	gpu.ErrNotFound, gpu.ErrInsufficientResources, gpu.ErrInUse, gpu.ErrInvalidArgument,
	gpu.ErrNotSupported, gpu.ErrDriverUnavailable, ErrNoPermission,
}

// TestMapReturn_EveryCode states the class of every NVML return code
// go-nvml defines, and of one it does not (a newer driver's).
func TestMapReturn_EveryCode(t *testing.T) {
	tests := []struct {
		ret  nvml.Return
		want error // nil: no class
	}{
		{nvml.ERROR_UNINITIALIZED, gpu.ErrDriverUnavailable},
		{nvml.ERROR_INVALID_ARGUMENT, gpu.ErrInvalidArgument},
		{nvml.ERROR_NOT_SUPPORTED, gpu.ErrNotSupported},
		{nvml.ERROR_NO_PERMISSION, ErrNoPermission},
		{nvml.ERROR_ALREADY_INITIALIZED, nil},
		{nvml.ERROR_NOT_FOUND, gpu.ErrNotFound},
		{nvml.ERROR_INSUFFICIENT_SIZE, nil},
		{nvml.ERROR_INSUFFICIENT_POWER, nil},
		{nvml.ERROR_DRIVER_NOT_LOADED, gpu.ErrDriverUnavailable},
		{nvml.ERROR_TIMEOUT, nil},
		{nvml.ERROR_IRQ_ISSUE, nil},
		{nvml.ERROR_LIBRARY_NOT_FOUND, gpu.ErrDriverUnavailable},
		{nvml.ERROR_FUNCTION_NOT_FOUND, gpu.ErrNotSupported},
		{nvml.ERROR_CORRUPTED_INFOROM, nil},
		{nvml.ERROR_GPU_IS_LOST, nil},
		{nvml.ERROR_RESET_REQUIRED, nil},
		{nvml.ERROR_OPERATING_SYSTEM, nil},
		{nvml.ERROR_LIB_RM_VERSION_MISMATCH, gpu.ErrDriverUnavailable},
		{nvml.ERROR_IN_USE, gpu.ErrInUse},
		{nvml.ERROR_MEMORY, nil},
		{nvml.ERROR_NO_DATA, nil},
		{nvml.ERROR_VGPU_ECC_NOT_SUPPORTED, nil},
		{nvml.ERROR_INSUFFICIENT_RESOURCES, gpu.ErrInsufficientResources},
		{nvml.ERROR_FREQ_NOT_SUPPORTED, nil},
		{nvml.ERROR_ARGUMENT_VERSION_MISMATCH, gpu.ErrNotSupported},
		{nvml.ERROR_DEPRECATED, gpu.ErrNotSupported},
		{nvml.ERROR_NOT_READY, nil},
		{nvml.ERROR_GPU_NOT_FOUND, gpu.ErrNotFound},
		{nvml.ERROR_INVALID_STATE, nil},
		{nvml.ERROR_RESET_TYPE_NOT_SUPPORTED, nil},
		{nvml.ERROR_UNKNOWN, nil},
		{nvml.Return(12345), nil},
	}
	// Every code go-nvml names (0..30 and 999) is in the table.
	covered := map[nvml.Return]bool{}
	for _, tt := range tests {
		covered[tt.ret] = true
	}
	for ret := range returnNames {
		if ret != nvml.SUCCESS && !covered[ret] {
			t.Errorf("%s has no row in this table", returnName(ret))
		}
	}

	if err := mapReturn("op", nvml.SUCCESS); err != nil {
		t.Errorf("mapReturn(SUCCESS) = %v, want nil", err)
	}
	for _, tt := range tests {
		t.Run(returnName(tt.ret), func(t *testing.T) {
			err := mapReturn("create gpu instance", tt.ret)
			if err == nil {
				t.Fatal("got nil")
			}
			for _, c := range classes {
				if got := errors.Is(err, c); got != (c == tt.want) {
					t.Errorf("errors.Is(err, %v) = %t; want class %v", c, got, tt.want)
				}
			}
			var nerr *Error
			if !errors.As(err, &nerr) || nerr.Return != tt.ret || nerr.Op != "create gpu instance" {
				t.Errorf("errors.As = %+v, want op and code %d", nerr, tt.ret)
			}
			msg := err.Error()
			if !strings.HasPrefix(msg, "create gpu instance: NVML") || strings.Contains(msg, "\n") {
				t.Errorf("message %q does not say what failed and NVML's name for it", msg)
			}
		})
	}
}

func TestReturnName(t *testing.T) {
	for ret, want := range map[nvml.Return]string{
		nvml.ERROR_IN_USE:  "NVML_ERROR_IN_USE",
		nvml.ERROR_UNKNOWN: "NVML_ERROR_UNKNOWN",
		nvml.Return(31):    "NVML return 31",
		nvml.Return(-1):    "NVML return -1",
	} {
		if got := returnName(ret); got != want {
			t.Errorf("returnName(%d) = %q, want %q", int32(ret), got, want)
		}
	}
}
