package sim_test

import (
	"context"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/agent/gpu/sim"
	"github.com/gpuaas/gpuaas/pkg/mig"
)

func subscribe(t *testing.T, s *sim.Sim, ctx context.Context) <-chan gpu.Event {
	t.Helper()
	ch, err := s.Events(ctx)
	if err != nil {
		t.Fatalf("Events: %v", err)
	}
	return ch
}

func next(t *testing.T, ch <-chan gpu.Event) gpu.Event {
	t.Helper()
	select {
	case ev, ok := <-ch:
		if !ok {
			t.Fatal("channel closed, want an event")
		}
		return ev
	case <-time.After(5 * time.Second):
		t.Fatal("no event")
	}
	return gpu.Event{}
}

func TestEvents_FanOutToEverySubscriber(t *testing.T) {
	s := newSim(t, sim.Config{GPUs: []sim.GPUConfig{{Model: "H200", MIGEnabled: true}}, Now: fixedClock})
	devs, _ := s.Devices(t.Context())
	uuid := devs[0].UUID
	gi := mustCreate(t, s, uuid, mig.Profile1g, pl(3, 1))
	mustCreateCI(t, s, uuid, gi.ID)
	a, b := subscribe(t, s, t.Context()), subscribe(t, s, t.Context())

	if err := s.InjectXID(uuid, 94, uint32(gi.ID), 0); err != nil {
		t.Fatal(err)
	}
	if err := s.InjectECC(uuid, true); err != nil {
		t.Fatal(err)
	}
	want := []gpu.Event{
		{Time: epoch, Kind: gpu.EventXID, GPUUUID: uuid, XID: 94, GPUInstanceID: uint32(gi.ID), ComputeInstanceID: 0},
		{Time: epoch, Kind: gpu.EventECCDoubleBit, GPUUUID: uuid, GPUInstanceID: gpu.WholeGPU, ComputeInstanceID: gpu.WholeGPU},
	}
	for name, ch := range map[string]<-chan gpu.Event{"first": a, "second": b} {
		for _, w := range want {
			if got := next(t, ch); got != w {
				t.Errorf("%s subscriber got %+v, want %+v", name, got, w)
			}
		}
	}
	if err := s.InjectECC(uuid, false); err != nil {
		t.Fatal(err)
	}
	if got := next(t, a); got.Kind != gpu.EventECCSingleBit || got.GPUInstanceID != gpu.WholeGPU {
		t.Errorf("single-bit event %+v", got)
	}
	if s.Dropped() != 0 {
		t.Errorf("Dropped = %d with readers keeping up", s.Dropped())
	}
}

func TestEvents_SlowReaderDropsAndIsCounted(t *testing.T) {
	s := newSim(t, sim.Config{GPUs: []sim.GPUConfig{{Model: "H100"}}, EventBuffer: 2})
	devs, _ := s.Devices(t.Context())
	uuid := devs[0].UUID
	slow := subscribe(t, s, t.Context())
	for xid := uint64(1); xid <= 5; xid++ {
		if err := s.InjectXID(uuid, xid, gpu.WholeGPU, gpu.WholeGPU); err != nil {
			t.Fatal(err)
		}
	}
	if got := s.Dropped(); got != 3 {
		t.Errorf("Dropped = %d, want 3 (5 events, 2 buffered)", got)
	}
	// The oldest are kept; publishing never blocked on the slow reader.
	if a, b := next(t, slow), next(t, slow); a.XID != 1 || b.XID != 2 {
		t.Errorf("buffered xids %d, %d; want 1, 2", a.XID, b.XID)
	}
	// A reader that keeps up again gets new events.
	if err := s.InjectXID(uuid, 79, gpu.WholeGPU, gpu.WholeGPU); err != nil {
		t.Fatal(err)
	}
	if ev := next(t, slow); ev.XID != 79 {
		t.Errorf("after catching up got xid %d", ev.XID)
	}
}

func TestEvents_ClosedWhenTheContextEnds(t *testing.T) {
	s, uuid := oneGPU(t, "A100-40GB")
	ctx, cancel := context.WithCancel(t.Context())
	ch := subscribe(t, s, ctx)
	stay := subscribe(t, s, t.Context())
	cancel()
	select {
	case _, ok := <-ch:
		if ok {
			t.Fatal("event on a cancelled subscription")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("channel not closed after cancel")
	}
	// Publishing after a subscriber left neither panics nor counts drops.
	if err := s.InjectXID(uuid, 13, gpu.WholeGPU, gpu.WholeGPU); err != nil {
		t.Fatal(err)
	}
	if ev := next(t, stay); ev.XID != 13 {
		t.Errorf("remaining subscriber got %+v", ev)
	}
	if s.Dropped() != 0 {
		t.Errorf("Dropped = %d", s.Dropped())
	}
	if _, err := s.Events(ctx); err == nil {
		t.Error("Events with an ended context: no error")
	}
}

// TestEvents_ConcurrentSubscribersAndInjections runs subscriptions that come
// and go while events are injected (run with -race; TestMain's leak check
// proves every subscription's close ran).
func TestEvents_ConcurrentSubscribersAndInjections(t *testing.T) {
	s, uuid := oneGPU(t, "H200")
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range 200 {
			_ = s.InjectXID(uuid, 31, gpu.WholeGPU, gpu.WholeGPU)
		}
	}()
	for range 50 {
		ctx, cancel := context.WithCancel(t.Context())
		ch := subscribe(t, s, ctx)
		cancel()
		for range ch {
		}
	}
	<-done
}

func TestInjectXID_Attribution(t *testing.T) {
	s := newSim(t, sim.Config{GPUs: []sim.GPUConfig{{Model: "H200", MIGEnabled: true}, {Model: "H100"}}})
	devs, _ := s.Devices(t.Context())
	migGPU, plain := devs[0].UUID, devs[1].UUID
	gi := mustCreate(t, s, migGPU, mig.Profile2g, pl(2, 2))
	mustCreateCI(t, s, migGPU, gi.ID)
	empty := mustCreate(t, s, migGPU, mig.Profile1g, pl(6, 1))
	g, e := uint32(gi.ID), uint32(empty.ID)

	tests := []struct {
		name   string
		gpu    string
		xid    uint64
		gi, ci uint32
		want   error
	}{
		{"whole gpu", plain, 79, gpu.WholeGPU, gpu.WholeGPU, nil},
		{"mig device", migGPU, 43, g, 0, nil},
		{"gpu instance alone", migGPU, 94, e, gpu.WholeGPU, nil},
		{"unknown gpu", "GPU-nope", 79, gpu.WholeGPU, gpu.WholeGPU, gpu.ErrNotFound},
		{"xid 0", plain, 0, gpu.WholeGPU, gpu.WholeGPU, gpu.ErrInvalidArgument},
		{"ci without gi", migGPU, 13, gpu.WholeGPU, 0, gpu.ErrInvalidArgument},
		{"gi without mig mode", plain, 13, 0, 0, gpu.ErrInvalidArgument},
		{"absent gi", migGPU, 13, 0, 0, gpu.ErrNotFound},
		{"absent ci", migGPU, 13, e, 0, gpu.ErrNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := s.InjectXID(tt.gpu, tt.xid, tt.gi, tt.ci)
			if tt.want == nil {
				if err != nil {
					t.Fatalf("InjectXID: %v", err)
				}
				return
			}
			wantErr(t, err, tt.want)
		})
	}
}
