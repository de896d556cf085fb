// Package heapfloor keeps the Go garbage collector from collecting a small
// heap over and over. With GOGC=100 the next collection starts when the
// heap has grown by its live size: the control plane holds a few MiB live
// with a small fleet, so at thousands of creates a second it collected
// some 25 times a second, and the collector and its allocation assists
// took about a tenth of its CPU. Start raises the GC percent just enough
// that the heap goal stays at or above a floor, and lowers it back as the
// live heap grows past the floor, so a large fleet is collected exactly
// as GOGC says.
//
// The cost is memory: up to the floor in garbage between collections when
// the live heap is small. A memory limit (GOMEMLIMIT) still bounds the
// heap, and GOGC=off turns the floor off.
package heapfloor

import (
	"math"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync"
	"sync/atomic"
)

// DefaultMiB is the control plane's floor.
const DefaultMiB = 128

// Percent is the GC percent that keeps the heap goal, live*(1+p/100), at
// or above floor: base if that already does, never less than base.
func Percent(base int, floor, live uint64) int {
	if base < 0 || live == 0 || live >= floor {
		return base
	}
	// live < floor: p = ceil((floor-live)*100/live).
	p := ((floor-live)*100 + live - 1) / live
	if p > math.MaxInt32 {
		p = math.MaxInt32
	}
	return max(base, int(p))
}

// Tuner re-sets the GC percent after each collection.
type Tuner struct {
	floor uint64
	base  int
	// set and live are debug.SetGCPercent and the live heap after the
	// last collection; tests replace them.
	set  func(int) int
	live func() uint64

	mu      sync.Mutex // orders adjust and Stop
	percent int        // last set
	stopped atomic.Bool
	done    chan struct{} // closed when the last sentinel's finalizer ran after Stop
}

// running is the tuner Start made and Stop has not stopped: a second one
// would take the first one's raised percent for GOGC.
var running atomic.Pointer[Tuner]

// Start keeps the heap goal at or above floor bytes until Stop. It returns
// nil, changing nothing, if floor is 0, GOGC is off, or another tuner
// runs (one per process).
func Start(floor uint64) *Tuner {
	t := newTuner(floor, gcPercent(), debug.SetGCPercent, liveHeap)
	if t == nil || !running.CompareAndSwap(nil, t) {
		return nil
	}
	t.adjust()
	t.arm()
	return t
}

// gcPercent is the GC percent in force: GOGC, or what SetGCPercent last
// set; -1 when off.
func gcPercent() int {
	s := []metrics.Sample{{Name: "/gc/gogc:percent"}}
	metrics.Read(s)
	if s[0].Value.Kind() != metrics.KindUint64 || s[0].Value.Uint64() > math.MaxInt32 {
		return -1
	}
	return int(s[0].Value.Uint64())
}

func newTuner(floor uint64, base int, set func(int) int, live func() uint64) *Tuner {
	if floor == 0 || base < 0 {
		return nil
	}
	return &Tuner{floor: floor, base: base, set: set, live: live, percent: base, done: make(chan struct{})}
}

// Percent is the GC percent the tuner last set.
func (t *Tuner) Percent() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.percent
}

// Stop restores the GC percent the process started with; later
// collections leave it alone.
func (t *Tuner) Stop() {
	if t == nil {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.stopped.Swap(true) {
		return
	}
	if t.percent != t.base {
		t.set(t.base)
		t.percent = t.base
	}
	running.CompareAndSwap(t, nil)
}

func (t *Tuner) adjust() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.stopped.Load() {
		return
	}
	if p := Percent(t.base, t.floor, t.live()); p != t.percent {
		t.set(p)
		t.percent = p
	}
}

// sentinel is garbage by design: its finalizer runs once per collection
// and arms the next. Holding a pointer keeps it out of the tiny allocator
// (pointer-free objects under 16 bytes), whose shared blocks may outlive
// the object and delay its finalizer.
type sentinel struct{ t *Tuner }

func (t *Tuner) arm() {
	s := &sentinel{t: t}
	runtime.SetFinalizer(s, func(s *sentinel) {
		if s.t.stopped.Load() {
			close(s.t.done)
			return
		}
		s.t.adjust()
		s.t.arm()
	})
}

// liveHeap is the heap marked live by the last collection; before the
// first, the heap in use (live and garbage alike) stands in for it.
func liveHeap() uint64 {
	s := []metrics.Sample{{Name: "/gc/heap/live:bytes"}, {Name: "/memory/classes/heap/objects:bytes"}}
	metrics.Read(s)
	for _, v := range s {
		if v.Value.Kind() == metrics.KindUint64 && v.Value.Uint64() > 0 {
			return v.Value.Uint64()
		}
	}
	return 0
}
