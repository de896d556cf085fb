package sim_test

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/agent/gpu/sim"
	"github.com/gpuaas/gpuaas/pkg/mig"
	"github.com/gpuaas/gpuaas/test/harness"
)

// requireMknod stops the test unless this process can make character
// device nodes (root or CAP_MKNOD): in CI (CI=true) it fails, elsewhere it
// skips and says why.
func requireMknod(t *testing.T) {
	t.Helper()
	probe := filepath.Join(t.TempDir(), "probe")
	err := unix.Mknod(probe, unix.S_IFCHR|0o600, int(unix.Mkdev(1, 3)))
	if err != nil {
		err = fmt.Errorf("cannot make device nodes (needs root or CAP_MKNOD): %w", err)
	}
	harness.Require(t, err)
}

// statNode returns a node's type, numbers and permissions.
func statNode(t *testing.T, path string) (major, minor uint32, perm fs.FileMode) {
	t.Helper()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatalf("device node: %v", err)
	}
	if fi.Mode()&fs.ModeCharDevice == 0 {
		t.Fatalf("%s is %v, not a character device", path, fi.Mode())
	}
	rdev := uint64(fi.Sys().(*syscall.Stat_t).Rdev)
	return unix.Major(rdev), unix.Minor(rdev), fi.Mode().Perm()
}

func wantNode(t *testing.T, path string, major, minor uint32, perm fs.FileMode) {
	t.Helper()
	ma, mi, p := statNode(t, path)
	if ma != major || mi != minor || p != perm {
		t.Errorf("%s is %d:%d %v, want %d:%d %v", path, ma, mi, p, major, minor, perm)
	}
}

func wantNoNode(t *testing.T, path string) {
	t.Helper()
	if _, err := os.Lstat(path); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("%s still there (%v)", path, err)
	}
}

// capNodes lists the nvidia-cap* names under dev.
func capNodes(t *testing.T, dev string) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(dev, "nvidia-caps"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

func TestDeviceNodes_CreatedOnDisk(t *testing.T) {
	requireMknod(t)
	ctx := t.Context()
	root := t.TempDir()
	dev := filepath.Join(root, "dev")
	cfg := sim.Config{
		GPUs:          []sim.GPUConfig{{Model: "H100"}, {Model: "H200", MIGEnabled: true}},
		StatePath:     filepath.Join(root, "state.json"),
		DevRoot:       dev,
		CreateNodes:   true,
		MIGMinorsPath: filepath.Join(root, "proc/driver/nvidia-caps/mig-minors"),
		UVMMajor:      234, CapsMajor: 236,
	}
	s := newSim(t, cfg)

	wantNode(t, filepath.Join(dev, "nvidiactl"), 195, 255, 0o666)
	wantNode(t, filepath.Join(dev, "nvidia0"), 195, 0, 0o666)
	wantNode(t, filepath.Join(dev, "nvidia1"), 195, 1, 0o666)
	wantNode(t, filepath.Join(dev, "nvidia-uvm"), 234, 0, 0o666)
	wantNode(t, filepath.Join(dev, "nvidia-uvm-tools"), 234, 1, 0o666)
	wantNode(t, filepath.Join(dev, "nvidia-caps/nvidia-cap1"), 236, 1, 0o400)
	wantNode(t, filepath.Join(dev, "nvidia-caps/nvidia-cap2"), 236, 2, 0o444)
	if got := capNodes(t, dev); strings.Join(got, ",") != "nvidia-cap1,nvidia-cap2" {
		t.Errorf("capability nodes before any instance: %v", got)
	}
	minors, err := os.ReadFile(cfg.MIGMinorsPath)
	if err != nil || string(minors) != sim.MIGMinors() {
		t.Errorf("mig-minors file: %v, %d bytes; want MIGMinors()", err, len(minors))
	}

	// A node made at NVIDIA's major with no driver behind it: open gives
	// ENXIO (what the eBPF device filter's tests rely on).
	if data, _ := os.ReadFile("/proc/devices"); !strings.Contains(string(data), " nvidia") {
		f, err := os.OpenFile(filepath.Join(dev, "nvidia1"), os.O_RDWR, 0)
		if err == nil {
			f.Close()
		}
		if !errors.Is(err, syscall.ENXIO) {
			t.Errorf("open of a driverless nvidia node: %v, want ENXIO", err)
		}
	}

	devs, _ := s.Devices(ctx)
	uuid := devs[1].UUID
	gi := mustCreate(t, s, uuid, mig.Profile1g, pl(6, 1)) // gpu1/gi13: 3 + 135 + 117 = 255
	wantNode(t, filepath.Join(dev, "nvidia-caps/nvidia-cap255"), 236, 255, 0o444)
	mustCreateCI(t, s, uuid, gi.ID)
	mds, _ := s.MIGDevices(ctx, uuid)
	for _, n := range mds[0].DeviceNodes {
		ma, mi, _ := statNode(t, n.Path)
		if ma != n.Major || mi != n.Minor {
			t.Errorf("reported node %+v is %d:%d on disk", n, ma, mi)
		}
	}
	big := mustCreate(t, s, uuid, mig.Profile3g, pl(0, 4)) // gi1: 3 + 135 + 9 = 147
	mustCreateCI(t, s, uuid, big.ID)
	if got := strings.Join(capNodes(t, dev), ","); got != "nvidia-cap1,nvidia-cap147,nvidia-cap148,nvidia-cap2,nvidia-cap255,nvidia-cap256" {
		t.Errorf("capability nodes with two MIG devices: %s", got)
	}

	// The agent restarts: the nodes of what the driver holds are still
	// there, and New makes any that went missing.
	if err := os.Remove(filepath.Join(dev, "nvidia-caps/nvidia-cap148")); err != nil {
		t.Fatal(err)
	}
	s = newSim(t, cfg)
	wantNode(t, filepath.Join(dev, "nvidia-caps/nvidia-cap148"), 236, 148, 0o444)

	if err := s.DestroyComputeInstance(ctx, uuid, gi.ID, 0); err != nil {
		t.Fatal(err)
	}
	wantNoNode(t, filepath.Join(dev, "nvidia-caps/nvidia-cap256"))
	wantNode(t, filepath.Join(dev, "nvidia-caps/nvidia-cap255"), 236, 255, 0o444)
	if err := s.DestroyGPUInstance(ctx, uuid, gi.ID); err != nil {
		t.Fatal(err)
	}
	wantNoNode(t, filepath.Join(dev, "nvidia-caps/nvidia-cap255"))

	if err := s.ResetGPU(uuid); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(capNodes(t, dev), ","); got != "nvidia-cap1,nvidia-cap2" {
		t.Errorf("capability nodes after a reset: %s", got)
	}
}

func TestDeviceNodes_SomethingInTheWayChangesNothing(t *testing.T) {
	requireMknod(t)
	ctx := t.Context()
	dev := filepath.Join(t.TempDir(), "dev")
	s := newSim(t, sim.Config{GPUs: []sim.GPUConfig{{Model: "H200", MIGEnabled: true}}, DevRoot: dev, CreateNodes: true})
	devs, _ := s.Devices(ctx)
	uuid := devs[0].UUID

	// gpu0/gi13/access is minor 120; a file there is not ours to replace.
	blocker := filepath.Join(dev, "nvidia-caps/nvidia-cap120")
	if err := os.WriteFile(blocker, []byte("not a node"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateGPUInstance(ctx, uuid, mig.Profile1g, pl(6, 1)); err == nil || !strings.Contains(err.Error(), "nvidia-cap120") {
		t.Fatalf("create with its capability node blocked: %v", err)
	}
	if gis, _ := s.GPUInstances(ctx, uuid); len(gis) != 0 {
		t.Errorf("a failed create left %+v", gis)
	}
	if data, err := os.ReadFile(blocker); err != nil || string(data) != "not a node" {
		t.Errorf("the blocking file was touched: %q, %v", data, err)
	}

	// Elsewhere the blocker is no obstacle: it is left alone, as is a node
	// with other numbers where an instance's node was.
	gi := mustCreate(t, s, uuid, mig.Profile1g, pl(0, 1)) // gi7: minor 66
	node := filepath.Join(dev, "nvidia-caps/nvidia-cap66")
	if err := os.Remove(node); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mknod(node, unix.S_IFCHR|0o444, int(unix.Mkdev(1, 3))); err != nil {
		t.Fatal(err)
	}
	if err := s.DestroyGPUInstance(ctx, uuid, gi.ID); err != nil {
		t.Fatalf("destroy: %v", err)
	}
	wantNode(t, node, 1, 3, 0o444)
	if data, err := os.ReadFile(blocker); err != nil || string(data) != "not a node" {
		t.Errorf("the blocking file was touched: %q, %v", data, err)
	}
}

func TestNew_CreateNodesRefusesAForeignNode(t *testing.T) {
	dev := t.TempDir()
	if err := os.WriteFile(filepath.Join(dev, "nvidiactl"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := sim.New(sim.Config{GPUs: []sim.GPUConfig{{Model: "H200"}}, DevRoot: dev, CreateNodes: true})
	if err == nil || !strings.Contains(err.Error(), "nvidiactl exists and is not character device 195:255") {
		t.Fatalf("New = %v, want a refusal naming nvidiactl", err)
	}
}

func TestNew_NodesOnlyReportedByDefault(t *testing.T) {
	dev := t.TempDir()
	s := newSim(t, sim.Config{GPUs: []sim.GPUConfig{{Model: "H200", MIGEnabled: true}}, DevRoot: dev})
	devs, _ := s.Devices(t.Context())
	gi := mustCreate(t, s, devs[0].UUID, mig.Profile7g, pl(0, 8))
	mustCreateCI(t, s, devs[0].UUID, gi.ID)
	if entries, _ := os.ReadDir(dev); len(entries) != 0 {
		t.Errorf("without CreateNodes the simulator made %v", entries)
	}
	mds, _ := s.MIGDevices(t.Context(), devs[0].UUID)
	if len(mds[0].DeviceNodes) != 6 || !strings.HasPrefix(mds[0].DeviceNodes[0].Path, dev) {
		t.Errorf("reported nodes %+v", mds[0].DeviceNodes)
	}
	var _ gpu.Observer = s
}

func TestDeviceNodes_FailedSaveLeavesNoNode(t *testing.T) {
	requireMknod(t)
	ctx := t.Context()
	root := t.TempDir()
	dev, stateDir := filepath.Join(root, "dev"), filepath.Join(root, "state")
	if err := os.Mkdir(stateDir, 0o755); err != nil {
		t.Fatal(err)
	}
	s := newSim(t, sim.Config{
		GPUs: []sim.GPUConfig{{Model: "A100-80GB", MIGEnabled: true}}, DevRoot: dev, CreateNodes: true,
		StatePath: filepath.Join(stateDir, "state.json"),
	})
	devs, _ := s.Devices(ctx)
	if err := os.RemoveAll(stateDir); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateGPUInstance(ctx, devs[0].UUID, mig.Profile7g, pl(0, 8)); err == nil {
		t.Fatal("create succeeded without a state directory")
	}
	if got := strings.Join(capNodes(t, dev), ","); got != "nvidia-cap1,nvidia-cap2" {
		t.Errorf("a create whose save failed left capability nodes: %s", got)
	}
}
