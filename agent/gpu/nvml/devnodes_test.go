package nvml

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/agent/gpu/sim"
	"github.com/gpuaas/gpuaas/pkg/mig"
)

// fakeProc writes a procfs with the driver's files: /proc/devices (when
// devices is not empty) and the whole mig-minors table.
func fakeProc(t *testing.T, devices string) string {
	t.Helper()
	root := t.TempDir()
	caps := filepath.Join(root, "driver", "nvidia-caps")
	if err := os.MkdirAll(caps, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(caps, "mig-minors"), []byte(sim.MIGMinors()), 0o644); err != nil {
		t.Fatal(err)
	}
	if devices != "" {
		if err := os.WriteFile(filepath.Join(root, "devices"), []byte(devices), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func readTable(t *testing.T, d devNodes) nodeTable {
	t.Helper()
	tab, err := d.read()
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	return tab
}

// TestMIGDeviceNodes_AgreeWithSimulator resolves a MIG device's nodes on a
// host whose /dev has none of them (majors from the documented 195 and
// /proc/devices, capability minors from mig-minors) and compares them with
// what the simulator, which models the driver's numbering, reports for the
// same instance.
func TestMIGDeviceNodes_AgreeWithSimulator(t *testing.T) {
	devRoot := t.TempDir()
	d := devNodes{devRoot: devRoot, procRoot: fakeProc(t, procDevices)}

	s, err := sim.New(sim.Config{
		GPUs:    []sim.GPUConfig{{Model: "H200", MIGEnabled: true}, {Model: "H200", MIGEnabled: true}},
		DevRoot: devRoot, UVMMajor: 508, CapsMajor: 506,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	devs, _ := s.Devices(ctx)
	second := devs[1]
	gi, err := s.CreateGPUInstance(ctx, second.UUID, mig.Profile1g, mig.Placement{Start: 3, Size: 1})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateComputeInstance(ctx, second.UUID, gi.ID); err != nil {
		t.Fatal(err)
	}
	mds, err := s.MIGDevices(ctx, second.UUID)
	if err != nil || len(mds) != 1 {
		t.Fatalf("sim MIGDevices = %v, %v", mds, err)
	}

	got, err := readTable(t, d).migDeviceNodes(second.MinorNumber, mds[0].GPUInstanceID, mds[0].ComputeInstanceID)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, mds[0].DeviceNodes) {
		t.Errorf("nodes\n got %+v\nwant %+v (simulator)", got, mds[0].DeviceNodes)
	}
}

func TestMIGDeviceNodes_Errors(t *testing.T) {
	t.Run("nvidia-uvm not loaded", func(t *testing.T) {
		d := devNodes{devRoot: t.TempDir(), procRoot: fakeProc(t, "Character devices:\n195 nvidia\n506 nvidia-caps\n")}
		_, err := readTable(t, d).migDeviceNodes(0, 7, 0)
		if !errors.Is(err, gpu.ErrDriverUnavailable) || !strings.Contains(err.Error(), "nvidia-modprobe -u") {
			t.Errorf("error %v, want ErrDriverUnavailable with how to load nvidia-uvm", err)
		}
	})
	t.Run("no /proc/devices", func(t *testing.T) {
		d := devNodes{devRoot: t.TempDir(), procRoot: fakeProc(t, "")}
		_, err := readTable(t, d).migDeviceNodes(0, 7, 0)
		if !errors.Is(err, gpu.ErrDriverUnavailable) || !strings.Contains(err.Error(), "devices") {
			t.Errorf("error %v, want ErrDriverUnavailable naming /proc/devices", err)
		}
	})
	t.Run("no mig-minors", func(t *testing.T) {
		_, err := devNodes{devRoot: t.TempDir(), procRoot: t.TempDir()}.read()
		if !errors.Is(err, gpu.ErrDriverUnavailable) || !strings.Contains(err.Error(), "mig-minors") {
			t.Errorf("error %v, want ErrDriverUnavailable naming mig-minors", err)
		}
	})
	t.Run("malformed mig-minors", func(t *testing.T) {
		proc := t.TempDir()
		caps := filepath.Join(proc, "driver", "nvidia-caps")
		_ = os.MkdirAll(caps, 0o755)
		_ = os.WriteFile(filepath.Join(caps, "mig-minors"), []byte("gpu0/gi0/access x\n"), 0o644)
		_, err := devNodes{devRoot: t.TempDir(), procRoot: proc}.read()
		if !errors.Is(err, gpu.ErrDriverUnavailable) {
			t.Errorf("error %v, want ErrDriverUnavailable", err)
		}
	})
	t.Run("capability not in the table", func(t *testing.T) {
		d := devNodes{devRoot: t.TempDir(), procRoot: fakeProc(t, procDevices)}
		_, err := readTable(t, d).migDeviceNodes(40, 0, 0)
		if !errors.Is(err, gpu.ErrDriverUnavailable) || !strings.Contains(err.Error(), "gpu40/gi0/access") {
			t.Errorf("error %v, want ErrDriverUnavailable naming the capability", err)
		}
	})
}

// TestMIGDeviceNodes_NodesOnDiskWin makes real character device nodes
// (root only) and checks their numbers win over /proc/devices, except a
// capability node's minor, which its name fixes.
func TestMIGDeviceNodes_NodesOnDiskWin(t *testing.T) {
	requireRoot(t)
	devRoot := t.TempDir()
	mknod := func(name string, major, minor uint32) {
		t.Helper()
		path := filepath.Join(devRoot, name)
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		dev := int(minor&0xff | (major&0xfff)<<8 | (minor&^0xff)<<12)
		if err := syscall.Mknod(path, syscall.S_IFCHR|0o600, dev); err != nil {
			t.Fatalf("mknod %s: %v", path, err)
		}
	}
	giCap, ciCap := sim.GIAccessMinor(0, 7), sim.CIAccessMinor(0, 7, 0)
	mknod("nvidia0", 195, 0)
	mknod("nvidia-uvm", 240, 0)
	mknod("nvidia-uvm-tools", 240, 1)
	mknod(capNodeName(giCap), 241, giCap)
	mknod(capNodeName(ciCap), 241, 9999) // stale minor: the name decides
	if err := os.WriteFile(filepath.Join(devRoot, "nvidiactl"), nil, 0o600); err != nil {
		t.Fatal(err) // a regular file is no node: the documented numbers stay
	}

	d := devNodes{devRoot: devRoot, procRoot: fakeProc(t, procDevices)}
	got, err := readTable(t, d).migDeviceNodes(0, 7, 0)
	if err != nil {
		t.Fatal(err)
	}
	want := []gpu.DeviceNode{
		{Path: filepath.Join(devRoot, "nvidia0"), Major: 195, Minor: 0},
		{Path: filepath.Join(devRoot, "nvidiactl"), Major: 195, Minor: 255},
		{Path: filepath.Join(devRoot, "nvidia-uvm"), Major: 240, Minor: 0},
		{Path: filepath.Join(devRoot, "nvidia-uvm-tools"), Major: 240, Minor: 1},
		{Path: filepath.Join(devRoot, capNodeName(giCap)), Major: 241, Minor: giCap},
		{Path: filepath.Join(devRoot, capNodeName(ciCap)), Major: 241, Minor: ciCap},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("nodes\n got %+v\nwant %+v", got, want)
	}
}

// requireRoot skips a test that needs root on a developer machine and
// fails it in CI (CI=true), where root is available.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if ci := strings.ToLower(os.Getenv("CI")); ci == "true" || ci == "1" {
		t.Fatal("this test needs root, which CI has")
	}
	t.Skip("needs root (mknod); it runs in CI")
}
