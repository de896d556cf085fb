package sim

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/pkg/mig"
)

func persistedConfig(t *testing.T) Config {
	return Config{
		GPUs: []GPUConfig{
			{Model: "H200", MIGEnabled: true},
			{Model: "A100-40GB", MIGEnabled: false},
		},
		StatePath: filepath.Join(t.TempDir(), "gpu-state.json"),
	}
}

func TestPersistence_RestartSeesWhatTheDriverHolds(t *testing.T) {
	ctx := t.Context()
	cfg := persistedConfig(t)
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	devs, _ := s.Devices(ctx)
	h200, a100 := devs[0].UUID, devs[1].UUID

	gi, err := s.CreateGPUInstance(ctx, h200, mig.Profile3g, mig.Placement{Start: 4, Size: 4})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateComputeInstance(ctx, h200, gi.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateGPUInstance(ctx, h200, mig.Profile1g, mig.Placement{Start: 0, Size: 1}); err != nil {
		t.Fatal(err)
	}
	mds, _ := s.MIGDevices(ctx, h200)
	if err := s.AttachProcess(mds[0].UUID, 4242); err != nil {
		t.Fatal(err)
	}
	if _, err := s.SetMIGMode(ctx, a100, true); err != nil {
		t.Fatal(err)
	}
	wantGIs, _ := s.GPUInstances(ctx, h200)

	// The agent restarts; the driver (the state file) still has it all.
	// The config's MIG modes only apply to a GPU the file does not know.
	cfg.GPUs[0].MIGEnabled = false
	r, err := New(cfg)
	if err != nil {
		t.Fatalf("New after restart: %v", err)
	}
	gotGIs, err := r.GPUInstances(ctx, h200)
	if err != nil || !reflect.DeepEqual(gotGIs, wantGIs) {
		t.Errorf("GPUInstances after restart = %+v, %v; want %+v", gotGIs, err, wantGIs)
	}
	gotMDs, _ := r.MIGDevices(ctx, h200)
	if !reflect.DeepEqual(gotMDs, mds) {
		t.Errorf("MIGDevices after restart = %+v; want %+v", gotMDs, mds)
	}
	if mode, _ := r.MIGMode(ctx, a100); mode != (gpu.MIGMode{Current: false, Pending: true}) {
		t.Errorf("pending mode after restart = %+v", mode)
	}
	if err := r.DestroyComputeInstance(ctx, h200, gi.ID, 0); !errors.Is(err, gpu.ErrInUse) {
		t.Errorf("the attached process was forgotten: %v", err)
	}
	if err := r.ResetGPU(a100); err != nil {
		t.Fatal(err)
	}
	r2, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if mode, _ := r2.MIGMode(ctx, a100); mode != (gpu.MIGMode{Current: true, Pending: true}) {
		t.Errorf("mode after reset and restart = %+v", mode)
	}

	entries, _ := os.ReadDir(filepath.Dir(cfg.StatePath))
	if len(entries) != 1 {
		t.Errorf("state directory holds %d entries, want only the state file (temp files left?)", len(entries))
	}
}

func TestPersistence_FailedSaveChangesNothing(t *testing.T) {
	ctx := t.Context()
	cfg := persistedConfig(t)
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	devs, _ := s.Devices(ctx)
	if err := os.RemoveAll(filepath.Dir(cfg.StatePath)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateGPUInstance(ctx, devs[0].UUID, mig.Profile7g, mig.Placement{Start: 0, Size: 8}); err == nil {
		t.Fatal("create succeeded although the state could not be saved")
	}
	if gis, _ := s.GPUInstances(ctx, devs[0].UUID); len(gis) != 0 {
		t.Errorf("unsaved instance is visible: %+v", gis)
	}
}

func TestPersistence_BadStateFileIsAnError(t *testing.T) {
	cfg := persistedConfig(t)
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	devs, _ := s.Devices(t.Context())
	h200, a100 := devs[0].UUID, devs[1].UUID
	gi := func(id int, p mig.ProfileID, start, size int, cis string) string {
		return `{"id":` + itoa(id) + `,"profile":` + itoa(int(p)) + `,"start":` + itoa(start) + `,"size":` + itoa(size) + cis + `}`
	}
	doc := func(gpus ...string) string { return `{"version":1,"gpus":[` + strings.Join(gpus, ",") + `]}` }
	gpuRec := func(uuid string, current bool, gis ...string) string {
		return `{"uuid":"` + uuid + `","migCurrent":` + boolStr(current) + `,"migPending":` + boolStr(current) +
			`,"gpuInstances":[` + strings.Join(gis, ",") + `]}`
	}

	tests := []struct {
		name, content, want string
	}{
		{"empty file", "", "corrupt state file"},
		{"garbage", "\x00\x01not json", "corrupt state file"},
		{"truncated", doc(gpuRec(h200, true))[:40], "corrupt state file"},
		{"trailing data", doc() + "{}", "data after the document"},
		{"unknown field", `{"version":1,"gpus":[],"extra":1}`, "unknown field"},
		{"wrong type", `{"version":"1","gpus":[]}`, "corrupt state file"},
		{"other version", `{"version":2,"gpus":[]}`, "version 2"},
		{"unconfigured gpu", doc(gpuRec("GPU-other", true)), "not a configured gpu"},
		{"gpu twice", doc(gpuRec(h200, true), gpuRec(h200, true)), "twice"},
		{"instances without mig mode", doc(gpuRec(a100, false, gi(7, mig.Profile1g, 0, 1, ""))), "mig mode not current"},
		{"unknown profile", doc(gpuRec(h200, true, gi(7, 42, 0, 1, ""))), "unknown mig profile"},
		{"disallowed placement", doc(gpuRec(h200, true, gi(14, mig.Profile1g, 7, 1, ""))), "placement not allowed"},
		{"overlap", doc(gpuRec(h200, true, gi(2, mig.Profile3g, 4, 4, ""), gi(13, mig.Profile1g, 6, 1, ""))), "overlaps"},
		{"wrong id", doc(gpuRec(h200, true, gi(1, mig.Profile1g, 6, 1, ""))), "id should be 13"},
		{"ids out of order", doc(gpuRec(h200, true, gi(13, mig.Profile1g, 6, 1, ""), gi(7, mig.Profile1g, 0, 1, ""))), "ascending"},
		{"two compute instances", doc(gpuRec(h200, true, gi(13, mig.Profile1g, 6, 1, `,"computeInstances":[{"id":0},{"id":1}]`))), "at most 1"},
		{"compute instance id", doc(gpuRec(h200, true, gi(13, mig.Profile1g, 6, 1, `,"computeInstances":[{"id":3}]`))), "want 0"},
		{"bad pid", doc(gpuRec(h200, true, gi(13, mig.Profile1g, 6, 1, `,"computeInstances":[{"id":0,"processes":[-1]}]`))), "invalid pid"},
		{"duplicate pid", doc(gpuRec(h200, true, gi(13, mig.Profile1g, 6, 1, `,"computeInstances":[{"id":0,"processes":[5,5]}]`))), "pids"},
		{"too many remapped rows", `{"version":1,"gpus":[{"uuid":"` + h200 + `","ecc":{"remappedCorrectable":500,"remappedUncorrectable":13}}]}`, "513 remapped rows"},
		{"negative ecc counter", `{"version":1,"gpus":[{"uuid":"` + h200 + `","ecc":{"corrected":-1}}]}`, "corrupt state file"},
		{"unknown ecc field", `{"version":1,"gpus":[{"uuid":"` + h200 + `","ecc":{"parity":1}}]}`, "unknown field"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := os.WriteFile(cfg.StatePath, []byte(tt.content), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := New(cfg)
			if err == nil || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), cfg.StatePath) {
				t.Fatalf("New = %v, want an error naming the file and containing %q", err, tt.want)
			}
		})
	}

	// And the valid form of the same document loads.
	good := doc(gpuRec(h200, true, gi(2, mig.Profile3g, 4, 4, `,"computeInstances":[{"id":0,"processes":[5,9]}]`), gi(7, mig.Profile1g, 0, 1, "")))
	if err := os.WriteFile(cfg.StatePath, []byte(good), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := New(cfg); err != nil {
		t.Fatalf("valid state: %v", err)
	}
}

func itoa(n int) string {
	b, _ := json.Marshal(n)
	return string(b)
}

func boolStr(b bool) string {
	if b {
		return "true"
	}
	return "false"
}

// FuzzLoadState feeds arbitrary bytes to the state loader: it must return
// an error or a state that obeys every rule, never panic, and a state it
// accepts must survive a save and reload unchanged.
func FuzzLoadState(f *testing.F) {
	s, err := New(Config{GPUs: []GPUConfig{{Model: "H200", MIGEnabled: true}, {Model: "H100"}}})
	if err != nil {
		f.Fatal(err)
	}
	models := s.models()
	uuid := s.gpus[0].dev.UUID
	f.Add([]byte(`{"version":1,"gpus":[]}`))
	f.Add([]byte(`{"version":1,"gpus":[{"uuid":"` + uuid + `","migCurrent":true,"migPending":true,"gpuInstances":[` +
		`{"id":2,"profile":9,"start":4,"size":4,"computeInstances":[{"id":0,"processes":[7]}]},{"id":7,"profile":19,"start":0,"size":1}]}]}`))
	f.Add([]byte(`{"version":1,"gpus":[{"uuid":"` + uuid + `","migCurrent":true,"gpuInstances":[{"id":0,"profile":0,"start":0,"size":8}]}]}`))
	f.Add([]byte(`{"version":1,"gpus":[{"uuid":"` + uuid + `","gpuInstances":[{"id":13,"profile":19,"start":6,"size":1}]}]}`))
	f.Add([]byte(`{"version":1,"gpus":[{"uuid":"` + uuid + `","ecc":{"corrected":4,"uncorrected":1,"remappedUncorrectable":1,"remapPending":true}}]}`))
	f.Add([]byte(`[]`))
	f.Add([]byte(`{"version":1,"gpus":[{"uuid":"x"}]} trailing`))
	f.Fuzz(func(t *testing.T, data []byte) {
		st, err := decodeState(data, models)
		if err != nil {
			return
		}
		for _, g := range st.GPUs {
			m := models[g.UUID]
			if err := m.CheckLayout(instances(g)); err != nil {
				t.Fatalf("accepted an invalid layout: %v", err)
			}
			if len(g.GPUInstances) > 0 && !g.MIGCurrent {
				t.Fatal("accepted instances on a GPU without MIG mode")
			}
			if uint64(g.ECC.RemappedCorrectable)+uint64(g.ECC.RemappedUncorrectable) > maxRemappedRows {
				t.Fatalf("accepted %+v remapped rows", g.ECC)
			}
		}
		out, err := json.Marshal(st)
		if err != nil {
			t.Fatal(err)
		}
		again, err := decodeState(out, models)
		if err != nil {
			t.Fatalf("re-encoded state rejected: %v", err)
		}
		if !reflect.DeepEqual(normalize(st), normalize(again)) {
			t.Fatalf("round trip changed the state:\n%+v\n%+v", st, again)
		}
	})
}

// normalize maps empty slices to nil, which JSON's omitempty does too.
func normalize(st stateFile) stateFile {
	if len(st.GPUs) == 0 {
		st.GPUs = nil
	}
	for i := range st.GPUs {
		g := &st.GPUs[i]
		if len(g.GPUInstances) == 0 {
			g.GPUInstances = nil
		}
		for j := range g.GPUInstances {
			gi := &g.GPUInstances[j]
			if len(gi.ComputeInstances) == 0 {
				gi.ComputeInstances = nil
			}
			for k := range gi.ComputeInstances {
				if len(gi.ComputeInstances[k].Processes) == 0 {
					gi.ComputeInstances[k].Processes = nil
				}
			}
		}
	}
	return st
}
