// Package sim is a simulated GPU driver implementing gpu.Backend: the test
// backend for the whole agent, on machines without NVIDIA hardware.
//
// It is a fake, not a mock: it enforces what the real driver enforces, so
// code that passes against it behaves on hardware. MIG placement rules come
// from pkg/mig (Model.Check is the one source of truth); on top of them the
// simulator models the driver's state machine: pending MIG mode that becomes
// current on a GPU reset, IN_USE for a GPU instance that still has compute
// instances or a compute instance a process holds, GPU instance ids derived
// from the placement as the driver derives them, MIG device UUIDs and the
// device nodes (with the driver's capability minors) a container needs.
//
// With Config.StatePath set, MIG mode, every GPU and compute instance and
// the injected ECC history are saved to a file on each change and loaded by
// New, so a restarted agent sees what the "driver" still holds, as on a real
// host.
//
// The simulator is also a gpu.Observer: telemetry is derived from the state
// (attached processes drive utilization, memory and power) with small
// deterministic jitter, and XID and ECC events are injected by tests
// (InjectXID, InjectECC) and fanned out to every subscriber.
//
// Device nodes are only reported unless Config.CreateNodes is set; then the
// simulator makes them under Config.DevRoot with mknod, at the driver's
// majors and minors, and keeps the MIG capability nodes in step with the
// instances, so the runtime and the eBPF device filter meet realistic
// nodes. It never replaces or removes what it did not make: anything else
// in the way of a node it needs is an error. Never point CreateNodes at the
// /dev of a host with a real NVIDIA driver.
package sim

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/pkg/mig"
)

// Defaults for Config fields left zero.
const (
	// DefaultDriverVersion is the driver version reported when
	// Config.DriverVersion is empty.
	DefaultDriverVersion = "570.172.08"
	// DefaultDevRoot is where device nodes are reported when Config.DevRoot
	// is empty.
	DefaultDevRoot = "/dev"
	// DefaultUVMMajor is the character major of /dev/nvidia-uvm when
	// Config.UVMMajor is zero. The real major is dynamic (read it from
	// /proc/devices on a host).
	DefaultUVMMajor = 510
	// DefaultCapsMajor is the character major of /dev/nvidia-caps/* when
	// Config.CapsMajor is zero; dynamic on a real host too.
	DefaultCapsMajor = 511
	// DefaultEventBuffer is the per-subscriber event buffer when
	// Config.EventBuffer is zero.
	DefaultEventBuffer = 64
)

// The driver's fixed character majors and minors.
const (
	nvidiaMajor    = 195 // /dev/nvidia<minor> and /dev/nvidiactl
	nvidiactlMinor = 255
	uvmMinor       = 0
	uvmToolsMinor  = 1
)

// MaxGPUs is the most GPUs one simulated host may have: the driver's MIG
// capability table covers GPU minors 0 to 31.
const MaxGPUs = 32

// Config describes the simulated host.
type Config struct {
	// GPUs in index order; the index is also the minor number.
	GPUs []GPUConfig
	// StatePath, if set, is the file MIG state is persisted to (JSON,
	// replaced atomically on every change) and loaded from by New. Empty
	// keeps state in memory only, as if the driver were reloaded with the
	// process.
	StatePath string
	// DriverVersion reported by DriverVersion and Devices; default
	// DefaultDriverVersion.
	DriverVersion string
	// ImmediateModeChange makes SetMIGMode take effect at once (current ==
	// pending on return), as a Hopper GPU does when no client holds it. When
	// false, a change stays pending until ResetGPU, the conservative model
	// that callers must handle on any GPU.
	ImmediateModeChange bool
	// HostID is the simulator's seed. It is mixed into every derived
	// identifier (GPU and MIG UUIDs, serials) and into the telemetry
	// jitter, so that simulated hosts in one test differ while the same
	// HostID and GPUs always give the same identifiers and, for the same
	// sequence of calls, the same readings.
	HostID string
	// DevRoot prefixes device node paths; default DefaultDevRoot.
	DevRoot string
	// CreateNodes makes New create the device nodes under DevRoot with
	// mknod (root, or CAP_MKNOD): nvidiactl and nvidia<minor> at major
	// 195, nvidia-uvm and nvidia-uvm-tools at UVMMajor, and under
	// nvidia-caps the config and monitor capabilities (nvidia-cap1, 2) and
	// the access capability of every GPU and compute instance, at
	// CapsMajor. Instance capability nodes then follow creates, destroys
	// and resets. Off, nodes are only reported (MIGDevices).
	CreateNodes bool
	// MIGMinorsPath, if set, is where New writes the driver's capability
	// table in /proc/driver/nvidia-caps/mig-minors format (MIGMinors), for
	// code that reads the minors from procfs. Parent directories are
	// created.
	MIGMinorsPath string
	// Now is the clock for telemetry and event times; default time.Now.
	Now func() time.Time
	// EventBuffer is how many events each Events subscriber may have
	// undelivered before further events to it are dropped (and counted by
	// Dropped); default DefaultEventBuffer.
	EventBuffer int
	// UVMMajor is the major of /dev/nvidia-uvm and /dev/nvidia-uvm-tools;
	// default DefaultUVMMajor.
	UVMMajor uint32
	// CapsMajor is the major of the /dev/nvidia-caps capability nodes;
	// default DefaultCapsMajor.
	CapsMajor uint32
}

// GPUConfig describes one simulated GPU.
type GPUConfig struct {
	// Model is a model name as mig.LookupModel accepts it: the NVML name
	// ("NVIDIA H200") or a short one ("H200", "H100", "A100-40GB",
	// "A100-80GB").
	Model string
	// MIGEnabled is the GPU's MIG mode (current and pending) when no state
	// file records it. A state file, once written, wins: MIG mode survives
	// restarts on hardware too.
	MIGEnabled bool
}

// Sim is a simulated GPU host. It is safe for concurrent use.
type Sim struct {
	cfg Config

	mu       sync.Mutex
	gpus     []*simGPU
	readings uint64 // telemetry readings taken, the jitter's sequence; guarded by mu

	evMu    sync.Mutex
	subs    map[*subscriber]struct{} // guarded by evMu
	dropped atomic.Uint64
}

var _ gpu.Backend = (*Sim)(nil)

// simGPU is one GPU: its fixed identity and its mutable driver state.
type simGPU struct {
	dev   gpu.Device
	model mig.Model
	rec   gpuRecord // guarded by Sim.mu; replaced whole on every change
}

// New builds a simulated host. With Config.StatePath set it loads the state
// file if one exists (a file that does not describe these GPUs or breaks a
// MIG rule is an error, never a panic) and otherwise writes a fresh one.
func New(cfg Config) (*Sim, error) {
	if len(cfg.GPUs) > MaxGPUs {
		return nil, fmt.Errorf("new gpu simulator: %d gpus configured, at most %d", len(cfg.GPUs), MaxGPUs)
	}
	if cfg.DriverVersion == "" {
		cfg.DriverVersion = DefaultDriverVersion
	}
	if cfg.DevRoot == "" {
		cfg.DevRoot = DefaultDevRoot
	}
	if cfg.UVMMajor == 0 {
		cfg.UVMMajor = DefaultUVMMajor
	}
	if cfg.CapsMajor == 0 {
		cfg.CapsMajor = DefaultCapsMajor
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.EventBuffer <= 0 {
		cfg.EventBuffer = DefaultEventBuffer
	}
	cfg.GPUs = slices.Clone(cfg.GPUs)

	s := &Sim{cfg: cfg, subs: map[*subscriber]struct{}{}}
	for i, gc := range cfg.GPUs {
		m, ok := mig.LookupModel(gc.Model)
		if !ok {
			return nil, fmt.Errorf("new gpu simulator: gpu %d: unknown model %q (known: %s)", i, gc.Model, knownModels())
		}
		g := &simGPU{dev: device(cfg, i, m), model: m}
		g.rec = gpuRecord{UUID: g.dev.UUID, MIGCurrent: gc.MIGEnabled, MIGPending: gc.MIGEnabled}
		s.gpus = append(s.gpus, g)
	}
	if err := s.load(); err != nil {
		return nil, fmt.Errorf("new gpu simulator: %w", err)
	}
	if cfg.MIGMinorsPath != "" {
		if err := writeMIGMinors(cfg.MIGMinorsPath); err != nil {
			return nil, fmt.Errorf("new gpu simulator: %w", err)
		}
	}
	if cfg.CreateNodes {
		if err := s.createNodes(); err != nil {
			return nil, fmt.Errorf("new gpu simulator: %w", err)
		}
	}
	return s, nil
}

// load reads the state file, or writes a fresh one when there is none.
func (s *Sim) load() error {
	if s.cfg.StatePath == "" {
		return nil
	}
	loaded, err := loadState(s.cfg.StatePath, s.models())
	switch {
	case errors.Is(err, errNoState):
		return s.save(nil)
	case err != nil:
		return err
	}
	for _, rec := range loaded.GPUs {
		for _, g := range s.gpus {
			if g.rec.UUID == rec.UUID {
				g.rec = rec
			}
		}
	}
	return nil
}

func knownModels() string {
	var names []string
	for _, m := range mig.Models() {
		names = append(names, m.ShortName)
	}
	return fmt.Sprint(names)
}

// models maps each GPU UUID to its model, for the state loader.
func (s *Sim) models() map[string]mig.Model {
	out := make(map[string]mig.Model, len(s.gpus))
	for _, g := range s.gpus {
		out[g.dev.UUID] = g.model
	}
	return out
}

// pciBuses are the bus numbers of the eight GPUs of an HGX board; GPUs past
// the eighth repeat them in the next PCI domain.
var pciBuses = [8]int{0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB}

// vbios is a plausible VBIOS version per model family.
var vbios = map[uint32]string{
	0x20B0: "92.00.25.00.08",
	0x20B2: "92.00.45.00.06",
	0x2330: "96.00.74.00.0D",
	0x2335: "96.00.A5.00.01",
}

func device(cfg Config, index int, m mig.Model) gpu.Device {
	h := digest(cfg.HostID, "gpu", fmt.Sprint(index), m.Name)
	return gpu.Device{
		Index:         index,
		UUID:          "GPU-" + uuidShape(h),
		Name:          m.Name,
		PCIBusID:      fmt.Sprintf("%08X:%02X:00.0", index/len(pciBuses), pciBuses[index%len(pciBuses)]),
		PCIDeviceID:   m.PCIDeviceID<<16 | 0x10DE,
		MemoryMiB:     m.MemoryMiB,
		Serial:        fmt.Sprintf("%013d", binary.BigEndian.Uint64(h[16:24])%10_000_000_000_000),
		VBIOSVersion:  vbios[m.PCIDeviceID],
		MIGCapable:    true,
		MinorNumber:   index,
		DriverVersion: cfg.DriverVersion,
	}
}

// digest hashes the parts, separated so that ("ab","c") and ("a","bc")
// differ.
func digest(parts ...string) [32]byte {
	h := sha256.New()
	for _, p := range parts {
		var n [8]byte
		binary.BigEndian.PutUint64(n[:], uint64(len(p)))
		h.Write(n[:])
		h.Write([]byte(p))
	}
	var out [32]byte
	h.Sum(out[:0])
	return out
}

// uuidShape formats the first 16 bytes as a version-4-shaped UUID.
func uuidShape(h [32]byte) string {
	b := h[:16]
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// migUUID is the MIG device UUID of compute instance ci in GPU instance gi.
func (s *Sim) migUUID(g *simGPU, gi, ci int) string {
	return "MIG-" + uuidShape(digest(s.cfg.HostID, "mig", g.dev.UUID, fmt.Sprint(gi), fmt.Sprint(ci)))
}

// gpuByUUID finds a GPU; the caller holds s.mu.
func (s *Sim) gpuByUUID(uuid string) (*simGPU, error) {
	for _, g := range s.gpus {
		if g.dev.UUID == uuid {
			return g, nil
		}
	}
	return nil, fmt.Errorf("no such gpu: %w", gpu.ErrNotFound)
}

// view runs fn on a GPU's current state under the lock.
func (s *Sim) view(ctx context.Context, uuid string, fn func(g *simGPU) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	g, err := s.gpuByUUID(uuid)
	if err != nil {
		return err
	}
	return fn(g)
}

// update runs fn on a copy of a GPU's state and, if fn succeeds, brings the
// capability nodes (Config.CreateNodes) in line with the copy, persists it
// and makes it current: a failed change, node operation or save leaves the
// simulator, the state file and the nodes as before.
func (s *Sim) update(uuid string, fn func(g *simGPU, rec *gpuRecord) error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	g, err := s.gpuByUUID(uuid)
	if err != nil {
		return err
	}
	next := g.rec.clone()
	if err := fn(g, &next); err != nil {
		return err
	}
	nodesChanged := s.cfg.CreateNodes && !slices.Equal(s.capNodes(g, g.rec), s.capNodes(g, next))
	if nodesChanged {
		if err := s.syncCapNodes(g, next); err != nil {
			// Best effort: put back what the current state had.
			_ = s.syncCapNodes(g, g.rec)
			return err
		}
	}
	if err := s.save(map[string]gpuRecord{uuid: next}); err != nil {
		if nodesChanged {
			_ = s.syncCapNodes(g, g.rec)
		}
		return err
	}
	g.rec = next
	return nil
}

// save writes every GPU's state, with the overrides in place of the current
// records, to the state file; the caller holds s.mu (or New runs alone).
func (s *Sim) save(overrides map[string]gpuRecord) error {
	if s.cfg.StatePath == "" {
		return nil
	}
	st := stateFile{Version: stateVersion}
	for _, g := range s.gpus {
		rec, ok := overrides[g.dev.UUID]
		if !ok {
			rec = g.rec
		}
		st.GPUs = append(st.GPUs, rec)
	}
	return saveState(s.cfg.StatePath, st)
}

// DriverVersion reports Config.DriverVersion.
func (s *Sim) DriverVersion(ctx context.Context) (string, error) {
	if err := ctx.Err(); err != nil {
		return "", err
	}
	return s.cfg.DriverVersion, nil
}

// Devices lists the simulated GPUs in index order.
func (s *Sim) Devices(ctx context.Context) ([]gpu.Device, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	out := make([]gpu.Device, len(s.gpus))
	for i, g := range s.gpus {
		out[i] = g.dev
	}
	return out, nil
}

// ResetGPU simulates a GPU reset (nvidia-smi -r): a pending MIG mode becomes
// current, every GPU and compute instance is gone, as they do not survive
// a reset on hardware, and a pending row remap takes effect. The volatile
// ECC counters count since driver load and survive it. It fails with
// gpu.ErrInUse while a process is attached to one of the GPU's MIG devices,
// and gpu.ErrNotFound for an unknown GPU.
func (s *Sim) ResetGPU(uuid string) error {
	err := s.update(uuid, func(g *simGPU, rec *gpuRecord) error {
		for _, gi := range rec.GPUInstances {
			for _, ci := range gi.ComputeInstances {
				if len(ci.Processes) > 0 {
					return fmt.Errorf("process %d holds %s: %w",
						ci.Processes[0], s.migUUID(g, gi.ID, ci.ID), gpu.ErrInUse)
				}
			}
		}
		rec.MIGCurrent = rec.MIGPending
		rec.GPUInstances = nil
		rec.ECC.RemapPending = false
		return nil
	})
	if err != nil {
		return fmt.Errorf("reset gpu %s: %w", uuid, err)
	}
	return nil
}

// AttachProcess simulates a process (a workload) opening a MIG device: while
// any process is attached, DestroyComputeInstance and ResetGPU fail with
// gpu.ErrInUse. Attaching the same pid twice is a no-op. Errors:
// gpu.ErrNotFound for an unknown MIG device, gpu.ErrInvalidArgument for a pid
// below 1. Attachments are part of the persisted state.
func (s *Sim) AttachProcess(migUUID string, pid int) error {
	if pid < 1 {
		return fmt.Errorf("attach process %d to %s: %w", pid, migUUID, gpu.ErrInvalidArgument)
	}
	err := s.updateMIGDevice(migUUID, func(ci *ciRecord) error {
		if !slices.Contains(ci.Processes, pid) {
			ci.Processes = append(ci.Processes, pid)
			slices.Sort(ci.Processes)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("attach process %d to %s: %w", pid, migUUID, err)
	}
	return nil
}

// DetachProcess simulates the process exiting. gpu.ErrNotFound for an
// unknown MIG device or a pid that is not attached.
func (s *Sim) DetachProcess(migUUID string, pid int) error {
	err := s.updateMIGDevice(migUUID, func(ci *ciRecord) error {
		i := slices.Index(ci.Processes, pid)
		if i < 0 {
			return fmt.Errorf("process %d is not attached: %w", pid, gpu.ErrNotFound)
		}
		ci.Processes = slices.Delete(ci.Processes, i, i+1)
		return nil
	})
	if err != nil {
		return fmt.Errorf("detach process %d from %s: %w", pid, migUUID, err)
	}
	return nil
}

// updateMIGDevice finds the compute instance behind a MIG UUID and updates
// it transactionally.
func (s *Sim) updateMIGDevice(migUUID string, fn func(ci *ciRecord) error) error {
	s.mu.Lock()
	var owner string
	for _, g := range s.gpus {
		for _, gi := range g.rec.GPUInstances {
			for _, ci := range gi.ComputeInstances {
				if s.migUUID(g, gi.ID, ci.ID) == migUUID {
					owner = g.dev.UUID
				}
			}
		}
	}
	s.mu.Unlock()
	if owner == "" {
		return fmt.Errorf("no such mig device: %w", gpu.ErrNotFound)
	}
	// The device may vanish between the lookup and the update; the update
	// searches again under the lock.
	return s.update(owner, func(g *simGPU, rec *gpuRecord) error {
		for i := range rec.GPUInstances {
			gi := &rec.GPUInstances[i]
			for j := range gi.ComputeInstances {
				ci := &gi.ComputeInstances[j]
				if s.migUUID(g, gi.ID, ci.ID) == migUUID {
					return fn(ci)
				}
			}
		}
		return fmt.Errorf("no such mig device: %w", gpu.ErrNotFound)
	})
}
