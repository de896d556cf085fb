package nvml

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"github.com/gpuaas/gpuaas/agent/gpu"
)

// The driver's fixed character device numbers (NVIDIA's documented major
// 195 for /dev/nvidia<minor> and /dev/nvidiactl). nvidia-uvm and
// nvidia-caps have dynamic majors: they come from the node or from
// /proc/devices, never from a guess.
const (
	nvidiaMajor    = 195
	nvidiactlMinor = 255
	uvmMinor       = 0
	uvmToolsMinor  = 1
)

// Driver names in /proc/devices.
const (
	procDevicesUVM  = "nvidia-uvm"
	procDevicesCaps = "nvidia-caps"
)

// devNodes resolves the device nodes a container needs for a MIG device.
type devNodes struct {
	devRoot, procRoot string
}

// nodeTable is one reading of procfs: what devNodes needs to name the
// nodes of every MIG device on the host.
type nodeTable struct {
	devRoot  string
	majors   map[string]uint32 // character majors from /proc/devices; nil if unreadable
	majorErr error             // why majors is nil
	minors   migMinors
}

// read reads /proc/devices and the MIG capability table. An unreadable or
// malformed mig-minors is an error wrapping gpu.ErrDriverUnavailable: a
// MIG device cannot be isolated without its capability nodes. An
// unreadable /proc/devices is tolerated here (nodes that exist are
// stat'ed); resolving a node that needs it then fails.
func (d devNodes) read() (nodeTable, error) {
	t := nodeTable{devRoot: d.devRoot}
	path := filepath.Join(d.procRoot, "driver", "nvidia-caps", "mig-minors")
	f, err := os.Open(path)
	if err != nil {
		return nodeTable{}, fmt.Errorf("read mig capability minors: %w: %w", err, gpu.ErrDriverUnavailable)
	}
	defer f.Close()
	if t.minors, err = parseMIGMinors(f); err != nil {
		return nodeTable{}, fmt.Errorf("read mig capability minors from %s: %w: %w", path, err, gpu.ErrDriverUnavailable)
	}
	devices := filepath.Join(d.procRoot, "devices")
	df, err := os.Open(devices)
	if err == nil {
		defer df.Close()
		t.majors, err = parseProcDevices(df)
	}
	if err != nil {
		t.majorErr = fmt.Errorf("read %s: %w", devices, err)
	}
	return t, nil
}

// migDeviceNodes lists the nodes of compute instance ci of GPU instance gi
// on the GPU with the minor number gpuMinor: the parent GPU, nvidiactl,
// nvidia-uvm and nvidia-uvm-tools, and the GI and CI access capabilities.
func (t nodeTable) migDeviceNodes(gpuMinor, gi, ci int) ([]gpu.DeviceNode, error) {
	giCap, ok := t.minors.Caps[migCap{GPU: gpuMinor, GI: gi, CI: -1}]
	if !ok {
		return nil, fmt.Errorf("mig-minors lists no %s: %w", migCap{GPU: gpuMinor, GI: gi, CI: -1}, gpu.ErrDriverUnavailable)
	}
	ciCap, ok := t.minors.Caps[migCap{GPU: gpuMinor, GI: gi, CI: ci}]
	if !ok {
		return nil, fmt.Errorf("mig-minors lists no %s: %w", migCap{GPU: gpuMinor, GI: gi, CI: ci}, gpu.ErrDriverUnavailable)
	}
	specs := []nodeSpec{
		{name: "nvidia" + strconv.Itoa(gpuMinor), major: nvidiaMajor, minor: uint32(gpuMinor)},
		{name: "nvidiactl", major: nvidiaMajor, minor: nvidiactlMinor},
		{name: "nvidia-uvm", driver: procDevicesUVM, minor: uvmMinor},
		{name: "nvidia-uvm-tools", driver: procDevicesUVM, minor: uvmToolsMinor},
		{name: capNodeName(giCap), driver: procDevicesCaps, minor: giCap, fixedMinor: true},
		{name: capNodeName(ciCap), driver: procDevicesCaps, minor: ciCap, fixedMinor: true},
	}
	out := make([]gpu.DeviceNode, 0, len(specs))
	for _, s := range specs {
		n, err := t.resolve(s)
		if err != nil {
			return nil, err
		}
		out = append(out, n)
	}
	return out, nil
}

func capNodeName(minor uint32) string {
	return filepath.Join("nvidia-caps", "nvidia-cap"+strconv.FormatUint(uint64(minor), 10))
}

// nodeSpec is one node to resolve: its name under the dev root, and where
// its numbers come from when the node cannot be stat'ed: a documented
// major, or the driver's entry in /proc/devices.
type nodeSpec struct {
	name   string
	major  uint32 // documented major; 0 when dynamic (see driver)
	driver string // /proc/devices name of a dynamic major
	minor  uint32
	// fixedMinor: the minor is part of the name (a capability node) and
	// is kept even if a stale node on disk says otherwise.
	fixedMinor bool
}

// resolve reads a node's numbers from the node itself when it is a
// character device, else from the documented major or /proc/devices.
func (t nodeTable) resolve(s nodeSpec) (gpu.DeviceNode, error) {
	path := filepath.Join(t.devRoot, s.name)
	n := gpu.DeviceNode{Path: path, Major: s.major, Minor: s.minor}
	if major, minor, ok := charDevice(path); ok {
		n.Major = major
		if !s.fixedMinor {
			n.Minor = minor
		}
		return n, nil
	}
	if s.driver == "" {
		return n, nil
	}
	if t.majors == nil {
		return gpu.DeviceNode{}, fmt.Errorf("major of %s: no character device there and %w: %w", path, t.majorErr, gpu.ErrDriverUnavailable)
	}
	major, ok := t.majors[s.driver]
	if !ok {
		return gpu.DeviceNode{}, fmt.Errorf("major of %s: no character device there and no %q in /proc/devices (%s): %w",
			path, s.driver, loadHint(s.driver), gpu.ErrDriverUnavailable)
	}
	n.Major = major
	return n, nil
}

// loadHint says how to load the kernel module behind a dynamic major.
func loadHint(driver string) string {
	if driver == procDevicesUVM {
		return "is the nvidia-uvm module loaded? nvidia-modprobe -u -c=0 loads it"
	}
	return "does this driver support MIG capabilities?"
}
