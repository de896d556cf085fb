//go:build cgo

package nvml

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/NVIDIA/go-nvml/pkg/dl"
	"github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/gpuaas/gpuaas/agent/gpu"
)

// Backend is the real GPU backend. It is safe for concurrent use; MIG
// changes made through one Backend are serialised. Close it to release the
// driver.
type Backend struct {
	lib           nvml.Interface
	log           *slog.Logger
	nodes         devNodes
	libraryPath   string
	driverVersion string

	// mu is held for reading by every call into NVML and for writing by
	// Close, so no call reaches the library after it is shut down.
	mu     sync.RWMutex
	closed bool

	// migMu serialises MIG changes (a lookup by id and the destroy that
	// follows must see the same instances).
	migMu sync.Mutex

	// ctx is cancelled by Close; it stops the event monitors, which Close
	// waits for (monitors) before shutting NVML down.
	ctx      context.Context
	cancel   context.CancelFunc
	monitors sync.WaitGroup
	dropped  atomic.Uint64

	symbols sync.Map // C symbol name -> bool, see has
}

var (
	_ gpu.Backend  = (*Backend)(nil)
	_ gpu.Observer = (*Backend)(nil)
)

// minDriver is the oldest driver branch that exports every function in
// requiredSymbols (nvmlDeviceCreateGpuInstanceWithPlacement arrived in
// R470).
const minDriver = "R470"

// requiredSymbols are the C functions the backend may call on any code
// path, each with the alternatives go-nvml falls back between (a versioned
// symbol first). New refuses a library that lacks one, because calling a
// missing function is not a Go panic: the dynamic loader kills the process.
var requiredSymbols = [][]string{
	{"nvmlInit_v2", "nvmlInit"},
	{"nvmlShutdown"},
	{"nvmlErrorString"},
	{"nvmlSystemGetDriverVersion"},
	{"nvmlDeviceGetCount_v2", "nvmlDeviceGetCount"},
	{"nvmlDeviceGetHandleByIndex_v2", "nvmlDeviceGetHandleByIndex"},
	{"nvmlDeviceGetHandleByUUID"},
	{"nvmlDeviceGetUUID"},
	{"nvmlDeviceGetName"},
	{"nvmlDeviceGetPciInfo_v3", "nvmlDeviceGetPciInfo_v2", "nvmlDeviceGetPciInfo"},
	{"nvmlDeviceGetMemoryInfo"},
	{"nvmlDeviceGetSerial"},
	{"nvmlDeviceGetVbiosVersion"},
	{"nvmlDeviceGetMinorNumber"},
	{"nvmlDeviceGetMigMode"},
	{"nvmlDeviceSetMigMode"},
	{"nvmlDeviceGetGpuInstanceProfileInfo"},
	{"nvmlDeviceGetGpuInstancePossiblePlacements_v2", "nvmlDeviceGetGpuInstancePossiblePlacements"},
	{"nvmlDeviceGetGpuInstanceRemainingCapacity"},
	{"nvmlDeviceCreateGpuInstanceWithPlacement"},
	{"nvmlDeviceGetGpuInstances"},
	{"nvmlGpuInstanceGetInfo"},
	{"nvmlGpuInstanceDestroy"},
	{"nvmlGpuInstanceGetComputeInstanceProfileInfo"},
	{"nvmlGpuInstanceCreateComputeInstance"},
	{"nvmlGpuInstanceGetComputeInstances"},
	{"nvmlComputeInstanceGetInfo_v2", "nvmlComputeInstanceGetInfo"},
	{"nvmlComputeInstanceDestroy"},
	{"nvmlDeviceIsMigDeviceHandle"},
	{"nvmlDeviceGetMaxMigDeviceCount"},
	{"nvmlDeviceGetMigDeviceHandleByIndex"},
	{"nvmlDeviceGetGpuInstanceId"},
	{"nvmlDeviceGetComputeInstanceId"},
	{"nvmlDeviceGetUtilizationRates"},
	{"nvmlDeviceGetPowerUsage"},
	{"nvmlDeviceGetTemperature"},
	{"nvmlDeviceGetTotalEccErrors"},
	{"nvmlDeviceGetClockInfo"},
	{"nvmlEventSetCreate"},
	{"nvmlDeviceGetSupportedEventTypes"},
	{"nvmlDeviceRegisterEvents"},
	{"nvmlEventSetWait_v2", "nvmlEventSetWait"},
	{"nvmlEventSetFree"},
}

// Optional functions, newer than minDriver; looked up (has) before use.
const (
	symRemappedRows       = "nvmlDeviceGetRemappedRows"
	symClocksEvent        = "nvmlDeviceGetCurrentClocksEventReasons"
	symClocksThrottle     = "nvmlDeviceGetCurrentClocksThrottleReasons"
	symProfileInfoVersion = "nvmlDeviceGetGpuInstanceProfileInfoV"
)

// New loads the NVML library, checks that it exports every function the
// backend calls, and initialises it. Without the driver the error wraps
// gpu.ErrDriverUnavailable and names the library, e.g. "load NVIDIA driver
// library libnvidia-ml.so.1: libnvidia-ml.so.1: cannot open shared object
// file: No such file or directory".
//
// The library stays mapped for the life of the process, so Close and a
// later New are safe: go-nvml binds its C calls lazily and process-wide,
// and a bound call into an unmapped library would crash. glibc already
// pins a library the executable has bound symbols from; opening it with
// RTLD_NODELETE makes that explicit rather than a loader detail.
func New(opts Options) (*Backend, error) {
	opts = opts.withDefaults()
	if err := preflight(opts.LibraryPath); err != nil {
		return nil, err
	}
	return newWithInterface(nvml.New(nvml.WithLibraryPath(opts.LibraryPath)), opts)
}

// preflight opens the library (for the loader's own error message, which
// go-nvml's Init discards) and checks requiredSymbols.
func preflight(path string) error {
	lib := dl.New(path, dl.RTLD_LAZY|dl.RTLD_GLOBAL|dl.RTLD_NODELETE)
	if err := lib.Open(); err != nil {
		return fmt.Errorf("load NVIDIA driver library %s: %w: %w", path, err, gpu.ErrDriverUnavailable)
	}
	var missing []string
	for _, alternatives := range requiredSymbols {
		found := false
		for _, sym := range alternatives {
			if lib.Lookup(sym) == nil {
				found = true
				break
			}
		}
		if !found {
			missing = append(missing, strings.Join(alternatives, " or "))
		}
	}
	// Dropping this reference does not unmap the library (RTLD_NODELETE).
	if err := lib.Close(); err != nil {
		return fmt.Errorf("load NVIDIA driver library %s: %w: %w", path, err, gpu.ErrDriverUnavailable)
	}
	if len(missing) > 0 {
		return fmt.Errorf("NVIDIA driver library %s lacks %s (a driver older than %s?): %w",
			path, strings.Join(missing, ", "), minDriver, gpu.ErrDriverUnavailable)
	}
	return nil
}

// newWithInterface builds a backend on any nvml.Interface (the real
// library, or go-nvml's mocks in tests) and initialises it.
func newWithInterface(lib nvml.Interface, opts Options) (b *Backend, err error) {
	opts = opts.withDefaults()
	op := "initialise NVML from " + opts.LibraryPath
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%s: %w", op, &panicError{value: r})
		}
	}()
	if ret := lib.Init(); ret != nvml.SUCCESS {
		return nil, mapReturn(op, ret)
	}
	version, ret := lib.SystemGetDriverVersion()
	if ret != nvml.SUCCESS {
		_ = lib.Shutdown()
		return nil, mapReturn("read the driver version", ret)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Backend{
		lib:           lib,
		log:           opts.Logger,
		nodes:         devNodes{devRoot: opts.DevRoot, procRoot: opts.ProcRoot},
		libraryPath:   opts.LibraryPath,
		driverVersion: version,
		ctx:           ctx,
		cancel:        cancel,
	}, nil
}

// Close stops the event monitors and shuts NVML down. Calls made after
// Close fail with gpu.ErrDriverUnavailable. Closing twice is a no-op.
func (b *Backend) Close() (err error) {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	b.cancel()
	b.mu.Unlock()
	// Monitors never take mu; they stop within one wait timeout and free
	// their event sets while the library is still initialised.
	b.monitors.Wait()
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("shut down NVML: %w", &panicError{value: r})
		}
	}()
	return mapReturn("shut down NVML", b.lib.Shutdown())
}

// enter starts a call into NVML: it fails when ctx is done or the backend
// is closed, and otherwise returns the function to defer, which ends the
// call, turns a panic into an error, and prefixes any error with op.
func (b *Backend) enter(ctx context.Context, op string) (func(*error), error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	b.mu.RLock()
	if b.closed {
		b.mu.RUnlock()
		return nil, fmt.Errorf("%s: nvml backend is closed: %w", op, gpu.ErrDriverUnavailable)
	}
	return func(err *error) {
		b.mu.RUnlock()
		if r := recover(); r != nil {
			*err = &panicError{value: r}
		}
		if *err != nil {
			*err = fmt.Errorf("%s: %w", op, *err)
		}
	}, nil
}

// has reports whether the loaded library exports the C function sym,
// remembering the answer. An interface whose lookup panics has nothing.
func (b *Backend) has(sym string) (ok bool) {
	if v, found := b.symbols.Load(sym); found {
		return v.(bool)
	}
	defer func() {
		if recover() != nil {
			ok = false
		}
		b.symbols.Store(sym, ok)
	}()
	return b.lib.Extensions().LookupSymbol(sym) == nil
}

// DriverVersion is the kernel driver's version as NVML reported it at New.
func (b *Backend) DriverVersion(ctx context.Context) (v string, err error) {
	done, err := b.enter(ctx, "read the driver version")
	if err != nil {
		return "", err
	}
	defer done(&err)
	return b.driverVersion, nil
}

// Devices lists the physical GPUs in NVML index order. A GPU that does not
// report a serial or VBIOS version (NOT_SUPPORTED) has them empty; a GPU
// without MIG (GetMigMode NOT_SUPPORTED) has MIGCapable false.
func (b *Backend) Devices(ctx context.Context) (out []gpu.Device, err error) {
	done, err := b.enter(ctx, "list gpus")
	if err != nil {
		return nil, err
	}
	defer done(&err)
	n, ret := b.lib.DeviceGetCount()
	if err := mapReturn("count gpus", ret); err != nil {
		return nil, err
	}
	out = make([]gpu.Device, 0, n)
	for i := range n {
		dev, ret := b.lib.DeviceGetHandleByIndex(i)
		if err := mapReturn(fmt.Sprintf("get gpu %d", i), ret); err != nil {
			return nil, err
		}
		d, err := b.describe(i, dev)
		if err != nil {
			return nil, fmt.Errorf("gpu %d: %w", i, err)
		}
		out = append(out, d)
	}
	return out, nil
}

// describe reads one GPU's identity.
func (b *Backend) describe(index int, dev nvml.Device) (gpu.Device, error) {
	d := gpu.Device{Index: index, DriverVersion: b.driverVersion}
	var ret nvml.Return
	if d.UUID, ret = dev.GetUUID(); ret != nvml.SUCCESS {
		return gpu.Device{}, mapReturn("read uuid", ret)
	}
	if d.Name, ret = dev.GetName(); ret != nvml.SUCCESS {
		return gpu.Device{}, mapReturn("read name", ret)
	}
	pci, ret := dev.GetPciInfo()
	if ret != nvml.SUCCESS {
		return gpu.Device{}, mapReturn("read pci info", ret)
	}
	d.PCIBusID, d.PCIDeviceID = busID(pci), pci.PciDeviceId
	mem, ret := dev.GetMemoryInfo()
	if ret != nvml.SUCCESS {
		return gpu.Device{}, mapReturn("read memory info", ret)
	}
	d.MemoryMiB = mem.Total / mib
	serial, ret := dev.GetSerial()
	if err := optionalString("read serial", serial, ret, &d.Serial); err != nil {
		return gpu.Device{}, err
	}
	vbios, ret := dev.GetVbiosVersion()
	if err := optionalString("read vbios version", vbios, ret, &d.VBIOSVersion); err != nil {
		return gpu.Device{}, err
	}
	if d.MinorNumber, ret = dev.GetMinorNumber(); ret != nvml.SUCCESS {
		return gpu.Device{}, mapReturn("read minor number", ret)
	}
	switch _, _, ret := dev.GetMigMode(); ret {
	case nvml.SUCCESS:
		d.MIGCapable = true
	case nvml.ERROR_NOT_SUPPORTED:
	default:
		return gpu.Device{}, mapReturn("read mig mode", ret)
	}
	return d, nil
}

// optionalString stores v in dst on success, leaves dst empty when NVML
// says NOT_SUPPORTED, and fails otherwise.
func optionalString(op, v string, ret nvml.Return, dst *string) error {
	switch ret {
	case nvml.SUCCESS:
		*dst = v
	case nvml.ERROR_NOT_SUPPORTED:
	default:
		return mapReturn(op, ret)
	}
	return nil
}

// busID is NVML's domain:bus:device.function form in upper case, e.g.
// "00000000:18:00.0", formatted from the numeric fields when the string is
// empty.
func busID(p nvml.PciInfo) string {
	s := cString(p.BusId[:])
	if s == "" {
		s = fmt.Sprintf("%08X:%02X:%02X.0", p.Domain, p.Bus, p.Device)
	}
	return strings.ToUpper(s)
}

// cString converts a NUL-terminated C char array.
func cString(b []int8) string {
	out := make([]byte, 0, len(b))
	for _, c := range b {
		if c == 0 {
			break
		}
		out = append(out, byte(c))
	}
	return string(out)
}

// gpuByUUID finds a physical GPU. Anything that is not a "GPU-" UUID
// NVML knows (a MIG device's UUID included) is gpu.ErrNotFound; NVML
// answers INVALID_ARGUMENT for a malformed UUID, which is not found too.
func (b *Backend) gpuByUUID(uuid string) (nvml.Device, error) {
	if !strings.HasPrefix(uuid, "GPU-") {
		return nil, fmt.Errorf("no gpu %q: %w", uuid, gpu.ErrNotFound)
	}
	dev, ret := b.lib.DeviceGetHandleByUUID(uuid)
	switch ret {
	case nvml.SUCCESS:
		return dev, nil
	case nvml.ERROR_NOT_FOUND, nvml.ERROR_INVALID_ARGUMENT:
		return nil, fmt.Errorf("no gpu %q: %w", uuid, gpu.ErrNotFound)
	default:
		return nil, mapReturn("look up gpu", ret)
	}
}
