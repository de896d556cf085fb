// Package lease is the agent's executor: it converges the host to the
// desired lease set (partition, container, start; at cancel or not_after,
// stop, delete, destroy) and reports what it observes. It enforces a lease's
// end on its own clock whatever the network does (fail closed), and it
// journals every step so a restarted agent re-adopts its running containers.
package lease

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/agent/isolation"
	"github.com/gpuaas/gpuaas/agent/partition"
	"google.golang.org/protobuf/proto"

	"github.com/gpuaas/gpuaas/agent/runtime"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/mig"
	"github.com/gpuaas/gpuaas/pkg/seal"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// Options configures an executor.
type Options struct {
	Journal *Journal
	GPU     gpu.Backend
	Runtime runtime.Runtime
	// LogDir receives one log file per lease's container.
	LogDir string
	// StopGrace is how long a workload gets between SIGTERM and SIGKILL.
	StopGrace time.Duration
	// Resync is how often every lease is re-checked (expiry, exits).
	Resync time.Duration
	Logger *slog.Logger
	Now    func() time.Time
	// Fencer, if set, fences each lease's cgroup with eBPF after its task
	// is created and before it starts; a lease that cannot be fenced never
	// starts (fail closed).
	Fencer isolation.Fencer
	// FenceUnavailable, if set, is why no Fencer could be built (kernel
	// without cgroup BPF, no bpffs): every lease fails at its fence step
	// with it, rather than running unfenced.
	FenceUnavailable error
	// BaseDeny is every lease's egress deny list (metadata endpoints,
	// private ranges, the host, the control plane); a lease's egress_allow
	// entries are layered over it.
	BaseDeny []netip.Prefix
	// Eligible, if set, says whether a GPU may take a new partition (the
	// health tracker's verdict); an ineligible GPU fails the lease rather
	// than placing a tenant on failing hardware.
	Eligible func(gpuUUID string) bool
	// Sealer, if set, seals env values before they are journaled
	// (pkg/seal) and opens them only to create the container.
	Sealer *seal.Keyring
}

// errSecretUnavailable: a journaled env value cannot be opened (its key
// left the agent's keyring); the lease fails rather than run without it.
var errSecretUnavailable = errors.New("secret env value unavailable")

// ErrGPUUnhealthy: the GPU the lease was placed on is unhealthy.
var ErrGPUUnhealthy = errors.New("gpu unhealthy")

// Executor converges leases. Create it with New and call Run.
type Executor struct {
	o      Options
	kick   chan struct{}
	change chan struct{}

	mu       sync.Mutex
	inflight map[string]bool
	wg       sync.WaitGroup
	// adopted are the fences this executor has checked since it started.
	adopted sync.Map
	// imageTries counts failed image resolutions per lease (*int).
	imageTries sync.Map
}

// New returns an executor.
func New(o Options) *Executor {
	if o.StopGrace == 0 {
		o.StopGrace = 10 * time.Second
	}
	if o.Resync == 0 {
		o.Resync = time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return &Executor{o: o, kick: make(chan struct{}, 1), change: make(chan struct{}, 1), inflight: map[string]bool{}}
}

// orphanSweep is how often containers no lease accounts for are looked for
// after the sweep at start (which catches what a crash left).
const orphanSweep = 30 * time.Second

// imagePullTimeout bounds resolving and pulling a lease's image, and
// maxImageTries how many passes an unreachable registry is retried.
const (
	imagePullTimeout = 5 * time.Minute
	maxImageTries    = 3
)

// errImageUnavailable: the image could not be resolved or pulled after
// retries (registry unreachable).
var errImageUnavailable = errors.New("image unavailable")

// ContainerID is the container id of a lease.
func ContainerID(leaseID string) string { return "gpuaas-" + leaseID }

// NotifyChange tells the reporter something observable changed outside the
// executor (e.g. GPU health).
func (e *Executor) NotifyChange() { signal(e.change) }

// Changes signals when the observed state changed (coalesced).
func (e *Executor) Changes() <-chan struct{} { return e.change }

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// SetDesired journals a new desired set and starts converging to it.
func (e *Executor) SetDesired(ds *agentv1.DesiredState) error {
	leases, err := e.sealEnv(ds.GetLeases())
	if err != nil {
		return err
	}
	changed, err := e.o.Journal.SetDesired(ds.GetGeneration(), leases)
	if err != nil {
		return fmt.Errorf("journal desired state: %w", err)
	}
	if changed {
		signal(e.kick)
	}
	return nil
}

// sealEnv returns leases with their env values sealed (copies; the
// originals are not changed), for the journal.
func (e *Executor) sealEnv(leases []*leasev1.Lease) ([]*leasev1.Lease, error) {
	if e.o.Sealer == nil {
		return leases, nil
	}
	out := make([]*leasev1.Lease, 0, len(leases))
	for _, l := range leases {
		if len(l.GetSpec().GetWorkload().GetEnv()) == 0 {
			out = append(out, l)
			continue
		}
		c := proto.Clone(l).(*leasev1.Lease)
		env := c.GetSpec().GetWorkload().GetEnv()
		for k, v := range env {
			if seal.IsSealed(v) {
				continue
			}
			sv, err := e.o.Sealer.Seal(v, seal.EnvAAD(c.GetId(), k))
			if err != nil {
				return nil, fmt.Errorf("seal env of lease %s: %w", c.GetId(), err)
			}
			env[k] = sv
		}
		out = append(out, c)
	}
	return out, nil
}

// Acked tells the executor the control plane recorded report seq.
func (e *Executor) Acked(seq uint64) error {
	gone, err := e.o.Journal.Prune(seq)
	if len(gone) > 0 {
		e.o.Logger.Debug("forgot acknowledged leases", "leases", gone)
	}
	return err
}

// Observed builds the next observed-state report.
func (e *Executor) Observed() (*agentv1.ObservedState, error) {
	seq, err := e.o.Journal.NextSequence()
	if err != nil {
		return nil, err
	}
	recs, err := e.o.Journal.Records()
	if err != nil {
		return nil, err
	}
	_, gen, err := e.o.Journal.Desired()
	if err != nil {
		return nil, err
	}
	obs := &agentv1.ObservedState{Sequence: seq, DesiredGeneration: gen}
	ids := make([]string, 0, len(recs))
	for id := range recs {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		r := recs[id]
		st := &leasev1.LeaseStatus{MigUuid: r.MIGUUID, ContainerId: r.ContainerID, ImageDigest: r.ImageDigest, Exited: r.Exited, ExitCode: r.ExitCode,
			OomKilled: r.OOMKilled, Ip: r.IP}
		if r.Exited {
			st.ExitSignal = int32(signalOf(uint32(r.ExitCode)))
		}
		if !r.StartTime.IsZero() {
			st.StartTime = timestamppb.New(r.StartTime)
		}
		if !r.EndTime.IsZero() {
			st.EndTime = timestamppb.New(r.EndTime)
		}
		obs.Leases = append(obs.Leases, &agentv1.ObservedLease{LeaseId: id, Phase: r.Phase, Reason: r.Reason, Status: st, UpdateTime: timestamppb.New(r.UpdateTime)})
	}
	return obs, nil
}

// Run converges until ctx ends. It first stops containers of ours that no
// lease in the journal accounts for (fail closed), then works on every
// lease on each kick and every Resync.
func (e *Executor) Run(ctx context.Context) error {
	if err := e.removeOrphans(ctx); err != nil {
		e.o.Logger.Warn("orphan sweep failed", "err", err)
	}
	if err := e.sweepFences(); err != nil {
		e.o.Logger.Warn("fence sweep failed", "err", err)
	}
	t := time.NewTicker(e.o.Resync)
	defer t.Stop()
	sweep := time.NewTicker(orphanSweep)
	defer sweep.Stop()
	defer e.wg.Wait()
	e.pass(ctx)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-e.kick:
		case <-t.C:
		case <-sweep.C:
			if err := e.removeOrphans(ctx); err != nil && ctx.Err() == nil {
				e.o.Logger.Warn("orphan sweep failed", "err", err)
			}
		}
		e.pass(ctx)
	}
}

// pass starts a converge step for every lease not already being worked on.
func (e *Executor) pass(ctx context.Context) {
	desired, _, err := e.o.Journal.Desired()
	if err != nil {
		e.o.Logger.Error("read desired state", "err", err)
		return
	}
	recs, err := e.o.Journal.Records()
	if err != nil {
		e.o.Logger.Error("read lease records", "err", err)
		return
	}
	ids := map[string]bool{}
	for id := range desired {
		ids[id] = true
	}
	for id, r := range recs {
		if !terminal(r.Phase) {
			ids[id] = true
		}
	}
	for id := range ids {
		e.mu.Lock()
		busy := e.inflight[id]
		e.inflight[id] = true
		e.mu.Unlock()
		if busy {
			continue
		}
		e.wg.Add(1)
		go func() {
			defer e.wg.Done()
			defer func() { e.mu.Lock(); delete(e.inflight, id); e.mu.Unlock() }()
			if err := e.converge(ctx, id); err != nil && ctx.Err() == nil {
				e.o.Logger.Warn("converge lease", "lease", id, "err", err)
			}
		}()
	}
}

func event(action, leaseID, resource, outcome, reason string, details map[string]string, now time.Time) *agentv1.AuditEvent {
	return &agentv1.AuditEvent{Time: timestamppb.New(now), Action: action, LeaseId: leaseID, Resource: resource, Outcome: outcome, Reason: reason, Details: details}
}

// save journals r (with events) and signals a change.
func (e *Executor) save(r *Record, events ...*agentv1.AuditEvent) error {
	r.UpdateTime = e.o.Now()
	if err := e.o.Journal.Put(*r, events...); err != nil {
		return fmt.Errorf("journal lease %s: %w", r.LeaseID, err)
	}
	signal(e.change)
	return nil
}

// converge takes one lease as far towards its goal as it can go now.
func (e *Executor) converge(ctx context.Context, id string) error {
	desired, _, err := e.o.Journal.Desired()
	if err != nil {
		return err
	}
	r, ok, err := e.o.Journal.Record(id)
	if err != nil {
		return err
	}
	if ok && terminal(r.Phase) {
		return nil
	}
	l, want := desired[id]
	if !ok {
		if !want {
			return nil
		}
		r = Record{LeaseID: id, Phase: leasev1.Phase_PHASE_SCHEDULED}
	}
	if r.Phase == leasev1.Phase_PHASE_TERMINATING && r.Final != leasev1.Phase_PHASE_UNSPECIFIED {
		// An ended lease finishes its teardown, even if still desired.
		return e.teardown(ctx, &r, r.Final, r.Reason)
	}
	now := e.o.Now()
	if na := l.GetNotAfter().AsTime(); want && !r.NotAfter.Equal(na) {
		r.NotAfter = na // journaled, so a later cancel or expiry is told apart
		if err := e.save(&r); err != nil {
			return err
		}
	}
	expired := !r.NotAfter.IsZero() && !now.Before(r.NotAfter)
	switch {
	case expired:
		return e.teardown(ctx, &r, leasev1.Phase_PHASE_TERMINATED, "expired")
	case !want:
		return e.teardown(ctx, &r, leasev1.Phase_PHASE_TERMINATED, "cancelled")
	}
	return e.provision(ctx, &r, l)
}

// failure classes that no retry will fix.
func permanent(err error) bool {
	return errors.Is(err, errSecretUnavailable) || errors.Is(err, gpu.ErrInsufficientResources) || errors.Is(err, gpu.ErrInvalidArgument) || errors.Is(err, gpu.ErrNotFound) || errors.Is(err, ErrGPUUnhealthy) ||
		errors.Is(err, gpu.ErrNotSupported) || errors.Is(err, runtime.ErrImageNotFound) || errors.Is(err, runtime.ErrInvalidSpec) || errors.Is(err, runtime.ErrImagePolicy) || errors.Is(err, errImageUnavailable) ||
		errors.Is(err, isolation.ErrUnsupported) || errors.Is(err, isolation.ErrAttach) || errors.Is(err, isolation.ErrInvalidPolicy) || errors.Is(err, errNoCgroup) ||
		errors.Is(err, runtime.ErrNetworkUnavailable)
}

func (e *Executor) provision(ctx context.Context, r *Record, l *leasev1.Lease) error {
	if r.Phase == leasev1.Phase_PHASE_SCHEDULED {
		r.Phase, r.Reason = leasev1.Phase_PHASE_PROVISIONING, "provisioning"
		if err := e.save(r); err != nil {
			return err
		}
	}
	p := l.GetPlacement()
	var dev gpu.MIGDevice
	if !r.HasCI {
		if e.o.Eligible != nil && !r.HasGI && !e.o.Eligible(p.GetGpuUuid()) {
			return e.fail(ctx, r, fmt.Errorf("gpu %s: %w", p.GetGpuUuid(), ErrGPUUnhealthy), "create partition")
		}
		want := partition.Want{GPUUUID: p.GetGpuUuid(), Profile: mig.ProfileID(p.GetProfileId()), Placement: mig.Placement{Start: int(p.GetStart()), Size: int(p.GetSize())}}
		h, err := partition.Ensure(ctx, e.o.GPU, want, func(gi int) error {
			r.GPUUUID, r.GIID, r.HasGI = want.GPUUUID, gi, true
			return e.save(r)
		})
		if err != nil {
			return e.fail(ctx, r, err, "create partition")
		}
		r.CIID, r.HasCI, r.MIGUUID = h.CIID, true, h.Device.UUID
		dev = h.Device
		res := fmt.Sprintf("gpu/%s/gi/%d", want.GPUUUID, h.GIID)
		if err := e.save(r, event("partition.create", r.LeaseID, res, auditlog.OutcomeSuccess, "",
			map[string]string{"mig_uuid": h.Device.UUID, "profile": p.GetMigProfile(), "placement": want.Placement.String()}, e.o.Now())); err != nil {
			return err
		}
	} else {
		d, err := partition.Device(ctx, e.o.GPU, r.GPUUUID, r.GIID, r.CIID)
		if err != nil {
			return e.fail(ctx, r, err, "find partition")
		}
		dev = d
	}

	cid := ContainerID(r.LeaseID)
	st, err := e.o.Runtime.Status(ctx, cid)
	if errors.Is(err, runtime.ErrNotFound) {
		w := l.GetSpec().GetWorkload()
		env := make([]string, 0, len(w.GetEnv()))
		for k, v := range w.GetEnv() {
			if seal.IsSealed(v) {
				if e.o.Sealer == nil {
					return e.fail(ctx, r, fmt.Errorf("%w: %s is sealed and the agent has no secrets key", errSecretUnavailable, k), "env")
				}
				pv, err := e.o.Sealer.Open(v, seal.EnvAAD(l.GetId(), k))
				if err != nil {
					return e.fail(ctx, r, fmt.Errorf("%w: %s: %v", errSecretUnavailable, k, err), "env")
				}
				v = pv
			}
			env = append(env, k+"="+v)
		}
		sort.Strings(env)
		image := w.GetImage()
		if ens, ok := e.o.Runtime.(runtime.ImageEnsurer); ok {
			// Resolve (pulling if needed, under the registry policy) and
			// create from repo@digest, so a tag moved afterwards cannot
			// change what runs.
			ictx, cancel := context.WithTimeout(ctx, imagePullTimeout)
			dgst, err := ens.EnsureImage(ictx, image, ens.ImagePolicy())
			cancel()
			if err != nil && !permanent(err) && ctx.Err() == nil {
				// An unreachable registry is retried a few passes, then
				// the lease fails with a reason instead of waiting for
				// its end.
				n, _ := e.imageTries.LoadOrStore(r.LeaseID, new(int))
				if *n.(*int)++; *n.(*int) >= maxImageTries {
					e.imageTries.Delete(r.LeaseID)
					err = fmt.Errorf("%w: %v", errImageUnavailable, err)
				}
			}
			if err != nil {
				return e.fail(ctx, r, err, "image")
			}
			e.imageTries.Delete(r.LeaseID)
			if image, err = runtime.Pinned(image, dgst); err != nil {
				return e.fail(ctx, r, err, "image")
			}
			r.ImageDigest = dgst
		}
		r.ContainerID = cid
		if err := e.save(r); err != nil {
			return err
		}
		st, err = e.o.Runtime.Create(ctx, runtime.Spec{
			ID: cid, LeaseID: r.LeaseID, Tenant: l.GetSpec().GetTenant(), Image: image, Args: w.GetArgs(), Env: env,
			LogPath: filepath.Join(e.o.LogDir, r.LeaseID+".log"), Device: dev, Network: networkMode(w.GetNetwork()),
			Limits: runtime.Limits{MemoryBytes: w.GetResources().GetMemoryBytes(), CPUMillis: w.GetResources().GetCpuMillis(), Pids: w.GetResources().GetPids()},
		})
	}
	if err != nil {
		return e.fail(ctx, r, err, "create container")
	}
	ip := ""
	if st.IP.IsValid() {
		ip = st.IP.String()
	}
	if !r.Created || r.IP != ip {
		r.Created, r.IP = true, ip
		if err := e.save(r); err != nil {
			return err
		}
	}
	if err := e.ensureFence(ctx, r, l, dev, st); err != nil {
		return e.fail(ctx, r, err, "fence")
	}
	switch st.State {
	case runtime.StateCreated, runtime.StateNoTask:
		if st, err = e.o.Runtime.Start(ctx, cid); err != nil {
			return e.fail(ctx, r, err, "start container")
		}
		if err := e.save(r, event("container.start", r.LeaseID, "container/"+cid, auditlog.OutcomeSuccess, "",
			map[string]string{"image": l.GetSpec().GetWorkload().GetImage(), "image_digest": r.ImageDigest, "mig_uuid": dev.UUID, "pid": fmt.Sprint(st.Pid)}, e.o.Now())); err != nil {
			return err
		}
	}
	switch st.State {
	case runtime.StateRunning:
		if r.Phase != leasev1.Phase_PHASE_RUNNING {
			r.Phase, r.Reason = leasev1.Phase_PHASE_RUNNING, "running"
			if r.StartTime.IsZero() {
				r.StartTime = e.o.Now()
			}
			e.o.Logger.Info("lease running", "lease", r.LeaseID, "container", cid, "mig", dev.UUID)
			return e.save(r)
		}
	case runtime.StateStopped:
		r.Exited, r.ExitCode, r.OOMKilled = true, int32(st.ExitCode), st.OOMKilled
		if r.StartTime.IsZero() {
			r.StartTime = e.o.Now()
		}
		phase := leasev1.Phase_PHASE_TERMINATED
		if st.ExitCode != 0 || st.OOMKilled {
			phase = leasev1.Phase_PHASE_FAILED
		}
		return e.teardown(ctx, r, phase, exitReason(st))
	}
	return nil
}

// fail handles a provisioning error: transient ones are retried on the next
// pass; permanent ones fail the lease and release what was created.
func (e *Executor) fail(ctx context.Context, r *Record, err error, step string) error {
	if !permanent(err) {
		return fmt.Errorf("%s (will retry): %w", step, err)
	}
	e.o.Logger.Warn("lease failed", "lease", r.LeaseID, "step", step, "err", err)
	_ = e.o.Journal.AddEvents(event("lease.provision", r.LeaseID, "lease/"+r.LeaseID, auditlog.OutcomeFailure, step+": "+reasonOf(err), nil, e.o.Now()))
	return e.teardown(ctx, r, leasev1.Phase_PHASE_FAILED, step+": "+reasonOf(err))
}

// reasonOf is the part of an error safe to report upstream: its class.
func reasonOf(err error) string {
	for _, c := range []error{errImageUnavailable, runtime.ErrImagePolicy, runtime.ErrNetworkUnavailable, isolation.ErrUnsupported, isolation.ErrAttach, isolation.ErrInvalidPolicy, errNoCgroup, ErrGPUUnhealthy, gpu.ErrInsufficientResources, gpu.ErrInvalidArgument, gpu.ErrNotSupported, gpu.ErrNotFound,
		runtime.ErrImageNotFound, runtime.ErrInvalidSpec, runtime.ErrNotFound} {
		if errors.Is(err, c) {
			return c.Error()
		}
	}
	return "internal error"
}

// teardown stops and deletes the container, destroys the partition and
// records the terminal phase. Every step is idempotent; on error the lease
// stays TERMINATING and the next pass retries.
func (e *Executor) teardown(ctx context.Context, r *Record, final leasev1.Phase, reason string) error {
	if r.Phase != leasev1.Phase_PHASE_TERMINATING || r.Final == leasev1.Phase_PHASE_UNSPECIFIED {
		r.Phase, r.Reason, r.Final = leasev1.Phase_PHASE_TERMINATING, reason, final
		if err := e.save(r); err != nil {
			return err
		}
	}
	if r.ContainerID != "" {
		if !r.Exited {
			if st, err := e.o.Runtime.Status(ctx, r.ContainerID); err == nil && st.State == runtime.StateStopped {
				r.Exited, r.ExitCode, r.OOMKilled = true, int32(st.ExitCode), st.OOMKilled
			}
		}
		if err := e.o.Runtime.Stop(ctx, r.ContainerID, e.o.StopGrace); err != nil {
			return fmt.Errorf("stop container %s: %w", r.ContainerID, err)
		}
		cid := r.ContainerID
		var events []*agentv1.AuditEvent
		if r.Created {
			events = append(events, event("container.stop", r.LeaseID, "container/"+cid, auditlog.OutcomeSuccess, reason, nil, e.o.Now()))
		}
		r.ContainerID, r.Created = "", false
		if err := e.save(r, events...); err != nil {
			return err
		}
		r.ContainerID = cid // keep it in the report
	}
	if r.Fenced && e.o.Fencer != nil {
		if err := e.o.Fencer.Detach(r.LeaseID); err != nil {
			return fmt.Errorf("detach fence: %w", err)
		}
		r.Fenced = false
		e.adopted.Delete(r.LeaseID)
		if err := e.save(r, event("fence.detach", r.LeaseID, "lease/"+r.LeaseID, auditlog.OutcomeSuccess, reason, nil, e.o.Now())); err != nil {
			return err
		}
	}
	if r.HasGI {
		if err := partition.Destroy(ctx, e.o.GPU, r.GPUUUID, r.GIID); err != nil {
			return fmt.Errorf("destroy partition: %w", err)
		}
		r.HasGI, r.HasCI = false, false
		if err := e.save(r, event("partition.destroy", r.LeaseID, fmt.Sprintf("gpu/%s/gi/%d", r.GPUUUID, r.GIID), auditlog.OutcomeSuccess, reason,
			map[string]string{"mig_uuid": r.MIGUUID}, e.o.Now())); err != nil {
			return err
		}
	}
	r.Phase, r.Reason, r.EndTime = final, reason, e.o.Now()
	if !strings.HasPrefix(reason, "exited") && !strings.HasPrefix(reason, "killed by signal") && reason != reasonOOMKilled && r.Exited {
		if r.OOMKilled {
			r.Reason = fmt.Sprintf("%s (workload had been %s)", reason, reasonOOMKilled)
		} else {
			r.Reason = fmt.Sprintf("%s (workload had exited with code %d)", reason, r.ExitCode)
		}
	}
	e.o.Logger.Info("lease ended", "lease", r.LeaseID, "phase", strings.TrimPrefix(final.String(), "PHASE_"), "reason", r.Reason)
	return e.save(r)
}

// reasonOOMKilled is the reason of a lease whose workload the kernel's OOM
// killer ended (its memory limit was reached): told apart from a SIGKILL
// sent by anyone else, which exits the same way.
const reasonOOMKilled = "oom-killed"

// exitReason says why a workload's task ended.
func exitReason(st runtime.Status) string {
	if st.OOMKilled {
		return reasonOOMKilled
	}
	if sig := signalOf(st.ExitCode); sig != 0 {
		return fmt.Sprintf("killed by signal %d", sig)
	}
	return fmt.Sprintf("exited with code %d", st.ExitCode)
}

// networkMode is the runtime's network mode for a lease's: bridge unless
// it asks for none. A lease never gets the host's network namespace.
func networkMode(m leasev1.NetworkMode) runtime.NetworkMode {
	if m == leasev1.NetworkMode_NETWORK_MODE_NONE {
		return runtime.NetworkNone
	}
	return runtime.NetworkBridge
}

// removeOrphans stops our containers that no journaled lease accounts for.
func (e *Executor) removeOrphans(ctx context.Context) error {
	list, err := e.o.Runtime.List(ctx)
	if err != nil {
		return err
	}
	recs, err := e.o.Journal.Records()
	if err != nil {
		return err
	}
	for _, st := range list {
		if r, ok := recs[st.LeaseID]; ok && r.ContainerID == st.ID && !terminal(r.Phase) {
			continue
		}
		e.o.Logger.Warn("removing orphan container", "container", st.ID, "lease", st.LeaseID)
		if err := e.o.Runtime.Stop(ctx, st.ID, e.o.StopGrace); err != nil {
			return fmt.Errorf("stop orphan %s: %w", st.ID, err)
		}
		if err := e.o.Journal.AddEvents(event("container.orphan_removed", st.LeaseID, "container/"+st.ID, auditlog.OutcomeSuccess, "no lease accounts for it", nil, e.o.Now())); err != nil {
			return err
		}
	}
	// Networks of containers that are gone (deleted behind the agent's
	// back, lost in a crash or a reboot): namespaces, veths, addresses.
	if sw, ok := e.o.Runtime.(runtime.NetworkSweeper); ok {
		gone, err := sw.SweepNetwork(ctx)
		for _, id := range gone {
			e.o.Logger.Warn("released the network of a container that is gone", "container", id)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// signalOf is the signal that killed a container's init, from its exit
// status: the runtime reports 128+N for a process ended by signal N.
func signalOf(exitCode uint32) int {
	if exitCode > 128 && exitCode <= 128+64 {
		return int(exitCode - 128)
	}
	return 0
}

// errNoCgroup: the runtime could not say where the task's cgroup is.
var errNoCgroup = errors.New("task cgroup unknown")

// Policy is the eBPF policy for a lease on its partition: the standard
// container devices and exactly the partition's nodes (capability nodes
// read-only), the base egress deny list and the lease's allow entries.
func Policy(l *leasev1.Lease, dev gpu.MIGDevice, baseDeny []netip.Prefix) (isolation.Policy, error) {
	p := isolation.Policy{DenyPrefixes: baseDeny}
	for _, n := range dev.DeviceNodes {
		access := "rw"
		if strings.Contains(n.Path, "nvidia-caps/") {
			access = "r"
		}
		p.Devices = append(p.Devices, isolation.CharDevice(n.Major, n.Minor, access))
	}
	for _, c := range l.GetSpec().GetWorkload().GetEgressAllow() {
		pfx, err := netip.ParsePrefix(c)
		if err != nil {
			return p, fmt.Errorf("%w: egress_allow %q: %v", isolation.ErrInvalidPolicy, c, err)
		}
		p.AllowPrefixes = append(p.AllowPrefixes, pfx)
	}
	return p, p.Validate()
}

// ensureFence fences a created task before it starts, and checks (once per
// executor run) that a running lease's pinned fence is still there,
// re-fencing it if not.
func (e *Executor) ensureFence(ctx context.Context, r *Record, l *leasev1.Lease, dev gpu.MIGDevice, st runtime.Status) error {
	if st.State == runtime.StateStopped {
		return nil
	}
	if e.o.Fencer == nil {
		if e.o.FenceUnavailable != nil {
			return fmt.Errorf("%w: %v", isolation.ErrUnsupported, e.o.FenceUnavailable)
		}
		return nil
	}
	if _, ok := e.adopted.Load(r.LeaseID); ok && r.Fenced {
		return nil
	}
	if r.Fenced {
		if _, err := e.o.Fencer.Adopt(r.LeaseID); err == nil {
			e.adopted.Store(r.LeaseID, true)
			return nil
		} else if !errors.Is(err, isolation.ErrNotFenced) {
			return err
		}
		e.o.Logger.Warn("fence of a running lease was gone; fencing again", "lease", r.LeaseID)
	}
	cg := st.CgroupPath
	if cg == "" && st.Pid != 0 {
		var err error
		if cg, err = isolation.CgroupDirOfPID(int(st.Pid)); err != nil {
			return fmt.Errorf("%w: %v", errNoCgroup, err)
		}
	}
	if cg == "" {
		return errNoCgroup
	}
	pol, err := Policy(l, dev, e.o.BaseDeny)
	if err != nil {
		return err
	}
	d, err := e.o.Fencer.Fence(r.LeaseID, cg, pol)
	if err != nil {
		return err
	}
	progs := make([]string, 0, len(d.Programs))
	for _, p := range d.Programs {
		progs = append(progs, fmt.Sprintf("%s:%d:%s", p.Attach, p.ProgramID, p.Tag))
	}
	r.Fenced = true
	e.adopted.Store(r.LeaseID, true)
	return e.save(r, event("fence.attach", r.LeaseID, "lease/"+r.LeaseID, auditlog.OutcomeSuccess, "",
		map[string]string{"cgroup": d.Cgroup, "programs": strings.Join(progs, ","), "devices": fmt.Sprint(len(d.Devices)),
			"deny_prefixes": fmt.Sprint(len(d.DenyPrefixes)), "allow_prefixes": fmt.Sprint(len(d.AllowPrefixes))}, e.o.Now()))
}

// sweepFences removes pinned fences no live lease accounts for.
func (e *Executor) sweepFences() error {
	if e.o.Fencer == nil {
		return nil
	}
	recs, err := e.o.Journal.Records()
	if err != nil {
		return err
	}
	gone, err := e.o.Fencer.Sweep(func(id string) bool {
		r, ok := recs[id]
		return ok && r.Fenced && !terminal(r.Phase)
	})
	for _, id := range gone {
		e.o.Logger.Warn("removed orphan fence", "lease", id)
		_ = e.o.Journal.AddEvents(event("fence.orphan_removed", id, "lease/"+id, auditlog.OutcomeSuccess, "no lease accounts for it", nil, e.o.Now()))
	}
	return err
}
