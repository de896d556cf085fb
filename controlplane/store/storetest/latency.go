package storetest

import (
	"slices"
	"sync"
	"testing"
	"time"
)

// Latencies gathers the latencies of a load's workers (each adds its own
// when it is done) for a benchmark's figures.
type Latencies struct {
	mu  sync.Mutex
	all []time.Duration
}

// Add records one worker's latencies.
func (l *Latencies) Add(mine []time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.all = append(l.all, mine...)
}

// Report reports the p99 latency (p99-ms) and the rate over elapsed
// (creates/s), and returns how many were recorded.
func (l *Latencies) Report(b *testing.B, elapsed time.Duration) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.all) == 0 {
		return 0
	}
	slices.Sort(l.all)
	b.ReportMetric(float64(l.all[len(l.all)*99/100].Microseconds())/1000, "p99-ms")
	b.ReportMetric(float64(len(l.all))/elapsed.Seconds(), "creates/s")
	return len(l.all)
}
