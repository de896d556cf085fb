package isolation

import (
	"cmp"
	"context"
	"slices"
	"strconv"
	"sync"
	"time"
)

// Summary counts the denials of one lease and kind since the previous
// summary for them. The lead turns each into one audit entry and metrics.
type Summary struct {
	LeaseID string
	// Cookie identifies the fence when LeaseID is "".
	Cookie uint64
	Kind   EventKind
	// Count is the number of denials summarized.
	Count uint64
	// Targets are the most frequent targets (DenyEvent.Target) with their
	// counts, most frequent first, at most MaxTargets; Other counts the
	// denials of the targets left out.
	Targets []TargetCount
	Other   uint64
	// First and Last are the times of the first and last denial counted.
	First, Last time.Time
}

// TargetCount is how often one target was denied.
type TargetCount struct {
	Target string
	Count  uint64
}

// DefaultMaxTargets bounds the targets tracked per summary.
const DefaultMaxTargets = 16

// Aggregator turns deny events into rate-limited summaries: at most one
// Summary per lease and kind per Interval. The first denial of a lease and
// kind is summarized at once (an attack shows up without delay); later
// ones are counted and summarized when Interval has passed since the
// previous summary. Memory is bounded by leases × kinds × MaxTargets.
type Aggregator struct {
	// Interval is the least time between two summaries of one lease and
	// kind.
	Interval time.Duration
	// MaxTargets bounds Summary.Targets (default DefaultMaxTargets).
	MaxTargets int
	// Now is the clock Run uses (default time.Now).
	Now func() time.Time

	mu      sync.Mutex
	buckets map[aggKey]*bucket
}

type aggKey struct {
	lease  string
	cookie uint64
	kind   EventKind
}

type bucket struct {
	lastEmit    time.Time // zero: never summarized
	count       uint64
	other       uint64
	targets     map[string]uint64
	first, last time.Time
}

// NewAggregator returns an Aggregator that summarizes each lease and kind
// at most once per interval.
func NewAggregator(interval time.Duration) *Aggregator {
	return &Aggregator{Interval: interval}
}

func (a *Aggregator) maxTargets() int {
	if a.MaxTargets > 0 {
		return a.MaxTargets
	}
	return DefaultMaxTargets
}

// Add counts ev at time now and returns a summary when one is due: the
// lease and kind had none in the last Interval.
func (a *Aggregator) Add(ev DenyEvent, now time.Time) (Summary, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.buckets == nil {
		a.buckets = map[aggKey]*bucket{}
	}
	k := aggKey{lease: ev.LeaseID, kind: ev.Kind}
	if ev.LeaseID == "" {
		k.cookie = ev.Cookie
	}
	b := a.buckets[k]
	if b == nil {
		b = &bucket{}
		a.buckets[k] = b
	}
	if b.count == 0 {
		b.first = ev.Time
	}
	b.count++
	b.last = ev.Time
	target := ev.Target()
	if b.targets == nil {
		b.targets = map[string]uint64{}
	}
	if _, ok := b.targets[target]; ok || len(b.targets) < a.maxTargets() {
		b.targets[target]++
	} else {
		b.other++
	}
	if !b.lastEmit.IsZero() && now.Sub(b.lastEmit) < a.Interval {
		return Summary{}, false
	}
	return a.emit(k, b, now), true
}

// Flush returns the summaries due at now: counted denials whose lease and
// kind had no summary in the last Interval. It forgets idle leases.
func (a *Aggregator) Flush(now time.Time) []Summary {
	return a.flush(now, false)
}

func (a *Aggregator) flush(now time.Time, all bool) []Summary {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []Summary
	for k, b := range a.buckets {
		due := all || now.Sub(b.lastEmit) >= a.Interval
		switch {
		case b.count > 0 && due:
			out = append(out, a.emit(k, b, now))
		case b.count == 0 && due:
			delete(a.buckets, k)
		}
	}
	slices.SortFunc(out, func(x, y Summary) int {
		return cmp.Or(cmp.Compare(x.LeaseID, y.LeaseID), cmp.Compare(x.Cookie, y.Cookie), cmp.Compare(x.Kind, y.Kind))
	})
	return out
}

func (a *Aggregator) emit(k aggKey, b *bucket, now time.Time) Summary {
	s := Summary{LeaseID: k.lease, Cookie: k.cookie, Kind: k.kind, Count: b.count, Other: b.other, First: b.first, Last: b.last}
	for t, n := range b.targets {
		s.Targets = append(s.Targets, TargetCount{Target: t, Count: n})
	}
	slices.SortFunc(s.Targets, func(x, y TargetCount) int {
		return cmp.Or(cmp.Compare(y.Count, x.Count), cmp.Compare(x.Target, y.Target))
	})
	b.count, b.other, b.targets = 0, 0, nil
	b.lastEmit = now
	return s
}

// Run summarizes the events of in until in closes (then the counted rest
// is summarized at once) or ctx is done, and closes the returned channel.
func (a *Aggregator) Run(ctx context.Context, in <-chan DenyEvent) <-chan Summary {
	now := a.Now
	if now == nil {
		now = time.Now
	}
	tick := a.Interval / 4
	if tick < 10*time.Millisecond {
		tick = 10 * time.Millisecond
	}
	out := make(chan Summary, 64)
	go func() {
		defer close(out)
		t := time.NewTicker(tick)
		defer t.Stop()
		send := func(ss ...Summary) bool {
			for _, s := range ss {
				select {
				case out <- s:
				case <-ctx.Done():
					return false
				}
			}
			return true
		}
		for {
			select {
			case <-ctx.Done():
				return
			case ev, ok := <-in:
				if !ok {
					send(a.flush(now(), true)...)
					return
				}
				if s, due := a.Add(ev, now()); due && !send(s) {
					return
				}
			case <-t.C:
				if !send(a.Flush(now())...) {
					return
				}
			}
		}
	}()
	return out
}

// String is a one-line rendering for logs: "lease l-1 device: 3 denied
// (c 195:1 rw ×2, c 240:3 r ×1)".
func (s Summary) String() string {
	b := []byte("lease " + s.LeaseID + " " + s.Kind.String() + ": " + strconv.FormatUint(s.Count, 10) + " denied (")
	for i, t := range s.Targets {
		if i > 0 {
			b = append(b, ", "...)
		}
		b = append(b, t.Target+" ×"+strconv.FormatUint(t.Count, 10)...)
	}
	if s.Other > 0 {
		b = append(b, ", other ×"+strconv.FormatUint(s.Other, 10)...)
	}
	return string(append(b, ')'))
}
