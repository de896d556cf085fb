package sim

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

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
	dev, capPath := s.devPath, s.capPath
	giCap := GIAccessMinor(gpuMinor, gi)
	ciCap := CIAccessMinor(gpuMinor, gi, ci)
	return []gpu.DeviceNode{
		{Path: dev("nvidia" + strconv.Itoa(gpuMinor)), Major: nvidiaMajor, Minor: uint32(gpuMinor)},
		{Path: dev("nvidiactl"), Major: nvidiaMajor, Minor: nvidiactlMinor},
		{Path: dev("nvidia-uvm"), Major: s.cfg.UVMMajor, Minor: uvmMinor},
		{Path: dev("nvidia-uvm-tools"), Major: s.cfg.UVMMajor, Minor: uvmToolsMinor},
		{Path: capPath(giCap), Major: s.cfg.CapsMajor, Minor: giCap},
		{Path: capPath(ciCap), Major: s.cfg.CapsMajor, Minor: ciCap},
	}
}

// Permissions of the nodes as the driver and nvidia-modprobe make them.
const (
	modeDeviceNode = 0o666 // nvidia<minor>, nvidiactl, nvidia-uvm(-tools)
	modeConfigCap  = 0o400 // nvidia-caps/nvidia-cap1: mig/config
	modeReadCap    = 0o444 // mig/monitor and the instance access caps
)

// The static capability minors (see MIGMinors).
const (
	configCapMinor  = 1
	monitorCapMinor = 2
)

func (s *Sim) devPath(name string) string { return filepath.Join(s.cfg.DevRoot, name) }

func (s *Sim) capPath(minor uint32) string {
	return filepath.Join(s.cfg.DevRoot, "nvidia-caps", "nvidia-cap"+strconv.FormatUint(uint64(minor), 10))
}

// capNodes are the capability nodes a GPU's state implies: one per GPU
// instance and one per compute instance, by ascending minor.
func (s *Sim) capNodes(g *simGPU, rec gpuRecord) []gpu.DeviceNode {
	var out []gpu.DeviceNode
	for _, gi := range rec.GPUInstances {
		m := GIAccessMinor(g.dev.MinorNumber, gi.ID)
		out = append(out, gpu.DeviceNode{Path: s.capPath(m), Major: s.cfg.CapsMajor, Minor: m})
		for _, ci := range gi.ComputeInstances {
			m := CIAccessMinor(g.dev.MinorNumber, gi.ID, ci.ID)
			out = append(out, gpu.DeviceNode{Path: s.capPath(m), Major: s.cfg.CapsMajor, Minor: m})
		}
	}
	slices.SortFunc(out, func(a, b gpu.DeviceNode) int { return int(a.Minor) - int(b.Minor) })
	return out
}

// createNodes makes the static nodes and every instance's capability nodes
// (Config.CreateNodes); New calls it before the simulator is shared.
func (s *Sim) createNodes() error {
	if err := os.MkdirAll(filepath.Join(s.cfg.DevRoot, "nvidia-caps"), 0o755); err != nil {
		return fmt.Errorf("create device nodes: %w", err)
	}
	nodes := []struct {
		n    gpu.DeviceNode
		mode os.FileMode
	}{
		{gpu.DeviceNode{Path: s.devPath("nvidiactl"), Major: nvidiaMajor, Minor: nvidiactlMinor}, modeDeviceNode},
		{gpu.DeviceNode{Path: s.devPath("nvidia-uvm"), Major: s.cfg.UVMMajor, Minor: uvmMinor}, modeDeviceNode},
		{gpu.DeviceNode{Path: s.devPath("nvidia-uvm-tools"), Major: s.cfg.UVMMajor, Minor: uvmToolsMinor}, modeDeviceNode},
		{gpu.DeviceNode{Path: s.capPath(configCapMinor), Major: s.cfg.CapsMajor, Minor: configCapMinor}, modeConfigCap},
		{gpu.DeviceNode{Path: s.capPath(monitorCapMinor), Major: s.cfg.CapsMajor, Minor: monitorCapMinor}, modeReadCap},
	}
	for _, g := range s.gpus {
		minor := uint32(g.dev.MinorNumber)
		nodes = append(nodes, struct {
			n    gpu.DeviceNode
			mode os.FileMode
		}{gpu.DeviceNode{Path: s.devPath("nvidia" + strconv.FormatUint(uint64(minor), 10)), Major: nvidiaMajor, Minor: minor}, modeDeviceNode})
	}
	for _, n := range nodes {
		if err := ensureCharDev(n.n, n.mode); err != nil {
			return fmt.Errorf("create device nodes: %w", err)
		}
	}
	for _, g := range s.gpus {
		if err := s.syncCapNodes(g, g.rec); err != nil {
			return err
		}
	}
	return nil
}

// syncCapNodes makes the capability nodes of one GPU those its state rec
// implies: missing ones are created (anything else at such a path is an
// error), ones of instances that no longer exist removed. Only names in
// this GPU's slice of the capability table are looked at, and only
// character devices with the caps major and the name's minor, which the
// simulator made, are removed; anything else there is left alone.
func (s *Sim) syncCapNodes(g *simGPU, rec gpuRecord) error {
	want := map[uint32]bool{}
	for _, n := range s.capNodes(g, rec) {
		want[n.Minor] = true
		if err := ensureCharDev(n, modeReadCap); err != nil {
			return fmt.Errorf("sync capability nodes of %s: %w", g.dev.UUID, err)
		}
	}
	dir := filepath.Join(s.cfg.DevRoot, "nvidia-caps")
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("sync capability nodes of %s: %w", g.dev.UUID, err)
	}
	first := GIAccessMinor(g.dev.MinorNumber, 0)
	for _, e := range entries {
		n, err := strconv.ParseUint(strings.TrimPrefix(e.Name(), "nvidia-cap"), 10, 32)
		if err != nil || !strings.HasPrefix(e.Name(), "nvidia-cap") {
			continue
		}
		minor := uint32(n)
		if minor < first || minor >= first+capsPerGPU || want[minor] {
			continue
		}
		node := gpu.DeviceNode{Path: filepath.Join(dir, e.Name()), Major: s.cfg.CapsMajor, Minor: minor}
		if err := removeCharDev(node); err != nil && !errors.Is(err, errForeignNode) {
			return fmt.Errorf("sync capability nodes of %s: %w", g.dev.UUID, err)
		}
	}
	return nil
}

// charDev reports whether fi is a character device and its numbers.
func charDev(fi os.FileInfo) (major, minor uint32, ok bool) {
	st, isStat := fi.Sys().(*syscall.Stat_t)
	if fi.Mode()&os.ModeCharDevice == 0 || !isStat {
		return 0, 0, false
	}
	rdev := uint64(st.Rdev) // uint32 on some platforms
	return unix.Major(rdev), unix.Minor(rdev), true
}

// ensureCharDev makes the node unless it already exists with the same
// numbers; anything else at the path is an error, never replaced.
func ensureCharDev(n gpu.DeviceNode, mode os.FileMode) error {
	fi, err := os.Lstat(n.Path)
	if err == nil {
		if major, minor, ok := charDev(fi); ok && major == n.Major && minor == n.Minor {
			return nil
		}
		return fmt.Errorf("%s exists and is not character device %d:%d", n.Path, n.Major, n.Minor)
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if err := unix.Mknod(n.Path, unix.S_IFCHR|uint32(mode.Perm()), int(unix.Mkdev(n.Major, n.Minor))); err != nil {
		return fmt.Errorf("mknod %s c %d %d: %w", n.Path, n.Major, n.Minor, err)
	}
	// mknod applies the umask; the driver's modes do not.
	if err := os.Chmod(n.Path, mode.Perm()); err != nil {
		return err
	}
	return nil
}

// errForeignNode: something other than the expected node is at a path.
var errForeignNode = errors.New("not the simulator's node")

// removeCharDev removes the node if it is the character device given; a
// missing node is not an error, anything else at the path is
// errForeignNode.
func removeCharDev(n gpu.DeviceNode) error {
	fi, err := os.Lstat(n.Path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if major, minor, ok := charDev(fi); !ok || major != n.Major || minor != n.Minor {
		return fmt.Errorf("not removing %s: not character device %d:%d: %w", n.Path, n.Major, n.Minor, errForeignNode)
	}
	if err := os.Remove(n.Path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// writeMIGMinors writes the capability table (MIGMinors) to path, read-only
// as procfs has it.
func writeMIGMinors(path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("write mig-minors: %w", err)
	}
	if err := writeFileAtomic(path, []byte(MIGMinors())); err != nil {
		return fmt.Errorf("write mig-minors %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o444); err != nil {
		return fmt.Errorf("write mig-minors %s: %w", path, err)
	}
	return nil
}
