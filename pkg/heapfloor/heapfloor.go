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

// Percent is the GC percent that keeps the heap goal at or above floor:
// base if that already does, never less than base. The goal is the
// runtime's: live + (live + scan) * percent/100, where live is the heap
// marked by the last collection and scan the stacks and globals it
// scanned (runtime/mgcpacer.go); leaving scan out would overshoot the
// floor where goroutine stacks are large (an agent session has several).
func Percent(base int, floor, live, scan uint64) int {
	if base < 0 || live == 0 || live >= floor {
		return base
	}
	work := live + scan
	if live+work*uint64(base)/100 >= floor {
		return base
	}
	// p = ceil((floor-live)*100/work), at most the percent whose minimum
	// heap alone is the floor: the runtime raises its minimum heap with
	// the percent (4 MiB at 100), and a percent set from a tiny heap made
	// the first goal after a quiet start hundreds of MiB.
	p := ((floor-live)*100 + work - 1) / work
	p = min(p, floor*100/runtimeMinHeap, math.MaxInt32)
	return max(base, int(p))
}

// runtimeMinHeap is the runtime's minimum heap goal at GOGC=100
// (defaultHeapMinimum in runtime/mgcpacer.go); it scales with the percent.
const runtimeMinHeap = 4 << 20

// Tuner re-sets the GC percent after each collection.
type Tuner struct {
	floor uint64
	base  int
	// set and heap are debug.SetGCPercent and the heap the last
	// collection marked live and the stacks and globals it scanned; tests
	// replace them.
	set  func(int) int
	heap func() (live, scan uint64)

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
	t := newTuner(floor, gcPercent(), debug.SetGCPercent, lastHeap)
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

func newTuner(floor uint64, base int, set func(int) int, heap func() (live, scan uint64)) *Tuner {
	if floor == 0 || base < 0 {
		return nil
	}
	return &Tuner{floor: floor, base: base, set: set, heap: heap, percent: base, done: make(chan struct{})}
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
	live, scan := t.heap()
	if p := Percent(t.base, t.floor, live, scan); p != t.percent {
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

// lastHeap is the heap the last collection marked live (0 before the
// first: the percent stays as it is until then), and the stacks and
// globals it scanned.
func lastHeap() (live, scan uint64) {
	s := []metrics.Sample{{Name: "/gc/heap/live:bytes"}, {Name: "/gc/scan/stack:bytes"}, {Name: "/gc/scan/globals:bytes"}}
	metrics.Read(s)
	u := func(i int) uint64 {
		if s[i].Value.Kind() != metrics.KindUint64 {
			return 0
		}
		return s[i].Value.Uint64()
	}
	return u(0), u(1) + u(2)
}
