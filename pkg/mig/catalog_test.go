package mig_test

import (
	"errors"
	"reflect"
	"slices"
	"testing"

	"github.com/gpuaas/gpuaas/pkg/mig"
)

// reported is what a driver reports for a table model: the input
// ModelFromProfiles sees on real hardware of that model.
func reported(m mig.Model) []mig.ReportedProfile {
	var out []mig.ReportedProfile
	for _, p := range m.Profiles {
		out = append(out, mig.ReportedProfile{
			ID: p.ID, Name: "MIG " + p.Name, Slices: p.Slices, MemorySlots: p.MemorySlots,
			MemoryMiB: p.MemoryMiB, SMs: p.SMs, InstanceCount: p.MaxCount, Placements: p.Placements(),
		})
	}
	return out
}

func TestModelFromProfiles_RebuildsEveryTableModel(t *testing.T) {
	for _, m := range mig.Models() {
		t.Run(m.ShortName, func(t *testing.T) {
			// The driver's order is not ours: reverse profiles and placements.
			rep := reported(m)
			slices.Reverse(rep)
			for i := range rep {
				slices.Reverse(rep[i].Placements)
			}
			got, err := mig.ModelFromProfiles(m.Name, m.PCIDeviceID<<16|0x10DE, m.MemoryMiB, rep)
			if err != nil {
				t.Fatalf("ModelFromProfiles: %v", err)
			}
			if !reflect.DeepEqual(got, m) {
				t.Errorf("ModelFromProfiles =\n%+v\nwant the table's\n%+v", got, m)
			}
		})
	}
}

func TestModelFromProfiles_UsesWhatTheDriverReports(t *testing.T) {
	h := h200(t)
	rep := reported(h)
	for i := range rep {
		rep[i].Name += "-newdriver" // names drift
		rep[i].MemoryMiB--          // sizes too
	}
	got, err := mig.ModelFromProfiles("NVIDIA H200", 0x233510DE, h.MemoryMiB, rep)
	if err != nil {
		t.Fatalf("ModelFromProfiles: %v", err)
	}
	p, ok := got.Profile(mig.Profile3g)
	if !ok || p.Name != "3g.71gb-newdriver" || p.MemoryMiB != 71168-1 {
		t.Errorf("3g = %+v, want the reported name and memory", p)
	}
	// The renamed +me profile no longer says so in its name: the table
	// knows it by id.
	if me, _ := got.Profile(mig.Profile1gME); !me.MediaExtensions {
		t.Errorf("1g+me lost its media extensions: %+v", me)
	}
	// Planning works on the reported model exactly as on the table's.
	at, err := got.Place(nil, mig.Profile1g)
	if err != nil || at != (mig.Placement{Start: 6, Size: 1}) {
		t.Errorf("Place on reported model = %v, %v; want 6:1", at, err)
	}
}

func TestModelFromProfiles_UnknownSKU(t *testing.T) {
	// A model the table lacks, with an A30-like geometry: 4 slices, 4
	// memory slots.
	rep := []mig.ReportedProfile{
		{ID: 14, Name: "1g.6gb", Slices: 1, MemorySlots: 1, MemoryMiB: 5836, InstanceCount: 4, Placements: []mig.Placement{at(0, 1), at(1, 1), at(2, 1), at(3, 1)}},
		{ID: 5, Name: "2g.12gb", Slices: 2, MemorySlots: 2, MemoryMiB: 11940, InstanceCount: 2, Placements: []mig.Placement{at(0, 2), at(2, 2)}},
		{ID: 0, Name: "4g.24gb", Slices: 4, MemorySlots: 4, MemoryMiB: 24062, InstanceCount: 1, Placements: []mig.Placement{at(0, 4)}},
	}
	m, err := mig.ModelFromProfiles("NVIDIA A30", 0x20B710DE, 24576, rep)
	if err != nil {
		t.Fatalf("ModelFromProfiles: %v", err)
	}
	if m.ComputeSlices != 4 || m.MemorySlots != 4 || m.ShortName != "A30" {
		t.Errorf("geometry %d slices / %d slots, short name %q; want 4 / 4, A30", m.ComputeSlices, m.MemorySlots, m.ShortName)
	}
	if got := m.Remaining(nil, 14); got != 4 {
		t.Errorf("Remaining 1g = %d, want 4", got)
	}
	if _, err := m.Place([]mig.Instance{in(14, 0, 1)}, 0); !errors.Is(err, mig.ErrNoCapacity) {
		t.Errorf("4g beside a 1g: %v, want ErrNoCapacity", err)
	}
}

func TestModelFromProfiles_RejectsInconsistentReports(t *testing.T) {
	good := func() []mig.ReportedProfile { return reported(h200(t)) }
	edit := func(id mig.ProfileID, f func(*mig.ReportedProfile)) []mig.ReportedProfile {
		rep := good()
		for i := range rep {
			if rep[i].ID == id {
				f(&rep[i])
			}
		}
		return rep
	}
	tests := []struct {
		name    string
		profile []mig.ReportedProfile
	}{
		{"no profiles", nil},
		{"duplicate id", append(good(), good()[0])},
		{"negative id", edit(mig.Profile1g, func(p *mig.ReportedProfile) { p.ID = -1 })},
		{"zero slices", edit(mig.Profile2g, func(p *mig.ReportedProfile) { p.Slices = 0 })},
		{"zero memory slots", edit(mig.Profile2g, func(p *mig.ReportedProfile) { p.MemorySlots = 0 })},
		{"more than 8 memory slots", edit(mig.Profile7g, func(p *mig.ReportedProfile) {
			p.MemorySlots = 9
			p.Placements = []mig.Placement{at(0, 9)}
		})},
		{"placement past slot 7", edit(mig.Profile3g, func(p *mig.ReportedProfile) { p.Placements = append(p.Placements, at(6, 4)) })},
		{"negative start", edit(mig.Profile1g, func(p *mig.ReportedProfile) { p.Placements = append(p.Placements, at(-1, 1)) })},
		{"placement of the wrong size", edit(mig.Profile2g, func(p *mig.ReportedProfile) { p.Placements[0].Size = 1 })},
		{"placement listed twice", edit(mig.Profile2g, func(p *mig.ReportedProfile) { p.Placements = append(p.Placements, at(0, 2)) })},
		{"no placements", edit(mig.Profile4g, func(p *mig.ReportedProfile) { p.Placements = nil })},
		{"instance count zero", edit(mig.Profile4g, func(p *mig.ReportedProfile) { p.InstanceCount = 0 })},
		{"more instances than placements fit side by side", edit(mig.Profile3g, func(p *mig.ReportedProfile) { p.InstanceCount = 3 })},
		{"memory beyond the GPU's", edit(mig.Profile7g, func(p *mig.ReportedProfile) { p.MemoryMiB = 1 << 40 })},
		{"more slices together than a GPU has", edit(mig.Profile1g, func(p *mig.ReportedProfile) {
			p.Slices = 2
			p.InstanceCount = 7
		})},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := mig.ModelFromProfiles("NVIDIA H200", 0x233510DE, 143771, tt.profile)
			if !errors.Is(err, mig.ErrInvalidProfiles) {
				t.Fatalf("ModelFromProfiles = %v, want ErrInvalidProfiles", err)
			}
		})
	}
}

func TestModelFromProfiles_KnownSKUWithOtherGeometry(t *testing.T) {
	h := h200(t)
	tests := []struct {
		name string
		edit func([]mig.ReportedProfile) []mig.ReportedProfile
	}{
		{"other starts", func(rep []mig.ReportedProfile) []mig.ReportedProfile {
			for i := range rep {
				if rep[i].ID == mig.Profile3g {
					rep[i].Placements = []mig.Placement{at(0, 4)}
					rep[i].InstanceCount = 1
				}
			}
			return rep
		}},
		{"a profile missing", func(rep []mig.ReportedProfile) []mig.ReportedProfile {
			return slices.DeleteFunc(rep, func(p mig.ReportedProfile) bool { return p.ID == mig.Profile1gME })
		}},
		{"an extra profile", func(rep []mig.ReportedProfile) []mig.ReportedProfile {
			return append(rep, mig.ReportedProfile{ID: 47, Name: "1g.18gb+gfx", Slices: 1, MemorySlots: 1, MemoryMiB: 16384, InstanceCount: 1, Placements: []mig.Placement{at(0, 1)}})
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := mig.ModelFromProfiles(h.Name, 0x233510DE, h.MemoryMiB, tt.edit(reported(h)))
			if !errors.Is(err, mig.ErrModelMismatch) || errors.Is(err, mig.ErrInvalidProfiles) {
				t.Fatalf("ModelFromProfiles = %v, want ErrModelMismatch only", err)
			}
			if m.Name != h.Name || len(m.Profiles) == 0 {
				t.Errorf("the reported model is not returned with the mismatch: %+v", m)
			}
		})
	}
}

func TestResolveModel(t *testing.T) {
	h := h200(t)
	tests := []struct {
		name     string
		model    string
		pci      uint32
		profiles []mig.ReportedProfile
		want     string // ShortName, "" for an error
		wantErr  error
	}{
		{"reported profiles win", "NVIDIA H200", 0x233510DE, reported(h), "H200-141GB", nil},
		{"MIG disabled: the table by PCI id", "renamed by a new driver", 0x233510DE, nil, "H200-141GB", nil},
		{"MIG disabled: the table by name", "NVIDIA H100 80GB HBM3", 0, nil, "H100-80GB", nil},
		{"unknown and silent", "NVIDIA L4", 0x27B810DE, nil, "", mig.ErrUnknownModel},
		{"reported but inconsistent", "NVIDIA H200", 0x233510DE, []mig.ReportedProfile{{ID: 1}}, "", mig.ErrInvalidProfiles},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := mig.ResolveModel(tt.model, tt.pci, 0, tt.profiles)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("ResolveModel = %v, want %v", err, tt.wantErr)
				}
				return
			}
			if err != nil || m.ShortName != tt.want {
				t.Fatalf("ResolveModel = %q, %v; want %q", m.ShortName, err, tt.want)
			}
		})
	}
}
