package sim_test

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/agent/gpu/gputest"
	"github.com/gpuaas/gpuaas/agent/gpu/sim"
	"github.com/gpuaas/gpuaas/pkg/mig"
)

func newSim(t *testing.T, cfg sim.Config) *sim.Sim {
	t.Helper()
	s, err := sim.New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return s
}

// oneGPU is a simulator with one GPU of the model, MIG enabled, and that
// GPU's UUID.
func oneGPU(t *testing.T, model string) (*sim.Sim, string) {
	t.Helper()
	s := newSim(t, sim.Config{GPUs: []sim.GPUConfig{{Model: model, MIGEnabled: true}}})
	devs, err := s.Devices(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return s, devs[0].UUID
}

func pl(start, size int) mig.Placement { return mig.Placement{Start: start, Size: size} }

func mustCreate(t *testing.T, s *sim.Sim, uuid string, p mig.ProfileID, at mig.Placement) gpu.GPUInstance {
	t.Helper()
	gi, err := s.CreateGPUInstance(t.Context(), uuid, p, at)
	if err != nil {
		t.Fatalf("CreateGPUInstance(%d at %s): %v", p, at, err)
	}
	return gi
}

func mustCreateCI(t *testing.T, s *sim.Sim, uuid string, gi int) gpu.ComputeInstance {
	t.Helper()
	ci, err := s.CreateComputeInstance(t.Context(), uuid, gi)
	if err != nil {
		t.Fatalf("CreateComputeInstance(%d): %v", gi, err)
	}
	return ci
}

func wantErr(t *testing.T, err error, classes ...error) {
	t.Helper()
	if err == nil {
		t.Fatalf("error nil, want %v", classes)
	}
	for _, c := range classes {
		if !errors.Is(err, c) {
			t.Fatalf("error %q is not %v", err, c)
		}
	}
}

func TestConformance(t *testing.T) {
	s := newSim(t, sim.Config{GPUs: []sim.GPUConfig{
		{Model: "H200", MIGEnabled: true},
		{Model: "H100", MIGEnabled: true},
		{Model: "A100-40GB", MIGEnabled: false},
		{Model: "A100-80GB", MIGEnabled: true},
	}})
	t.Run("read-only on empty GPUs", func(t *testing.T) { gputest.RunReadOnly(t, s) })
	t.Run("mutating", func(t *testing.T) { gputest.RunMutating(t, s) })

	// Populate every MIG GPU so the read-only suite checks listings,
	// compute instances and device nodes across GPUs too.
	devs, _ := s.Devices(t.Context())
	for _, d := range devs {
		if d.Index == 2 {
			continue
		}
		for _, p := range []mig.ProfileID{mig.Profile4g, mig.Profile2g, mig.Profile1g} {
			m, _ := mig.ModelByPCIDeviceID(d.PCIDeviceID)
			gis, _ := s.GPUInstances(t.Context(), d.UUID)
			var existing []mig.Instance
			for _, gi := range gis {
				existing = append(existing, mig.Instance{Profile: gi.ProfileID, Placement: gi.Placement})
			}
			at, err := m.Place(existing, p)
			if err != nil {
				t.Fatal(err)
			}
			gi := mustCreate(t, s, d.UUID, p, at)
			if p != mig.Profile1g {
				mustCreateCI(t, s, d.UUID, gi.ID)
			}
		}
	}
	// Busy, with an ECC history: telemetry must still meet the contract.
	mds, _ := s.MIGDevices(t.Context(), devs[0].UUID)
	if err := s.AttachProcess(mds[0].UUID, 4242); err != nil {
		t.Fatal(err)
	}
	if err := s.InjectECC(devs[1].UUID, true); err != nil {
		t.Fatal(err)
	}
	t.Run("read-only on populated GPUs", func(t *testing.T) { gputest.RunReadOnly(t, s) })
}

func TestConformance_EveryModel(t *testing.T) {
	for _, m := range mig.Models() {
		t.Run(m.ShortName, func(t *testing.T) {
			s, _ := oneGPU(t, m.Name)
			gputest.RunReadOnly(t, s)
			gputest.RunMutating(t, s)
		})
	}
}

func TestNew_RejectsBadConfig(t *testing.T) {
	tests := []struct {
		name string
		cfg  sim.Config
		want string
	}{
		{"unknown model", sim.Config{GPUs: []sim.GPUConfig{{Model: "B200"}}}, `unknown model "B200"`},
		{"ambiguous model", sim.Config{GPUs: []sim.GPUConfig{{Model: "A100"}}}, `unknown model "A100"`},
		{"too many gpus", sim.Config{GPUs: make([]sim.GPUConfig, 33)}, "at most 32"},
		{"state directory missing", sim.Config{GPUs: []sim.GPUConfig{{Model: "H200"}}, StatePath: "/nonexistent/dir/state.json"}, "save state"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := sim.New(tt.cfg)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("New = %v, want error containing %q", err, tt.want)
			}
		})
	}
}

func TestNew_NoGPUs(t *testing.T) {
	s := newSim(t, sim.Config{})
	devs, err := s.Devices(t.Context())
	if err != nil || len(devs) != 0 {
		t.Fatalf("Devices = %v, %v; want none", devs, err)
	}
}

var (
	gpuUUID = regexp.MustCompile(`^GPU-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)
	migUUID = regexp.MustCompile(`^MIG-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)
)

func TestDevices_Identity(t *testing.T) {
	cfg := sim.Config{GPUs: []sim.GPUConfig{
		{Model: "H200"}, {Model: "H100"}, {Model: "A100-40GB"}, {Model: "NVIDIA A100-SXM4-80GB"},
		{Model: "H200"}, {Model: "H200"}, {Model: "H200"}, {Model: "H200"}, {Model: "H200"},
	}, DriverVersion: "550.90.07"}
	a := newSim(t, cfg)
	b := newSim(t, cfg)
	cfg.HostID = "node-2"
	other := newSim(t, cfg)

	da, _ := a.Devices(t.Context())
	db, _ := b.Devices(t.Context())
	do, _ := other.Devices(t.Context())
	if !slices.Equal(da, db) {
		t.Error("the same config gave different devices")
	}
	wantNames := []string{"NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB", "NVIDIA A100-SXM4-80GB"}
	wantPCI := []uint32{0x233510DE, 0x233010DE, 0x20B010DE, 0x20B210DE}
	buses := map[string]bool{}
	for i, d := range da {
		if d.Index != i || d.MinorNumber != i {
			t.Errorf("device %d: index %d, minor %d", i, d.Index, d.MinorNumber)
		}
		if !gpuUUID.MatchString(d.UUID) {
			t.Errorf("device %d: UUID %q", i, d.UUID)
		}
		if d.UUID == do[i].UUID || d.Serial == do[i].Serial {
			t.Errorf("device %d: another HostID gave the same UUID or serial", i)
		}
		if buses[d.PCIBusID] {
			t.Errorf("device %d: bus id %s reused", i, d.PCIBusID)
		}
		buses[d.PCIBusID] = true
		if len(d.Serial) != 13 || strings.Trim(d.Serial, "0123456789") != "" {
			t.Errorf("device %d: serial %q", i, d.Serial)
		}
		if d.DriverVersion != "550.90.07" || !d.MIGCapable || d.VBIOSVersion == "" {
			t.Errorf("device %d: %+v", i, d)
		}
		if i < len(wantNames) && (d.Name != wantNames[i] || d.PCIDeviceID != wantPCI[i]) {
			t.Errorf("device %d: %s %#x, want %s %#x", i, d.Name, d.PCIDeviceID, wantNames[i], wantPCI[i])
		}
	}
	if da[0].PCIBusID != "00000000:18:00.0" || da[8].PCIBusID != "00000001:18:00.0" {
		t.Errorf("bus ids %s, %s", da[0].PCIBusID, da[8].PCIBusID)
	}
	if v, _ := a.DriverVersion(t.Context()); v != "550.90.07" {
		t.Errorf("DriverVersion = %q", v)
	}
	if v, _ := newSim(t, sim.Config{}).DriverVersion(t.Context()); v != sim.DefaultDriverVersion {
		t.Errorf("default DriverVersion = %q", v)
	}
}

func TestMIGMode_PendingUntilReset(t *testing.T) {
	ctx := t.Context()
	s := newSim(t, sim.Config{GPUs: []sim.GPUConfig{{Model: "H200"}}})
	devs, _ := s.Devices(ctx)
	uuid := devs[0].UUID

	steps := []struct {
		name string
		do   func() (gpu.MIGMode, error)
		want gpu.MIGMode
	}{
		{"initial", func() (gpu.MIGMode, error) { return s.MIGMode(ctx, uuid) }, gpu.MIGMode{}},
		{"enable is pending", func() (gpu.MIGMode, error) { return s.SetMIGMode(ctx, uuid, true) }, gpu.MIGMode{Current: false, Pending: true}},
		{"still pending", func() (gpu.MIGMode, error) { return s.MIGMode(ctx, uuid) }, gpu.MIGMode{Current: false, Pending: true}},
		{"reset applies it", func() (gpu.MIGMode, error) {
			if err := s.ResetGPU(uuid); err != nil {
				return gpu.MIGMode{}, err
			}
			return s.MIGMode(ctx, uuid)
		}, gpu.MIGMode{Current: true, Pending: true}},
		{"disable is pending", func() (gpu.MIGMode, error) { return s.SetMIGMode(ctx, uuid, false) }, gpu.MIGMode{Current: true, Pending: false}},
		{"setting the current mode cancels it", func() (gpu.MIGMode, error) { return s.SetMIGMode(ctx, uuid, true) }, gpu.MIGMode{Current: true, Pending: true}},
	}
	for _, st := range steps {
		got, err := st.do()
		if err != nil || got != st.want {
			t.Fatalf("%s: %+v, %v; want %+v", st.name, got, err, st.want)
		}
	}
}

func TestMIGMode_PendingIsNotEnough(t *testing.T) {
	ctx := t.Context()
	s := newSim(t, sim.Config{GPUs: []sim.GPUConfig{{Model: "H200"}}})
	devs, _ := s.Devices(ctx)
	uuid := devs[0].UUID
	if _, err := s.SetMIGMode(ctx, uuid, true); err != nil {
		t.Fatal(err)
	}
	_, err := s.CreateGPUInstance(ctx, uuid, mig.Profile1g, pl(0, 1))
	wantErr(t, err, gpu.ErrNotSupported)
}

func TestMIGMode_Immediate(t *testing.T) {
	ctx := t.Context()
	s := newSim(t, sim.Config{GPUs: []sim.GPUConfig{{Model: "H100"}}, ImmediateModeChange: true})
	devs, _ := s.Devices(ctx)
	uuid := devs[0].UUID
	if got, err := s.SetMIGMode(ctx, uuid, true); err != nil || got != (gpu.MIGMode{Current: true, Pending: true}) {
		t.Fatalf("SetMIGMode = %+v, %v", got, err)
	}
	mustCreate(t, s, uuid, mig.Profile7g, pl(0, 8))
}

func TestSetMIGMode_InUseWhileInstancesExist(t *testing.T) {
	ctx := t.Context()
	s, uuid := oneGPU(t, "H200")
	mustCreate(t, s, uuid, mig.Profile1g, pl(3, 1))
	_, err := s.SetMIGMode(ctx, uuid, false)
	wantErr(t, err, gpu.ErrInUse)
	if mode, _ := s.MIGMode(ctx, uuid); mode != (gpu.MIGMode{Current: true, Pending: true}) {
		t.Errorf("mode changed by a refused request: %+v", mode)
	}
	if _, err := s.SetMIGMode(ctx, uuid, true); err != nil {
		t.Errorf("requesting the current mode: %v", err)
	}
	_, err = s.SetMIGMode(ctx, "GPU-nope", true)
	wantErr(t, err, gpu.ErrNotFound)
}

func TestMIGOperations_RequireMIGMode(t *testing.T) {
	ctx := t.Context()
	s := newSim(t, sim.Config{GPUs: []sim.GPUConfig{{Model: "H200"}}})
	devs, _ := s.Devices(ctx)
	uuid := devs[0].UUID
	ops := map[string]func() error{
		"GPUInstanceProfiles": func() error { _, err := s.GPUInstanceProfiles(ctx, uuid); return err },
		"PossiblePlacements":  func() error { _, err := s.PossiblePlacements(ctx, uuid, mig.Profile1g); return err },
		"CreateGPUInstance":   func() error { _, err := s.CreateGPUInstance(ctx, uuid, mig.Profile1g, pl(0, 1)); return err },
		"GPUInstances":        func() error { _, err := s.GPUInstances(ctx, uuid); return err },
		"DestroyGPUInstance":  func() error { return s.DestroyGPUInstance(ctx, uuid, 7) },
		"CreateComputeInstance": func() error {
			_, err := s.CreateComputeInstance(ctx, uuid, 7)
			return err
		},
		"ComputeInstances":       func() error { _, err := s.ComputeInstances(ctx, uuid, 7); return err },
		"DestroyComputeInstance": func() error { return s.DestroyComputeInstance(ctx, uuid, 7, 0) },
		"MIGDevices":             func() error { _, err := s.MIGDevices(ctx, uuid); return err },
	}
	for name, op := range ops {
		t.Run(name, func(t *testing.T) { wantErr(t, op(), gpu.ErrNotSupported) })
	}
}

func TestUnknownGPU(t *testing.T) {
	ctx := t.Context()
	s, _ := oneGPU(t, "H200")
	const uuid = "GPU-does-not-exist"
	ops := map[string]func() error{
		"MIGMode":             func() error { _, err := s.MIGMode(ctx, uuid); return err },
		"SetMIGMode":          func() error { _, err := s.SetMIGMode(ctx, uuid, true); return err },
		"GPUInstanceProfiles": func() error { _, err := s.GPUInstanceProfiles(ctx, uuid); return err },
		"CreateGPUInstance":   func() error { _, err := s.CreateGPUInstance(ctx, uuid, mig.Profile1g, pl(0, 1)); return err },
		"MIGDevices":          func() error { _, err := s.MIGDevices(ctx, uuid); return err },
		"ResetGPU":            func() error { return s.ResetGPU(uuid) },
	}
	for name, op := range ops {
		t.Run(name, func(t *testing.T) { wantErr(t, op(), gpu.ErrNotFound) })
	}
}

func TestCreateGPUInstance_EnforcesTheDriverRules(t *testing.T) {
	tests := []struct {
		name     string
		existing []mig.Instance
		profile  mig.ProfileID
		at       mig.Placement
		want     []error // nil: success
	}{
		{"unknown profile", nil, 42, pl(0, 1), []error{gpu.ErrInvalidArgument, mig.ErrUnknownProfile}},
		{"1g at slot 7", nil, mig.Profile1g, pl(7, 1), []error{gpu.ErrInvalidArgument, mig.ErrPlacementNotAllowed}},
		{"3g at slot 2", nil, mig.Profile3g, pl(2, 4), []error{gpu.ErrInvalidArgument, mig.ErrPlacementNotAllowed}},
		{"4g at slot 4", nil, mig.Profile4g, pl(4, 4), []error{gpu.ErrInvalidArgument, mig.ErrPlacementNotAllowed}},
		{"wrong size", nil, mig.Profile2g, pl(0, 4), []error{gpu.ErrInvalidArgument, mig.ErrPlacementNotAllowed}},
		{"overlap", []mig.Instance{{Profile: mig.Profile3g, Placement: pl(4, 4)}}, mig.Profile2g, pl(4, 2), []error{gpu.ErrInsufficientResources, mig.ErrOverlap}},
		{"7g on a used GPU", []mig.Instance{{Profile: mig.Profile1g, Placement: pl(6, 1)}}, mig.Profile7g, pl(0, 8), []error{gpu.ErrInsufficientResources, mig.ErrOverlap}},
		{"second 1g+me", []mig.Instance{{Profile: mig.Profile1gME, Placement: pl(0, 1)}}, mig.Profile1gME, pl(1, 1), []error{gpu.ErrInsufficientResources, mig.ErrNoCapacity}},
		{"4g + 3g", []mig.Instance{{Profile: mig.Profile4g, Placement: pl(0, 4)}}, mig.Profile3g, pl(4, 4), nil},
		{"1g beside a 1g+me", []mig.Instance{{Profile: mig.Profile1gME, Placement: pl(0, 1)}}, mig.Profile1g, pl(1, 1), nil},
	}
	for _, model := range []string{"H200", "H100", "A100-40GB", "A100-80GB"} {
		for _, tt := range tests {
			t.Run(model+"/"+tt.name, func(t *testing.T) {
				s, uuid := oneGPU(t, model)
				for _, e := range tt.existing {
					mustCreate(t, s, uuid, e.Profile, e.Placement)
				}
				before, _ := s.GPUInstances(t.Context(), uuid)
				gi, err := s.CreateGPUInstance(t.Context(), uuid, tt.profile, tt.at)
				if tt.want == nil {
					if err != nil || gi.Placement != tt.at || gi.ProfileID != tt.profile {
						t.Fatalf("CreateGPUInstance = %+v, %v", gi, err)
					}
					return
				}
				wantErr(t, err, tt.want...)
				if !strings.Contains(err.Error(), "create gpu instance") || !strings.Contains(err.Error(), uuid) {
					t.Errorf("error %q lacks context", err)
				}
				after, _ := s.GPUInstances(t.Context(), uuid)
				if !slices.Equal(before, after) {
					t.Errorf("a refused create changed the instances: %v -> %v", before, after)
				}
			})
		}
	}
}

func TestGPUInstanceIDs_FollowThePlacement(t *testing.T) {
	tests := []struct {
		layout []mig.Instance
		ids    []int
	}{
		{[]mig.Instance{{Profile: mig.Profile7g, Placement: pl(0, 8)}}, []int{0}},
		{[]mig.Instance{{Profile: mig.Profile3g, Placement: pl(4, 4)}, {Profile: mig.Profile4g, Placement: pl(0, 4)}}, []int{2, 1}},
		{[]mig.Instance{{Profile: mig.Profile2g, Placement: pl(2, 2)}, {Profile: mig.Profile1gDouble, Placement: pl(6, 2)}, {Profile: mig.Profile2g, Placement: pl(0, 2)}}, []int{4, 6, 3}},
		{[]mig.Instance{{Profile: mig.Profile1g, Placement: pl(6, 1)}, {Profile: mig.Profile1g, Placement: pl(0, 1)}, {Profile: mig.Profile1gME, Placement: pl(3, 1)}}, []int{13, 7, 10}},
	}
	for i, tt := range tests {
		t.Run(strconv.Itoa(i), func(t *testing.T) {
			s, uuid := oneGPU(t, "H200")
			for j, e := range tt.layout {
				if gi := mustCreate(t, s, uuid, e.Profile, e.Placement); gi.ID != tt.ids[j] {
					t.Errorf("%d at %s got id %d, want %d", e.Profile, e.Placement, gi.ID, tt.ids[j])
				}
			}
			gis, _ := s.GPUInstances(t.Context(), uuid)
			if !slices.IsSortedFunc(gis, func(a, b gpu.GPUInstance) int { return a.ID - b.ID }) {
				t.Errorf("GPUInstances not by id: %+v", gis)
			}
		})
	}
}

func TestGPUInstanceProfiles_ReportRemaining(t *testing.T) {
	s, uuid := oneGPU(t, "H200")
	mustCreate(t, s, uuid, mig.Profile3g, pl(4, 4))
	ps, err := s.GPUInstanceProfiles(t.Context(), uuid)
	if err != nil {
		t.Fatal(err)
	}
	want := map[mig.ProfileID][2]int{ // instance count, remaining
		mig.Profile1g: {7, 4}, mig.Profile1gME: {1, 1}, mig.Profile1gDouble: {4, 2},
		mig.Profile2g: {3, 2}, mig.Profile3g: {2, 1}, mig.Profile4g: {1, 1}, mig.Profile7g: {1, 0},
	}
	if len(ps) != len(want) {
		t.Fatalf("%d profiles, want %d", len(ps), len(want))
	}
	for _, p := range ps {
		if w := want[p.ID]; p.InstanceCount != w[0] || p.Remaining != w[1] {
			t.Errorf("profile %s: count %d remaining %d, want %v", p.Name, p.InstanceCount, p.Remaining, w)
		}
	}
	if ps[4].Name != "3g.71gb" || ps[4].MemoryMiB != 71168 || ps[4].MultiprocessorCount != 60 || ps[4].SliceCount != 3 || ps[4].MemorySlots != 4 {
		t.Errorf("3g profile %+v", ps[4])
	}
}

func TestPossiblePlacements(t *testing.T) {
	ctx := t.Context()
	s, uuid := oneGPU(t, "H100")
	mustCreate(t, s, uuid, mig.Profile1g, pl(6, 1))
	tests := []struct {
		profile mig.ProfileID
		want    []mig.Placement
	}{
		{mig.Profile3g, []mig.Placement{pl(0, 4)}},
		{mig.Profile2g, []mig.Placement{pl(0, 2), pl(2, 2), pl(4, 2)}},
		{mig.Profile1gDouble, []mig.Placement{pl(0, 2), pl(2, 2), pl(4, 2)}},
		{mig.Profile7g, []mig.Placement{}},
	}
	for _, tt := range tests {
		got, err := s.PossiblePlacements(ctx, uuid, tt.profile)
		if err != nil || got == nil || !slices.Equal(got, tt.want) {
			t.Errorf("PossiblePlacements(%d) = %#v, %v; want %v", tt.profile, got, err, tt.want)
		}
	}
	_, err := s.PossiblePlacements(ctx, uuid, 42)
	wantErr(t, err, gpu.ErrInvalidArgument)
}

func TestComputeInstances_Rules(t *testing.T) {
	ctx := t.Context()
	s, uuid := oneGPU(t, "H200")
	gi := mustCreate(t, s, uuid, mig.Profile3g, pl(0, 4))

	_, err := s.CreateComputeInstance(ctx, uuid, 99)
	wantErr(t, err, gpu.ErrNotFound)
	_, err = s.ComputeInstances(ctx, uuid, 99)
	wantErr(t, err, gpu.ErrNotFound)

	ci := mustCreateCI(t, s, uuid, gi.ID)
	if ci != (gpu.ComputeInstance{GPUUUID: uuid, GPUInstanceID: gi.ID, ID: 0, ProfileID: 2, SliceCount: 3}) {
		t.Errorf("compute instance %+v", ci)
	}
	_, err = s.CreateComputeInstance(ctx, uuid, gi.ID)
	wantErr(t, err, gpu.ErrInsufficientResources)
	wantErr(t, s.DestroyGPUInstance(ctx, uuid, gi.ID), gpu.ErrInUse)
	wantErr(t, s.DestroyComputeInstance(ctx, uuid, gi.ID, 5), gpu.ErrNotFound)
	wantErr(t, s.DestroyComputeInstance(ctx, uuid, 99, 0), gpu.ErrNotFound)

	if err := s.DestroyComputeInstance(ctx, uuid, gi.ID, ci.ID); err != nil {
		t.Fatal(err)
	}
	if err := s.DestroyGPUInstance(ctx, uuid, gi.ID); err != nil {
		t.Fatal(err)
	}
	wantErr(t, s.DestroyGPUInstance(ctx, uuid, gi.ID), gpu.ErrNotFound)
}

func TestComputeInstances_ProfileIDPerSize(t *testing.T) {
	want := map[mig.ProfileID]int{mig.Profile1g: 0, mig.Profile1gME: 0, mig.Profile1gDouble: 0, mig.Profile2g: 1, mig.Profile3g: 2, mig.Profile4g: 3, mig.Profile7g: 4}
	for p, w := range want {
		s, uuid := oneGPU(t, "A100-40GB")
		m, _ := mig.ModelByName("NVIDIA A100-SXM4-40GB")
		at, _ := m.Place(nil, p)
		gi := mustCreate(t, s, uuid, p, at)
		if ci := mustCreateCI(t, s, uuid, gi.ID); ci.ProfileID != w {
			t.Errorf("profile %d: compute profile %d, want %d", p, ci.ProfileID, w)
		}
	}
}

func TestProcesses_HoldTheirPartition(t *testing.T) {
	ctx := t.Context()
	s, uuid := oneGPU(t, "H200")
	gi := mustCreate(t, s, uuid, mig.Profile2g, pl(4, 2))
	ci := mustCreateCI(t, s, uuid, gi.ID)
	devs, _ := s.MIGDevices(ctx, uuid)
	mu := devs[0].UUID

	wantErr(t, s.AttachProcess("MIG-nope", 100), gpu.ErrNotFound)
	wantErr(t, s.AttachProcess(mu, 0), gpu.ErrInvalidArgument)
	wantErr(t, s.DetachProcess(mu, 100), gpu.ErrNotFound)

	if err := s.AttachProcess(mu, 100); err != nil {
		t.Fatal(err)
	}
	if err := s.AttachProcess(mu, 100); err != nil {
		t.Errorf("attaching twice: %v", err)
	}
	if err := s.AttachProcess(mu, 200); err != nil {
		t.Fatal(err)
	}
	wantErr(t, s.DestroyComputeInstance(ctx, uuid, gi.ID, ci.ID), gpu.ErrInUse)
	wantErr(t, s.ResetGPU(uuid), gpu.ErrInUse)

	if err := s.DetachProcess(mu, 100); err != nil {
		t.Fatal(err)
	}
	wantErr(t, s.DestroyComputeInstance(ctx, uuid, gi.ID, ci.ID), gpu.ErrInUse)
	if err := s.DetachProcess(mu, 200); err != nil {
		t.Fatal(err)
	}
	if err := s.DestroyComputeInstance(ctx, uuid, gi.ID, ci.ID); err != nil {
		t.Fatalf("destroy after the processes left: %v", err)
	}
	wantErr(t, s.AttachProcess(mu, 100), gpu.ErrNotFound)
}

func TestResetGPU_ClearsInstances(t *testing.T) {
	ctx := t.Context()
	s, uuid := oneGPU(t, "H200")
	gi := mustCreate(t, s, uuid, mig.Profile7g, pl(0, 8))
	mustCreateCI(t, s, uuid, gi.ID)
	if err := s.ResetGPU(uuid); err != nil {
		t.Fatal(err)
	}
	gis, err := s.GPUInstances(ctx, uuid)
	if err != nil || len(gis) != 0 {
		t.Errorf("after reset: %+v, %v", gis, err)
	}
	if mode, _ := s.MIGMode(ctx, uuid); !mode.Current {
		t.Errorf("reset with nothing pending changed the mode: %+v", mode)
	}
}

func TestMIGDevices_DeviceNodes(t *testing.T) {
	ctx := t.Context()
	s := newSim(t, sim.Config{
		GPUs:    []sim.GPUConfig{{Model: "H100"}, {Model: "H100"}, {Model: "H200", MIGEnabled: true}},
		DevRoot: "/run/test/dev", UVMMajor: 234, CapsMajor: 236,
	})
	devs, _ := s.Devices(ctx)
	uuid := devs[2].UUID
	gi := mustCreate(t, s, uuid, mig.Profile1g, pl(6, 1)) // gi 13
	mustCreateCI(t, s, uuid, gi.ID)
	mds, err := s.MIGDevices(ctx, uuid)
	if err != nil || len(mds) != 1 {
		t.Fatalf("MIGDevices = %+v, %v", mds, err)
	}
	md := mds[0]
	if !migUUID.MatchString(md.UUID) || md.GPUInstanceID != 13 || md.ComputeInstanceID != 0 ||
		md.MemoryMiB != 16384 || md.Placement != pl(6, 1) || md.ProfileID != mig.Profile1g {
		t.Errorf("MIG device %+v", md)
	}
	// gpu2/gi13/access = 3 + 2*135 + 13*9 = 390; ci0 = 391.
	want := []gpu.DeviceNode{
		{Path: "/run/test/dev/nvidia2", Major: 195, Minor: 2},
		{Path: "/run/test/dev/nvidiactl", Major: 195, Minor: 255},
		{Path: "/run/test/dev/nvidia-uvm", Major: 234, Minor: 0},
		{Path: "/run/test/dev/nvidia-uvm-tools", Major: 234, Minor: 1},
		{Path: "/run/test/dev/nvidia-caps/nvidia-cap390", Major: 236, Minor: 390},
		{Path: "/run/test/dev/nvidia-caps/nvidia-cap391", Major: 236, Minor: 391},
	}
	if !slices.Equal(md.DeviceNodes, want) {
		t.Errorf("device nodes\n got %+v\nwant %+v", md.DeviceNodes, want)
	}

	// Defaults.
	d, uuid := oneGPU(t, "H200")
	gi = mustCreate(t, d, uuid, mig.Profile7g, pl(0, 8))
	mustCreateCI(t, d, uuid, gi.ID)
	mds, _ = d.MIGDevices(ctx, uuid)
	nodes := mds[0].DeviceNodes
	if nodes[0].Path != "/dev/nvidia0" || nodes[2].Major != sim.DefaultUVMMajor || nodes[4].Major != sim.DefaultCapsMajor ||
		nodes[4].Path != "/dev/nvidia-caps/nvidia-cap3" || nodes[5].Minor != 4 {
		t.Errorf("default nodes %+v", nodes)
	}
}

func TestMIGDevices_UUIDsAreStableAndDistinct(t *testing.T) {
	ctx := t.Context()
	cfg := sim.Config{GPUs: []sim.GPUConfig{{Model: "H200", MIGEnabled: true}, {Model: "H200", MIGEnabled: true}}}
	fill := func(s *sim.Sim) []string {
		devs, _ := s.Devices(ctx)
		var uuids []string
		for _, d := range devs {
			for start := range 7 {
				gi := mustCreate(t, s, d.UUID, mig.Profile1g, pl(start, 1))
				mustCreateCI(t, s, d.UUID, gi.ID)
			}
			mds, _ := s.MIGDevices(ctx, d.UUID)
			for _, md := range mds {
				uuids = append(uuids, md.UUID)
			}
		}
		return uuids
	}
	a := fill(newSim(t, cfg))
	b := fill(newSim(t, cfg))
	if !slices.Equal(a, b) {
		t.Error("the same instances got different MIG UUIDs")
	}
	seen := map[string]bool{}
	for _, u := range a {
		if seen[u] {
			t.Errorf("MIG UUID %s given twice", u)
		}
		seen[u] = true
	}
	if len(a) != 14 {
		t.Errorf("%d MIG devices, want 14", len(a))
	}
}

func TestCapabilityMinors_MatchTheDriverTable(t *testing.T) {
	// Points read off /proc/driver/nvidia-caps/mig-minors on real hosts.
	for _, tt := range []struct {
		name string
		got  uint32
		want uint32
	}{
		{"gpu0/gi0/access", sim.GIAccessMinor(0, 0), 3},
		{"gpu0/gi0/ci0/access", sim.CIAccessMinor(0, 0, 0), 4},
		{"gpu0/gi0/ci7/access", sim.CIAccessMinor(0, 0, 7), 11},
		{"gpu0/gi1/access", sim.GIAccessMinor(0, 1), 12},
		{"gpu3/gi3/ci3/access", sim.CIAccessMinor(3, 3, 3), 439},
		{"gpu6/gi11/ci7/access", sim.CIAccessMinor(6, 11, 7), 920},
		{"gpu1/gi0/access", sim.GIAccessMinor(1, 0), 138},
	} {
		if tt.got != tt.want {
			t.Errorf("%s = %d, want %d", tt.name, tt.got, tt.want)
		}
	}

	lines := strings.Split(strings.TrimSuffix(sim.MIGMinors(), "\n"), "\n")
	if want := 2 + sim.MaxGPUs*15*9; len(lines) != want {
		t.Fatalf("%d lines, want %d", len(lines), want)
	}
	byMinor := map[int]string{}
	for _, line := range lines {
		name, n, ok := strings.Cut(line, " ")
		minor, err := strconv.Atoi(n)
		if !ok || err != nil {
			t.Fatalf("line %q", line)
		}
		if prev, dup := byMinor[minor]; dup {
			t.Fatalf("minor %d for %s and %s", minor, prev, name)
		}
		byMinor[minor] = name
		var g, gi, ci int
		switch {
		case name == "config" || name == "monitor":
		case strings.Count(name, "/") == 2:
			if _, err := fmt.Sscanf(name, "gpu%d/gi%d/access", &g, &gi); err != nil || uint32(minor) != sim.GIAccessMinor(g, gi) {
				t.Fatalf("line %q disagrees with GIAccessMinor", line)
			}
		default:
			if _, err := fmt.Sscanf(name, "gpu%d/gi%d/ci%d/access", &g, &gi, &ci); err != nil || uint32(minor) != sim.CIAccessMinor(g, gi, ci) {
				t.Fatalf("line %q disagrees with CIAccessMinor", line)
			}
		}
	}
}

func TestCanceledContext(t *testing.T) {
	s, uuid := oneGPU(t, "H200")
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	_, err := s.CreateGPUInstance(ctx, uuid, mig.Profile1g, pl(0, 1))
	wantErr(t, err, context.Canceled)
	_, err = s.GPUInstances(ctx, uuid)
	wantErr(t, err, context.Canceled)
	if gis, _ := s.GPUInstances(t.Context(), uuid); len(gis) != 0 {
		t.Errorf("a canceled create created %+v", gis)
	}
}
