package heapfloor

import (
	"math"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"testing"
	"time"
)

const mib = 1 << 20

func TestPercent(t *testing.T) {
	for _, tc := range []struct {
		name              string
		base              int
		floor, live, scan uint64
		want              int
	}{
		{"no collection yet", 100, 128 * mib, 0, 0, 100},
		{"small heap: goal raised to the floor", 100, 128 * mib, 8 * mib, 0, 1500},
		{"rounded up, never under the floor", 100, 128 * mib, 7 * mib, 0, 1729},
		{"half the floor: GOGC=100 already reaches it", 100, 128 * mib, 64 * mib, 0, 100},
		{"just under half: raised", 100, 128 * mib, 63 * mib, 0, 104},
		{"stacks count toward the goal", 100, 128 * mib, 8 * mib, 112 * mib, 100},
		{"stacks count toward the goal, short of it", 100, 128 * mib, 8 * mib, 32 * mib, 300},
		{"live heap past the floor", 100, 128 * mib, 1024 * mib, 0, 100},
		{"a higher GOGC is kept", 400, 128 * mib, 32 * mib, 0, 400},
		{"a higher GOGC short of the floor is raised", 400, 128 * mib, 16 * mib, 0, 700},
		{"GOGC=off", -1, 128 * mib, 8 * mib, 0, -1},
		{"at most the percent whose minimum heap is the floor", 100, 128 * mib, 1 * mib, 0, 3200},
		{"a tiny heap and a huge floor", 100, math.MaxUint64 / 200, 1, 0, math.MaxInt32},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := Percent(tc.base, tc.floor, tc.live, tc.scan)
			if got != tc.want {
				t.Fatalf("Percent(%d, %d, %d, %d) = %d, want %d", tc.base, tc.floor, tc.live, tc.scan, got, tc.want)
			}
			// The runtime's goal (runtime/mgcpacer.go) reaches the floor,
			// and a percent one less would not, unless it is the base.
			goal := func(p int) float64 {
				return float64(tc.live) + float64(tc.live+tc.scan)*float64(p)/100
			}
			minHeap := float64(runtimeMinHeap) * float64(got) / 100
			if tc.base >= 0 && tc.live > 0 && tc.live < tc.floor && got < math.MaxInt32 {
				if max(goal(got), minHeap) < float64(tc.floor) {
					t.Fatalf("goal %.0f under the floor %d", goal(got), tc.floor)
				}
				if got > tc.base && max(goal(got-1), float64(runtimeMinHeap)*float64(got-1)/100) >= float64(tc.floor) {
					t.Fatalf("percent %d overshoots: %d already reaches the floor", got, got-1)
				}
			}
		})
	}
}

// The tuner sets the percent only when it changes, follows the live heap
// both ways, and after Stop restores the base and sets nothing more.
func TestTunerFollowsTheLiveHeap(t *testing.T) {
	var sets []int
	live := uint64(8 * mib)
	tu := newTuner(128*mib, 100, func(p int) int { sets = append(sets, p); return 0 }, func() (uint64, uint64) { return live, 0 })
	tu.adjust()
	tu.adjust()
	live = 512 * mib
	tu.adjust()
	live = 16 * mib
	tu.adjust()
	tu.Stop()
	tu.Stop()
	live = 4 * mib
	tu.adjust()
	want := []int{1500, 100, 700, 100}
	if len(sets) != len(want) {
		t.Fatalf("set %v, want %v", sets, want)
	}
	for i := range want {
		if sets[i] != want[i] {
			t.Fatalf("set %v, want %v", sets, want)
		}
	}
	if tu.Percent() != 100 {
		t.Fatalf("Percent() after Stop = %d, want the base", tu.Percent())
	}
}

func TestNothingToTune(t *testing.T) {
	if tu := Start(0); tu != nil {
		tu.Stop()
		t.Fatal("a zero floor started a tuner")
	}
	old := debug.SetGCPercent(-1)
	defer debug.SetGCPercent(old)
	if tu := Start(128 * mib); tu != nil {
		tu.Stop()
		t.Fatal("GOGC=off started a tuner")
	}
	var tu *Tuner
	tu.Stop() // a nil tuner stops quietly
}

// One tuner per process: a second would take the first's raised percent
// for GOGC and keep it.
func TestOneTunerAtATime(t *testing.T) {
	first := Start(1024 * mib)
	if first == nil {
		t.Fatal("no tuner")
	}
	if second := Start(2048 * mib); second != nil {
		second.Stop()
		first.Stop()
		t.Fatal("a second tuner started while the first ran")
	}
	first.Stop()
	again := Start(1024 * mib)
	if again == nil {
		t.Fatal("no tuner after the first stopped")
	}
	again.Stop()
}

func gogc() int64 {
	s := []metrics.Sample{{Name: "/gc/gogc:percent"}}
	metrics.Read(s)
	return int64(s[0].Value.Uint64())
}

// Against the runtime: the percent is raised at once (a test binary's
// live heap is a few MiB), stays raised across collections, and Stop
// restores it; the finalizer chain then ends.
func TestStartRaisesAndStopRestores(t *testing.T) {
	base := gogc()
	runtime.GC() // the tuner waits for a collection's live heap
	tu := Start(1024 * mib)
	if tu == nil {
		t.Fatal("no tuner")
	}
	if got := gogc(); got <= base || got != int64(tu.Percent()) {
		t.Fatalf("GOGC %d after Start (tuner says %d), want above %d", got, tu.Percent(), base)
	}
	for range 3 {
		runtime.GC()
	}
	if got := gogc(); got <= base {
		t.Fatalf("GOGC %d after three collections, want above %d", got, base)
	}
	tu.Stop()
	if got := gogc(); got != base {
		t.Fatalf("GOGC %d after Stop, want %d", got, base)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		runtime.GC()
		select {
		case <-tu.done:
			if got := gogc(); got != base {
				t.Fatalf("GOGC %d after the last finalizer, want %d", got, base)
			}
			return
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("the finalizer chain did not end after Stop")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
