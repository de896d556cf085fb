//go:build cgo

package nvml

import (
	"fmt"

	"github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/gpuaas/gpuaas/agent/gpu"
)

// Error is a failed NVML call: what was being done and the code NVML
// returned. It unwraps to the gpu error class of the code (errors.Is(err,
// gpu.ErrInUse)), or to nothing for a code no class covers; errors.As gives
// callers the raw code (e.g. to tell NVML_ERROR_GPU_IS_LOST apart).
type Error struct {
	Op     string
	Return nvml.Return
	class  error
}

// Error says what failed and NVML's name for the code, e.g.
// "destroy gpu instance 3: NVML_ERROR_IN_USE". The name comes from a table
// in this package, never from the C library, so an error can be formatted
// at any time, even after Close unloaded the library.
func (e *Error) Error() string {
	return e.Op + ": " + returnName(e.Return)
}

// Unwrap returns the gpu error class, or nil.
func (e *Error) Unwrap() error { return e.class }

// mapReturn turns an NVML return code into an error: nil for
// NVML_SUCCESS, otherwise an *Error carrying op and the code, whose class
// is:
//
//	NOT_FOUND, GPU_NOT_FOUND                      gpu.ErrNotFound
//	INSUFFICIENT_RESOURCES                        gpu.ErrInsufficientResources
//	IN_USE                                        gpu.ErrInUse
//	INVALID_ARGUMENT                              gpu.ErrInvalidArgument
//	NOT_SUPPORTED, FUNCTION_NOT_FOUND,
//	ARGUMENT_VERSION_MISMATCH, DEPRECATED         gpu.ErrNotSupported
//	NO_PERMISSION                                 ErrNoPermission
//	LIBRARY_NOT_FOUND, DRIVER_NOT_LOADED,
//	UNINITIALIZED, LIB_RM_VERSION_MISMATCH        gpu.ErrDriverUnavailable
//	anything else                                 no class (internal)
func mapReturn(op string, ret nvml.Return) error {
	if ret == nvml.SUCCESS {
		return nil
	}
	return &Error{Op: op, Return: ret, class: returnClass(ret)}
}

func returnClass(ret nvml.Return) error {
	switch ret {
	case nvml.ERROR_NOT_FOUND, nvml.ERROR_GPU_NOT_FOUND:
		return gpu.ErrNotFound
	case nvml.ERROR_INSUFFICIENT_RESOURCES:
		return gpu.ErrInsufficientResources
	case nvml.ERROR_IN_USE:
		return gpu.ErrInUse
	case nvml.ERROR_INVALID_ARGUMENT:
		return gpu.ErrInvalidArgument
	case nvml.ERROR_NOT_SUPPORTED, nvml.ERROR_FUNCTION_NOT_FOUND,
		nvml.ERROR_ARGUMENT_VERSION_MISMATCH, nvml.ERROR_DEPRECATED:
		return gpu.ErrNotSupported
	case nvml.ERROR_NO_PERMISSION:
		return ErrNoPermission
	case nvml.ERROR_LIBRARY_NOT_FOUND, nvml.ERROR_DRIVER_NOT_LOADED,
		nvml.ERROR_UNINITIALIZED, nvml.ERROR_LIB_RM_VERSION_MISMATCH:
		return gpu.ErrDriverUnavailable
	default:
		return nil
	}
}

// returnNames are NVML's names for its return codes (nvmlReturn_t).
var returnNames = map[nvml.Return]string{
	nvml.SUCCESS:                         "NVML_SUCCESS",
	nvml.ERROR_UNINITIALIZED:             "NVML_ERROR_UNINITIALIZED",
	nvml.ERROR_INVALID_ARGUMENT:          "NVML_ERROR_INVALID_ARGUMENT",
	nvml.ERROR_NOT_SUPPORTED:             "NVML_ERROR_NOT_SUPPORTED",
	nvml.ERROR_NO_PERMISSION:             "NVML_ERROR_NO_PERMISSION",
	nvml.ERROR_ALREADY_INITIALIZED:       "NVML_ERROR_ALREADY_INITIALIZED",
	nvml.ERROR_NOT_FOUND:                 "NVML_ERROR_NOT_FOUND",
	nvml.ERROR_INSUFFICIENT_SIZE:         "NVML_ERROR_INSUFFICIENT_SIZE",
	nvml.ERROR_INSUFFICIENT_POWER:        "NVML_ERROR_INSUFFICIENT_POWER",
	nvml.ERROR_DRIVER_NOT_LOADED:         "NVML_ERROR_DRIVER_NOT_LOADED",
	nvml.ERROR_TIMEOUT:                   "NVML_ERROR_TIMEOUT",
	nvml.ERROR_IRQ_ISSUE:                 "NVML_ERROR_IRQ_ISSUE",
	nvml.ERROR_LIBRARY_NOT_FOUND:         "NVML_ERROR_LIBRARY_NOT_FOUND",
	nvml.ERROR_FUNCTION_NOT_FOUND:        "NVML_ERROR_FUNCTION_NOT_FOUND",
	nvml.ERROR_CORRUPTED_INFOROM:         "NVML_ERROR_CORRUPTED_INFOROM",
	nvml.ERROR_GPU_IS_LOST:               "NVML_ERROR_GPU_IS_LOST",
	nvml.ERROR_RESET_REQUIRED:            "NVML_ERROR_RESET_REQUIRED",
	nvml.ERROR_OPERATING_SYSTEM:          "NVML_ERROR_OPERATING_SYSTEM",
	nvml.ERROR_LIB_RM_VERSION_MISMATCH:   "NVML_ERROR_LIB_RM_VERSION_MISMATCH",
	nvml.ERROR_IN_USE:                    "NVML_ERROR_IN_USE",
	nvml.ERROR_MEMORY:                    "NVML_ERROR_MEMORY",
	nvml.ERROR_NO_DATA:                   "NVML_ERROR_NO_DATA",
	nvml.ERROR_VGPU_ECC_NOT_SUPPORTED:    "NVML_ERROR_VGPU_ECC_NOT_SUPPORTED",
	nvml.ERROR_INSUFFICIENT_RESOURCES:    "NVML_ERROR_INSUFFICIENT_RESOURCES",
	nvml.ERROR_FREQ_NOT_SUPPORTED:        "NVML_ERROR_FREQ_NOT_SUPPORTED",
	nvml.ERROR_ARGUMENT_VERSION_MISMATCH: "NVML_ERROR_ARGUMENT_VERSION_MISMATCH",
	nvml.ERROR_DEPRECATED:                "NVML_ERROR_DEPRECATED",
	nvml.ERROR_NOT_READY:                 "NVML_ERROR_NOT_READY",
	nvml.ERROR_GPU_NOT_FOUND:             "NVML_ERROR_GPU_NOT_FOUND",
	nvml.ERROR_INVALID_STATE:             "NVML_ERROR_INVALID_STATE",
	nvml.ERROR_RESET_TYPE_NOT_SUPPORTED:  "NVML_ERROR_RESET_TYPE_NOT_SUPPORTED",
	nvml.ERROR_UNKNOWN:                   "NVML_ERROR_UNKNOWN",
}

// returnName is NVML's name for a return code, or "NVML return N" for a
// code this table does not know (a newer driver's).
func returnName(ret nvml.Return) string {
	if n, ok := returnNames[ret]; ok {
		return n
	}
	return fmt.Sprintf("NVML return %d", int32(ret))
}

// panicError is a panic inside a go-nvml call, recovered at the backend's
// boundary: typically an nvml.Interface (a mock) that does not implement a
// function. It has no gpu class: it is a defect, not a driver answer.
type panicError struct {
	value any
}

func (e *panicError) Error() string {
	return fmt.Sprintf("go-nvml call panicked: %v", e.value)
}
