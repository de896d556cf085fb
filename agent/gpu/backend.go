// Package gpu is the agent's seam to the GPU driver: the part of NVML the
// agent uses, and no more. Two backends implement it: nvml (the real driver
// through go-nvml) and sim (a simulator that enforces the driver's MIG
// rules). Code above this package never talks to NVML directly.
//
// Errors are the sentinel classes below, wrapped with context; callers test
// them with errors.Is, never by message.
package gpu

import (
	"context"
	"errors"
	"time"

	"github.com/gpuaas/gpuaas/pkg/mig"
)

// Error classes, mirroring the NVML return codes the agent acts on.
var (
	// ErrNotFound: no such GPU, GPU instance or compute instance.
	ErrNotFound = errors.New("not found")
	// ErrInsufficientResources: the placement overlaps an existing instance,
	// or the GPU has no capacity left for the profile
	// (NVML_ERROR_INSUFFICIENT_RESOURCES).
	ErrInsufficientResources = errors.New("insufficient resources")
	// ErrInUse: the instance still has children (a GPU instance with compute
	// instances) or the GPU has instances while MIG mode is being changed
	// (NVML_ERROR_IN_USE).
	ErrInUse = errors.New("in use")
	// ErrInvalidArgument: unknown profile, a placement the profile does not
	// allow, or another malformed request (NVML_ERROR_INVALID_ARGUMENT).
	ErrInvalidArgument = errors.New("invalid argument")
	// ErrNotSupported: the GPU does not support MIG, or MIG mode is not
	// enabled (or only pending) for a MIG operation
	// (NVML_ERROR_NOT_SUPPORTED).
	ErrNotSupported = errors.New("not supported")
	// ErrDriverUnavailable: the driver library could not be loaded or
	// initialised (NVML_ERROR_LIBRARY_NOT_FOUND, DRIVER_NOT_LOADED).
	ErrDriverUnavailable = errors.New("driver unavailable")
)

// Device is one physical GPU as the driver reports it.
type Device struct {
	Index         int
	UUID          string // "GPU-..."
	Name          string // "NVIDIA H200"
	PCIBusID      string // "00000000:18:00.0"
	PCIDeviceID   uint32 // device id in the upper 16 bits as NVML reports pciDeviceId, e.g. 0x233510DE
	MemoryMiB     uint64
	Serial        string
	VBIOSVersion  string
	MIGCapable    bool
	MinorNumber   int // /dev/nvidia<minor>
	DriverVersion string
}

// MIGMode is the current and pending MIG mode of a GPU. A change becomes
// current only after the GPU is reset (or, on Hopper and later, after all
// clients have released it), exactly as the driver reports it.
type MIGMode struct {
	Current bool
	Pending bool
}

// GPUInstanceProfile is what the driver reports for one GPU instance profile
// on one GPU.
type GPUInstanceProfile struct {
	ID                  mig.ProfileID
	Name                string // e.g. "1g.18gb", derived from sizes, informational
	SliceCount          int
	MemorySlots         int
	MemoryMiB           uint64
	MultiprocessorCount int
	InstanceCount       int // maximum number of instances of this profile on an empty GPU
	Remaining           int // how many more could be created now (capacity)
}

// GPUInstance is a created GPU instance.
type GPUInstance struct {
	GPUUUID   string
	ID        int // GPU instance id, unique per GPU
	ProfileID mig.ProfileID
	Placement mig.Placement
}

// ComputeInstance is a created compute instance inside a GPU instance.
type ComputeInstance struct {
	GPUUUID       string
	GPUInstanceID int
	ID            int // compute instance id, unique per GPU instance
	ProfileID     int // compute instance profile id
	SliceCount    int
}

// MIGDevice is the handle a workload sees: one compute instance of one GPU
// instance, with its UUID and the device nodes a container needs.
type MIGDevice struct {
	UUID              string // "MIG-..."
	GPUUUID           string
	GPUInstanceID     int
	ComputeInstanceID int
	ProfileID         mig.ProfileID
	Placement         mig.Placement
	MemoryMiB         uint64
	// DeviceNodes are the paths a container needs for this partition: the
	// parent /dev/nvidiaN, /dev/nvidiactl, /dev/nvidia-uvm,
	// /dev/nvidia-uvm-tools, and the GI and CI access capability nodes
	// under /dev/nvidia-caps.
	DeviceNodes []DeviceNode
}

// DeviceNode is a character device a container may open.
type DeviceNode struct {
	Path  string
	Major uint32
	Minor uint32
}

// Backend is the NVML surface the agent uses. Implementations are safe for
// concurrent use.
type Backend interface {
	// Observer is the read-only telemetry and event surface.
	Observer

	// DriverVersion is the kernel driver's version string.
	DriverVersion(ctx context.Context) (string, error)
	// Devices lists the physical GPUs in index order.
	Devices(ctx context.Context) ([]Device, error)

	// MIGMode reports the current and pending mode of the GPU.
	MIGMode(ctx context.Context, gpuUUID string) (MIGMode, error)
	// SetMIGMode requests a mode change; it fails with ErrInUse while the GPU
	// has GPU instances. The change may stay pending (see MIGMode).
	SetMIGMode(ctx context.Context, gpuUUID string, enabled bool) (MIGMode, error)

	// GPUInstanceProfiles lists the GPU instance profiles of the GPU with
	// their remaining capacity. Fails with ErrNotSupported when MIG is not
	// currently enabled.
	GPUInstanceProfiles(ctx context.Context, gpuUUID string) ([]GPUInstanceProfile, error)
	// PossiblePlacements lists the placements at which an instance of the
	// profile could be created now (free and allowed).
	PossiblePlacements(ctx context.Context, gpuUUID string, profile mig.ProfileID) ([]mig.Placement, error)
	// CreateGPUInstance creates a GPU instance of the profile at exactly
	// the placement given. ErrInsufficientResources when it overlaps an
	// existing instance or capacity is exhausted; ErrInvalidArgument when the
	// profile does not allow that placement.
	CreateGPUInstance(ctx context.Context, gpuUUID string, profile mig.ProfileID, at mig.Placement) (GPUInstance, error)
	// GPUInstances lists the GPU instances on the GPU.
	GPUInstances(ctx context.Context, gpuUUID string) ([]GPUInstance, error)
	// DestroyGPUInstance destroys the GPU instance; ErrInUse while it has
	// compute instances.
	DestroyGPUInstance(ctx context.Context, gpuUUID string, gpuInstanceID int) error

	// CreateComputeInstance creates the GPU instance's full-size compute
	// instance (the default compute profile, as nvidia-smi mig -cgi ... -C
	// does).
	CreateComputeInstance(ctx context.Context, gpuUUID string, gpuInstanceID int) (ComputeInstance, error)
	// ComputeInstances lists the compute instances of a GPU instance.
	ComputeInstances(ctx context.Context, gpuUUID string, gpuInstanceID int) ([]ComputeInstance, error)
	// DestroyComputeInstance destroys a compute instance; ErrInUse while a
	// process is running on it.
	DestroyComputeInstance(ctx context.Context, gpuUUID string, gpuInstanceID, computeInstanceID int) error

	// MIGDevices lists the MIG devices (one per compute instance) of a GPU.
	MIGDevices(ctx context.Context, gpuUUID string) ([]MIGDevice, error)
}

// Telemetry is one reading of a GPU or of one MIG device. Fields a device
// does not report (a MIG device has no power or temperature of its own) are
// nil; never a made-up zero.
type Telemetry struct {
	Time time.Time
	// GPU or MIG device UUID the reading is of.
	UUID string
	// Utilization of the graphics engine in percent (for a MIG device: its
	// GR engine activity).
	UtilizationPct *uint32
	MemoryUsedMiB  *uint64
	MemoryFreeMiB  *uint64
	PowerMilliWatt *uint32
	TemperatureC   *uint32
	// ECC errors since driver load.
	ECCCorrectedVolatile   *uint64
	ECCUncorrectedVolatile *uint64
	// Remapped rows and whether a remap is pending a reset.
	RemappedRowsCorrectable   *uint32
	RemappedRowsUncorrectable *uint32
	RemapPending              *bool
	RemapFailed               *bool
	SMClockMHz                *uint32
	MemoryClockMHz            *uint32
	// ThrottleReasons is NVML's clocks event reasons bit mask.
	ThrottleReasons *uint64
}

// EventKind is what an Event reports.
type EventKind string

const (
	EventXID            EventKind = "xid"
	EventECCSingleBit   EventKind = "ecc-single-bit"
	EventECCDoubleBit   EventKind = "ecc-double-bit"
	EventDriverRestart  EventKind = "driver-restart"
	EventMonitorStopped EventKind = "monitor-stopped"
)

// WholeGPU is the GPU/compute instance id NVML reports for an event that is
// not attributed to one MIG instance.
const WholeGPU = 0xFFFFFFFF

// Event is one critical event from the driver.
type Event struct {
	Time    time.Time
	Kind    EventKind
	GPUUUID string
	// XID is the XID number for EventXID.
	XID uint64
	// GPUInstanceID and ComputeInstanceID attribute the event to a MIG
	// device; WholeGPU when it concerns the whole GPU.
	GPUInstanceID     uint32
	ComputeInstanceID uint32
}

// CCEvidence is a GPU's confidential-computing attestation evidence, or
// why there is none. Status is "attested" with a report, else a stated
// "not available (...)" reason; it is never empty.
type CCEvidence struct {
	Status string
	// Report is the GPU's attestation report over the nonce, as the
	// driver returns it; Certificates its attestation certificate chain.
	Report       []byte
	Certificates []byte
}

// CCAttester is implemented by a backend that can read a GPU's
// confidential-computing evidence (the NVML backend). It is read-only.
type CCAttester interface {
	ConfidentialCompute(ctx context.Context, gpuUUID string, nonce []byte) (CCEvidence, error)
}

// Observer is the read-only health and telemetry surface of a backend.
type Observer interface {
	// DeviceTelemetry reads a physical GPU; ErrNotFound for an unknown
	// UUID.
	DeviceTelemetry(ctx context.Context, gpuUUID string) (Telemetry, error)
	// MIGTelemetry reads one MIG device (by its "MIG-..." UUID);
	// ErrNotFound for a UUID that is not a current MIG device. Power and
	// temperature are always nil: a MIG device has none of its own.
	MIGTelemetry(ctx context.Context, migUUID string) (Telemetry, error)
	// Events delivers XID and ECC events until ctx ends; the channel is
	// closed then. Every subscriber gets every event. Events that cannot
	// be delivered because the reader is too slow are dropped, never
	// queued without bound, and counted (each backend's Dropped method).
	// A ctx that has already ended gives its error and no channel.
	Events(ctx context.Context) (<-chan Event, error)
}
