package sim

import (
	"fmt"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/gpuaas/gpuaas/agent/gpu"
)

// The driver's MIG capability numbering. The kernel module (nv-caps.c)
// builds one static table at load time and numbers its entries in order
// from 0: the nvlink fabric-mgmt capability (0), mig/config (1),
// mig/monitor (2), then for each GPU minor 0..31, for each GPU instance id
// 0..14, the GI's access capability followed by the access capabilities of
// its compute instances 0..7. /proc/driver/nvidia-caps/mig-minors prints
// that table; the minors do not depend on which instances exist.
const (
	capsFirstGPUMinor = 3
	capsGIsPerGPU     = 15
	capsCIsPerGI      = 8
	capsPerGI         = 1 + capsCIsPerGI
	capsPerGPU        = capsGIsPerGPU * capsPerGI
)

// GIAccessMinor is the minor of /dev/nvidia-caps/nvidia-cap<minor> for
// capability gpu<gpuMinor>/gi<gi>/access, as the driver numbers it:
// 3 + 135*gpuMinor + 9*gi. Valid for gpuMinor < 32 and gi < 15.
func GIAccessMinor(gpuMinor, gi int) uint32 {
	return uint32(capsFirstGPUMinor + gpuMinor*capsPerGPU + gi*capsPerGI)
}

// CIAccessMinor is the minor for capability gpu<gpuMinor>/gi<gi>/ci<ci>/access:
// the GI's minor + 1 + ci. Valid for gpuMinor < 32, gi < 15 and ci < 8.
func CIAccessMinor(gpuMinor, gi, ci int) uint32 {
	return GIAccessMinor(gpuMinor, gi) + 1 + uint32(ci)
}

// MIGMinors renders /proc/driver/nvidia-caps/mig-minors as the driver
// prints it (the whole static table), for tests that give code under test a
// fake procfs.
func MIGMinors() string {
	var b strings.Builder
	b.WriteString("config 1\nmonitor 2\n")
	for g := range MaxGPUs {
		for gi := range capsGIsPerGPU {
			fmt.Fprintf(&b, "gpu%d/gi%d/access %d\n", g, gi, GIAccessMinor(g, gi))
			for ci := range capsCIsPerGI {
				fmt.Fprintf(&b, "gpu%d/gi%d/ci%d/access %d\n", g, gi, ci, CIAccessMinor(g, gi, ci))
			}
		}
	}
	return b.String()
}

// deviceNodes are the nodes a container needs for one MIG device: the
// parent GPU, the control device, UVM and its tools node, and the GI and CI
// access capabilities.
func (s *Sim) deviceNodes(gpuMinor, gi, ci int) []gpu.DeviceNode {
	dev := func(name string) string { return filepath.Join(s.cfg.DevRoot, name) }
	giCap := GIAccessMinor(gpuMinor, gi)
	ciCap := CIAccessMinor(gpuMinor, gi, ci)
	capPath := func(minor uint32) string {
		return dev(filepath.Join("nvidia-caps", "nvidia-cap"+strconv.FormatUint(uint64(minor), 10)))
	}
	return []gpu.DeviceNode{
		{Path: dev("nvidia" + strconv.Itoa(gpuMinor)), Major: nvidiaMajor, Minor: uint32(gpuMinor)},
		{Path: dev("nvidiactl"), Major: nvidiaMajor, Minor: nvidiactlMinor},
		{Path: dev("nvidia-uvm"), Major: s.cfg.UVMMajor, Minor: uvmMinor},
		{Path: dev("nvidia-uvm-tools"), Major: s.cfg.UVMMajor, Minor: uvmToolsMinor},
		{Path: capPath(giCap), Major: s.cfg.CapsMajor, Minor: giCap},
		{Path: capPath(ciCap), Major: s.cfg.CapsMajor, Minor: ciCap},
	}
}
