package partition_test

import (
	"errors"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/agent/gpu/sim"
	"github.com/gpuaas/gpuaas/agent/partition"
	"github.com/gpuaas/gpuaas/pkg/mig"
)

// host is a simulated host with one H200, MIG enabled, whose state is kept
// in a file as on a real driver.
func host(t *testing.T) (*sim.Sim, string) {
	t.Helper()
	s, err := sim.New(sim.Config{
		GPUs:                []sim.GPUConfig{{Model: "H200", MIGEnabled: true}},
		StatePath:           filepath.Join(t.TempDir(), "sim.json"),
		ImmediateModeChange: true,
	})
	if err != nil {
		t.Fatalf("new simulator: %v", err)
	}
	devs, err := s.Devices(t.Context())
	if err != nil || len(devs) != 1 {
		t.Fatalf("Devices = %v, %v; want one gpu", devs, err)
	}
	return s, devs[0].UUID
}

func at(start, size int) mig.Placement { return mig.Placement{Start: start, Size: size} }

// instances lists the GPU instances on the GPU with their compute instance
// counts, the driver's whole view of what exists.
func instances(t *testing.T, b gpu.Backend, uuid string) map[gpu.GPUInstance]int {
	t.Helper()
	gis, err := b.GPUInstances(t.Context(), uuid)
	if err != nil {
		t.Fatalf("GPUInstances: %v", err)
	}
	out := map[gpu.GPUInstance]int{}
	for _, gi := range gis {
		cis, err := b.ComputeInstances(t.Context(), uuid, gi.ID)
		if err != nil {
			t.Fatalf("ComputeInstances(%d): %v", gi.ID, err)
		}
		out[gi] = len(cis)
	}
	return out
}

func ensure(t *testing.T, b gpu.Backend, w partition.Want) partition.Handle {
	t.Helper()
	h, err := partition.Ensure(t.Context(), b, w, nil)
	if err != nil {
		t.Fatalf("Ensure(%+v): %v", w, err)
	}
	return h
}

func TestEnsureCreatesGPUAndComputeInstanceAtExactlyThePlacement(t *testing.T) {
	s, uuid := host(t)
	// 1g at slot 5: not where a planner left to itself would put it first.
	w := partition.Want{GPUUUID: uuid, Profile: mig.Profile1g, Placement: at(5, 1)}

	h := ensure(t, s, w)

	got := instances(t, s, uuid)
	want := gpu.GPUInstance{GPUUUID: uuid, ID: h.GIID, ProfileID: mig.Profile1g, Placement: at(5, 1)}
	if len(got) != 1 || got[want] != 1 {
		t.Fatalf("instances on the gpu = %v, want only %v with one compute instance", got, want)
	}
	if h.GPUUUID != uuid || !h.HasCI {
		t.Errorf("handle = %+v, want gpu %s with a compute instance", h, uuid)
	}
	d := h.Device
	if !strings.HasPrefix(d.UUID, "MIG-") || d.GPUUUID != uuid || d.GPUInstanceID != h.GIID || d.ComputeInstanceID != h.CIID ||
		d.ProfileID != mig.Profile1g || d.Placement != at(5, 1) {
		t.Errorf("device = %+v, want the MIG device of gi %d ci %d at 5:1", d, h.GIID, h.CIID)
	}
	paths := map[string]gpu.DeviceNode{}
	for _, n := range d.DeviceNodes {
		paths[n.Path] = n
	}
	giCap := sim.GIAccessMinor(0, h.GIID)
	ciCap := sim.CIAccessMinor(0, h.GIID, h.CIID)
	for _, p := range []string{
		"/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools",
		"/dev/nvidia-caps/nvidia-cap" + strconv.Itoa(int(giCap)), "/dev/nvidia-caps/nvidia-cap" + strconv.Itoa(int(ciCap)),
	} {
		if _, ok := paths[p]; !ok {
			t.Errorf("device nodes %v lack %s", d.DeviceNodes, p)
		}
	}
}

func TestEnsureAgainAdoptsTheExistingPartition(t *testing.T) {
	s, uuid := host(t)
	w := partition.Want{GPUUUID: uuid, Profile: mig.Profile3g, Placement: at(4, 4)}
	first := ensure(t, s, w)

	// What an agent that crashed after creating the partition, before
	// journaling it, does on restart.
	second := ensure(t, s, w)

	if second.GIID != first.GIID || second.CIID != first.CIID || second.Device.UUID != first.Device.UUID {
		t.Errorf("second Ensure = gi %d ci %d %s, want the first's gi %d ci %d %s",
			second.GIID, second.CIID, second.Device.UUID, first.GIID, first.CIID, first.Device.UUID)
	}
	if got := instances(t, s, uuid); len(got) != 1 {
		t.Errorf("instances = %v, want the one partition", got)
	}
}

func TestEnsureAdoptsAGPUInstanceLeftWithoutItsComputeInstance(t *testing.T) {
	s, uuid := host(t)
	// The agent died between creating the GPU instance and its compute
	// instance.
	gi, err := s.CreateGPUInstance(t.Context(), uuid, mig.Profile2g, at(2, 2))
	if err != nil {
		t.Fatal(err)
	}

	h := ensure(t, s, partition.Want{GPUUUID: uuid, Profile: mig.Profile2g, Placement: at(2, 2)})

	if h.GIID != gi.ID {
		t.Errorf("Ensure used gi %d, want the existing gi %d", h.GIID, gi.ID)
	}
	if got := instances(t, s, uuid); len(got) != 1 || got[gi] != 1 {
		t.Errorf("instances = %v, want gi %d with one compute instance", got, gi.ID)
	}
}

func TestEnsureDoesNotAdoptAnotherProfileAtThePlacement(t *testing.T) {
	s, uuid := host(t)
	// A plain 1g sits at slot 0; a 1g+me at slot 0 is a different
	// partition and must not be mistaken for it.
	if _, err := s.CreateGPUInstance(t.Context(), uuid, mig.Profile1g, at(0, 1)); err != nil {
		t.Fatal(err)
	}
	before := instances(t, s, uuid)

	_, err := partition.Ensure(t.Context(), s, partition.Want{GPUUUID: uuid, Profile: mig.Profile1gME, Placement: at(0, 1)}, nil)

	if !errors.Is(err, gpu.ErrInsufficientResources) {
		t.Errorf("Ensure = %v, want %v", err, gpu.ErrInsufficientResources)
	}
	if after := instances(t, s, uuid); len(after) != len(before) {
		t.Errorf("instances changed from %v to %v", before, after)
	}
}

func TestEnsureCallsOnGIWithTheGPUInstanceBeforeGoingOn(t *testing.T) {
	s, uuid := host(t)
	var called []int
	var cisAtCall int
	h, err := partition.Ensure(t.Context(), s, partition.Want{GPUUUID: uuid, Profile: mig.Profile1gDouble, Placement: at(6, 2)}, func(gi int) error {
		called = append(called, gi)
		cis, err := s.ComputeInstances(t.Context(), uuid, gi)
		if err != nil {
			return err
		}
		cisAtCall = len(cis)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(called, []int{h.GIID}) {
		t.Errorf("onGI called with %v, want once with gi %d", called, h.GIID)
	}
	if cisAtCall != 0 {
		t.Errorf("onGI saw %d compute instances; it must run before the compute instance is created", cisAtCall)
	}
}

func TestEnsureStopsWhenOnGIFails(t *testing.T) {
	s, uuid := host(t)
	w := partition.Want{GPUUUID: uuid, Profile: mig.Profile1g, Placement: at(3, 1)}
	journalFull := errors.New("journal: disk full")

	_, err := partition.Ensure(t.Context(), s, w, func(int) error { return journalFull })

	if !errors.Is(err, journalFull) {
		t.Fatalf("Ensure = %v, want the callback's error", err)
	}
	got := instances(t, s, uuid)
	if len(got) != 1 {
		t.Fatalf("instances = %v, want the GPU instance only", got)
	}
	for gi, cis := range got {
		if cis != 0 {
			t.Errorf("gi %d has %d compute instances; Ensure went on after onGI failed", gi.ID, cis)
		}
	}
	// The next attempt adopts the GPU instance the failed one left.
	h := ensure(t, s, w)
	if got := instances(t, s, uuid); len(got) != 1 || got[gpu.GPUInstance{GPUUUID: uuid, ID: h.GIID, ProfileID: w.Profile, Placement: w.Placement}] != 1 {
		t.Errorf("after retry instances = %v, want gi %d with one compute instance", got, h.GIID)
	}
}

func TestEnsureRefusesWhatTheDriverRefuses(t *testing.T) {
	for _, tc := range []struct {
		name     string
		existing []partition.Want // created first
		want     func(uuid string) partition.Want
		class    error
	}{
		{
			name:     "placement overlapping an existing partition",
			existing: []partition.Want{{Profile: mig.Profile3g, Placement: at(0, 4)}},
			want: func(uuid string) partition.Want {
				return partition.Want{GPUUUID: uuid, Profile: mig.Profile1g, Placement: at(2, 1)}
			},
			class: gpu.ErrInsufficientResources,
		},
		{
			name: "placement the profile does not allow",
			want: func(uuid string) partition.Want {
				return partition.Want{GPUUUID: uuid, Profile: mig.Profile3g, Placement: at(2, 4)}
			},
			class: gpu.ErrInvalidArgument,
		},
		{
			name: "unknown profile",
			want: func(uuid string) partition.Want {
				return partition.Want{GPUUUID: uuid, Profile: 99, Placement: at(0, 1)}
			},
			class: gpu.ErrInvalidArgument,
		},
		{
			name: "unknown gpu",
			want: func(string) partition.Want {
				return partition.Want{GPUUUID: "GPU-00000000-0000-4000-8000-000000000000", Profile: mig.Profile1g, Placement: at(0, 1)}
			},
			class: gpu.ErrNotFound,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, uuid := host(t)
			for _, e := range tc.existing {
				e.GPUUUID = uuid
				ensure(t, s, e)
			}
			before := instances(t, s, uuid)
			called := false

			_, err := partition.Ensure(t.Context(), s, tc.want(uuid), func(int) error { called = true; return nil })

			if !errors.Is(err, tc.class) {
				t.Errorf("Ensure = %v, want %v", err, tc.class)
			}
			if called {
				t.Error("onGI was called though no GPU instance was created")
			}
			if after := instances(t, s, uuid); len(after) != len(before) {
				t.Errorf("instances changed from %v to %v", before, after)
			}
		})
	}
}

func TestEnsureOnAGPUWithoutMIGModeIsNotSupported(t *testing.T) {
	s, err := sim.New(sim.Config{GPUs: []sim.GPUConfig{{Model: "H100", MIGEnabled: false}}})
	if err != nil {
		t.Fatal(err)
	}
	devs, _ := s.Devices(t.Context())

	_, err = partition.Ensure(t.Context(), s, partition.Want{GPUUUID: devs[0].UUID, Profile: mig.Profile1g, Placement: at(0, 1)}, nil)

	if !errors.Is(err, gpu.ErrNotSupported) {
		t.Errorf("Ensure = %v, want %v", err, gpu.ErrNotSupported)
	}
}

func TestDestroyRemovesComputeInstancesThenTheGPUInstance(t *testing.T) {
	s, uuid := host(t)
	h := ensure(t, s, partition.Want{GPUUUID: uuid, Profile: mig.Profile4g, Placement: at(0, 4)})
	other := ensure(t, s, partition.Want{GPUUUID: uuid, Profile: mig.Profile1g, Placement: at(6, 1)})

	// The simulator refuses to destroy a GPU instance that still has a
	// compute instance (IN_USE), so success means the order was right.
	if err := partition.Destroy(t.Context(), s, uuid, h.GIID); err != nil {
		t.Fatalf("Destroy: %v", err)
	}

	got := instances(t, s, uuid)
	want := gpu.GPUInstance{GPUUUID: uuid, ID: other.GIID, ProfileID: mig.Profile1g, Placement: at(6, 1)}
	if len(got) != 1 || got[want] != 1 {
		t.Errorf("instances = %v, want only the untouched %v with its compute instance", got, want)
	}
	if _, err := partition.Device(t.Context(), s, uuid, h.GIID, h.CIID); !errors.Is(err, gpu.ErrNotFound) {
		t.Errorf("Device of the destroyed partition = %v, want %v", err, gpu.ErrNotFound)
	}
}

func TestDestroyWhatIsGoneSucceeds(t *testing.T) {
	s, uuid := host(t)
	h := ensure(t, s, partition.Want{GPUUUID: uuid, Profile: mig.Profile1g, Placement: at(1, 1)})
	if err := partition.Destroy(t.Context(), s, uuid, h.GIID); err != nil {
		t.Fatalf("first Destroy: %v", err)
	}

	if err := partition.Destroy(t.Context(), s, uuid, h.GIID); err != nil {
		t.Errorf("second Destroy = %v, want nil: what is already gone is not an error", err)
	}
	// A GPU instance whose compute instance never got created.
	gi, err := s.CreateGPUInstance(t.Context(), uuid, mig.Profile1g, at(2, 1))
	if err != nil {
		t.Fatal(err)
	}
	if err := partition.Destroy(t.Context(), s, uuid, gi.ID); err != nil {
		t.Errorf("Destroy of a gi without compute instances = %v, want nil", err)
	}
	if got := instances(t, s, uuid); len(got) != 0 {
		t.Errorf("instances = %v, want none", got)
	}
}

func TestDestroyKeepsAPartitionAProcessHolds(t *testing.T) {
	s, uuid := host(t)
	h := ensure(t, s, partition.Want{GPUUUID: uuid, Profile: mig.Profile2g, Placement: at(0, 2)})
	if err := s.AttachProcess(h.Device.UUID, 4242); err != nil {
		t.Fatal(err)
	}

	err := partition.Destroy(t.Context(), s, uuid, h.GIID)

	if !errors.Is(err, gpu.ErrInUse) {
		t.Fatalf("Destroy = %v, want %v", err, gpu.ErrInUse)
	}
	if _, err := partition.Device(t.Context(), s, uuid, h.GIID, h.CIID); err != nil {
		t.Errorf("the held partition is gone: %v", err)
	}
	if err := s.DetachProcess(h.Device.UUID, 4242); err != nil {
		t.Fatal(err)
	}
	if err := partition.Destroy(t.Context(), s, uuid, h.GIID); err != nil {
		t.Errorf("Destroy after the process exited: %v", err)
	}
}

func TestDeviceFindsThePartitionByGPUAndComputeInstance(t *testing.T) {
	s, uuid := host(t)
	a := ensure(t, s, partition.Want{GPUUUID: uuid, Profile: mig.Profile1g, Placement: at(0, 1)})
	b := ensure(t, s, partition.Want{GPUUUID: uuid, Profile: mig.Profile1g, Placement: at(1, 1)})

	for _, h := range []partition.Handle{a, b} {
		d, err := partition.Device(t.Context(), s, uuid, h.GIID, h.CIID)
		if err != nil {
			t.Errorf("Device(gi %d, ci %d): %v", h.GIID, h.CIID, err)
			continue
		}
		if d.UUID != h.Device.UUID || len(d.DeviceNodes) == 0 {
			t.Errorf("Device(gi %d, ci %d) = %+v, want %+v", h.GIID, h.CIID, d, h.Device)
		}
	}
	for _, tc := range []struct {
		name   string
		gpu    string
		gi, ci int
	}{
		{"no such gpu instance", uuid, 14, 0},
		{"no such compute instance", uuid, a.GIID, a.CIID + 1},
		{"no such gpu", "GPU-00000000-0000-4000-8000-000000000000", a.GIID, a.CIID},
	} {
		if _, err := partition.Device(t.Context(), s, tc.gpu, tc.gi, tc.ci); !errors.Is(err, gpu.ErrNotFound) {
			t.Errorf("%s: Device = %v, want %v", tc.name, err, gpu.ErrNotFound)
		}
	}
}
