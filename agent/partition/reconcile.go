package partition

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/pkg/mig"
)

// The Reconciler moves each GPU's MIG partitions from what the driver has
// to what is desired, touching only the difference, and never an instance
// a running lease holds. It plans a whole GPU against the MIG rules before
// its first call, so a GPU is either moved to its desired layout or left as
// it was, with the reason reported; and it journals every NVML call before
// making it (IntentLog), so a kill at any point is repaired on restart.

// ErrInvalidDesired: a desired layout is malformed or does not suit the
// host (an unknown GPU, a GPU given twice, instances with MIG disabled, a
// layout that breaks the MIG rules). Reconcile returns it before touching
// any GPU.
var ErrInvalidDesired = errors.New("invalid desired mig layout")

// Desired is the layout one GPU should have. GPUs not named are left alone.
type Desired struct {
	GPUUUID    string
	MIGEnabled bool
	// Instances are the GPU instances, each with its full-size compute
	// instance; empty when MIGEnabled is false.
	Instances []mig.Instance
}

// Resetter resets one GPU so that a pending MIG mode becomes current (the
// simulator's ResetGPU; nvidia-smi -r or NVML's reset on a host). It must
// fail with an error of class gpu.ErrInUse while a process holds the GPU.
type Resetter interface {
	Reset(ctx context.Context, gpuUUID string) error
}

// ResetFunc adapts a function to Resetter.
type ResetFunc func(ctx context.Context, gpuUUID string) error

// Reset calls f.
func (f ResetFunc) Reset(ctx context.Context, gpuUUID string) error { return f(ctx, gpuUUID) }

// ReconcilerConfig wires a Reconciler.
type ReconcilerConfig struct {
	// Backend is the GPU driver. Required.
	Backend gpu.Backend
	// Intents is the crash journal. Required.
	Intents *IntentLog
	// Reset resets a GPU whose MIG mode change stays pending. Nil: such a
	// GPU is reported (ConflictResetRequired) and left pending.
	Reset Resetter
	// Model is the MIG model a GPU is planned with; default
	// mig.ResolveModel from the device's name, PCI id and memory (the
	// built-in table), the model the control plane plans with.
	Model func(gpu.Device) (mig.Model, error)
	// Logger gets one record per change; default discards.
	Logger *slog.Logger
}

// Reconciler converges GPUs to desired MIG layouts. Its methods are safe
// for concurrent use but run one at a time. The lease executor's Ensure and
// Destroy must not run on a GPU while the Reconciler applies to it.
type Reconciler struct {
	b      gpu.Backend
	log    *IntentLog
	reset  Resetter
	model  func(gpu.Device) (mig.Model, error)
	logger *slog.Logger

	mu sync.Mutex
	// busy remembers, per GPU, the instances a process held when last
	// tried (gpu.ErrInUse), so that the next round tries them first and a
	// lasting conflict costs one refused call, not a destroy and rollback
	// of the instances around them. Guarded by mu.
	busy map[string]map[int]mig.Instance
}

// NewReconciler checks the configuration and builds a Reconciler.
func NewReconciler(cfg ReconcilerConfig) (*Reconciler, error) {
	if cfg.Backend == nil || cfg.Intents == nil {
		return nil, errors.New("new mig reconciler: a backend and an intent journal are required")
	}
	r := &Reconciler{b: cfg.Backend, log: cfg.Intents, reset: cfg.Reset, model: cfg.Model, logger: cfg.Logger,
		busy: map[string]map[int]mig.Instance{}}
	if r.model == nil {
		r.model = func(d gpu.Device) (mig.Model, error) {
			return mig.ResolveModel(d.Name, d.PCIDeviceID, d.MemoryMiB, nil)
		}
	}
	if r.logger == nil {
		r.logger = slog.New(slog.DiscardHandler)
	}
	return r, nil
}

// InstanceRef is one GPU instance as the report names it.
type InstanceRef struct {
	GIID      int
	Profile   mig.ProfileID
	Placement mig.Placement
}

// Instance is the instance's profile and placement.
func (i InstanceRef) Instance() mig.Instance {
	return mig.Instance{Profile: i.Profile, Placement: i.Placement}
}

// ConflictReason says why a GPU was left as it was.
type ConflictReason string

// Conflict reasons.
const (
	// ConflictProtected: the desired layout needs space (or capacity) a
	// running lease's instance holds.
	ConflictProtected ConflictReason = "protected-instance"
	// ConflictInUse: the desired layout needs space an instance holds that
	// a process is attached to (the driver said IN_USE).
	ConflictInUse ConflictReason = "instance-in-use"
	// ConflictBusy: the MIG mode must change but the GPU is not idle (a
	// running lease's instance, an attached process, or a reset refused).
	ConflictBusy ConflictReason = "gpu-busy"
	// ConflictResetRequired: the MIG mode change is pending a GPU reset and
	// no Resetter is configured.
	ConflictResetRequired ConflictReason = "reset-required"
)

// Conflict is why one GPU was not moved to its desired layout.
type Conflict struct {
	GPUUUID string
	Reason  ConflictReason
	// Instances are the instances in the way, if any.
	Instances []InstanceRef
	// Detail is the rule that failed, for people.
	Detail string
}

// GPUReport is what a Reconcile or Recover did on one GPU.
type GPUReport struct {
	GPUUUID string
	// Index is the GPU's index, -1 for a GPU the host no longer reports.
	Index int
	// Created are the instances made (GPU and compute instance).
	Created []InstanceRef
	// Destroyed are the instances removed.
	Destroyed []InstanceRef
	// Adopted are desired instances that an interrupted apply (or someone
	// else) had made, completed with their compute instance where it was
	// missing.
	Adopted []InstanceRef
	// Kept are desired instances that already existed, not touched.
	Kept []InstanceRef
	// Untouched are the running leases' (protected) instances, never
	// touched.
	Untouched []InstanceRef
	// InUse are undesired instances a process holds, left in place because
	// the desired layout does not need their space.
	InUse []InstanceRef
	// ModeChanged: SetMIGMode was called (a change requested or a pending
	// one cancelled). MIGMode is the mode afterwards.
	ModeChanged bool
	MIGMode     gpu.MIGMode
	// Reset: the Resetter was called for this GPU.
	Reset     bool
	Conflicts []Conflict
	// Err is why the GPU could not be reconciled (a driver error); the
	// intent journal keeps what the next Reconcile must repair.
	Err error
}

// Report is what a Reconcile or Recover did, per GPU in index order.
type Report struct {
	GPUs    []GPUReport
	Elapsed time.Duration
}

// GPU finds one GPU's report.
func (r Report) GPU(uuid string) (GPUReport, bool) {
	for _, g := range r.GPUs {
		if g.GPUUUID == uuid {
			return g, true
		}
	}
	return GPUReport{}, false
}

// Conflicts lists every GPU's conflicts.
func (r Report) Conflicts() []Conflict {
	var out []Conflict
	for _, g := range r.GPUs {
		out = append(out, g.Conflicts...)
	}
	return out
}

// reportBuilder collects GPU reports by UUID.
type reportBuilder struct {
	byUUID map[string]*GPUReport
	index  map[string]int
}

func newReportBuilder(devs []gpu.Device) *reportBuilder {
	rb := &reportBuilder{byUUID: map[string]*GPUReport{}, index: map[string]int{}}
	for _, d := range devs {
		rb.index[d.UUID] = d.Index
	}
	return rb
}

func (rb *reportBuilder) gpu(uuid string) *GPUReport {
	if g, ok := rb.byUUID[uuid]; ok {
		return g
	}
	idx, ok := rb.index[uuid]
	if !ok {
		idx = -1
	}
	g := &GPUReport{GPUUUID: uuid, Index: idx}
	rb.byUUID[uuid] = g
	return g
}

func (rb *reportBuilder) report(start time.Time) Report {
	out := Report{Elapsed: time.Since(start)}
	for _, g := range rb.byUUID {
		out.GPUs = append(out.GPUs, *g)
	}
	slices.SortFunc(out.GPUs, func(a, b GPUReport) int {
		ai, bi := a.Index, b.Index
		if ai < 0 {
			ai = 1 << 30
		}
		if bi < 0 {
			bi = 1 << 30
		}
		return cmp.Or(cmp.Compare(ai, bi), cmp.Compare(a.GPUUUID, b.GPUUUID))
	})
	return out
}

// target is one validated desired GPU.
type target struct {
	dev   gpu.Device
	model mig.Model
	want  Desired
}

// actualGI is one GPU instance as observed, with its compute instances.
type actualGI struct {
	gi        gpu.GPUInstance
	cis       []gpu.ComputeInstance
	protected bool
}

func (a actualGI) instance() mig.Instance {
	return mig.Instance{Profile: a.gi.ProfileID, Placement: a.gi.Placement}
}

func (a actualGI) ref() InstanceRef {
	return InstanceRef{GIID: a.gi.ID, Profile: a.gi.ProfileID, Placement: a.gi.Placement}
}

func refs(as []actualGI) []InstanceRef {
	out := make([]InstanceRef, len(as))
	for i, a := range as {
		out[i] = a.ref()
	}
	return out
}

func noneProtected(string, int) bool { return false }

// Reconcile moves every GPU named in desired to its layout and reports what
// it did. It first repairs what an interrupted apply left (as Recover
// does). Then, per GPU: instances in both (same profile and placement) are
// kept; desired ones missing are created, with their compute instance; the
// rest are destroyed, except those protected(gpu, gi) says a running lease
// holds, which are never touched. The final layout (desired plus the
// protected instances left in place) is checked against the MIG rules
// before the first call; when a protected instance is in the way, or a
// process holds an instance in the way (gpu.ErrInUse, rolled back), the
// GPU is left as it was and a Conflict says why. MIG mode changes only on
// a GPU with nothing left to keep, and the Resetter is called for that GPU
// only when the change stays pending. A second Reconcile with the same
// input makes no mutating call.
//
// Bad input is an error of class ErrInvalidDesired returned before any
// GPU is touched. Driver errors on a GPU are in its report's Err and,
// joined, in the error; the other GPUs are still reconciled. protected may
// be nil (nothing protected).
func (r *Reconciler) Reconcile(ctx context.Context, desired []Desired, protected func(gpuUUID string, giID int) bool) (Report, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	start := time.Now()
	if protected == nil {
		protected = noneProtected
	}
	devs, err := r.b.Devices(ctx)
	if err != nil {
		return Report{}, fmt.Errorf("reconcile mig layouts: list gpus: %w", err)
	}
	targets, err := r.validate(devs, desired)
	if err != nil {
		return Report{}, fmt.Errorf("reconcile mig layouts: %w", err)
	}
	rb := newReportBuilder(devs)
	failed, recErr := r.recover(ctx, protected, rb)
	if failed == nil {
		return rb.report(start), fmt.Errorf("reconcile mig layouts: %w", recErr)
	}
	errs := []error{recErr}
	for _, t := range targets {
		if failed[t.dev.UUID] {
			continue // its repair failed: leave it to the next round
		}
		g := rb.gpu(t.dev.UUID)
		if err := r.reconcileGPU(ctx, t, protected, g); err != nil {
			err = fmt.Errorf("reconcile gpu %s: %w", t.dev.UUID, err)
			g.Err = err
			errs = append(errs, err)
		}
	}
	return rb.report(start), errors.Join(errs...)
}

// validate checks every desired layout against the host before anything is
// touched.
func (r *Reconciler) validate(devs []gpu.Device, desired []Desired) ([]target, error) {
	byUUID := map[string]gpu.Device{}
	for _, d := range devs {
		byUUID[d.UUID] = d
	}
	seen := map[string]bool{}
	var out []target
	for _, want := range desired {
		d, ok := byUUID[want.GPUUUID]
		switch {
		case !ok:
			return nil, fmt.Errorf("gpu %q is not on this host: %w", want.GPUUUID, ErrInvalidDesired)
		case seen[want.GPUUUID]:
			return nil, fmt.Errorf("gpu %s is given twice: %w", want.GPUUUID, ErrInvalidDesired)
		case !want.MIGEnabled && len(want.Instances) > 0:
			return nil, fmt.Errorf("gpu %s: %d instances with mig disabled: %w", want.GPUUUID, len(want.Instances), ErrInvalidDesired)
		case want.MIGEnabled && !d.MIGCapable:
			return nil, fmt.Errorf("gpu %s (%s) does not support mig: %w", want.GPUUUID, d.Name, ErrInvalidDesired)
		}
		seen[want.GPUUUID] = true
		t := target{dev: d, want: want}
		if want.MIGEnabled {
			m, err := r.model(d)
			if err != nil {
				return nil, fmt.Errorf("gpu %s: %w: %w", want.GPUUUID, ErrInvalidDesired, err)
			}
			if err := m.CheckLayout(want.Instances); err != nil {
				return nil, fmt.Errorf("gpu %s: %w: %w", want.GPUUUID, ErrInvalidDesired, err)
			}
			t.model = m
			t.want.Instances = slices.Clone(want.Instances)
		}
		out = append(out, t)
	}
	slices.SortFunc(out, func(a, b target) int { return a.dev.Index - b.dev.Index })
	return out, nil
}

// observe lists a GPU's instances with their compute instances.
func (r *Reconciler) observe(ctx context.Context, uuid string, protected func(string, int) bool) ([]actualGI, error) {
	gis, err := r.b.GPUInstances(ctx, uuid)
	if err != nil {
		return nil, err
	}
	out := make([]actualGI, 0, len(gis))
	for _, gi := range gis {
		cis, err := r.b.ComputeInstances(ctx, uuid, gi.ID)
		if err != nil {
			return nil, err
		}
		out = append(out, actualGI{gi: gi, cis: cis, protected: protected(uuid, gi.ID)})
	}
	return out, nil
}

// gpuPlan is the diff of one GPU.
type gpuPlan struct {
	kept, adopt, untouched, extras, destroy []actualGI
	create                                  []mig.Instance
}

func diff(want []mig.Instance, actual []actualGI) gpuPlan {
	var p gpuPlan
	wanted := map[mig.Instance]bool{}
	for _, in := range want {
		wanted[in] = true
	}
	have := map[mig.Instance]bool{}
	for _, a := range actual {
		key := a.instance()
		have[key] = true
		switch {
		case a.protected:
			p.untouched = append(p.untouched, a)
			if !wanted[key] {
				p.extras = append(p.extras, a)
			}
		case !wanted[key]:
			p.destroy = append(p.destroy, a)
		case len(a.cis) == 0:
			p.adopt = append(p.adopt, a)
		default:
			p.kept = append(p.kept, a)
		}
	}
	for _, in := range want {
		if !have[in] {
			p.create = append(p.create, in)
		}
	}
	return p
}

// checkFinal checks the desired layout on top of the instances that stay
// whatever happens; it returns the conflict, or nil.
func checkFinal(uuid string, m mig.Model, stay []actualGI, want []mig.Instance, reason ConflictReason) *Conflict {
	placed := make([]mig.Instance, 0, len(stay)+len(want))
	for _, a := range stay {
		placed = append(placed, a.instance())
	}
	for _, in := range want {
		if err := m.Check(placed, in.Profile, in.Placement); err != nil {
			var blocking []actualGI
			for _, a := range stay {
				if a.gi.Placement.Overlaps(in.Placement) {
					blocking = append(blocking, a)
				}
			}
			if len(blocking) == 0 {
				blocking = stay // capacity: all of them together
			}
			return &Conflict{GPUUUID: uuid, Reason: reason, Instances: refs(blocking),
				Detail: fmt.Sprintf("desired %s needs what is held: %v", instanceString(in), err)}
		}
		placed = append(placed, in)
	}
	return nil
}

func instanceString(in mig.Instance) string {
	return fmt.Sprintf("profile %d at %s", in.Profile, in.Placement)
}

// reconcileGPU moves one GPU to its layout or leaves it as it was.
func (r *Reconciler) reconcileGPU(ctx context.Context, t target, protected func(string, int) bool, g *GPUReport) error {
	uuid, want := t.dev.UUID, t.want.MIGEnabled
	if !t.dev.MIGCapable {
		return nil // desired MIG off (validated), and it has no MIG
	}
	mode, err := r.b.MIGMode(ctx, uuid)
	if err != nil {
		return err
	}
	g.MIGMode = mode
	var actual []actualGI
	if mode.Current {
		if actual, err = r.observe(ctx, uuid, protected); err != nil {
			return err
		}
	}
	r.forgetGone(uuid, actual)
	p := diff(t.want.Instances, actual)
	g.Untouched = append(g.Untouched, refs(p.untouched)...)

	if mode.Current != want {
		return r.changeMode(ctx, t, mode, actual, p, g)
	}
	if !want {
		if mode.Pending != want {
			return r.setMode(ctx, uuid, want, g)
		}
		return nil
	}
	if c := checkFinal(uuid, t.model, p.extras, t.want.Instances, ConflictProtected); c != nil {
		g.Conflicts = append(g.Conflicts, *c)
		return nil
	}
	if mode.Pending != want {
		// Cancel a requested disable: allowed with instances, as the
		// driver allows requesting the current mode.
		if err := r.setMode(ctx, uuid, want, g); err != nil {
			return err
		}
	}
	g.Kept = append(g.Kept, refs(p.kept)...)
	if len(p.destroy)+len(p.create)+len(p.adopt) == 0 {
		return nil
	}
	plan := Plan{GPUUUID: uuid, MIGEnabled: true, Instances: slices.Clone(t.want.Instances)}
	for _, a := range p.extras {
		plan.Instances = append(plan.Instances, a.instance())
	}
	if err := r.log.begin(plan); err != nil {
		return err
	}
	stay := p.extras
	kept, c, err := r.destroyAll(ctx, uuid, p.destroy, actual, func(a actualGI) *Conflict {
		// A process holds a: fine if the layout does not need its space.
		if c := checkFinal(uuid, t.model, append(slices.Clone(stay), a), t.want.Instances, ConflictInUse); c != nil {
			return c
		}
		stay = append(stay, a)
		plan.Instances = append(plan.Instances, a.instance())
		return nil
	}, g)
	if c != nil {
		g.Conflicts = append(g.Conflicts, *c)
	}
	if err != nil || c != nil {
		return err
	}
	if len(kept) > 0 {
		g.InUse = append(g.InUse, refs(kept)...)
		if err := r.log.begin(plan); err != nil {
			return err
		}
	}
	for _, in := range p.create {
		if err := r.create(ctx, uuid, in, g); err != nil {
			return err
		}
	}
	for _, a := range p.adopt {
		if err := r.createCI(ctx, uuid, a); err != nil {
			return err
		}
		g.Adopted = append(g.Adopted, a.ref())
		r.logger.Info("mig instance adopted", "gpu", uuid, "gi", a.gi.ID, "profile", int(a.gi.ProfileID), "placement", a.gi.Placement.String())
	}
	return r.log.finish(uuid)
}

// changeMode moves an idle GPU to the other MIG mode: it destroys the
// instances that are not protected, requests the mode, resets the GPU if
// the change stays pending, and creates the desired instances.
func (r *Reconciler) changeMode(ctx context.Context, t target, mode gpu.MIGMode, actual []actualGI, p gpuPlan, g *GPUReport) error {
	uuid, want := t.dev.UUID, t.want.MIGEnabled
	if len(p.untouched) > 0 {
		g.Conflicts = append(g.Conflicts, Conflict{GPUUUID: uuid, Reason: ConflictBusy, Instances: refs(p.untouched),
			Detail: fmt.Sprintf("mig mode must change to %t but running leases hold instances", want)})
		return nil
	}
	if mode.Pending == want && r.reset == nil {
		g.Conflicts = append(g.Conflicts, Conflict{GPUUUID: uuid, Reason: ConflictResetRequired,
			Detail: fmt.Sprintf("mig mode %t is pending a gpu reset and no reset is configured", want)})
		return nil
	}
	if err := r.log.begin(Plan{GPUUUID: uuid, MIGEnabled: want, Instances: slices.Clone(t.want.Instances)}); err != nil {
		return err
	}
	_, c, err := r.destroyAll(ctx, uuid, actual, actual, func(a actualGI) *Conflict {
		return &Conflict{GPUUUID: uuid, Reason: ConflictBusy, Instances: []InstanceRef{a.ref()},
			Detail: fmt.Sprintf("mig mode must change to %t but a process holds an instance", want)}
	}, g)
	if c != nil {
		g.Conflicts = append(g.Conflicts, *c)
	}
	if err != nil || c != nil {
		return err
	}
	if mode.Pending != want {
		if err := r.setMode(ctx, uuid, want, g); err != nil {
			return err
		}
	}
	if g.MIGMode.Current != want {
		if r.reset == nil {
			g.Conflicts = append(g.Conflicts, Conflict{GPUUUID: uuid, Reason: ConflictResetRequired,
				Detail: fmt.Sprintf("mig mode %t is pending a gpu reset and no reset is configured", want)})
			return r.log.finish(uuid)
		}
		err := r.call(Intent{Op: OpReset, GPUUUID: uuid, GIID: -1}, func() (int, error) {
			return -1, r.reset.Reset(ctx, uuid)
		})
		if errors.Is(err, gpu.ErrInUse) {
			g.Conflicts = append(g.Conflicts, Conflict{GPUUUID: uuid, Reason: ConflictBusy,
				Detail: fmt.Sprintf("reset refused: %v", err)})
			return r.log.finish(uuid)
		}
		if err != nil {
			return fmt.Errorf("reset: %w", err)
		}
		g.Reset = true
		r.logger.Info("gpu reset for mig mode", "gpu", uuid, "mig_enabled", want)
		mode, err := r.b.MIGMode(ctx, uuid)
		if err != nil {
			return err
		}
		g.MIGMode = mode
		if mode.Current != want {
			return fmt.Errorf("mig mode still %t after reset (pending %t)", mode.Current, mode.Pending)
		}
	}
	for _, in := range t.want.Instances {
		if err := r.create(ctx, uuid, in, g); err != nil {
			return err
		}
	}
	return r.log.finish(uuid)
}

// setMode requests a MIG mode, journaled.
func (r *Reconciler) setMode(ctx context.Context, uuid string, want bool, g *GPUReport) error {
	var mode gpu.MIGMode
	err := r.call(Intent{Op: OpSetMIGMode, GPUUUID: uuid, GIID: -1, Enabled: want}, func() (int, error) {
		var err error
		mode, err = r.b.SetMIGMode(ctx, uuid, want)
		return -1, err
	})
	if err != nil {
		return err
	}
	g.ModeChanged, g.MIGMode = true, mode
	r.logger.Info("mig mode requested", "gpu", uuid, "mig_enabled", want, "current", mode.Current, "pending", mode.Pending)
	return nil
}

// destroyAll destroys the instances, compute instances first. When a
// process holds one (gpu.ErrInUse), inUse decides: nil leaves it in place
// and goes on (it is returned in kept); a conflict puts back the compute
// instances destroyed so far and stops, leaving the GPU as it was (the plan
// is rewritten to the original layout first, so a kill during the rollback
// is repaired towards it).
func (r *Reconciler) destroyAll(ctx context.Context, uuid string, list, original []actualGI, inUse func(actualGI) *Conflict, g *GPUReport) (kept []actualGI, _ *Conflict, _ error) {
	var emptied, gone []actualGI
	list = slices.Clone(list)
	slices.SortStableFunc(list, func(a, b actualGI) int { return cmpBool(r.wasBusy(uuid, b), r.wasBusy(uuid, a)) })
	for _, a := range list {
		var busy error
		for _, ci := range a.cis {
			err := r.call(Intent{Op: OpDestroyCI, GPUUUID: uuid, Profile: a.gi.ProfileID, Placement: a.gi.Placement, GIID: a.gi.ID, CIID: ci.ID},
				func() (int, error) { return -1, r.b.DestroyComputeInstance(ctx, uuid, a.gi.ID, ci.ID) })
			if errors.Is(err, gpu.ErrInUse) {
				busy = err
				break
			}
			r.setBusy(uuid, a, false)
			if err != nil && !errors.Is(err, gpu.ErrNotFound) {
				return nil, nil, err
			}
		}
		if busy == nil {
			emptied = append(emptied, a)
			continue
		}
		r.setBusy(uuid, a, true)
		c := inUse(a)
		if c == nil {
			kept = append(kept, a)
			r.logger.Info("mig instance in use left in place", "gpu", uuid, "gi", a.gi.ID, "error", busy.Error())
			continue
		}
		if c.Detail == "" {
			c.Detail = busy.Error()
		} else {
			c.Detail += ": " + busy.Error()
		}
		return nil, c, r.rollback(ctx, uuid, append(emptied, a), original)
	}
	for _, a := range emptied {
		err := r.call(Intent{Op: OpDestroyGI, GPUUUID: uuid, Profile: a.gi.ProfileID, Placement: a.gi.Placement, GIID: a.gi.ID},
			func() (int, error) { return -1, r.b.DestroyGPUInstance(ctx, uuid, a.gi.ID) })
		if err != nil && !errors.Is(err, gpu.ErrNotFound) {
			return nil, nil, err
		}
		gone = append(gone, a)
		r.logger.Info("mig instance destroyed", "gpu", uuid, "gi", a.gi.ID, "profile", int(a.gi.ProfileID), "placement", a.gi.Placement.String())
	}
	g.Destroyed = append(g.Destroyed, refs(gone)...)
	return kept, nil, nil
}

func (r *Reconciler) wasBusy(uuid string, a actualGI) bool {
	in, ok := r.busy[uuid][a.gi.ID]
	return ok && in == a.instance()
}

func (r *Reconciler) setBusy(uuid string, a actualGI, busy bool) {
	if !busy {
		delete(r.busy[uuid], a.gi.ID)
		return
	}
	if r.busy[uuid] == nil {
		r.busy[uuid] = map[int]mig.Instance{}
	}
	r.busy[uuid][a.gi.ID] = a.instance()
}

// forgetGone drops what is remembered of instances no longer there.
func (r *Reconciler) forgetGone(uuid string, actual []actualGI) {
	for id, in := range r.busy[uuid] {
		if !slices.ContainsFunc(actual, func(a actualGI) bool { return a.gi.ID == id && a.instance() == in }) {
			delete(r.busy[uuid], id)
		}
	}
}

func cmpBool(a, b bool) int {
	switch {
	case a == b:
		return 0
	case a:
		return 1
	}
	return -1
}

// rollback gives the instances whose compute instances were destroyed
// their compute instance back.
func (r *Reconciler) rollback(ctx context.Context, uuid string, emptied, original []actualGI) error {
	plan := Plan{GPUUUID: uuid, MIGEnabled: true}
	for _, a := range original {
		plan.Instances = append(plan.Instances, a.instance())
	}
	if err := r.log.begin(plan); err != nil {
		return err
	}
	for _, a := range emptied {
		cis, err := r.b.ComputeInstances(ctx, uuid, a.gi.ID)
		if err != nil {
			return fmt.Errorf("roll back gi %d: %w", a.gi.ID, err)
		}
		if len(cis) > 0 {
			continue
		}
		if err := r.createCI(ctx, uuid, a); err != nil {
			return fmt.Errorf("roll back gi %d: %w", a.gi.ID, err)
		}
	}
	return r.log.finish(uuid)
}

// create makes a GPU instance at exactly the placement and its compute
// instance.
func (r *Reconciler) create(ctx context.Context, uuid string, in mig.Instance, g *GPUReport) error {
	var gi gpu.GPUInstance
	err := r.call(Intent{Op: OpCreateGI, GPUUUID: uuid, Profile: in.Profile, Placement: in.Placement, GIID: -1}, func() (int, error) {
		var err error
		if gi, err = r.b.CreateGPUInstance(ctx, uuid, in.Profile, in.Placement); err != nil {
			return -1, err
		}
		return gi.ID, nil
	})
	if err != nil {
		return err
	}
	a := actualGI{gi: gi}
	if err := r.createCI(ctx, uuid, a); err != nil {
		return err
	}
	g.Created = append(g.Created, a.ref())
	r.logger.Info("mig instance created", "gpu", uuid, "gi", gi.ID, "profile", int(gi.ProfileID), "placement", gi.Placement.String())
	return nil
}

func (r *Reconciler) createCI(ctx context.Context, uuid string, a actualGI) error {
	return r.call(Intent{Op: OpCreateCI, GPUUUID: uuid, Profile: a.gi.ProfileID, Placement: a.gi.Placement, GIID: a.gi.ID},
		func() (int, error) {
			_, err := r.b.CreateComputeInstance(ctx, uuid, a.gi.ID)
			return -1, err
		})
}

// call journals the intent, makes the call, and marks the intent done.
func (r *Reconciler) call(in Intent, fn func() (giID int, err error)) error {
	seq, err := r.log.intend(in)
	if err != nil {
		return err
	}
	gi, callErr := fn()
	if callErr != nil {
		gi = -1
	}
	if err := r.log.done(in.GPUUUID, seq, gi); err != nil {
		return errors.Join(callErr, err)
	}
	return callErr
}

// Recover repairs what an apply interrupted by a kill or a driver error
// left, as the intent journal tells: on each GPU with an unfinished plan,
// every instance at the profile and placement of one of its intents is
// adopted (given its compute instance if missing) when the plan wants it
// and destroyed when not, unless protected(gpu, gi) says a running lease
// holds it (never touched) or a process holds it (reported in InUse). Then
// the GPU's journal is cleared. Pending MIG mode requests are left to the
// next Reconcile, which sees them in the driver. Run it at start, before
// the lease executor recovers; Reconcile also runs it first. protected may
// be nil.
func (r *Reconciler) Recover(ctx context.Context, protected func(gpuUUID string, giID int) bool) (Report, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	start := time.Now()
	if protected == nil {
		protected = noneProtected
	}
	devs, err := r.b.Devices(ctx)
	if err != nil {
		return Report{}, fmt.Errorf("recover mig partitions: list gpus: %w", err)
	}
	rb := newReportBuilder(devs)
	_, err = r.recover(ctx, protected, rb)
	return rb.report(start), err
}

// recover repairs every GPU with outstanding intents and returns those it
// could not repair; nil when the journal could not be read.
func (r *Reconciler) recover(ctx context.Context, protected func(string, int) bool, rb *reportBuilder) (map[string]bool, error) {
	out, err := r.log.Outstanding()
	if err != nil {
		return nil, fmt.Errorf("recover mig partitions: %w", err)
	}
	failed := map[string]bool{}
	var errs []error
	for _, uuid := range out.GPUs() {
		g := rb.gpu(uuid)
		if err := r.recoverGPU(ctx, uuid, out.Plans[uuid], out.Intents[uuid], protected, g); err != nil {
			err = fmt.Errorf("recover mig partitions on %s: %w", uuid, err)
			g.Err = err
			failed[uuid] = true
			errs = append(errs, err)
		}
	}
	return failed, errors.Join(errs...)
}

func (r *Reconciler) recoverGPU(ctx context.Context, uuid string, plan Plan, intents []Intent, protected func(string, int) bool, g *GPUReport) error {
	mode, err := r.b.MIGMode(ctx, uuid)
	if errors.Is(err, gpu.ErrNotFound) {
		r.logger.Warn("gpu with unfinished mig intents is gone", "gpu", uuid)
		return r.log.finish(uuid)
	}
	if err != nil {
		return err
	}
	g.MIGMode = mode
	touched := map[mig.Instance]bool{}
	for _, in := range intents {
		switch in.Op {
		case OpCreateGI, OpCreateCI, OpDestroyCI, OpDestroyGI:
			touched[mig.Instance{Profile: in.Profile, Placement: in.Placement}] = true
		}
	}
	if !mode.Current || len(touched) == 0 {
		return r.log.finish(uuid) // no instance can be half-made
	}
	actual, err := r.observe(ctx, uuid, protected)
	if err != nil {
		return err
	}
	wanted := map[mig.Instance]bool{}
	for _, in := range plan.Instances {
		wanted[in] = true
	}
	for _, a := range actual {
		key := a.instance()
		switch {
		case !touched[key]:
		case a.protected:
			g.Untouched = append(g.Untouched, a.ref())
		case wanted[key]:
			if len(a.cis) == 0 {
				if err := r.createCI(ctx, uuid, a); err != nil {
					return err
				}
			}
			g.Adopted = append(g.Adopted, a.ref())
			r.logger.Info("mig instance adopted after interruption", "gpu", uuid, "gi", a.gi.ID, "profile", int(a.gi.ProfileID), "placement", a.gi.Placement.String())
		default:
			kept, _, err := r.destroyAll(ctx, uuid, []actualGI{a}, actual, func(actualGI) *Conflict { return nil }, g)
			if err != nil {
				return err
			}
			g.InUse = append(g.InUse, refs(kept)...)
		}
	}
	return r.log.finish(uuid)
}
