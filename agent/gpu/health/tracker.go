// Package health turns the driver's XID and ECC events into the health of
// each GPU and MIG partition on a host, and so into whether new leases may
// go there. The policy is keyed to NVIDIA's XID catalog (catalog.go): each
// XID's immediate action decides between ignoring it, restarting the
// affected workload, resetting the GPU, and rebooting the node.
//
// The package decides and reports; it never acts. Stopping workloads,
// resetting GPUs and writing the audit entry for a health change are the
// agent's: it learns of each through Options.OnChange and the Decision for
// each event. It fails closed: a GPU it does not track, an XID it does not
// know, an event kind it does not know, or an event stream that stops,
// makes no GPU eligible.
package health

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/gpuaas/gpuaas/agent/gpu"
)

// Status is the health of a GPU or of one MIG partition.
type Status int

const (
	Healthy Status = iota
	Unhealthy
)

func (s Status) String() string {
	if s == Healthy {
		return "healthy"
	}
	return "unhealthy"
}

// Health is the state of one scope: a whole GPU, or one GPU instance (MIG
// partition) of it.
type Health struct {
	Status Status
	// Reason says why it is unhealthy; empty while healthy.
	Reason string
	// Since is when the scope became unhealthy; zero while healthy.
	Since time.Time
	// Clear is what clears it: ResetGPU (Tracker.Reset) or RebootNode
	// (nothing this process does).
	Clear Action
	// XID is the XID that made it unhealthy; 0 for other causes.
	XID uint64
}

// Change is one health change, for the agent's audit log. GI and CI name
// the scope that changed: gpu.WholeGPU for both when it is the GPU. An
// Unhealthy to Unhealthy change is an escalation (Clear became
// RebootNode).
type Change struct {
	Time     time.Time
	GPU      string
	GI, CI   uint32
	From, To Status
	Reason   string
	XID      uint64
	Clear    Action
}

// Decision is what one event means, whatever it did to health: the action
// the agent should take, and where: the event's GPU and its GI/CI
// attribution (gpu.WholeGPU when it names no MIG device). A
// RestartApplication means the workloads on that MIG device, or on the
// whole GPU.
type Decision struct {
	Event  gpu.Event
	Action Action
	// XID is the catalog row for an XID event; Known is false for an XID
	// the catalog does not list (Action is then DefaultAction).
	XID   XID
	Known bool
	// Changes are the health changes the event caused, also given to
	// Options.OnChange.
	Changes []Change
}

// ErrRebootRequired: Reset cannot make the GPU healthy; only a reboot can.
var ErrRebootRequired = errors.New("reboot required")

// ErrMonitorStopped: the event stream ended while its context was live.
var ErrMonitorStopped = errors.New("gpu event monitoring stopped")

// Options configure a Tracker.
type Options struct {
	// GPUs are the UUIDs tracked. Events for other GPUs change nothing,
	// and Eligible is false for them: a GPU nobody watches is not
	// vouched for.
	GPUs []string
	// OnChange, if set, is called with every health change, in order and
	// before the Observe or Reset that caused it returns. It may read the
	// Tracker (Eligible, Health, Snapshot) but must not call Observe,
	// Reset or Run.
	OnChange func(Change)
	// OnDecision, if set, is called by Run with the Decision for each
	// event, after its changes were reported.
	OnDecision func(Decision)
	// Overrides replace the catalog's action for the XIDs given (operator
	// policy, e.g. ignoring 109 as k8s-device-plugin does).
	Overrides map[uint64]Action
	// SingleBitThreshold is how many single-bit (corrected) ECC events a
	// GPU may report between resets before it is unhealthy (needing a
	// reset). 0, the default, never: the hardware corrected each one and
	// the row remapper retires failing rows by itself; the catalog ignores
	// even XID 92 (EXCESSIVE_SBE_INTERRUPTS), and k8s-device-plugin
	// registers single-bit events but never acts on them. Set it to catch
	// a GPU whose memory degrades faster than remapping keeps up.
	SingleBitThreshold int
	// Now is the clock for changes whose event carries no time, and for
	// Reset; default time.Now.
	Now func() time.Time
}

// scope keys a partition's state: a GPU instance of a GPU.
type scope struct {
	gpu string
	gi  uint32
}

// gpuState is what the Tracker knows of one GPU.
type gpuState struct {
	health    Health
	singleBit int
}

// partState is one partition's health, with the CI attribution of the
// event behind it.
type partState struct {
	health Health
	ci     uint32
}

// Tracker keeps per-GPU and per-partition health from events. It is safe
// for concurrent use.
type Tracker struct {
	opts Options

	mu    sync.Mutex
	gpus  map[string]*gpuState // guarded by mu
	parts map[scope]*partState // unhealthy partitions only; guarded by mu
	queue []Change             // changes not yet given to OnChange; guarded by mu
	deliv sync.Mutex           // held by the one goroutine draining queue
}

// NewTracker tracks opts.GPUs, all healthy.
func NewTracker(opts Options) *Tracker {
	if opts.Now == nil {
		opts.Now = time.Now
	}
	opts.Overrides = maps.Clone(opts.Overrides)
	t := &Tracker{opts: opts, gpus: map[string]*gpuState{}, parts: map[scope]*partState{}}
	for _, u := range opts.GPUs {
		t.gpus[u] = &gpuState{}
	}
	return t
}

// actionFor applies the overrides to the catalog.
func (t *Tracker) actionFor(xid uint64) (Action, XID, bool) {
	x, known := LookupXID(xid)
	a := x.Action
	if o, ok := t.opts.Overrides[xid]; ok {
		a = o
	}
	return a, x, known
}

// Observe applies one event and returns what it means. The rules:
//
//   - An XID's action is the catalog's (or an override, or DefaultAction).
//     Ignore and RestartApplication change no health: the hardware is
//     fine (the Decision tells the agent to restart the workload).
//     ResetGPU and RebootNode make the whole GPU unhealthy whatever the
//     attribution, since the recovery takes every partition down, except
//     for XID 48 (an uncorrectable ECC error) attributed to a GPU
//     instance: the bad row is in that instance's memory, so only that
//     partition is unhealthy until the GPU is reset and the remap
//     activates. An XID 95 (uncontained) that follows escalates to the GPU.
//   - A double-bit ECC event is treated as XID 48: its partition if
//     attributed, else the whole GPU; cleared by Reset.
//   - Single-bit ECC events change nothing unless SingleBitThreshold is
//     set and reached; then the GPU needs a reset.
//   - Driver restart, monitor stopped, or an unknown event kind: the GPU
//     (every tracked GPU when the event names none) is unhealthy until
//     Reset, since its state can no longer be vouched for.
//
// A scope already unhealthy keeps its first reason unless the new event
// needs a reboot where the old one needed a reset (an escalation, reported
// as a Change).
func (t *Tracker) Observe(ev gpu.Event) Decision {
	d := Decision{Event: ev}
	when := ev.Time
	if when.IsZero() {
		when = t.opts.Now()
	}
	attributed := ev.GPUInstanceID != gpu.WholeGPU

	t.mu.Lock()
	var changes []Change
	// mark makes the event's partition or GPU unhealthy; an event that
	// names no GPU concerns all of them.
	mark := func(partition bool, clear Action, reason string) {
		if ev.GPUUUID == "" {
			for _, u := range slices.Sorted(maps.Keys(t.gpus)) {
				changes = append(changes, t.markGPU(u, when, clear, reason, ev.XID)...)
			}
			return
		}
		if partition {
			changes = append(changes, t.markPartition(ev.GPUUUID, ev.GPUInstanceID, ev.ComputeInstanceID, when, clear, reason, ev.XID)...)
			return
		}
		changes = append(changes, t.markGPU(ev.GPUUUID, when, clear, reason, ev.XID)...)
	}
	where := ""
	if attributed {
		where = fmt.Sprintf(" in gpu instance %d", ev.GPUInstanceID)
		if ev.ComputeInstanceID != gpu.WholeGPU {
			where += fmt.Sprintf(" compute instance %d", ev.ComputeInstanceID)
		}
	}

	switch ev.Kind {
	case gpu.EventXID:
		d.Action, d.XID, d.Known = t.actionFor(ev.XID)
		name := d.XID.Mnemonic
		if !d.Known {
			name = "not in the catalog"
		}
		reason := fmt.Sprintf("xid %d (%s)%s: %s", ev.XID, name, where, d.Action)
		if d.Action >= ResetGPU {
			mark(attributed && ev.XID == xidDoubleBitECC && d.Action == ResetGPU, d.Action, reason)
		}
	case gpu.EventECCDoubleBit:
		d.Action = ResetGPU
		mark(attributed, ResetGPU, "double-bit ecc error"+where+": reset-gpu")
	case gpu.EventECCSingleBit:
		d.Action = Ignore
		if g := t.gpus[ev.GPUUUID]; g != nil && t.opts.SingleBitThreshold > 0 {
			g.singleBit++
			if g.singleBit >= t.opts.SingleBitThreshold {
				d.Action = ResetGPU
				mark(false, ResetGPU, fmt.Sprintf("%d single-bit ecc errors since the last reset (threshold %d): reset-gpu",
					g.singleBit, t.opts.SingleBitThreshold))
			}
		}
	default:
		d.Action = ResetGPU
		reason := map[gpu.EventKind]string{
			gpu.EventDriverRestart:  "driver restarted",
			gpu.EventMonitorStopped: "event monitoring stopped",
		}[ev.Kind]
		if reason == "" {
			reason = fmt.Sprintf("unknown event kind %q", ev.Kind)
		}
		mark(false, ResetGPU, reason+": health unknown until the gpu is reset")
	}
	d.Changes = changes
	t.deliver(changes)
	return d
}

// xidDoubleBitECC is the XID of an uncorrectable (double-bit) ECC error.
const xidDoubleBitECC = 48

// markGPU makes a tracked GPU unhealthy (or escalates it); the caller holds
// t.mu.
func (t *Tracker) markGPU(uuid string, when time.Time, clear Action, reason string, xid uint64) []Change {
	g := t.gpus[uuid]
	if g == nil {
		return nil
	}
	if !escalates(g.health, clear) {
		return nil
	}
	from := g.health.Status
	g.health = Health{Status: Unhealthy, Reason: reason, Since: since(g.health, when), Clear: clear, XID: xid}
	return []Change{{Time: when, GPU: uuid, GI: gpu.WholeGPU, CI: gpu.WholeGPU, From: from, To: Unhealthy, Reason: reason, XID: xid, Clear: clear}}
}

// markPartition makes one partition of a tracked GPU unhealthy; the caller
// holds t.mu.
func (t *Tracker) markPartition(uuid string, gi, ci uint32, when time.Time, clear Action, reason string, xid uint64) []Change {
	if t.gpus[uuid] == nil {
		return nil
	}
	k := scope{uuid, gi}
	p := t.parts[k]
	if p == nil {
		p = &partState{}
		t.parts[k] = p
	}
	if !escalates(p.health, clear) {
		return nil
	}
	from := p.health.Status
	p.health = Health{Status: Unhealthy, Reason: reason, Since: since(p.health, when), Clear: clear, XID: xid}
	p.ci = ci
	return []Change{{Time: when, GPU: uuid, GI: gi, CI: ci, From: from, To: Unhealthy, Reason: reason, XID: xid, Clear: clear}}
}

// escalates reports whether an event needing clear changes h: a healthy
// scope becomes unhealthy, an unhealthy one needing a reset escalates to
// needing a reboot.
func escalates(h Health, clear Action) bool {
	return h.Status == Healthy || clear > h.Clear
}

// since keeps the time a scope first became unhealthy across escalations.
func since(h Health, when time.Time) time.Time {
	if h.Status == Unhealthy {
		return h.Since
	}
	return when
}

// deliver queues changes for OnChange and releases t.mu, which the caller
// holds; it returns once they were delivered. Changes are queued in the
// order they happened and one goroutine at a time drains the queue, so
// OnChange sees them in that order, never concurrently, and without t.mu
// held (it may read the Tracker).
func (t *Tracker) deliver(changes []Change) {
	if t.opts.OnChange != nil {
		t.queue = append(t.queue, changes...)
	}
	t.mu.Unlock()
	if t.opts.OnChange == nil {
		return
	}
	t.deliv.Lock()
	defer t.deliv.Unlock()
	for {
		t.mu.Lock()
		batch := t.queue
		t.queue = nil
		t.mu.Unlock()
		if len(batch) == 0 {
			return
		}
		for _, c := range batch {
			t.opts.OnChange(c)
		}
	}
}

// Reset records that a GPU was reset (or re-verified after a driver
// restart or a monitoring gap): every partition of it is healthy again
// (its instances are gone, and pending row remaps are active), the
// single-bit count restarts, and the GPU itself is healthy unless it needs
// a reboot, in which case ErrRebootRequired is returned with the reason.
// gpu.ErrNotFound for a GPU the Tracker does not track.
func (t *Tracker) Reset(gpuUUID string) error {
	when := t.opts.Now()
	t.mu.Lock()
	g := t.gpus[gpuUUID]
	if g == nil {
		t.mu.Unlock()
		return fmt.Errorf("reset health of %s: not tracked: %w", gpuUUID, gpu.ErrNotFound)
	}
	var changes []Change
	keys := slices.SortedFunc(maps.Keys(t.parts), func(a, b scope) int { return cmpGI(a.gi, b.gi) })
	for _, k := range keys {
		if k.gpu != gpuUUID {
			continue
		}
		p := t.parts[k]
		changes = append(changes, Change{Time: when, GPU: gpuUUID, GI: k.gi, CI: p.ci, From: Unhealthy, To: Healthy,
			Reason: "gpu reset", Clear: p.health.Clear})
		delete(t.parts, k)
	}
	g.singleBit = 0
	var err error
	switch {
	case g.health.Status == Healthy:
	case g.health.Clear >= RebootNode:
		err = fmt.Errorf("reset health of %s: %s: %w", gpuUUID, g.health.Reason, ErrRebootRequired)
	default:
		changes = append(changes, Change{Time: when, GPU: gpuUUID, GI: gpu.WholeGPU, CI: gpu.WholeGPU, From: Unhealthy, To: Healthy,
			Reason: "gpu reset", Clear: g.health.Clear})
		g.health = Health{}
	}
	t.deliver(changes)
	return err
}

// Eligible reports whether a new lease may go to the GPU instance gi of a
// GPU, or with gi = gpu.WholeGPU to the whole GPU: the GPU is tracked and
// healthy, and so is that partition (for the whole GPU: every partition).
//
// Partition health is keyed by GPU instance id. A GPU instance id names a
// placement on these GPUs, so a new instance whose memory overlaps an
// unhealthy one's under another id is not caught here; the placement layer
// should avoid the memory of unhealthy partitions (Snapshot) until Reset.
func (t *Tracker) Eligible(gpuUUID string, gi uint32) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	g := t.gpus[gpuUUID]
	if g == nil || g.health.Status != Healthy {
		return false
	}
	if gi != gpu.WholeGPU {
		return t.parts[scope{gpuUUID, gi}] == nil
	}
	for k := range t.parts {
		if k.gpu == gpuUUID {
			return false
		}
	}
	return true
}

// Health returns the state of a GPU (gi = gpu.WholeGPU) or of one of its
// partitions (only the partition's own state; see Eligible for the
// combination). ok is false for a GPU the Tracker does not track.
func (t *Tracker) Health(gpuUUID string, gi uint32) (h Health, ok bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	g := t.gpus[gpuUUID]
	if g == nil {
		return Health{}, false
	}
	if gi == gpu.WholeGPU {
		return g.health, true
	}
	if p := t.parts[scope{gpuUUID, gi}]; p != nil {
		return p.health, true
	}
	return Health{}, true
}

// Entry is one unhealthy scope in a Snapshot.
type Entry struct {
	GPU    string
	GI, CI uint32 // gpu.WholeGPU for the GPU itself
	Health Health
}

// Snapshot lists every unhealthy GPU and partition, by GPU UUID then GPU
// instance (the GPU itself first).
func (t *Tracker) Snapshot() []Entry {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []Entry
	for u, g := range t.gpus {
		if g.health.Status == Unhealthy {
			out = append(out, Entry{GPU: u, GI: gpu.WholeGPU, CI: gpu.WholeGPU, Health: g.health})
		}
	}
	for k, p := range t.parts {
		out = append(out, Entry{GPU: k.gpu, GI: k.gi, CI: p.ci, Health: p.health})
	}
	slices.SortFunc(out, func(a, b Entry) int {
		if a.GPU != b.GPU {
			if a.GPU < b.GPU {
				return -1
			}
			return 1
		}
		return cmpGI(a.GI, b.GI)
	})
	return out
}

// Run feeds the backend's events to Observe until ctx ends, then returns
// nil. If the stream ends while ctx is live (the backend lost the driver),
// every tracked GPU is marked unhealthy ("event monitoring stopped") and
// Run returns ErrMonitorStopped: without events, health is unknown.
func (t *Tracker) Run(ctx context.Context, obs gpu.Observer) error {
	events, err := obs.Events(ctx)
	if err != nil {
		return fmt.Errorf("watch gpu health: %w", err)
	}
	for ev := range events {
		d := t.Observe(ev)
		if t.opts.OnDecision != nil {
			t.opts.OnDecision(d)
		}
	}
	if ctx.Err() != nil {
		return nil
	}
	d := t.Observe(gpu.Event{Time: t.opts.Now(), Kind: gpu.EventMonitorStopped,
		GPUInstanceID: gpu.WholeGPU, ComputeInstanceID: gpu.WholeGPU})
	if t.opts.OnDecision != nil {
		t.opts.OnDecision(d)
	}
	return fmt.Errorf("watch gpu health: %w", ErrMonitorStopped)
}

// cmpGI orders GPU instance ids with gpu.WholeGPU (the GPU itself) first.
func cmpGI(a, b uint32) int {
	key := func(gi uint32) int64 {
		if gi == gpu.WholeGPU {
			return -1
		}
		return int64(gi)
	}
	return int(key(a) - key(b))
}
