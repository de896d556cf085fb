//go:build cgo

package nvml

import (
	"context"
	"fmt"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/gpuaas/gpuaas/agent/gpu"
)

const (
	// watchedEvents are the NVML event types Events registers.
	watchedEvents = nvml.EventTypeXidCriticalError | nvml.EventTypeSingleBitEccError | nvml.EventTypeDoubleBitEccError
	// eventWait bounds one wait on the event set, and so how long a
	// cancelled monitor (or Close) waits for it to stop.
	eventWait = 500 * time.Millisecond
	// eventBuffer is the channel's capacity; events beyond it while the
	// reader lags are dropped and counted.
	eventBuffer = 64
	// maxWaitFailures is how many consecutive failed waits end a monitor
	// with an EventMonitorStopped event.
	maxWaitFailures = 5
)

// Events registers every GPU that supports them for XID, single-bit and
// double-bit ECC events and delivers them until ctx ends or Close; the
// channel is closed then. Each call has an NVML event set of its own, and
// the driver gives every set every event, so every subscriber gets every
// event. An event concerning one MIG device carries its
// GPU and compute instance ids, one concerning the whole GPU
// gpu.WholeGPU. Events the reader is too slow for are dropped and counted
// (Dropped). If the driver keeps failing the wait, a last event of kind
// gpu.EventMonitorStopped says so before the channel closes. A GPU that
// cannot report events is skipped and logged; gpu.ErrNotSupported when
// none can.
func (b *Backend) Events(ctx context.Context) (events <-chan gpu.Event, err error) {
	done, err := b.enter(ctx, "watch gpu events")
	if err != nil {
		return nil, err
	}
	defer done(&err)
	set, ret := b.lib.EventSetCreate()
	if err := mapReturn("create event set", ret); err != nil {
		return nil, err
	}
	uuids, err := b.register(set)
	if err == nil && len(uuids) == 0 {
		err = fmt.Errorf("no gpu reports xid or ecc events: %w", gpu.ErrNotSupported)
	}
	if err != nil {
		_ = set.Free()
		return nil, err
	}
	out := make(chan gpu.Event, eventBuffer)
	monitorCtx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(b.ctx, cancel)
	b.monitors.Add(1)
	go func() {
		defer b.monitors.Done()
		defer stop()
		defer cancel()
		b.monitor(monitorCtx, set, uuids, out)
	}()
	return out, nil
}

// register adds every GPU's watched events to the set and returns the
// registered GPUs' UUIDs by handle.
func (b *Backend) register(set nvml.EventSet) (map[nvml.Device]string, error) {
	n, ret := b.lib.DeviceGetCount()
	if err := mapReturn("count gpus", ret); err != nil {
		return nil, err
	}
	uuids := map[nvml.Device]string{}
	for i := range n {
		dev, ret := b.lib.DeviceGetHandleByIndex(i)
		if err := mapReturn(fmt.Sprintf("get gpu %d", i), ret); err != nil {
			return nil, err
		}
		uuid, ret := dev.GetUUID()
		if err := mapReturn(fmt.Sprintf("read uuid of gpu %d", i), ret); err != nil {
			return nil, err
		}
		supported, ret := dev.GetSupportedEventTypes()
		if ret == nvml.ERROR_NOT_SUPPORTED || (ret == nvml.SUCCESS && supported&watchedEvents == 0) {
			b.log.Warn("gpu reports no xid or ecc events; not watched", "gpu", uuid)
			continue
		}
		if err := mapReturn("read supported event types of "+uuid, ret); err != nil {
			return nil, err
		}
		ret = dev.RegisterEvents(supported&watchedEvents, set)
		if ret == nvml.ERROR_NOT_SUPPORTED {
			b.log.Warn("gpu refused event registration; not watched", "gpu", uuid)
			continue
		}
		if err := mapReturn("register events of "+uuid, ret); err != nil {
			return nil, err
		}
		uuids[dev] = uuid
	}
	return uuids, nil
}

// monitor waits on the set until ctx ends, then frees it and closes out.
// It never takes b.mu: Close cancels ctx and waits for it before shutting
// NVML down, so the library is initialised for every call made here.
func (b *Backend) monitor(ctx context.Context, set nvml.EventSet, uuids map[nvml.Device]string, out chan<- gpu.Event) {
	defer close(out)
	defer func() {
		if r := recover(); r != nil {
			b.log.Error("gpu event monitor panicked", "error", &panicError{value: r})
			b.send(out, gpu.Event{Time: time.Now(), Kind: gpu.EventMonitorStopped, GPUInstanceID: gpu.WholeGPU, ComputeInstanceID: gpu.WholeGPU})
		}
		if ret := set.Free(); ret != nvml.SUCCESS {
			b.log.Warn("free gpu event set", "error", mapReturn("free event set", ret))
		}
	}()
	failures := 0
	for ctx.Err() == nil {
		data, ret := set.Wait(uint32(eventWait / time.Millisecond))
		switch ret {
		case nvml.SUCCESS:
			failures = 0
		case nvml.ERROR_TIMEOUT:
			failures = 0
			continue
		default:
			failures++
			err := mapReturn("wait for gpu events", ret)
			if failures < maxWaitFailures {
				b.log.Warn("gpu event wait failed; retrying", "error", err, "failures", failures)
				select {
				case <-ctx.Done():
				case <-time.After(eventWait / 5):
				}
				continue
			}
			b.log.Error("gpu event monitor stopped", "error", err, "failures", failures)
			b.send(out, gpu.Event{Time: time.Now(), Kind: gpu.EventMonitorStopped, GPUInstanceID: gpu.WholeGPU, ComputeInstanceID: gpu.WholeGPU})
			return
		}
		if ev, ok := b.event(data, uuids); ok {
			b.send(out, ev)
		}
	}
}

// event converts NVML's event data; ok is false for a type not watched.
func (b *Backend) event(data nvml.EventData, uuids map[nvml.Device]string) (gpu.Event, bool) {
	ev := gpu.Event{
		Time:              time.Now(),
		GPUInstanceID:     data.GpuInstanceId,
		ComputeInstanceID: data.ComputeInstanceId,
	}
	switch data.EventType {
	case nvml.EventTypeXidCriticalError:
		ev.Kind, ev.XID = gpu.EventXID, data.EventData
	case nvml.EventTypeSingleBitEccError:
		ev.Kind = gpu.EventECCSingleBit
	case nvml.EventTypeDoubleBitEccError:
		ev.Kind = gpu.EventECCDoubleBit
	default:
		return gpu.Event{}, false
	}
	if uuid, ok := uuids[data.Device]; ok {
		ev.GPUUUID = uuid
	} else if data.Device != nil {
		if uuid, ret := data.Device.GetUUID(); ret == nvml.SUCCESS {
			ev.GPUUUID = uuid
		}
	}
	return ev, true
}

// send delivers an event without blocking; a full channel drops it.
func (b *Backend) send(out chan<- gpu.Event, ev gpu.Event) {
	select {
	case out <- ev:
	default:
		b.dropped.Add(1)
		b.log.Warn("gpu event dropped: reader too slow", "kind", ev.Kind, "gpu", ev.GPUUUID, "xid", ev.XID)
	}
}

// Dropped is how many events were dropped because a reader of Events was
// too slow, since New.
func (b *Backend) Dropped() uint64 { return b.dropped.Load() }
