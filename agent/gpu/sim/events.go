package sim

import (
	"context"
	"fmt"
	"slices"

	"github.com/gpuaas/gpuaas/agent/gpu"
)

// subscriber is one Events channel. Sends and the close happen under
// Sim.evMu, so an event is never sent on a closed channel.
type subscriber struct {
	ch chan gpu.Event
}

// Events subscribes to injected events (InjectXID, InjectECC) until ctx
// ends, when the channel is closed. Each subscriber has Config.EventBuffer
// slots; an event that finds a subscriber's buffer full is dropped for that
// subscriber alone and counted by Dropped. No goroutine waits on ctx: the
// close runs from context.AfterFunc.
func (s *Sim) Events(ctx context.Context) (<-chan gpu.Event, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("subscribe to gpu events: %w", err)
	}
	sub := &subscriber{ch: make(chan gpu.Event, s.cfg.EventBuffer)}
	s.evMu.Lock()
	s.subs[sub] = struct{}{}
	s.evMu.Unlock()
	context.AfterFunc(ctx, func() {
		s.evMu.Lock()
		defer s.evMu.Unlock()
		delete(s.subs, sub)
		close(sub.ch)
	})
	return sub.ch, nil
}

// Dropped is how many events were dropped because a subscriber's buffer
// was full, over all subscribers since New.
func (s *Sim) Dropped() uint64 { return s.dropped.Load() }

// publish delivers ev to every current subscriber without blocking.
func (s *Sim) publish(ev gpu.Event) {
	s.evMu.Lock()
	defer s.evMu.Unlock()
	for sub := range s.subs {
		select {
		case sub.ch <- ev:
		default:
			s.dropped.Add(1)
		}
	}
}

// InjectXID simulates the driver reporting XID xid on a GPU, attributed to
// GPU instance gi and compute instance ci, or to the whole GPU with both
// gpu.WholeGPU (as NVML reports events on a GPU without MIG, or ones not
// attributable to an instance). A ci may be gpu.WholeGPU alone, for an
// event of a whole GPU instance. Errors: gpu.ErrNotFound for an unknown GPU
// or an instance that does not exist, gpu.ErrInvalidArgument for XID 0, a
// ci without a gi, or a gi on a GPU whose MIG mode is not current. The XID
// changes no state: what it implies (a reset, a reboot) is for the caller
// to decide, as on hardware.
func (s *Sim) InjectXID(gpuUUID string, xid uint64, gi, ci uint32) error {
	if xid == 0 {
		return fmt.Errorf("inject xid 0 on %s: %w", gpuUUID, gpu.ErrInvalidArgument)
	}
	err := s.view(context.Background(), gpuUUID, func(g *simGPU) error {
		return checkAttribution(g.rec, gi, ci)
	})
	if err != nil {
		return fmt.Errorf("inject xid %d on %s (gi %d, ci %d): %w", xid, gpuUUID, gi, ci, err)
	}
	s.publish(gpu.Event{
		Time: s.cfg.Now(), Kind: gpu.EventXID, GPUUUID: gpuUUID, XID: xid,
		GPUInstanceID: gi, ComputeInstanceID: ci,
	})
	return nil
}

// checkAttribution checks that gi and ci name instances that exist (or are
// gpu.WholeGPU).
func checkAttribution(rec gpuRecord, gi, ci uint32) error {
	if gi == gpu.WholeGPU {
		if ci != gpu.WholeGPU {
			return fmt.Errorf("compute instance %d without a gpu instance: %w", ci, gpu.ErrInvalidArgument)
		}
		return nil
	}
	if err := requireMIG(rec); err != nil {
		return fmt.Errorf("%w: %w", gpu.ErrInvalidArgument, err)
	}
	i := slices.IndexFunc(rec.GPUInstances, func(r giRecord) bool { return uint32(r.ID) == gi })
	if i < 0 {
		return fmt.Errorf("gpu instance %d: %w", gi, gpu.ErrNotFound)
	}
	if ci != gpu.WholeGPU && !slices.ContainsFunc(rec.GPUInstances[i].ComputeInstances, func(r ciRecord) bool { return uint32(r.ID) == ci }) {
		return fmt.Errorf("compute instance %d of gpu instance %d: %w", ci, gi, gpu.ErrNotFound)
	}
	return nil
}

// InjectECC simulates an ECC error in a GPU's memory, reported for the
// whole GPU. A single-bit error is corrected: the corrected volatile
// counter grows and an EventECCSingleBit is published. A double-bit error
// grows the uncorrected counter, records one row for remapping (remapped
// uncorrectable rows + 1 and a remap pending until ResetGPU; past
// maxRemappedRows recorded rows the remap fails instead) and publishes an
// EventECCDoubleBit. The XIDs the driver logs alongside (48, 63, 64, 94,
// 95) are not synthesized: inject them with InjectXID where a test needs
// them. The counters are persisted with the rest of the state.
// gpu.ErrNotFound for an unknown GPU.
func (s *Sim) InjectECC(gpuUUID string, doubleBit bool) error {
	err := s.update(gpuUUID, func(_ *simGPU, rec *gpuRecord) error {
		e := &rec.ECC
		if !doubleBit {
			e.Corrected++
			return nil
		}
		e.Uncorrected++
		if uint64(e.RemappedCorrectable)+uint64(e.RemappedUncorrectable) >= maxRemappedRows {
			e.RemapFailed = true
			return nil
		}
		e.RemappedUncorrectable++
		e.RemapPending = true
		return nil
	})
	if err != nil {
		return fmt.Errorf("inject ecc error (double bit %t) on %s: %w", doubleBit, gpuUUID, err)
	}
	kind := gpu.EventECCSingleBit
	if doubleBit {
		kind = gpu.EventECCDoubleBit
	}
	s.publish(gpu.Event{
		Time: s.cfg.Now(), Kind: kind, GPUUUID: gpuUUID,
		GPUInstanceID: gpu.WholeGPU, ComputeInstanceID: gpu.WholeGPU,
	})
	return nil
}
