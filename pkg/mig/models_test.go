package mig_test

import (
	"slices"
	"testing"

	"github.com/gpuaas/gpuaas/pkg/mig"
)

// wantGeometry is the geometry from the driver's placement listings: every
// model in the table must have exactly these profiles.
var wantGeometry = map[mig.ProfileID]struct {
	slices, slots, max int
	starts             []int
	me                 bool
}{
	mig.Profile1g:       {1, 1, 7, []int{0, 1, 2, 3, 4, 5, 6}, false},
	mig.Profile1gME:     {1, 1, 1, []int{0, 1, 2, 3, 4, 5, 6}, true},
	mig.Profile1gDouble: {1, 2, 4, []int{0, 2, 4, 6}, false},
	mig.Profile2g:       {2, 2, 3, []int{0, 2, 4}, false},
	mig.Profile3g:       {3, 4, 2, []int{0, 4}, false},
	mig.Profile4g:       {4, 4, 1, []int{0}, false},
	mig.Profile7g:       {7, 8, 1, []int{0}, false},
}

func TestModels_HaveTheDriverGeometry(t *testing.T) {
	for _, m := range mig.Models() {
		t.Run(m.ShortName, func(t *testing.T) {
			if m.ComputeSlices != 7 || m.MemorySlots != 8 {
				t.Errorf("slices/slots = %d/%d, want 7/8", m.ComputeSlices, m.MemorySlots)
			}
			if len(m.Profiles) != len(wantGeometry) {
				t.Fatalf("%d profiles, want %d", len(m.Profiles), len(wantGeometry))
			}
			names := map[string]bool{}
			for _, p := range m.Profiles {
				g, ok := wantGeometry[p.ID]
				if !ok {
					t.Errorf("unexpected profile id %d", p.ID)
					continue
				}
				if p.Slices != g.slices || p.MemorySlots != g.slots || p.MaxCount != g.max ||
					!slices.Equal(p.Starts, g.starts) || p.MediaExtensions != g.me {
					t.Errorf("profile %d (%s) = %+v, want %+v", p.ID, p.Name, p, g)
				}
				if p.MemoryMiB == 0 || p.MemoryMiB > m.MemoryMiB || p.SMs == 0 || p.SMs > m.SMs {
					t.Errorf("profile %s sizes %d MiB / %d SMs out of range", p.Name, p.MemoryMiB, p.SMs)
				}
				if names[p.Name] {
					t.Errorf("duplicate profile name %s", p.Name)
				}
				names[p.Name] = true
			}
		})
	}
}

func TestModels_NamesAndSizes(t *testing.T) {
	// Order: 1g, 1g+me, 1g double memory, 2g, 3g, 4g, 7g.
	tests := []struct {
		model  string
		pciID  uint32
		memMiB uint64
		names  []string
		memory []uint64
		sms    []int
	}{
		{
			"NVIDIA A100-SXM4-40GB", 0x20B0, 40960,
			[]string{"1g.5gb", "1g.5gb+me", "1g.10gb", "2g.10gb", "3g.20gb", "4g.20gb", "7g.40gb"},
			[]uint64{4864, 4864, 9856, 9856, 19968, 19968, 40192},
			[]int{14, 14, 14, 28, 42, 56, 98},
		},
		{
			"NVIDIA A100-SXM4-80GB", 0x20B2, 81920,
			[]string{"1g.10gb", "1g.10gb+me", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"},
			[]uint64{9728, 9728, 19968, 19968, 40192, 40192, 81152},
			[]int{14, 14, 14, 28, 42, 56, 98},
		},
		{
			"NVIDIA H100 80GB HBM3", 0x2330, 81559,
			[]string{"1g.10gb", "1g.10gb+me", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"},
			[]uint64{9984, 9984, 20096, 20096, 40448, 40448, 81152},
			[]int{16, 16, 26, 32, 60, 64, 132},
		},
		{
			"NVIDIA H200", 0x2335, 143771,
			[]string{"1g.18gb", "1g.18gb+me", "1g.35gb", "2g.35gb", "3g.71gb", "4g.71gb", "7g.141gb"},
			[]uint64{16384, 16384, 33024, 33024, 71168, 71168, 143104},
			[]int{16, 16, 26, 32, 60, 64, 132},
		},
	}
	ids := []mig.ProfileID{mig.Profile1g, mig.Profile1gME, mig.Profile1gDouble, mig.Profile2g, mig.Profile3g, mig.Profile4g, mig.Profile7g}
	for _, tt := range tests {
		t.Run(tt.model, func(t *testing.T) {
			m, ok := mig.ModelByName(tt.model)
			if !ok {
				t.Fatalf("model %q not found", tt.model)
			}
			if m.PCIDeviceID != tt.pciID || m.MemoryMiB != tt.memMiB {
				t.Errorf("pci id %#x, memory %d; want %#x, %d", m.PCIDeviceID, m.MemoryMiB, tt.pciID, tt.memMiB)
			}
			for i, id := range ids {
				p, ok := m.Profile(id)
				if !ok {
					t.Fatalf("profile %d missing", id)
				}
				if p.Name != tt.names[i] || p.MemoryMiB != tt.memory[i] || p.SMs != tt.sms[i] {
					t.Errorf("profile %d = %s/%d MiB/%d SMs, want %s/%d/%d",
						id, p.Name, p.MemoryMiB, p.SMs, tt.names[i], tt.memory[i], tt.sms[i])
				}
				if m.Profiles[i].ID != id {
					t.Errorf("profile order: index %d is %d, want %d", i, m.Profiles[i].ID, id)
				}
			}
		})
	}
}

func TestModels_CallersCannotMutateTheTable(t *testing.T) {
	ms := mig.Models()
	ms[0].Name = "changed"
	ms[0].Profiles[0].Starts[0] = 99
	ms[0].Profiles[0].Name = "changed"

	m, _ := mig.ModelByName("NVIDIA H200")
	m.Profiles[0].Starts[1] = 99
	p, _ := m.Profile(mig.Profile3g)
	p.Starts[0] = 99

	again := mig.Models()
	if again[0].Name == "changed" || again[0].Profiles[0].Starts[0] == 99 || again[0].Profiles[0].Name == "changed" {
		t.Error("Models returned the table itself")
	}
	h200, _ := mig.ModelByName("NVIDIA H200")
	if h200.Profiles[0].Starts[1] == 99 {
		t.Error("ModelByName returned the table's slices")
	}
	if p3, _ := h200.Profile(mig.Profile3g); p3.Starts[0] == 99 {
		t.Error("Profile returned the model's slices")
	}
}

func TestModelByName(t *testing.T) {
	for _, tt := range []struct {
		name string
		ok   bool
	}{
		{"NVIDIA H200", true},
		{"NVIDIA H100 80GB HBM3", true},
		{"NVIDIA A100-SXM4-40GB", true},
		{"NVIDIA A100-SXM4-80GB", true},
		{"nvidia h200", false}, // NVML names are exact
		{"H200", false},
		{"", false},
	} {
		if _, ok := mig.ModelByName(tt.name); ok != tt.ok {
			t.Errorf("ModelByName(%q) ok = %v, want %v", tt.name, ok, tt.ok)
		}
	}
}

func TestModelByPCIDeviceID(t *testing.T) {
	for _, tt := range []struct {
		id   uint32
		want string
	}{
		{0x2335, "NVIDIA H200"},
		{0x233510DE, "NVIDIA H200"}, // NVML's combined form
		{0x2330, "NVIDIA H100 80GB HBM3"},
		{0x20B0, "NVIDIA A100-SXM4-40GB"},
		{0x20B210DE, "NVIDIA A100-SXM4-80GB"},
		{0x23351002, ""}, // another vendor's low bits
		{0x1234, ""},
		{0, ""},
	} {
		m, ok := mig.ModelByPCIDeviceID(tt.id)
		if ok != (tt.want != "") || m.Name != tt.want {
			t.Errorf("ModelByPCIDeviceID(%#x) = %q, %v; want %q", tt.id, m.Name, ok, tt.want)
		}
	}
}

func TestLookupModel(t *testing.T) {
	for _, tt := range []struct {
		in, want string
	}{
		{"NVIDIA H200", "NVIDIA H200"},
		{"H200", "NVIDIA H200"},
		{"h200-141gb", "NVIDIA H200"},
		{"H100", "NVIDIA H100 80GB HBM3"},
		{"H100-80GB", "NVIDIA H100 80GB HBM3"},
		{"A100-40GB", "NVIDIA A100-SXM4-40GB"},
		{"A100-SXM4-80GB", "NVIDIA A100-SXM4-80GB"},
		{" a100-80gb ", "NVIDIA A100-SXM4-80GB"},
		{"A100", ""}, // ambiguous
		{"B200", ""},
		{"", ""},
	} {
		m, ok := mig.LookupModel(tt.in)
		if ok != (tt.want != "") || m.Name != tt.want {
			t.Errorf("LookupModel(%q) = %q, %v; want %q", tt.in, m.Name, ok, tt.want)
		}
	}
}

func TestProfileByName(t *testing.T) {
	h200, _ := mig.ModelByName("NVIDIA H200")
	for _, tt := range []struct {
		name string
		want mig.ProfileID
		ok   bool
	}{
		{"1g.18gb", mig.Profile1g, true},
		{"1g.18gb+me", mig.Profile1gME, true},
		{"1g.35gb", mig.Profile1gDouble, true},
		{"2g.35gb", mig.Profile2g, true},
		{"3g.71gb", mig.Profile3g, true},
		{"MIG 4g.71gb", mig.Profile4g, true},
		{"7g.141gb", mig.Profile7g, true},
		{"1g.10gb", 0, false}, // an H100 name
		{"", 0, false},
	} {
		p, ok := h200.ProfileByName(tt.name)
		if ok != tt.ok || (ok && p.ID != tt.want) {
			t.Errorf("ProfileByName(%q) = %d, %v; want %d, %v", tt.name, p.ID, ok, tt.want, tt.ok)
		}
	}
	if _, ok := h200.Profile(42); ok {
		t.Error("Profile(42) found")
	}
}

func TestIsKnownProfileName(t *testing.T) {
	for _, tt := range []struct {
		name string
		want bool
	}{
		{"1g.5gb", true}, {"1g.10gb", true}, {"1g.18gb+me", true}, {"7g.141gb", true},
		{"3g.40gb", true}, {"2g.10gb", true}, {"7g.40gb", true},
		{"1g.6gb", false}, {"8g.80gb", false}, {"", false},
	} {
		if got := mig.IsKnownProfileName(tt.name); got != tt.want {
			t.Errorf("IsKnownProfileName(%q) = %v, want %v", tt.name, got, tt.want)
		}
	}
}
