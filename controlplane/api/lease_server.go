package api

import (
	"context"
	"errors"
	"log/slog"
	"strconv"

	"google.golang.org/protobuf/proto"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/lease"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/authn"
	"github.com/gpuaas/gpuaas/pkg/errs"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// Redacted replaces every environment value in what a caller sees.
const Redacted = "[REDACTED]"

// LeaseServer serves gpuaas.lease.v1.LeaseService.
type LeaseServer struct {
	leasev1.UnimplementedLeaseServiceServer
	Leases *lease.Service
	// Store receives the audit entry of each GetLeaseLogs call; Logs
	// relays it to the agents (the AgentServer's relay). Without them
	// GetLeaseLogs is refused.
	Store store.Store
	Logs  *LogRelay
	Log   *slog.Logger
}

func caller(ctx context.Context) (lease.Caller, error) {
	c, ok := CallerFrom(ctx)
	if !ok {
		return lease.Caller{}, errs.New(errs.ErrUnauthenticated, "NO_CALLER", "unauthenticated")
	}
	return c, nil
}

// redact returns a copy of l without secret values: tenant environment
// values never leave the control plane except to the agent that runs them.
func redact(l *leasev1.Lease) *leasev1.Lease {
	if len(l.GetSpec().GetWorkload().GetEnv()) == 0 {
		return l
	}
	c := proto.Clone(l).(*leasev1.Lease)
	for k := range c.Spec.Workload.Env {
		c.Spec.Workload.Env[k] = Redacted
	}
	return c
}

func (s *LeaseServer) CreateLease(ctx context.Context, req *leasev1.CreateLeaseRequest) (*leasev1.CreateLeaseResponse, error) {
	c, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	l, err := s.Leases.Create(ctx, c, req)
	if err != nil {
		return nil, err
	}
	return &leasev1.CreateLeaseResponse{Lease: redact(l)}, nil
}

func (s *LeaseServer) GetLease(ctx context.Context, req *leasev1.GetLeaseRequest) (*leasev1.GetLeaseResponse, error) {
	c, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	l, err := s.Leases.Get(ctx, c, req.GetId())
	if err != nil {
		return nil, err
	}
	return &leasev1.GetLeaseResponse{Lease: redact(l)}, nil
}

func (s *LeaseServer) ListLeases(ctx context.Context, req *leasev1.ListLeasesRequest) (*leasev1.ListLeasesResponse, error) {
	c, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	ls, next, err := s.Leases.List(ctx, c, req)
	if err != nil {
		return nil, err
	}
	resp := &leasev1.ListLeasesResponse{NextPageToken: next}
	for _, l := range ls {
		resp.Leases = append(resp.Leases, redact(l))
	}
	return resp, nil
}

func (s *LeaseServer) CancelLease(ctx context.Context, req *leasev1.CancelLeaseRequest) (*leasev1.CancelLeaseResponse, error) {
	c, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	l, err := s.Leases.Cancel(ctx, c, req.GetId(), req.GetReason())
	if err != nil {
		return nil, err
	}
	return &leasev1.CancelLeaseResponse{Lease: redact(l)}, nil
}

func (s *LeaseServer) ExtendLease(ctx context.Context, req *leasev1.ExtendLeaseRequest) (*leasev1.ExtendLeaseResponse, error) {
	c, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	if req.GetExtendBy() == nil || req.GetExtendBy().CheckValid() != nil {
		return nil, errs.InvalidArgument("extend_by", "a valid duration is required")
	}
	l, err := s.Leases.Extend(ctx, c, req.GetId(), req.GetExtendBy().AsDuration())
	if err != nil {
		return nil, err
	}
	return &leasev1.ExtendLeaseResponse{Lease: redact(l)}, nil
}

func (s *LeaseServer) WatchLeases(req *leasev1.WatchLeasesRequest, stream leasev1.LeaseService_WatchLeasesServer) error {
	c, err := caller(stream.Context())
	if err != nil {
		return err
	}
	return s.Leases.Watch(stream.Context(), c, req.GetTenant(), req.GetFromRevision(), func(l *leasev1.Lease) error {
		return stream.Send(&leasev1.WatchLeasesResponse{Lease: redact(l)})
	})
}

// GetLeaseLogs streams the lease's captured output from the agent of the
// node that holds it. Every call appends exactly one audit entry
// "lease.logs", and fails closed: a call refused before the agent is asked
// is audited as refused when it ends; a call that is granted is audited
// before the agent is asked, so no byte is disclosed unless its entry is
// committed (if it cannot be written, the call fails with AUDIT_FAILED and
// discloses nothing). The entry records the grant (tail and byte limit);
// what was then sent (bytes, truncated, a failure) is logged.
func (s *LeaseServer) GetLeaseLogs(req *leasev1.GetLeaseLogsRequest, stream leasev1.LeaseService_GetLeaseLogsServer) (err error) {
	ctx := stream.Context()
	c, err := caller(ctx)
	if err != nil {
		return err
	}
	if s.Store == nil || s.Logs == nil {
		return errs.New(errs.ErrUnavailable, "LOGS_UNAVAILABLE", "lease logs are not served by this control plane")
	}
	var tenant, node string
	granted := false
	defer func() {
		if granted {
			return
		}
		if aerr := s.auditLogs(ctx, c, req, tenant, node, err); aerr != nil {
			if s.Log != nil {
				s.Log.Error("audit lease logs", "lease", truncate(req.GetLeaseId(), 64), "err", aerr)
			}
			err = errs.Wrap(errs.ErrInternal, "AUDIT_FAILED", "the access could not be audited", aerr)
		}
	}()
	if req.GetTailBytes() < 0 {
		return errs.InvalidArgument("tail_bytes", "must not be negative")
	}
	l, err := s.Leases.Get(ctx, c, req.GetLeaseId())
	if err != nil {
		return err
	}
	tenant, node = l.GetSpec().GetTenant(), l.GetPlacement().GetNode()
	if node == "" {
		return errs.FailedPrecondition("LEASE_NOT_PLACED", "lease %s is not on a node yet", l.GetId())
	}
	if err := s.Logs.connected(node); err != nil {
		return err
	}
	granted = true
	if aerr := s.auditLogs(ctx, c, req, tenant, node, nil); aerr != nil {
		if s.Log != nil {
			s.Log.Error("audit lease logs", "lease", l.GetId(), "err", aerr)
		}
		return errs.Wrap(errs.ErrInternal, "AUDIT_FAILED", "the access could not be audited", aerr)
	}
	res, err := s.Logs.fetch(ctx, node, l.GetId(), req.GetTailBytes(), func(data []byte, truncated bool) error {
		return stream.Send(&leasev1.GetLeaseLogsResponse{Data: data, Truncated: truncated})
	})
	if s.Log != nil {
		s.Log.Info("lease logs sent", "lease", l.GetId(), "node", node, "bytes", res.bytes, "truncated", res.truncated, "err", err)
	}
	return err
}

// auditLogs appends the one entry of a GetLeaseLogs call: its refusal
// (callErr), or its grant.
func (s *LeaseServer) auditLogs(ctx context.Context, c lease.Caller, req *leasev1.GetLeaseLogsRequest, tenant, node string, callErr error) error {
	outcome, reason := auditlog.OutcomeSuccess, "access granted"
	if callErr != nil {
		outcome, reason = auditlog.OutcomeFailure, errs.ReasonOf(callErr)
		if reason == "" {
			reason = errs.Code(callErr).String()
		}
		if errors.Is(callErr, errs.ErrPermissionDenied) || errors.Is(callErr, errs.ErrUnauthenticated) || errors.Is(callErr, authn.ErrOtherTenant) {
			outcome = auditlog.OutcomeDenied
		}
	}
	details := map[string]string{
		"tail_bytes":  strconv.FormatInt(req.GetTailBytes(), 10),
		"limit_bytes": strconv.FormatInt(s.Logs.maxBytes(), 10),
	}
	if node != "" {
		details["node"] = node
	}
	return s.Store.Update(context.WithoutCancel(ctx), func(tx store.Tx) error {
		_, err := audit.Append(tx, audit.FromContext(ctx, auditlog.Entry{Actor: c.ID, Tenant: tenant, Action: "lease.logs",
			Resource: "lease/" + truncate(req.GetLeaseId(), 64), Outcome: outcome, Reason: reason, RequestID: c.RequestID, Details: details}))
		return err
	})
}
