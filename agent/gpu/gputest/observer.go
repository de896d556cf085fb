package gputest

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/agent/gpu"
)

// unknownMIG is a MIG device UUID no backend reports.
const unknownMIG = "MIG-00000000-0000-4000-8000-000000000000"

// closeWait bounds how long a cancelled subscription may take to close its
// channel.
const closeWait = 5 * time.Second

// maxTemperatureC is a ceiling no working sensor reports; GPUs shut down
// far below it.
const maxTemperatureC = 150

// checkObserverReadOnly checks the Observer contract that holds on any
// host, touched or not: telemetry of every GPU and every existing MIG
// device, with the fields hardware always has set and the ones a MIG
// device never has nil, and the life cycle of event subscriptions. It
// cannot make events happen, so it checks no event's content.
func checkObserverReadOnly(t *testing.T, b gpu.Backend, devs []gpu.Device) {
	ctx := t.Context()
	if _, err := b.DeviceTelemetry(ctx, unknownGPU); !errors.Is(err, gpu.ErrNotFound) {
		t.Errorf("DeviceTelemetry(unknown gpu) = %v, want ErrNotFound", err)
	}
	if _, err := b.MIGTelemetry(ctx, unknownMIG); !errors.Is(err, gpu.ErrNotFound) {
		t.Errorf("MIGTelemetry(unknown mig device) = %v, want ErrNotFound", err)
	}
	for _, d := range devs {
		tel, err := b.DeviceTelemetry(ctx, d.UUID)
		if err != nil {
			t.Errorf("DeviceTelemetry(%s): %v", d.UUID, err)
			continue
		}
		checkTelemetry(t, tel, d.UUID, d.MemoryMiB)
		for _, md := range migDevicesOf(t, b, d) {
			tel, err := b.MIGTelemetry(ctx, md.UUID)
			if err != nil {
				t.Errorf("MIGTelemetry(%s): %v", md.UUID, err)
				continue
			}
			checkTelemetry(t, tel, md.UUID, d.MemoryMiB)
			checkMIGTelemetry(t, tel)
		}
	}
	checkSubscriptions(t, b)
}

// migDevicesOf lists a GPU's MIG devices, none when MIG mode is off.
func migDevicesOf(t *testing.T, b gpu.Backend, d gpu.Device) []gpu.MIGDevice {
	t.Helper()
	if !d.MIGCapable {
		return nil
	}
	mode, err := b.MIGMode(t.Context(), d.UUID)
	if err != nil || !mode.Current {
		return nil
	}
	mds, err := b.MIGDevices(t.Context(), d.UUID)
	if err != nil {
		t.Errorf("MIGDevices(%s): %v", d.UUID, err)
	}
	return mds
}

// checkTelemetry checks what holds for any reading of a GPU or MIG device
// whose parent has totalMiB of memory.
func checkTelemetry(t *testing.T, tel gpu.Telemetry, uuid string, totalMiB uint64) {
	t.Helper()
	if tel.UUID != uuid || tel.Time.IsZero() {
		t.Errorf("telemetry of %s names %q at %v; want its UUID and a time", uuid, tel.UUID, tel.Time)
	}
	if tel.MemoryUsedMiB == nil || tel.MemoryFreeMiB == nil {
		t.Errorf("telemetry of %s: memory used %v, free %v; both are always readable", uuid, tel.MemoryUsedMiB, tel.MemoryFreeMiB)
	} else if used, free := *tel.MemoryUsedMiB, *tel.MemoryFreeMiB; used > totalMiB || free > totalMiB || used+free > totalMiB {
		t.Errorf("telemetry of %s: %d MiB used + %d MiB free exceed the GPU's %d MiB", uuid, used, free, totalMiB)
	}
	if u := tel.UtilizationPct; u != nil && *u > 100 {
		t.Errorf("telemetry of %s: utilization %d%%", uuid, *u)
	}
	if c := tel.TemperatureC; c != nil && *c >= maxTemperatureC {
		t.Errorf("telemetry of %s: temperature %d C", uuid, *c)
	}
}

// checkMIGTelemetry checks the fields a MIG device never has: it has no
// power or temperature of its own (gpu.Telemetry: nil, never a made-up
// zero).
func checkMIGTelemetry(t *testing.T, tel gpu.Telemetry) {
	t.Helper()
	if tel.PowerMilliWatt != nil || tel.TemperatureC != nil {
		t.Errorf("telemetry of MIG device %s: power %v, temperature %v; want nil", tel.UUID, tel.PowerMilliWatt, tel.TemperatureC)
	}
}

// checkSubscriptions checks the life cycle of Events: a subscription's
// channel closes when its context ends and only then, independently of any
// other subscription, and an ended context gives no open subscription.
// Events that arrive meanwhile are read and discarded; on a real driver
// every subscription gets its own copy, so this steals none from other
// subscribers.
func checkSubscriptions(t *testing.T, b gpu.Backend) {
	t.Helper()
	ctxA, cancelA := context.WithCancel(t.Context())
	defer cancelA()
	ctxB, cancelB := context.WithCancel(t.Context())
	defer cancelB()
	a, err := b.Events(ctxA)
	if errors.Is(err, gpu.ErrNotSupported) {
		// A host whose GPUs cannot report events: the agent's health
		// tracking fails closed there; nothing to check here.
		t.Logf("Events: %v; subscription checks skipped", err)
		return
	}
	if err != nil {
		t.Errorf("Events: %v", err)
		return
	}
	bch, err := b.Events(ctxB)
	if err != nil {
		t.Errorf("Events (second subscriber): %v", err)
		return
	}
	cancelA()
	if !closesWithin(a, closeWait) {
		t.Errorf("Events: channel not closed %v after its context ended", closeWait)
	}
	if closesWithin(bch, 50*time.Millisecond) {
		t.Error("Events: ending one subscription closed another")
	}
	cancelB()
	if !closesWithin(bch, closeWait) {
		t.Errorf("Events: second channel not closed %v after its context ended", closeWait)
	}

	done, cancel := context.WithCancel(t.Context())
	cancel()
	ch, err := b.Events(done)
	if err == nil && !closesWithin(ch, closeWait) {
		t.Error("Events with an ended context: no error and a channel that stays open")
	}
}

// closesWithin drains ch (events may arrive meanwhile on a live host) and
// reports whether it was closed within d.
func closesWithin(ch <-chan gpu.Event, d time.Duration) bool {
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		select {
		case _, ok := <-ch:
			if !ok {
				return true
			}
		case <-timer.C:
			return false
		}
	}
}
