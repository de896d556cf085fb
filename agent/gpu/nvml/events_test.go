//go:build cgo

package nvml

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxh200"
	mockserver "github.com/NVIDIA/go-nvml/pkg/nvml/mock/server"

	"github.com/gpuaas/gpuaas/agent/gpu"
)

// eventDriver gives a dgxh200 mock the event set behaviour of the driver:
// every set gets every event raised on a device registered to it, a wait
// blocks until an event or its timeout, and freed sets are recorded.
type eventDriver struct {
	t      *testing.T
	server *mockserver.Server

	mu       sync.Mutex
	sets     map[*mock.EventSet]*eventSetState
	log      []string // "free", "shutdown" in order
	failWait nvml.Return
}

type eventSetState struct {
	feed    chan nvml.EventData
	devices map[nvml.Device]bool
}

func newEventDriver(t *testing.T) (*eventDriver, *Backend) {
	t.Helper()
	d := &eventDriver{t: t, server: dgxh200.New(), sets: map[*mock.EventSet]*eventSetState{}}
	d.server.EventSetCreateFunc = d.create
	d.server.ShutdownFunc = func() nvml.Return {
		d.mu.Lock()
		defer d.mu.Unlock()
		d.log = append(d.log, "shutdown")
		return nvml.SUCCESS
	}
	for _, dev := range d.server.Devices {
		md := dev.(*mockserver.Device)
		md.GetSupportedEventTypesFunc = func() (uint64, nvml.Return) {
			return nvml.EventTypeXidCriticalError | nvml.EventTypeSingleBitEccError | nvml.EventTypeDoubleBitEccError | nvml.EventTypePState, nvml.SUCCESS
		}
		md.RegisterEventsFunc = func(types uint64, set nvml.EventSet) nvml.Return {
			if types&^watchedEvents != 0 {
				t.Errorf("registered event types %#x, more than watched", types)
			}
			d.mu.Lock()
			defer d.mu.Unlock()
			d.sets[set.(*mock.EventSet)].devices[md] = true
			return nvml.SUCCESS
		}
	}
	b, err := newWithInterface(d.server, Options{Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close() })
	return d, b
}

func (d *eventDriver) create() (nvml.EventSet, nvml.Return) {
	st := &eventSetState{feed: make(chan nvml.EventData, 1024), devices: map[nvml.Device]bool{}}
	set := &mock.EventSet{}
	set.WaitFunc = func(ms uint32) (nvml.EventData, nvml.Return) {
		d.mu.Lock()
		fail := d.failWait
		d.mu.Unlock()
		if fail != nvml.SUCCESS {
			return nvml.EventData{}, fail
		}
		select {
		case ev := <-st.feed:
			return ev, nvml.SUCCESS
		case <-time.After(time.Duration(ms) * time.Millisecond):
			return nvml.EventData{}, nvml.ERROR_TIMEOUT
		}
	}
	set.FreeFunc = func() nvml.Return {
		d.mu.Lock()
		defer d.mu.Unlock()
		d.log = append(d.log, "free")
		delete(d.sets, set)
		return nvml.SUCCESS
	}
	d.mu.Lock()
	d.sets[set] = st
	d.mu.Unlock()
	return set, nvml.SUCCESS
}

// raise delivers an event of the device to every set it is registered to.
func (d *eventDriver) raise(dev int, typ, data uint64, gi, ci uint32) {
	d.mu.Lock()
	defer d.mu.Unlock()
	device := d.server.Devices[dev]
	for _, st := range d.sets {
		if st.devices[device] {
			st.feed <- nvml.EventData{Device: device, EventType: typ, EventData: data, GpuInstanceId: gi, ComputeInstanceId: ci}
		}
	}
}

func (d *eventDriver) uuid(dev int) string { return d.server.Devices[dev].(*mockserver.Device).UUID }

func (d *eventDriver) openSets() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.sets)
}

func receive(t *testing.T, ch <-chan gpu.Event) gpu.Event {
	t.Helper()
	select {
	case ev, ok := <-ch:
		if !ok {
			t.Fatal("channel closed, want an event")
		}
		return ev
	case <-time.After(5 * time.Second):
		t.Fatal("no event within 5s")
	}
	return gpu.Event{}
}

func waitClosed(t *testing.T, ch <-chan gpu.Event) {
	t.Helper()
	deadline := time.After(5 * time.Second)
	for {
		select {
		case _, ok := <-ch:
			if !ok {
				return
			}
		case <-deadline:
			t.Fatal("channel not closed within 5s")
		}
	}
}

func TestEvents_DeliversWithAttribution(t *testing.T) {
	d, b := newEventDriver(t)
	ch, err := b.Events(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	d.raise(2, nvml.EventTypePState, 0, gpu.WholeGPU, gpu.WholeGPU) // not watched: never delivered
	d.raise(2, nvml.EventTypeXidCriticalError, 79, 3, 0)
	d.raise(0, nvml.EventTypeSingleBitEccError, 0, gpu.WholeGPU, gpu.WholeGPU)
	d.raise(5, nvml.EventTypeDoubleBitEccError, 0, 7, gpu.WholeGPU)
	want := []gpu.Event{
		{Kind: gpu.EventXID, GPUUUID: d.uuid(2), XID: 79, GPUInstanceID: 3, ComputeInstanceID: 0},
		{Kind: gpu.EventECCSingleBit, GPUUUID: d.uuid(0), GPUInstanceID: gpu.WholeGPU, ComputeInstanceID: gpu.WholeGPU},
		{Kind: gpu.EventECCDoubleBit, GPUUUID: d.uuid(5), GPUInstanceID: 7, ComputeInstanceID: gpu.WholeGPU},
	}
	for _, w := range want {
		got := receive(t, ch)
		if got.Time.IsZero() {
			t.Errorf("event %+v has no time", got)
		}
		got.Time = time.Time{}
		if got != w {
			t.Errorf("event\n got %+v\nwant %+v", got, w)
		}
	}
}

func TestEvents_EverySubscriberGetsEveryEvent(t *testing.T) {
	d, b := newEventDriver(t)
	a, err := b.Events(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	c, err := b.Events(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	d.raise(1, nvml.EventTypeXidCriticalError, 48, gpu.WholeGPU, gpu.WholeGPU)
	for _, ch := range []<-chan gpu.Event{a, c} {
		if ev := receive(t, ch); ev.XID != 48 || ev.GPUUUID != d.uuid(1) {
			t.Errorf("event %+v, want XID 48 on gpu 1", ev)
		}
	}
}

func TestEvents_CancelClosesAndFreesTheSet(t *testing.T) {
	d, b := newEventDriver(t)
	ctx, cancel := context.WithCancel(t.Context())
	ch, err := b.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	start := time.Now()
	waitClosed(t, ch)
	if waited := time.Since(start); waited > 4*eventWait {
		t.Errorf("closed %v after cancel, want within one wait (%v)", waited, eventWait)
	}
	if n := d.openSets(); n != 0 {
		t.Errorf("%d event sets not freed", n)
	}

	ended, stop := context.WithCancel(t.Context())
	stop()
	if ch, err := b.Events(ended); !errors.Is(err, context.Canceled) || ch != nil {
		t.Errorf("Events(ended ctx) = %v, %v; want no channel and context.Canceled", ch, err)
	}
}

// TestEvents_CloseStopsMonitorsBeforeShutdown: Close ends every
// subscription and frees its set while NVML is still initialised.
func TestEvents_CloseStopsMonitorsBeforeShutdown(t *testing.T) {
	d, b := newEventDriver(t)
	a, _ := b.Events(t.Context())
	c, _ := b.Events(t.Context())
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	waitClosed(t, a)
	waitClosed(t, c)
	d.mu.Lock()
	defer d.mu.Unlock()
	if !slices.Equal(d.log, []string{"free", "free", "shutdown"}) {
		t.Errorf("driver saw %v; want both sets freed before shutdown", d.log)
	}
}

func TestEvents_DropsAndCountsWhenTheReaderLags(t *testing.T) {
	d, b := newEventDriver(t)
	ch, err := b.Events(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	const raised = eventBuffer + 36
	for i := range raised {
		d.raise(0, nvml.EventTypeXidCriticalError, uint64(i+1), gpu.WholeGPU, gpu.WholeGPU)
	}
	deadline := time.Now().Add(5 * time.Second)
	for b.Dropped()+uint64(len(ch)) < raised && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if len(ch) != eventBuffer || b.Dropped() != raised-eventBuffer {
		t.Fatalf("%d buffered, %d dropped; want %d and %d", len(ch), b.Dropped(), eventBuffer, raised-eventBuffer)
	}
	for i := range eventBuffer {
		if ev := <-ch; ev.XID != uint64(i+1) {
			t.Fatalf("event %d has XID %d: the oldest events are kept, in order", i, ev.XID)
		}
	}
}

func TestEvents_MonitorStopsAfterRepeatedFailures(t *testing.T) {
	d, b := newEventDriver(t)
	d.failWait = nvml.ERROR_UNKNOWN
	ch, err := b.Events(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	ev := receive(t, ch)
	if ev.Kind != gpu.EventMonitorStopped || ev.GPUInstanceID != gpu.WholeGPU {
		t.Errorf("event %+v, want monitor-stopped", ev)
	}
	waitClosed(t, ch)
}

func TestEvents_NoGPUReportsEvents(t *testing.T) {
	d, b := newEventDriver(t)
	for _, dev := range d.server.Devices {
		dev.(*mockserver.Device).GetSupportedEventTypesFunc = func() (uint64, nvml.Return) { return 0, nvml.ERROR_NOT_SUPPORTED }
	}
	if _, err := b.Events(t.Context()); !errors.Is(err, gpu.ErrNotSupported) {
		t.Errorf("Events = %v, want ErrNotSupported", err)
	}
	if n := d.openSets(); n != 0 {
		t.Errorf("%d event sets left open after a failed Events", n)
	}
}
