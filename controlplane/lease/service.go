// Package lease is the control plane's lease service: validation, the lease
// state machine, placement, expiry, and the desired state of each node. It is
// the only writer of the leases bucket; every change it commits carries its
// audit entry in the same transaction.
package lease

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base32"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/authn"
	"github.com/gpuaas/gpuaas/pkg/errs"
	"github.com/gpuaas/gpuaas/pkg/seal"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

const keyRevision = "revision"

// Caller is who makes a request, as the API layer authenticated it.
type Caller struct {
	// ID is the caller's SPIFFE ID or token subject; it is the audit actor.
	ID string
	// Tenant restricts the caller to one tenant's leases; empty means the
	// caller may act for every tenant (an operator).
	Tenant string
	// RequestID correlates the audit entry with logs.
	RequestID string
}

// Fleet is what the lease service needs of the fleet: the connected nodes
// to place on, and a way to tell a node its desired state changed.
// ConnectedNodes' result is read only; a fleet may return the very same
// slice again only while nothing it describes (down to each GPU) has
// changed, and placement then reuses what it derived from it.
type Fleet interface {
	ConnectedNodes() []NodeView
	Notify(node string)
}

// Options configures the service.
type Options struct {
	Store  store.Store
	Fleet  Fleet
	Logger *slog.Logger
	Now    func() time.Time
	// Sealer, if set, seals env values at rest (pkg/seal): in the lease
	// records and, as keyed digests, in the idempotency records. They are
	// opened only for the agent that runs the lease (DesiredState).
	Sealer *seal.Keyring
}

// Service implements the lease lifecycle.
type Service struct {
	sealer *seal.Keyring
	st     store.Store
	fleet  Fleet
	log    *slog.Logger
	now    func() time.Time
	watch  *broadcaster
	held   heldCache
	placer placer
	newID  func(time.Time) string // leaseIDAt; tests force collisions
}

// New returns the service.
func New(opts Options) *Service {
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &Service{st: opts.Store, fleet: opts.Fleet, log: opts.Logger, now: opts.Now, watch: newBroadcaster(), sealer: opts.Sealer, newID: leaseIDAt}
}

// SetFleet wires the fleet after construction (the fleet needs the service
// too).
func (s *Service) SetFleet(f Fleet) { s.fleet = f }

type idemRecord struct {
	LeaseID  string `json:"lease_id"`
	BodyHash string `json:"body_hash"`
}

// leaseIDEncoding keeps byte order in text order (0-9 then a-v).
var leaseIDEncoding = base32.HexEncoding.WithPadding(base32.NoPadding)

// leaseIDAt returns a lease id made at t: "l-" and 20 characters, the
// creation time in milliseconds (48 bits) then 52 random bits. Ids made later sort later,
// so new rows land in the last pages of the leases bucket (a group commit
// writes a few pages, not one per lease, and its fsync is that much
// shorter); the random bits keep ids unguessable and apart within one
// millisecond, and Create refuses to overwrite one that exists.
func leaseIDAt(t time.Time) string {
	var b [13]byte
	binary.BigEndian.PutUint64(b[:8], uint64(t.UnixMilli())<<16)
	if _, err := rand.Read(b[6:]); err != nil {
		panic(err)
	}
	return "l-" + strings.ToLower(leaseIDEncoding.EncodeToString(b[:]))[:20]
}

// bodyHash identifies a request body for its idempotency key: SHA-256 of
// the deterministic encoding, or with a sealer a keyed digest, so that the
// record keeps no plain hash of env values.
func (s *Service) bodyHash(spec *leasev1.LeaseSpec) string {
	b, _ := proto.MarshalOptions{Deterministic: true}.Marshal(spec)
	if s.sealer != nil {
		return "k:" + hex.EncodeToString(s.sealer.Digest(b))
	}
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

// sealEnv seals l's env values in place (with a sealer).
func (s *Service) sealEnv(l *leasev1.Lease) error {
	env := l.GetSpec().GetWorkload().GetEnv()
	if s.sealer == nil || len(env) == 0 {
		return nil
	}
	for k, v := range env {
		if seal.IsSealed(v) {
			continue
		}
		sv, err := s.sealer.Seal(v, seal.EnvAAD(l.GetId(), k))
		if err != nil {
			return fmt.Errorf("seal env of lease %s: %w", l.GetId(), err)
		}
		env[k] = sv
	}
	return nil
}

// openEnv returns l with its env values opened (a copy if any was sealed),
// for the agent that runs it. A value that cannot be opened (its key left
// the keyring) is an error: the lease is not handed out with a wrong
// environment.
func (s *Service) openEnv(l *leasev1.Lease) (*leasev1.Lease, error) {
	env := l.GetSpec().GetWorkload().GetEnv()
	sealed := false
	for _, v := range env {
		sealed = sealed || seal.IsSealed(v)
	}
	if !sealed {
		return l, nil
	}
	if s.sealer == nil {
		return nil, fmt.Errorf("lease %s has sealed env values and no secrets key is configured", l.GetId())
	}
	out := proto.Clone(l).(*leasev1.Lease)
	oenv := out.GetSpec().GetWorkload().GetEnv()
	for k, v := range oenv {
		if !seal.IsSealed(v) {
			continue
		}
		pv, err := s.sealer.Open(v, seal.EnvAAD(l.GetId(), k))
		if err != nil {
			return nil, fmt.Errorf("open env %s of lease %s: %w", k, l.GetId(), err)
		}
		oenv[k] = pv
	}
	return out, nil
}

func getLease(tx store.Tx, id string) (*leasev1.Lease, error) {
	raw, err := tx.Get(store.BucketLeases, id)
	if errors.Is(err, store.ErrNotFound) {
		return nil, errs.NotFound("LEASE_NOT_FOUND", "lease %s not found", id)
	}
	if err != nil {
		return nil, err
	}
	l := &leasev1.Lease{}
	if err := proto.Unmarshal(raw, l); err != nil {
		return nil, fmt.Errorf("decode lease %s: %w", id, err)
	}
	return l, nil
}

// putLease stores l with a new revision and keeps the allocation index in
// step; prev is its phase before this change (PHASE_UNSPECIFIED for a new
// lease).
func putLease(tx store.Tx, l *leasev1.Lease, prev leasev1.Phase, now time.Time) error {
	rev, err := store.NextU64(tx, keyRevision)
	if err != nil {
		return err
	}
	l.Revision = int64(rev)
	l.UpdateTime = timestamppb.New(now)
	raw, err := proto.Marshal(l)
	if err != nil {
		return err
	}
	if err := tx.Put(store.BucketLeases, l.GetId(), raw); err != nil {
		return err
	}
	if err := recordUsage(tx, l, prev, now); err != nil {
		return err
	}
	return reindex(tx, l, prev)
}

func scanLeases(tx store.Tx, fn func(*leasev1.Lease) error) error {
	return tx.Scan(store.BucketLeases, "", false, func(k string, v []byte) error {
		l := &leasev1.Lease{}
		if err := proto.Unmarshal(v, l); err != nil {
			return fmt.Errorf("decode lease %s: %w", k, err)
		}
		return fn(l)
	})
}

// setPhase records a transition, refusing what the state machine forbids.
func setPhase(l *leasev1.Lease, to leasev1.Phase, reason string, now time.Time) error {
	from := l.GetPhase()
	if from == to {
		return nil
	}
	if from != leasev1.Phase_PHASE_UNSPECIFIED && !CanTransition(from, to) {
		return errs.FailedPrecondition("INVALID_TRANSITION", "lease %s cannot go from %s to %s", l.GetId(), short(from), short(to))
	}
	l.Phase = to
	l.Reason = reason
	l.History = append(l.History, &leasev1.Transition{Phase: to, Reason: reason, Time: timestamppb.New(now)})
	return nil
}

func short(p leasev1.Phase) string { return strings.TrimPrefix(p.String(), "PHASE_") }

// audit appends the entry of an operation on l, correlated with the call
// ctx serves (if any).
func (s *Service) audit(ctx context.Context, tx store.Tx, c Caller, l *leasev1.Lease, action, outcome, reason string, details map[string]string) error {
	_, err := audit.Append(tx, audit.FromContext(ctx, auditlog.Entry{
		Time: s.now(), Actor: c.ID, Tenant: l.GetSpec().GetTenant(), Action: action,
		Resource: "lease/" + l.GetId(), Outcome: outcome, Reason: reason, RequestID: c.RequestID, Details: details,
	}))
	return err
}

func (s *Service) nodes() []NodeView {
	if s.fleet == nil {
		return nil
	}
	return s.fleet.ConnectedNodes()
}

func (s *Service) notify(nodes ...string) {
	if s.fleet == nil {
		return
	}
	seen := map[string]bool{}
	for _, n := range nodes {
		if n != "" && !seen[n] {
			seen[n] = true
			s.fleet.Notify(n)
		}
	}
}

// Create validates, places and stores a lease.
func (s *Service) Create(ctx context.Context, c Caller, req *leasev1.CreateLeaseRequest) (*leasev1.Lease, error) {
	if err := ValidateCreate(req); err != nil {
		return nil, err
	}
	spec := req.GetSpec()
	if c.Tenant != "" && spec.GetTenant() != c.Tenant {
		return nil, errs.PermissionDenied("TENANT_MISMATCH", "caller may not create leases for tenant %s", spec.GetTenant())
	}
	idemKey := c.ID + "\x00" + req.GetIdempotencyKey()
	hash := s.bodyHash(spec)
	nodes := s.nodes()
	// Everything that does not read the store is done here, outside the
	// serialized transaction: the fleet's view for placement, the new
	// lease's id and its copy of the spec, sealed.
	view := s.placer.view(nodes)
	id := s.newID(s.now())
	// The lease keeps the request's spec; sealing changes its env, so a
	// spec with env is copied first and the request keeps what it said.
	own := spec
	if len(spec.GetWorkload().GetEnv()) > 0 {
		own = proto.Clone(spec).(*leasev1.LeaseSpec)
	}
	if err := s.sealEnv(&leasev1.Lease{Id: id, Spec: own}); err != nil {
		return nil, err
	}
	idemRec, err := json.Marshal(idemRecord{LeaseID: id, BodyHash: hash})
	if err != nil {
		return nil, err
	}

	// No lock around placement: the store's transactions are serializable
	// (bbolt's group commit runs its functions one after another in one
	// transaction; etcd's commit fails if the allocation index changed
	// since it was read), so two creates never take one partition, and
	// concurrent creates share one commit.
	var out *leasev1.Lease
	created := false
	// The two reads of this create's own keys are made ahead, for the
	// whole batch at once where the store batches (etcd).
	ahead := []store.Key{{Bucket: store.BucketIdempotency, Key: idemKey}, {Bucket: store.BucketLeases, Key: id}}
	err = store.UpdateReading(ctx, s.st, ahead, func(tx store.Tx) error {
		created = false
		if raw, err := tx.Get(store.BucketIdempotency, idemKey); err == nil {
			var rec idemRecord
			if err := json.Unmarshal(raw, &rec); err != nil {
				return fmt.Errorf("decode idempotency record: %w", err)
			}
			if rec.BodyHash != hash {
				return errs.AlreadyExists("IDEMPOTENCY_KEY_REUSED", "idempotency_key", "key was used for a different request")
			}
			l, err := getLease(tx, rec.LeaseID)
			out = l
			return err
		} else if !errors.Is(err, store.ErrNotFound) {
			return err
		}
		if _, err := tx.Get(store.BucketLeases, id); err == nil {
			// 52 random bits in one millisecond: never seen, but a lease is
			// never overwritten on chance. The caller retries.
			return errs.New(errs.ErrAborted, "LEASE_ID_COLLISION", "lease id collision; retry the request")
		} else if !errors.Is(err, store.ErrNotFound) {
			return err
		}
		now := s.now()
		l := &leasev1.Lease{
			Id: id, Spec: own, CreateTime: timestamppb.New(now),
			NotAfter: timestamppb.New(now.Add(spec.GetDuration().AsDuration())), CreatedBy: c.ID,
		}
		if err := setPhase(l, leasev1.Phase_PHASE_PENDING, "accepted", now); err != nil {
			return err
		}
		if err := ensureIndex(tx); err != nil {
			return err
		}
		tok, err := indexToken(tx)
		if err != nil {
			return err
		}
		st := s.placer.state(view, tok)
		if st == nil {
			held, tok, err := s.heldPartitions(tx)
			if err != nil {
				return err
			}
			st = s.placer.build(view, tok, held)
		}
		placement, perr := st.placeOrRefuse(nodes, spec.GetGpu())
		switch {
		case perr == nil:
			l.Placement = placement
			if err := setPhase(l, leasev1.Phase_PHASE_SCHEDULED, "placed on "+placement.GetNode(), now); err != nil {
				return err
			}
		case errors.Is(perr, errs.ErrResourceExhausted):
			// Stays PENDING; the scheduler retries as capacity appears.
			var e *errs.Error
			if errors.As(perr, &e) {
				l.Reason = "waiting for capacity: " + e.Message
			}
		default:
			return perr
		}
		if err := putLease(tx, l, leasev1.Phase_PHASE_UNSPECIFIED, now); err != nil {
			return err
		}
		if p := l.GetPlacement(); p != nil {
			// The next create (in this batch or later) finds the index
			// as this one leaves it without reading it again.
			next, err := indexToken(tx)
			if err != nil {
				return err
			}
			s.placer.derive(st, next, p.GetGpuUuid(), instanceOf(p))
		}
		if err := tx.Put(store.BucketIdempotency, idemKey, idemRec); err != nil {
			return err
		}
		details := map[string]string{"mig_profile": spec.GetGpu().GetMigProfile(), "image": spec.GetWorkload().GetImage(), "phase": short(l.GetPhase())}
		if p := l.GetPlacement(); p != nil {
			details["node"], details["gpu"], details["placement"] = p.GetNode(), p.GetGpuUuid(), fmt.Sprintf("%d:%d", p.GetStart(), p.GetSize())
		}
		if err := s.audit(ctx, tx, c, l, "lease.create", auditlog.OutcomeSuccess, "", details); err != nil {
			return err
		}
		out, created = l, true
		return nil
	})
	if err != nil {
		return nil, err
	}
	if created {
		// Debug: the audit log and WatchLeases carry every creation, and a
		// line each at thousands per second would trip journald's rate
		// limit (10,000 per 30 s by default) and lose other lines.
		s.log.Debug("lease created", "lease", out.GetId(), "tenant", out.GetSpec().GetTenant(), "phase", short(out.GetPhase()), "node", out.GetPlacement().GetNode())
		s.watch.publish(out)
		s.notify(out.GetPlacement().GetNode())
	}
	return out, nil
}

// Get returns one lease the caller may see.
func (s *Service) Get(ctx context.Context, c Caller, id string) (*leasev1.Lease, error) {
	if !ValidLeaseID(id) {
		return nil, errs.InvalidArgument("id", "is not a lease id")
	}
	var out *leasev1.Lease
	err := s.st.View(ctx, func(tx store.Tx) error {
		l, err := getLease(tx, id)
		out = l
		return err
	})
	if err != nil {
		return nil, err
	}
	if c.Tenant != "" && out.GetSpec().GetTenant() != c.Tenant {
		// Not PermissionDenied: another tenant's lease must not be
		// distinguishable from a missing one.
		// The cause (never sent to the caller) lets the edge audit the
		// attempt.
		return nil, errs.Wrap(errs.ErrNotFound, "LEASE_NOT_FOUND", fmt.Sprintf("lease %s not found", id), authn.ErrOtherTenant)
	}
	return out, nil
}

// List returns leases newest first.
func (s *Service) List(ctx context.Context, c Caller, req *leasev1.ListLeasesRequest) ([]*leasev1.Lease, string, error) {
	tenant := req.GetTenant()
	if c.Tenant != "" {
		if tenant != "" && tenant != c.Tenant {
			return nil, "", errs.PermissionDenied("TENANT_MISMATCH", "caller may not list tenant %s", tenant)
		}
		tenant = c.Tenant
	}
	size := int(req.GetPageSize())
	switch {
	case size < 0 || size > 1000:
		return nil, "", errs.InvalidArgument("page_size", "must be 0-1000")
	case size == 0:
		size = 100
	}
	offset := 0
	if t := req.GetPageToken(); t != "" {
		raw, err := base64.RawURLEncoding.DecodeString(t)
		n, cerr := strconv.Atoi(strings.TrimPrefix(string(raw), "o:"))
		if err != nil || cerr != nil || !strings.HasPrefix(string(raw), "o:") || n < 0 {
			return nil, "", errs.InvalidArgument("page_token", "is not a token from a previous response")
		}
		offset = n
	}
	phases := map[leasev1.Phase]bool{}
	for _, p := range req.GetPhases() {
		phases[p] = true
	}
	var all []*leasev1.Lease
	err := s.st.View(ctx, func(tx store.Tx) error {
		return scanLeases(tx, func(l *leasev1.Lease) error {
			if (tenant == "" || l.GetSpec().GetTenant() == tenant) && (len(phases) == 0 || phases[l.GetPhase()]) {
				all = append(all, l)
			}
			return nil
		})
	})
	if err != nil {
		return nil, "", err
	}
	sort.Slice(all, func(i, j int) bool {
		ti, tj := all[i].GetCreateTime().AsTime(), all[j].GetCreateTime().AsTime()
		if !ti.Equal(tj) {
			return ti.After(tj)
		}
		return all[i].GetId() < all[j].GetId()
	})
	if offset > len(all) {
		offset = len(all)
	}
	end := min(offset+size, len(all))
	next := ""
	if end < len(all) {
		next = base64.RawURLEncoding.EncodeToString([]byte("o:" + strconv.Itoa(end)))
	}
	return all[offset:end], next, nil
}

// mutate loads a lease the caller may change, applies fn and stores it with
// its audit entry, in one transaction.
func (s *Service) mutate(ctx context.Context, c Caller, id, action string, fn func(*leasev1.Lease, time.Time) (changed bool, details map[string]string, err error)) (*leasev1.Lease, error) {
	if !ValidLeaseID(id) {
		return nil, errs.InvalidArgument("id", "is not a lease id")
	}
	var out *leasev1.Lease
	var changed bool
	err := s.st.Update(ctx, func(tx store.Tx) error {
		l, err := getLease(tx, id)
		if err != nil {
			return err
		}
		if c.Tenant != "" && l.GetSpec().GetTenant() != c.Tenant {
			return errs.Wrap(errs.ErrNotFound, "LEASE_NOT_FOUND", fmt.Sprintf("lease %s not found", id), authn.ErrOtherTenant)
		}
		now := s.now()
		prev := l.GetPhase()
		var details map[string]string
		changed, details, err = fn(l, now)
		if err != nil {
			return err
		}
		out = l
		if !changed {
			return nil
		}
		if err := putLease(tx, l, prev, now); err != nil {
			return err
		}
		return s.audit(ctx, tx, c, l, action, auditlog.OutcomeSuccess, l.GetReason(), details)
	})
	if err != nil {
		return nil, err
	}
	if changed {
		s.watch.publish(out)
		s.notify(out.GetPlacement().GetNode())
	}
	return out, nil
}

// Cancel ends a lease early; a terminal lease is returned unchanged.
func (s *Service) Cancel(ctx context.Context, c Caller, id, reason string) (*leasev1.Lease, error) {
	if len(reason) > 256 || !printable(reason) {
		return nil, errs.InvalidArgument("reason", "at most 256 printable characters")
	}
	if reason == "" {
		reason = "cancelled"
	} else {
		reason = "cancelled: " + reason
	}
	return s.mutate(ctx, c, id, "lease.cancel", func(l *leasev1.Lease, now time.Time) (bool, map[string]string, error) {
		switch {
		case Terminal(l.GetPhase()) || l.GetPhase() == leasev1.Phase_PHASE_TERMINATING:
			return false, nil, nil
		case l.GetPhase() == leasev1.Phase_PHASE_PENDING:
			return true, nil, setPhase(l, leasev1.Phase_PHASE_TERMINATED, reason, now)
		case l.GetPhase() == leasev1.Phase_PHASE_LOST:
			return true, nil, setPhase(l, leasev1.Phase_PHASE_TERMINATED, reason, now)
		}
		return true, nil, setPhase(l, leasev1.Phase_PHASE_TERMINATING, reason, now)
	})
}

// Extend moves a live lease's not_after later.
func (s *Service) Extend(ctx context.Context, c Caller, id string, by time.Duration) (*leasev1.Lease, error) {
	if by <= 0 || by > MaxDuration {
		return nil, errs.InvalidArgument("extend_by", "must be positive and at most %s", MaxDuration)
	}
	return s.mutate(ctx, c, id, "lease.extend", func(l *leasev1.Lease, now time.Time) (bool, map[string]string, error) {
		if Terminal(l.GetPhase()) || l.GetPhase() == leasev1.Phase_PHASE_TERMINATING || l.GetPhase() == leasev1.Phase_PHASE_LOST {
			return false, nil, errs.FailedPrecondition("LEASE_ENDING", "lease %s is %s and cannot be extended", id, short(l.GetPhase()))
		}
		na := l.GetNotAfter().AsTime().Add(by)
		if na.Sub(l.GetCreateTime().AsTime()) > MaxDuration {
			return false, nil, errs.InvalidArgument("extend_by", "a lease may last at most %s in all", MaxDuration)
		}
		old := l.GetNotAfter().AsTime()
		l.NotAfter = timestamppb.New(na)
		return true, map[string]string{"old_not_after": old.UTC().Format(time.RFC3339), "new_not_after": na.UTC().Format(time.RFC3339)}, nil
	})
}

// DesiredState is the full set of leases that should run on node, and the
// store revision it was read at (the generation).
func (s *Service) DesiredState(ctx context.Context, node string) (*agentv1.DesiredState, error) {
	ds := &agentv1.DesiredState{}
	err := s.st.View(ctx, func(tx store.Tx) error {
		rev, err := store.GetU64(tx, keyRevision)
		if err != nil {
			return err
		}
		ds.Generation = rev
		live, err := liveOn(tx, node)
		for _, l := range live {
			if ShouldRun(l.GetPhase()) {
				ol, oerr := s.openEnv(l)
				if oerr != nil {
					return oerr
				}
				ds.Leases = append(ds.Leases, ol)
			}
		}
		sort.Slice(ds.Leases, func(i, j int) bool { return ds.Leases[i].GetId() < ds.Leases[j].GetId() })
		return err
	})
	return ds, err
}

// LiveOn returns the leases that hold a partition on node.
func (s *Service) LiveOn(ctx context.Context, node string) ([]*leasev1.Lease, error) {
	var out []*leasev1.Lease
	err := s.st.View(ctx, func(tx store.Tx) error {
		var err error
		out, err = liveOn(tx, node)
		return err
	})
	return out, err
}

// LiveLeases returns every lease that holds a partition.
func (s *Service) LiveLeases(ctx context.Context) ([]*leasev1.Lease, error) {
	var out []*leasev1.Lease
	err := s.st.View(ctx, func(tx store.Tx) error {
		var err error
		out, err = liveOn(tx, "")
		return err
	})
	return out, err
}

// Observe records what an agent reports of its leases. agent is the
// reporting agent's identity; node is the node it is authorised for. A
// report about a lease placed on another node is refused and audited.
func (s *Service) Observe(ctx context.Context, agent Caller, node string, obs *agentv1.ObservedState) error {
	// In chunks, like the sweeps: each lease changes atomically with its
	// audit (and usage) entries, and a transaction stays within etcd's
	// limits however many leases the report carries.
	all := obs.GetLeases()
	for len(all) > 0 {
		n := min(len(all), sweepChunk)
		if err := s.observeChunk(ctx, agent, node, all[:n]); err != nil {
			return err
		}
		all = all[n:]
	}
	return nil
}

func (s *Service) observeChunk(ctx context.Context, agent Caller, node string, leases []*agentv1.ObservedLease) error {
	var changed []*leasev1.Lease
	err := s.st.Update(ctx, func(tx store.Tx) error {
		changed = changed[:0]
		for _, o := range leases {
			if !ValidLeaseID(o.GetLeaseId()) {
				continue
			}
			l, err := getLease(tx, o.GetLeaseId())
			if errors.Is(err, errs.ErrNotFound) {
				continue
			}
			if err != nil {
				return err
			}
			if l.GetPlacement().GetNode() != node {
				if err := s.audit(ctx, tx, agent, l, "lease.observe", auditlog.OutcomeDenied, "agent reported a lease of another node", map[string]string{"node": node}); err != nil {
					return err
				}
				continue
			}
			now := s.now()
			prev := l.GetPhase()
			to := o.GetPhase()
			statusChanged := !proto.Equal(l.GetStatus(), o.GetStatus()) && o.GetStatus() != nil
			phaseChanged := to != l.GetPhase() && CanTransition(l.GetPhase(), to)
			if !statusChanged && !phaseChanged {
				continue
			}
			if o.GetStatus() != nil {
				l.Status = o.GetStatus()
			}
			if phaseChanged {
				if err := setPhase(l, to, o.GetReason(), now); err != nil {
					return err
				}
			}
			if err := putLease(tx, l, prev, now); err != nil {
				return err
			}
			if phaseChanged {
				d := map[string]string{"phase": short(to), "node": node}
				if st := l.GetStatus(); st != nil {
					d["mig_uuid"], d["container_id"] = st.GetMigUuid(), st.GetContainerId()
				}
				outcome := auditlog.OutcomeSuccess
				if to == leasev1.Phase_PHASE_FAILED {
					outcome = auditlog.OutcomeFailure
				}
				if err := s.audit(ctx, tx, agent, l, "lease."+strings.ToLower(short(to)), outcome, o.GetReason(), d); err != nil {
					return err
				}
			}
			changed = append(changed, l)
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, l := range changed {
		s.log.Info("lease observed", "lease", l.GetId(), "phase", short(l.GetPhase()), "reason", l.GetReason(), "node", node)
		s.watch.publish(l)
	}
	return nil
}

// System is the audit actor of the control plane's own decisions.
var System = Caller{ID: "gpuaas/controlplane"}

// sweepChunk bounds the leases one sweep (or observed-state) transaction
// changes, so that it fits etcd's --max-txn-ops (each change writes the
// lease, its index row and its audit entry, and an ending lease its usage
// entry: its audit record, two ledger rows and the ledger sequence). Each
// lease changes atomically with its entries; a sweep as a whole is a
// sequence of transactions.
const sweepChunk = 12

// Tick expires leases past not_after and places pending ones. Run it
// periodically and when capacity may have appeared.
func (s *Service) Tick(ctx context.Context) error {
	// The fleet's schedulable nodes are read only when a pending lease
	// needs them: a tick with nothing to place (the common case) costs no
	// walk over the fleet.
	var cached []NodeView
	loaded := false
	nodes := func() []NodeView {
		if !loaded {
			cached, loaded = s.nodes(), true
		}
		return cached
	}
	for {
		n, err := s.tickChunk(ctx, nodes)
		if err != nil || n < sweepChunk {
			return err
		}
	}
}

// tickChunk changes at most sweepChunk leases and returns how many it
// changed.
func (s *Service) tickChunk(ctx context.Context, nodes func() []NodeView) (int, error) {
	var changed []*leasev1.Lease
	err := s.st.Update(ctx, func(tx store.Tx) error {
		changed = changed[:0]
		now := s.now()
		var todo []*leasev1.Lease
		if err := scanLeases(tx, func(l *leasev1.Lease) error {
			if !Terminal(l.GetPhase()) {
				todo = append(todo, l)
			}
			return nil
		}); err != nil {
			return err
		}
		shared, _, err := s.heldPartitions(tx)
		if err != nil {
			return err
		}
		held := maps.Clone(shared) // placements below add to it
		// Oldest first, so pending leases are placed in arrival order.
		sort.Slice(todo, func(i, j int) bool { return todo[i].GetCreateTime().AsTime().Before(todo[j].GetCreateTime().AsTime()) })
		for _, l := range todo {
			if len(changed) == sweepChunk {
				break
			}
			prev := l.GetPhase()
			expired := !now.Before(l.GetNotAfter().AsTime())
			var action string
			switch {
			case expired && (l.GetPhase() == leasev1.Phase_PHASE_PENDING):
				action = "lease.expire"
				if err := setPhase(l, leasev1.Phase_PHASE_TERMINATED, "expired before placement", now); err != nil {
					return err
				}
			case expired && ShouldRun(l.GetPhase()):
				action = "lease.expire"
				if err := setPhase(l, leasev1.Phase_PHASE_TERMINATING, "expired", now); err != nil {
					return err
				}
			case l.GetPhase() == leasev1.Phase_PHASE_PENDING:
				p, err := Place(nodes(), held, l.GetSpec().GetGpu())
				if err != nil {
					continue
				}
				l.Placement = p
				held[p.GetGpuUuid()] = append(slices.Clip(held[p.GetGpuUuid()]), instanceOf(p))
				action = "lease.schedule"
				if err := setPhase(l, leasev1.Phase_PHASE_SCHEDULED, "placed on "+p.GetNode(), now); err != nil {
					return err
				}
			default:
				continue
			}
			if err := putLease(tx, l, prev, now); err != nil {
				return err
			}
			if err := s.audit(ctx, tx, System, l, action, auditlog.OutcomeSuccess, l.GetReason(), map[string]string{"node": l.GetPlacement().GetNode()}); err != nil {
				return err
			}
			changed = append(changed, l)
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	s.published(changed)
	return len(changed), nil
}

func (s *Service) published(changed []*leasev1.Lease) {
	for _, l := range changed {
		s.log.Info("lease changed", "lease", l.GetId(), "phase", short(l.GetPhase()), "reason", l.GetReason())
		s.watch.publish(l)
		s.notify(l.GetPlacement().GetNode())
	}
}

// NodeLost marks every lease on node that has not ended LOST, with reason
// and a transition, audited as lease.lost by the control plane. Leases are
// not rescheduled: their partitions stay reserved until the node reports
// how they ended or the platform cancels them. It returns the leases it
// changed.
func (s *Service) NodeLost(ctx context.Context, node, reason string) ([]*leasev1.Lease, error) {
	var all []*leasev1.Lease
	for {
		var changed []*leasev1.Lease
		err := s.st.Update(ctx, func(tx store.Tx) error {
			changed = changed[:0]
			if err := ensureIndex(tx); err != nil {
				return err
			}
			live, err := liveOn(tx, node)
			if err != nil {
				return err
			}
			now := s.now()
			for _, l := range live {
				if len(changed) == sweepChunk {
					break
				}
				prev := l.GetPhase()
				if !CanTransition(prev, leasev1.Phase_PHASE_LOST) {
					continue
				}
				if err := setPhase(l, leasev1.Phase_PHASE_LOST, reason, now); err != nil {
					return err
				}
				if err := putLease(tx, l, prev, now); err != nil {
					return err
				}
				if err := s.audit(ctx, tx, System, l, "lease.lost", auditlog.OutcomeFailure, reason, map[string]string{"node": node, "previous_phase": short(prev)}); err != nil {
					return err
				}
				changed = append(changed, l)
			}
			return nil
		})
		if err != nil {
			return all, err
		}
		s.published(changed)
		all = append(all, changed...)
		if len(changed) < sweepChunk {
			return all, nil
		}
	}
}

// Run calls Tick every interval until ctx ends.
func (s *Service) Run(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := s.Tick(ctx); err != nil && ctx.Err() == nil {
				s.log.Error("lease tick failed", "err", err)
			}
		}
	}
}
