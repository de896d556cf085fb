package sim_test

import (
	"errors"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"testing"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/agent/gpu/sim"
	"github.com/gpuaas/gpuaas/pkg/mig"
)

// TestConcurrentCreates_NeverOverlap races creates, destroys and reads on
// two GPUs (run it with -race). Whatever interleaving happens, every GPU's
// layout must stay valid, and every successful create must be visible.
func TestConcurrentCreates_NeverOverlap(t *testing.T) {
	for _, persisted := range []bool{false, true} {
		name := "in memory"
		cfg := sim.Config{GPUs: []sim.GPUConfig{{Model: "H200", MIGEnabled: true}, {Model: "A100-80GB", MIGEnabled: true}}}
		if persisted {
			name = "persisted"
			cfg.StatePath = filepath.Join(t.TempDir(), "state.json")
		}
		t.Run(name, func(t *testing.T) {
			ctx := t.Context()
			s := newSim(t, cfg)
			devs, _ := s.Devices(ctx)
			models := map[string]mig.Model{}
			for _, d := range devs {
				models[d.UUID], _ = mig.ModelByPCIDeviceID(d.PCIDeviceID)
			}

			const workers, rounds = 8, 60
			var wg sync.WaitGroup
			errs := make(chan error, workers*rounds)
			for w := range workers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					r := rand.New(rand.NewPCG(uint64(w), 7))
					for range rounds {
						d := devs[r.IntN(len(devs))]
						m := models[d.UUID]
						p := m.Profiles[r.IntN(len(m.Profiles))]
						at := mig.Placement{Start: p.Starts[r.IntN(len(p.Starts))], Size: p.MemorySlots}
						switch r.IntN(4) {
						case 0, 1:
							gi, err := s.CreateGPUInstance(ctx, d.UUID, p.ID, at)
							if err == nil && r.IntN(2) == 0 {
								_, err = s.CreateComputeInstance(ctx, d.UUID, gi.ID)
							}
							if err != nil && !isExpected(err) {
								errs <- err
							}
						case 2:
							gis, _ := s.GPUInstances(ctx, d.UUID)
							if len(gis) > 0 {
								gi := gis[r.IntN(len(gis))]
								_ = s.DestroyComputeInstance(ctx, d.UUID, gi.ID, 0)
								_ = s.DestroyGPUInstance(ctx, d.UUID, gi.ID)
							}
						case 3:
							if _, err := s.GPUInstanceProfiles(ctx, d.UUID); err != nil {
								errs <- err
							}
							if _, err := s.MIGDevices(ctx, d.UUID); err != nil {
								errs <- err
							}
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Errorf("unexpected error: %v", err)
			}
			for _, d := range devs {
				gis, err := s.GPUInstances(ctx, d.UUID)
				if err != nil {
					t.Fatal(err)
				}
				var layout []mig.Instance
				for _, gi := range gis {
					layout = append(layout, mig.Instance{Profile: gi.ProfileID, Placement: gi.Placement})
				}
				if err := models[d.UUID].CheckLayout(layout); err != nil {
					t.Errorf("%s: invalid layout after concurrent creates %v: %v", d.Name, layout, err)
				}
			}
			if persisted {
				// The file written last is the state in memory.
				r := newSim(t, cfg)
				for _, d := range devs {
					a, _ := s.GPUInstances(ctx, d.UUID)
					b, _ := r.GPUInstances(ctx, d.UUID)
					if len(a) != len(b) {
						t.Errorf("%s: %d instances in memory, %d in the state file", d.Name, len(a), len(b))
					}
				}
			}
		})
	}
}

// isExpected: the errors a racing create may legitimately get.
func isExpected(err error) bool {
	for _, c := range []error{gpu.ErrInsufficientResources, gpu.ErrNotFound, gpu.ErrInUse} {
		if errors.Is(err, c) {
			return true
		}
	}
	return false
}
