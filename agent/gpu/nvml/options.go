package nvml

import (
	"errors"
	"log/slog"
)

// DefaultLibrary is the NVML library New loads when Options.LibraryPath is
// empty: the soname the driver installs, found by the dynamic loader.
const DefaultLibrary = "libnvidia-ml.so.1"

// Defaults for Options.DevRoot and Options.ProcRoot.
const (
	DefaultDevRoot  = "/dev"
	DefaultProcRoot = "/proc"
)

// ErrNoPermission: the driver refused the call for lack of privilege
// (NVML_ERROR_NO_PERMISSION), e.g. a MIG change by a process without
// CAP_SYS_ADMIN. It is kept apart from gpu.ErrNotSupported on purpose: the
// GPU can do it, this process may not, and an operator fixes that
// differently.
var ErrNoPermission = errors.New("no permission")

// Options configure New.
type Options struct {
	// LibraryPath is the NVML library to load: a file name the dynamic
	// loader resolves or a path. Empty means DefaultLibrary.
	LibraryPath string
	// Logger receives what the backend notices but does not fail on (a
	// GPU that cannot report events, a MIG mode change left pending).
	// Nil means slog.Default().
	Logger *slog.Logger
	// DevRoot is where the driver's device nodes are, both for stat'ing
	// them and in the paths reported for containers. Empty means
	// DefaultDevRoot.
	DevRoot string
	// ProcRoot is where procfs is mounted (devices,
	// driver/nvidia-caps/mig-minors). Empty means DefaultProcRoot.
	ProcRoot string
}

func (o Options) withDefaults() Options {
	if o.LibraryPath == "" {
		o.LibraryPath = DefaultLibrary
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.DevRoot == "" {
		o.DevRoot = DefaultDevRoot
	}
	if o.ProcRoot == "" {
		o.ProcRoot = DefaultProcRoot
	}
	return o
}
