package mig_test

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"

	"github.com/gpuaas/gpuaas/pkg/mig"
)

// FuzzPlace drives a GPU through random sequences of Place, destroy and
// direct Check-gated creates, and asserts after every step that the layout
// is valid (no overlap, allowed placements, slices and counts within
// limits) and that Place, Free, Check and Remaining agree with one another.
func FuzzPlace(f *testing.F) {
	f.Add([]byte{3, 0, 0, 0, 1, 0, 3, 0, 4})
	f.Add([]byte{0, 0, 6, 0, 6, 0, 6, 0, 6, 0, 6, 0, 6, 0, 6, 0, 6})
	f.Add([]byte{1, 3, 4, 4, 1, 0, 2, 2, 0, 5})
	f.Add([]byte{2, 3, 1, 0, 0, 0, 3, 1, 9, 2, 0, 0, 2})
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) == 0 {
			return
		}
		models := mig.Models()
		m := models[int(data[0])%len(models)]
		data = data[1:]
		var existing []mig.Instance
		next := func() (byte, bool) {
			if len(data) == 0 {
				return 0, false
			}
			b := data[0]
			data = data[1:]
			return b, true
		}
		for {
			op, ok := next()
			if !ok {
				return
			}
			arg, _ := next()
			switch op % 4 {
			case 0, 1: // place a model profile
				p := m.Profiles[int(arg)%len(m.Profiles)]
				got, err := m.Place(existing, p.ID)
				free := m.Free(existing, p.ID)
				if err != nil {
					if !errors.Is(err, mig.ErrNoCapacity) {
						t.Fatalf("Place(%s) = %v, want ErrNoCapacity", p.Name, err)
					}
					if len(free) != 0 {
						t.Fatalf("Place(%s) found no capacity but Free = %v", p.Name, free)
					}
					continue
				}
				if err := m.Check(existing, p.ID, got); err != nil {
					t.Fatalf("Place(%s) = %v, which Check rejects: %v", p.Name, got, err)
				}
				if !slices.Contains(free, got) {
					t.Fatalf("Place(%s) = %v, not in Free %v", p.Name, got, free)
				}
				if again, _ := m.Place(existing, p.ID); again != got {
					t.Fatalf("Place(%s) not deterministic: %v then %v", p.Name, got, again)
				}
				existing = append(existing, mig.Instance{Profile: p.ID, Placement: got})
			case 2: // destroy one
				if len(existing) > 0 {
					i := int(arg) % len(existing)
					existing = slices.Delete(existing, i, i+1)
				}
			case 3: // create wherever Check allows, including layouts Place would not choose
				p := m.Profiles[int(arg)%len(m.Profiles)]
				startB, _ := next()
				sizeB, _ := next()
				pl := mig.Placement{Start: int(startB%10) - 1, Size: int(sizeB % 9)}
				if m.Check(existing, p.ID, pl) == nil {
					existing = append(existing, mig.Instance{Profile: p.ID, Placement: pl})
				}
			}
			assertValid(t, m, existing)
		}
	})
}

func assertValid(t *testing.T, m mig.Model, existing []mig.Instance) {
	t.Helper()
	if err := m.CheckLayout(existing); err != nil {
		t.Fatalf("invalid layout %v: %v", existing, err)
	}
	slicesUsed := 0
	counts := map[mig.ProfileID]int{}
	for i, a := range existing {
		p, ok := m.Profile(a.Profile)
		if !ok || !p.Allows(a.Placement) {
			t.Fatalf("instance %v not allowed", a)
		}
		if a.Placement.Start < 0 || a.Placement.End() > m.MemorySlots {
			t.Fatalf("instance %v outside memory", a)
		}
		slicesUsed += p.Slices
		counts[a.Profile]++
		if counts[a.Profile] > p.MaxCount {
			t.Fatalf("%d instances of %s, max %d", counts[a.Profile], p.Name, p.MaxCount)
		}
		for _, b := range existing[i+1:] {
			if a.Placement.Overlaps(b.Placement) {
				t.Fatalf("instances %v and %v overlap", a, b)
			}
		}
	}
	if slicesUsed > m.ComputeSlices {
		t.Fatalf("%d compute slices in use, max %d", slicesUsed, m.ComputeSlices)
	}
	for _, p := range m.Profiles {
		free := m.Free(existing, p.ID)
		for _, pl := range p.Placements() {
			if ok := m.Check(existing, p.ID, pl) == nil; ok != slices.Contains(free, pl) {
				t.Fatalf("%s at %v: Check ok = %v, but Free = %v", p.Name, pl, ok, free)
			}
		}
		rem := m.Remaining(existing, p.ID)
		if (rem > 0) != (len(free) > 0) || rem > p.MaxCount-counts[p.ID] {
			t.Fatalf("%s: Remaining %d, Free %v, %d of max %d exist", p.Name, rem, free, counts[p.ID], p.MaxCount)
		}
	}
}

// FuzzParsePlacement asserts ParsePlacement never panics and round-trips
// through String.
func FuzzParsePlacement(f *testing.F) {
	for _, s := range []string{"0:4", "6:1", "", ":", "1:", "-1:2", "99:99", "0:0", "٣:1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := mig.ParsePlacement(s)
		if err != nil {
			return
		}
		if p.Start < 0 || p.Size <= 0 {
			t.Fatalf("ParsePlacement(%q) = %v", s, p)
		}
		q, err := mig.ParsePlacement(p.String())
		if err != nil || q != p {
			t.Fatalf("round trip %q -> %v -> %v, %v", s, p, q, err)
		}
	})
}

// FuzzParseMigParted asserts the mig-parted reader never panics, that every
// error it returns is a *ConfigError of class ErrInvalidConfig with a line
// inside the input, and that every layout it accepts is valid for its GPU
// and holds exactly the instances asked for.
func FuzzParseMigParted(f *testing.F) {
	f.Add([]byte(sampleConfig))
	f.Add([]byte("version: v1\nmig-configs:\n  c:\n    - devices: [0, 2]\n      mig-enabled: true\n      mig-devices: {\"1g.18gb\": 3, \"4g.71gb\": 1}\n"))
	f.Add([]byte("version: v1\nmig-configs:\n  c:\n    - device-filter: [\"0x233510DE\", \"0x233010DE:0x16C110DE\"]\n      devices: all\n      mig-enabled: false\n"))
	f.Add([]byte("version: v1\nmig-configs: &a\n  c: *a\n"))
	f.Add([]byte("version: v1\nmig-configs:\n  c: &e\n    - devices: all\n      mig-enabled: true\n      mig-devices: {\"7g.141gb\": 1}\n  d: *e\n"))
	f.Add([]byte("version: v1\nmig-configs: {c: [{devices: all, mig-enabled: true, mig-devices: {\"3c.3g.40gb\": 2}}]}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		lines := strings.Count(string(data), "\n") + 2
		checkErr := func(what string, err error) {
			var ce *mig.ConfigError
			if !errors.Is(err, mig.ErrInvalidConfig) || !errors.As(err, &ce) {
				t.Fatalf("%s: %v is not a *ConfigError of class ErrInvalidConfig", what, err)
			}
			if ce.Line < 0 || ce.Line > lines {
				t.Fatalf("%s: %v names line %d of %d", what, err, ce.Line, lines)
			}
		}
		cfg, err := mig.ParseMigParted(data)
		if err != nil {
			checkErr("ParseMigParted", err)
			return
		}
		if cfg.Version != mig.MigPartedVersion || len(cfg.Configs) == 0 {
			t.Fatalf("accepted config %+v", cfg)
		}
		h100, _ := mig.ModelByName("NVIDIA H100 80GB HBM3")
		hosts := [][]mig.DeviceInfo{
			host(4),
			{{Index: 0, PCIDeviceID: 0x2330}, {Index: 1, PCIDeviceID: 0x233010DE, Model: &h100}, {Index: 2, PCIDeviceID: 0x20B010DE}, {Index: 3, PCIDeviceID: 0x27B810DE, NoMIG: true}},
		}
		for _, name := range cfg.Names() {
			for _, devs := range hosts {
				layouts, err := cfg.Layout(name, devs)
				if err != nil {
					checkErr("Layout "+name, err)
					continue
				}
				last := -1
				for _, dl := range layouts {
					if dl.Index <= last {
						t.Fatalf("Layout %s: indices out of order: %+v", name, layouts)
					}
					last = dl.Index
					if !dl.MIGEnabled {
						if len(dl.Counts) != 0 || len(dl.Instances) != 0 {
							t.Fatalf("Layout %s: instances on a GPU without MIG: %+v", name, dl)
						}
						continue
					}
					m := h100
					if dl.Index != 1 || devs[1].Model == nil {
						var ok bool
						if m, ok = mig.ModelByPCIDeviceID(devs[dl.Index].PCIDeviceID); !ok {
							t.Fatalf("Layout %s: MIG enabled on an unknown model: %+v", name, dl)
						}
					}
					if err := m.CheckLayout(dl.Instances); err != nil {
						t.Fatalf("Layout %s: invalid layout %v: %v", name, dl.Instances, err)
					}
					have := map[mig.ProfileID]int{}
					for _, in := range dl.Instances {
						have[in.Profile]++
					}
					if !maps.Equal(have, dl.Counts) {
						t.Fatalf("Layout %s: instances %v, counts %v", name, dl.Instances, dl.Counts)
					}
				}
			}
		}
	})
}

// FuzzPlanAcross builds random fleets (mixed models, idle and ineligible
// GPUs) and asserts that PlanAcross only makes decisions Check accepts on
// an eligible GPU, that ErrNoCapacity without fragmentation means no
// eligible GPU has a free placement, and that a fragmentation report's
// moves are idle instances whose removal makes its placement valid.
func FuzzPlanAcross(f *testing.F) {
	f.Add([]byte{4, 0, 1, 9, 4, 19, 3, 14, 0, 19, 5, 5})
	f.Add([]byte{2, 3, 3, 19, 1, 19, 3, 19, 5, 14})
	f.Add([]byte{1, 0, 0, 19, 2, 15, 4, 19, 6, 5})
	f.Fuzz(func(t *testing.T, data []byte) {
		next := func() int {
			if len(data) == 0 {
				return 0
			}
			b := data[0]
			data = data[1:]
			return int(b)
		}
		models := mig.Models()
		fleet := make([]mig.GPUState, 1+next()%4)
		for i := range fleet {
			flags := next()
			g := mig.GPUState{ID: fmt.Sprint("gpu-", i), Model: models[flags%len(models)], Eligible: flags&4 == 0}
			for range next() % 6 {
				p := g.Model.Profiles[next()%len(g.Model.Profiles)]
				at := mig.Placement{Start: p.Starts[next()%len(p.Starts)], Size: p.MemorySlots}
				if g.Model.Check(g.Instances, p.ID, at) == nil {
					in := mig.Instance{Profile: p.ID, Placement: at}
					g.Instances = append(g.Instances, in)
					if flags&8 != 0 {
						g.Idle = append(g.Idle, in)
					}
				}
			}
			fleet[i] = g
		}
		ids := []mig.ProfileID{19, 20, 15, 14, 9, 5, 0, 42}
		req := mig.Request{Profile: ids[next()%len(ids)]}
		d, err := mig.PlanAcross(fleet, req)
		if err == nil {
			g := fleet[d.Index]
			if !g.Eligible || g.ID != d.GPU {
				t.Fatalf("decision %+v on ineligible or misnamed GPU %+v", d, g)
			}
			if err := g.Model.Check(g.Instances, d.Profile, d.Placement); err != nil {
				t.Fatalf("decision %+v: %v", d, err)
			}
			return
		}
		if errors.Is(err, mig.ErrUnknownProfile) {
			return
		}
		if !errors.Is(err, mig.ErrNoCapacity) {
			t.Fatalf("PlanAcross = %v, want ErrNoCapacity or ErrUnknownProfile", err)
		}
		for _, g := range fleet {
			if g.Eligible && len(g.Model.Free(g.Instances, req.Profile)) > 0 {
				t.Fatalf("PlanAcross = %v, but %s has %v free", err, g.ID, g.Model.Free(g.Instances, req.Profile))
			}
		}
		var fe *mig.FragmentationError
		if !errors.As(err, &fe) {
			if errors.Is(err, mig.ErrFragmented) {
				t.Fatalf("%v is ErrFragmented but not a *FragmentationError", err)
			}
			return
		}
		if len(fe.Moves) == 0 {
			return
		}
		gi := slices.IndexFunc(fleet, func(g mig.GPUState) bool { return g.ID == fe.GPU })
		g := fleet[gi]
		kept := slices.Clone(g.Instances)
		for _, mv := range fe.Moves {
			if mv.GPU != g.ID || !slices.Contains(g.Idle, mv.Instance) {
				t.Fatalf("move %+v is not of an idle instance on %s", mv, g.ID)
			}
			kept = slices.DeleteFunc(kept, func(in mig.Instance) bool { return in == mv.Instance })
		}
		if err := g.Model.Check(kept, req.Profile, fe.Placement); err != nil {
			t.Fatalf("after the moves %+v, %s at %s: %v", fe.Moves, fe.ProfileName, fe.Placement, err)
		}
	})
}
