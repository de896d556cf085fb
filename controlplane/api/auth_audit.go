package api

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/peer"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/errs"
)

// Audit actions of refused access.
const (
	// ActionDenied is one refused call (or TLS handshake).
	ActionDenied = "access.denied"
	// ActionDeniedSuppressed counts the refusals of one identity that
	// were not audited one by one because it went over its budget.
	ActionDeniedSuppressed = "access.denied.suppressed"
	// UnauthenticatedActor is the actor of a refusal with no verified
	// identity; the peer address is in the details.
	UnauthenticatedActor = "unauthenticated"
)

// denialKey is whose budget a refusal is charged to: the verified
// identity, else the peer's IP address (kept as a netip.Addr, so charging
// an unauthenticated refusal formats and allocates nothing), else the
// peer's address as text; or the budget shared by everyone.
type denialKey struct {
	actor  string
	addr   netip.Addr
	other  string
	global bool
}

var globalKey = denialKey{global: true}

// peer is the peer address of an unauthenticated key, as text.
func (k denialKey) peer() string {
	if k.addr.IsValid() {
		return k.addr.String()
	}
	return k.other
}

// peerKey is the budget key of an unauthenticated refusal on ctx.
func peerKey(ctx context.Context) denialKey {
	p, ok := peer.FromContext(ctx)
	if !ok || p.Addr == nil {
		return denialKey{}
	}
	if tcp, ok := p.Addr.(*net.TCPAddr); ok {
		if a, ok := netip.AddrFromSlice(tcp.IP); ok {
			return denialKey{addr: a.Unmap()}
		}
	}
	return denialKey{other: peerHost(ctx)}
}

// Denial audit defaults.
const (
	DefaultDenialsPerIdentity = 10
	DefaultDenialsPerWindow   = 600
	DefaultDenialWindow       = time.Minute
	DefaultDenialQueue        = 1024
)

// DenialOptions configures a DenialAuditor.
type DenialOptions struct {
	// PerIdentity is how many refusals of one identity (a verified ID, or
	// the peer's IP address when none is known) are audited one by one
	// per Window; MaxPerWindow bounds them for all identities together.
	// The rest are counted and audited as one ActionDeniedSuppressed entry
	// per identity and window.
	PerIdentity  int
	MaxPerWindow int
	Window       time.Duration
	// MaxIdentities bounds the identities tracked (least recently seen
	// forgotten first, its suppressed count audited then).
	MaxIdentities int
	// Queue bounds the entries waiting to be written.
	Queue int
	Now   func() time.Time
	Log   *slog.Logger
}

// Denial is one refused call.
type Denial struct {
	// Actor is the verified identity, or "" if none is known.
	Actor  string
	Tenant string
	// Method is the full RPC name, or "tls.handshake".
	Method string
	// Err is the refusal (its class and reason are recorded); Reason, if
	// set, overrides its reason.
	Err       error
	Reason    string
	RequestID string
	// Peer is the remote address; taken from the context if empty.
	Peer string
	// Claimed is an identity the caller claimed but did not prove (the
	// SPIFFE ID of a certificate that failed verification).
	Claimed string
}

type denialWindow struct {
	start      time.Time
	admitted   int
	suppressed int
	actor      string
}

// DenialAuditor writes refused calls to the audit log, asynchronously and
// within a budget, so a flood of refused calls costs neither a store
// write per call nor an unbounded log. It is safe for concurrent use.
type DenialAuditor struct {
	st   store.Store
	o    DenialOptions
	wake chan struct{}

	mu      sync.Mutex
	windows *lru[denialKey, *denialWindow]
	pending []auditlog.Entry

	writeMu    sync.Mutex
	suppressed atomic.Uint64
	dropped    atomic.Uint64
	written    atomic.Uint64
}

// NewDenialAuditor returns an auditor appending to st; zero options take
// the defaults. Run (or Flush) writes what Record queues.
func NewDenialAuditor(st store.Store, o DenialOptions) *DenialAuditor {
	if o.PerIdentity <= 0 {
		o.PerIdentity = DefaultDenialsPerIdentity
	}
	if o.MaxPerWindow <= 0 {
		o.MaxPerWindow = DefaultDenialsPerWindow
	}
	if o.Window <= 0 {
		o.Window = DefaultDenialWindow
	}
	if o.MaxIdentities <= 0 {
		o.MaxIdentities = DefaultMaxIdentities
	}
	if o.Queue <= 0 {
		o.Queue = DefaultDenialQueue
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	d := &DenialAuditor{st: st, o: o, wake: make(chan struct{}, 1)}
	d.windows = newLRU[denialKey, *denialWindow](o.MaxIdentities, func(key denialKey, w *denialWindow) {
		// Called with d.mu held, from add.
		d.summarizeLocked(key, w)
	})
	return d
}

func peerHost(ctx context.Context) string {
	p, ok := peer.FromContext(ctx)
	if !ok || p.Addr == nil {
		return ""
	}
	if tcp, ok := p.Addr.(*net.TCPAddr); ok {
		return tcp.IP.String()
	}
	if host, _, err := net.SplitHostPort(p.Addr.String()); err == nil {
		return host
	}
	return p.Addr.String()
}

// Record queues the audit entry of a refusal, unless the identity or
// everyone is over budget this window, in which case it is counted. It
// never blocks and never touches the store.
func (d *DenialAuditor) Record(ctx context.Context, x Denial) {
	// The budget is charged before anything is formatted: a refusal over
	// budget (a flood) costs a clock read and two map lookups.
	var key denialKey
	actor := x.Actor
	switch {
	case actor != "":
		key.actor = actor
	case x.Peer != "":
		if a, err := netip.ParseAddr(x.Peer); err == nil {
			key.addr = a.Unmap()
		} else {
			key.other = x.Peer
		}
	default:
		key = peerKey(ctx)
	}
	if actor == "" {
		actor = UnauthenticatedActor
	}
	now := d.o.Now()
	d.mu.Lock()
	admit := d.admitLocked(key, actor, now) && d.admitLocked(globalKey, "", now) && len(d.pending) < d.o.Queue
	if !admit {
		d.mu.Unlock()
		d.suppressed.Add(1)
		return
	}
	d.mu.Unlock()
	if x.Peer == "" {
		if x.Actor == "" {
			x.Peer = key.peer()
		} else {
			x.Peer = peerHost(ctx)
		}
	}
	reason := x.Reason
	if reason == "" {
		reason = errs.ReasonOf(x.Err)
	}
	if reason == "" {
		reason = errs.Code(x.Err).String()
	}
	details := map[string]string{"code": errs.Code(x.Err).String()}
	if x.Peer != "" {
		details["peer"] = x.Peer
	}
	if x.Claimed != "" {
		details["claimed_id"] = truncate(x.Claimed, 256)
	}
	e := audit.FromContext(ctx, auditlog.Entry{Time: now, Actor: actor, Tenant: x.Tenant, Action: ActionDenied, Resource: "rpc:" + truncate(x.Method, 128),
		Outcome: auditlog.OutcomeDenied, Reason: reason, RequestID: x.RequestID, Details: details})
	d.mu.Lock()
	d.pending = append(d.pending, e)
	d.mu.Unlock()
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

// admitLocked charges one refusal to key's window; false if over budget
// (then it is counted as suppressed there).
func (d *DenialAuditor) admitLocked(key denialKey, actor string, now time.Time) bool {
	limit := d.o.PerIdentity
	if key == globalKey {
		limit = d.o.MaxPerWindow
	}
	w, ok := d.windows.get(key)
	if !ok {
		w = &denialWindow{start: now, actor: actor}
		d.windows.add(key, w)
	}
	if now.Sub(w.start) >= d.o.Window {
		d.summarizeLocked(key, w)
		w.start, w.admitted = now, 0
	}
	if w.admitted >= limit {
		w.suppressed++
		return false
	}
	w.admitted++
	return true
}

// summarizeLocked queues the suppressed count of a window and resets it.
func (d *DenialAuditor) summarizeLocked(key denialKey, w *denialWindow) {
	if w.suppressed == 0 {
		return
	}
	actor := w.actor
	if key == globalKey {
		actor = "*"
	}
	details := map[string]string{"suppressed": strconv.Itoa(w.suppressed), "window_start": w.start.UTC().Format(time.RFC3339)}
	if key.actor == "" && !key.global {
		if p := key.peer(); p != "" {
			details["peer"] = p
		}
	}
	// The summary itself bypasses the queue bound: there is at most one
	// per identity and window.
	d.pending = append(d.pending, auditlog.Entry{Time: d.o.Now(), Actor: actor, Action: ActionDeniedSuppressed,
		Resource: "rpc:*", Outcome: auditlog.OutcomeDenied, Reason: "DENIALS_SUPPRESSED", Details: details})
	w.suppressed = 0
}

// Run writes queued entries as they come, and summaries of windows that
// ended, until ctx ends; then it flushes what is left.
func (d *DenialAuditor) Run(ctx context.Context) {
	t := time.NewTicker(d.o.Window)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			_ = d.Flush(context.WithoutCancel(ctx))
			return
		case <-d.wake:
			_ = d.write(ctx)
		case <-t.C:
			d.summarizeEnded()
			_ = d.write(ctx)
		}
	}
}

// summarizeEnded queues summaries of windows that are over.
func (d *DenialAuditor) summarizeEnded() {
	now := d.o.Now()
	d.mu.Lock()
	defer d.mu.Unlock()
	d.windows.each(func(key denialKey, w *denialWindow) {
		if now.Sub(w.start) >= d.o.Window {
			d.summarizeLocked(key, w)
		}
	})
}

// Flush writes every queued entry and the suppressed counts of every
// window, ended or not.
func (d *DenialAuditor) Flush(ctx context.Context) error {
	d.mu.Lock()
	d.windows.each(func(key denialKey, w *denialWindow) { d.summarizeLocked(key, w) })
	d.mu.Unlock()
	return d.write(ctx)
}

// write appends the queued entries in one store transaction.
func (d *DenialAuditor) write(ctx context.Context) error {
	d.writeMu.Lock()
	defer d.writeMu.Unlock()
	d.mu.Lock()
	batch := d.pending
	d.pending = nil
	d.mu.Unlock()
	if len(batch) == 0 {
		return nil
	}
	err := d.st.Update(ctx, func(tx store.Tx) error {
		for _, e := range batch {
			if _, err := audit.Append(tx, e); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		d.dropped.Add(uint64(len(batch)))
		d.o.Log.Error("audit denied access", "entries", len(batch), "err", err)
		return err
	}
	d.written.Add(uint64(len(batch)))
	return nil
}

// DenialStats are the auditor's counters.
type DenialStats struct {
	Written, Suppressed, Dropped uint64
}

// Stats returns the counters: entries written, refusals not audited one by
// one (over budget), entries lost to a failed store write.
func (d *DenialAuditor) Stats() DenialStats {
	return DenialStats{Written: d.written.Load(), Suppressed: d.suppressed.Load(), Dropped: d.dropped.Load()}
}
