package api

import (
	"container/list"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// Rate limit defaults.
const (
	DefaultRatePerSecond = 20
	DefaultRateBurst     = 40
	DefaultMaxIdentities = 10000
)

// RateLimitOptions configures a RateLimiter.
type RateLimitOptions struct {
	// PerSecond is the sustained rate of calls per identity; Burst the
	// bucket size.
	PerSecond float64
	Burst     int
	// MaxIdentities bounds the identities tracked; the least recently
	// seen is forgotten first (it then starts again with a full bucket).
	MaxIdentities int
	// Now is the clock; default time.Now.
	Now func() time.Time
}

// RateLimiter is a token bucket per identity (golang.org/x/time/rate) with
// a bounded number of identities, so it cannot be used to exhaust memory.
// It is safe for concurrent use.
type RateLimiter struct {
	limit rate.Limit
	burst int
	now   func() time.Time

	mu      sync.Mutex
	buckets *lru[string, *rate.Limiter]
}

// NewRateLimiter returns a limiter; zero options take the defaults.
func NewRateLimiter(o RateLimitOptions) *RateLimiter {
	if o.PerSecond <= 0 {
		o.PerSecond = DefaultRatePerSecond
	}
	if o.Burst <= 0 {
		o.Burst = DefaultRateBurst
	}
	if o.MaxIdentities <= 0 {
		o.MaxIdentities = DefaultMaxIdentities
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return &RateLimiter{limit: rate.Limit(o.PerSecond), burst: o.Burst, now: o.Now, buckets: newLRU[string, *rate.Limiter](o.MaxIdentities, nil)}
}

// Allow takes one token from key's bucket. When the bucket is empty it
// returns false and how long until a token is available.
func (r *RateLimiter) Allow(key string) (bool, time.Duration) {
	now := r.now()
	r.mu.Lock()
	l, ok := r.buckets.get(key)
	if !ok {
		l = rate.NewLimiter(r.limit, r.burst)
		r.buckets.add(key, l)
	}
	r.mu.Unlock()
	res := l.ReserveN(now, 1)
	if !res.OK() {
		return false, time.Second
	}
	if d := res.DelayFrom(now); d > 0 {
		res.CancelAt(now)
		return false, d
	}
	return true, 0
}

// Tracked returns how many identities have a bucket.
func (r *RateLimiter) Tracked() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.buckets.len()
}

// lru is a map bounded to max entries that forgets the least recently
// used one first. It is not safe for concurrent use.
type lru[K comparable, V any] struct {
	max     int
	ll      *list.List
	m       map[K]*list.Element
	onEvict func(key K, v V)
}

type lruEntry[K comparable, V any] struct {
	key K
	val V
}

func newLRU[K comparable, V any](max int, onEvict func(K, V)) *lru[K, V] {
	return &lru[K, V]{max: max, ll: list.New(), m: make(map[K]*list.Element), onEvict: onEvict}
}

func (l *lru[K, V]) get(key K) (V, bool) {
	if e, ok := l.m[key]; ok {
		l.ll.MoveToFront(e)
		return e.Value.(*lruEntry[K, V]).val, true
	}
	var zero V
	return zero, false
}

func (l *lru[K, V]) add(key K, v V) {
	if e, ok := l.m[key]; ok {
		e.Value.(*lruEntry[K, V]).val = v
		l.ll.MoveToFront(e)
		return
	}
	l.m[key] = l.ll.PushFront(&lruEntry[K, V]{key: key, val: v})
	for l.ll.Len() > l.max {
		oldest := l.ll.Back()
		ent := oldest.Value.(*lruEntry[K, V])
		l.ll.Remove(oldest)
		delete(l.m, ent.key)
		if l.onEvict != nil {
			l.onEvict(ent.key, ent.val)
		}
	}
}

func (l *lru[K, V]) len() int { return l.ll.Len() }

// each calls fn for every entry, most recently used first.
func (l *lru[K, V]) each(fn func(key K, v V)) {
	for e := l.ll.Front(); e != nil; e = e.Next() {
		ent := e.Value.(*lruEntry[K, V])
		fn(ent.key, ent.val)
	}
}
