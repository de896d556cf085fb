package mig

import "strings"

// Model is one MIG-capable GPU model: its identity as the driver reports it
// and its GPU instance profiles.
type Model struct {
	// Name as NVML reports it, e.g. "NVIDIA H200".
	Name string
	// ShortName is the name operators and configs use, e.g. "H200-141GB".
	ShortName string
	// PCIDeviceID is the PCI device id without the vendor, e.g. 0x2335.
	PCIDeviceID uint32
	// MemoryMiB is the whole GPU's memory as nvidia-smi shows it.
	MemoryMiB uint64
	// SMs is the whole GPU's streaming multiprocessor count.
	SMs int
	// ComputeSlices is the number of compute slices (7).
	ComputeSlices int
	// MemorySlots is the number of memory slots (8).
	MemorySlots int
	// Profiles in the order nvidia-smi mig -lgip lists them: 1g, 1g+me,
	// 1g double memory, 2g, 3g, 4g, 7g.
	Profiles []Profile
}

// nvidiaVendorID is the PCI vendor id NVML puts in the low 16 bits of its
// combined pciDeviceId.
const nvidiaVendorID = 0x10DE

// geometry is the profile layout every model in the table shares; only
// names and sizes differ per model.
var geometry = []struct {
	id     ProfileID
	slices int
	slots  int
	starts []int
	max    int
	me     bool
}{
	{Profile1g, 1, 1, []int{0, 1, 2, 3, 4, 5, 6}, 7, false},
	{Profile1gME, 1, 1, []int{0, 1, 2, 3, 4, 5, 6}, 1, true},
	{Profile1gDouble, 1, 2, []int{0, 2, 4, 6}, 4, false},
	{Profile2g, 2, 2, []int{0, 2, 4}, 3, false},
	{Profile3g, 3, 4, []int{0, 4}, 2, false},
	{Profile4g, 4, 4, []int{0}, 1, false},
	{Profile7g, 7, 8, []int{0}, 1, false},
}

// sizes are one model's per-profile names, memory and SMs, in geometry
// order.
type sizes struct {
	names  [7]string
	memMiB [7]uint64
	sms    [7]int
}

func newModel(name, short string, pciID uint32, memMiB uint64, sms int, sz sizes) Model {
	m := Model{
		Name:          name,
		ShortName:     short,
		PCIDeviceID:   pciID,
		MemoryMiB:     memMiB,
		SMs:           sms,
		ComputeSlices: ComputeSlices,
		MemorySlots:   MemorySlots,
	}
	for i, g := range geometry {
		m.Profiles = append(m.Profiles, Profile{
			ID:              g.id,
			Name:            sz.names[i],
			Slices:          g.slices,
			MemorySlots:     g.slots,
			Starts:          append([]int(nil), g.starts...),
			MaxCount:        g.max,
			MemoryMiB:       sz.memMiB[i],
			SMs:             sz.sms[i],
			MediaExtensions: g.me,
		})
	}
	return m
}

// models is the table. Memory values are what the driver reports per
// profile (nvidia-smi mig -lgip, GiB converted to MiB); whole-GPU memory is
// what nvidia-smi shows. The H200's start slots are assumed equal to the
// H100's: same profile ids and fractions, no published listing.
var models = []Model{
	newModel("NVIDIA A100-SXM4-40GB", "A100-40GB", 0x20B0, 40960, 108, sizes{
		names:  [7]string{"1g.5gb", "1g.5gb+me", "1g.10gb", "2g.10gb", "3g.20gb", "4g.20gb", "7g.40gb"},
		memMiB: [7]uint64{4864, 4864, 9856, 9856, 19968, 19968, 40192},
		sms:    [7]int{14, 14, 14, 28, 42, 56, 98},
	}),
	newModel("NVIDIA A100-SXM4-80GB", "A100-80GB", 0x20B2, 81920, 108, sizes{
		names:  [7]string{"1g.10gb", "1g.10gb+me", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"},
		memMiB: [7]uint64{9728, 9728, 19968, 19968, 40192, 40192, 81152},
		sms:    [7]int{14, 14, 14, 28, 42, 56, 98},
	}),
	newModel("NVIDIA H100 80GB HBM3", "H100-80GB", 0x2330, 81559, 132, sizes{
		names:  [7]string{"1g.10gb", "1g.10gb+me", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"},
		memMiB: [7]uint64{9984, 9984, 20096, 20096, 40448, 40448, 81152},
		sms:    [7]int{16, 16, 26, 32, 60, 64, 132},
	}),
	newModel("NVIDIA H200", "H200-141GB", 0x2335, 143771, 132, sizes{
		names:  [7]string{"1g.18gb", "1g.18gb+me", "1g.35gb", "2g.35gb", "3g.71gb", "4g.71gb", "7g.141gb"},
		memMiB: [7]uint64{16384, 16384, 33024, 33024, 71168, 71168, 143104},
		sms:    [7]int{16, 16, 26, 32, 60, 64, 132},
	}),
}

func (m Model) clone() Model {
	ps := make([]Profile, len(m.Profiles))
	for i, p := range m.Profiles {
		ps[i] = p.clone()
	}
	m.Profiles = ps
	return m
}

// Models returns the known MIG-capable models. The result is a deep copy:
// callers may modify it without affecting the table.
func Models() []Model {
	out := make([]Model, len(models))
	for i, m := range models {
		out[i] = m.clone()
	}
	return out
}

// ModelByName finds a model by its NVML name, e.g. "NVIDIA H200", exactly.
func ModelByName(name string) (Model, bool) {
	for _, m := range models {
		if m.Name == name {
			return m.clone(), true
		}
	}
	return Model{}, false
}

// ModelByPCIDeviceID finds a model by PCI device id. It accepts the bare
// device id (0x2335) and NVML's combined pciDeviceId with the NVIDIA vendor
// id in the low 16 bits (0x233510DE).
func ModelByPCIDeviceID(id uint32) (Model, bool) {
	if id > 0xFFFF && id&0xFFFF == nvidiaVendorID {
		id >>= 16
	}
	for _, m := range models {
		if m.PCIDeviceID == id {
			return m.clone(), true
		}
	}
	return Model{}, false
}

// LookupModel finds a model by any name a person might write in a config:
// the NVML name ("NVIDIA H200"), the name without the vendor
// ("A100-SXM4-40GB"), the short name ("H200-141GB"), or a family name
// ("H200", "H100") when exactly one model has it. Matching ignores case.
// "A100" alone is ambiguous and matches nothing.
func LookupModel(name string) (Model, bool) {
	n := strings.ToLower(strings.TrimSpace(name))
	if n == "" {
		return Model{}, false
	}
	for _, m := range models {
		full := strings.ToLower(m.Name)
		if n == full || n == strings.TrimPrefix(full, "nvidia ") || n == strings.ToLower(m.ShortName) {
			return m.clone(), true
		}
	}
	var found []Model
	for _, m := range models {
		family, _, _ := strings.Cut(strings.ToLower(m.ShortName), "-")
		if n == family {
			found = append(found, m)
		}
	}
	if len(found) == 1 {
		return found[0].clone(), true
	}
	return Model{}, false
}

// Profile finds the model's profile with the id.
func (m Model) Profile(id ProfileID) (Profile, bool) {
	for _, p := range m.Profiles {
		if p.ID == id {
			return p.clone(), true
		}
	}
	return Profile{}, false
}

// ProfileByName finds the model's profile with the name, e.g. "3g.71gb".
// A leading "MIG " (as nvidia-smi prints it) is ignored.
func (m Model) ProfileByName(name string) (Profile, bool) {
	name = strings.TrimPrefix(name, "MIG ")
	for _, p := range m.Profiles {
		if p.Name == name {
			return p.clone(), true
		}
	}
	return Profile{}, false
}

// IsKnownProfileName reports whether any known model has a profile with the
// name.
func IsKnownProfileName(name string) bool {
	for _, m := range models {
		if _, ok := m.ProfileByName(name); ok {
			return true
		}
	}
	return false
}
