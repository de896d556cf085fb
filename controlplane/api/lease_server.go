package api

import (
	"context"

	"google.golang.org/protobuf/proto"

	"github.com/gpuaas/gpuaas/controlplane/lease"
	"github.com/gpuaas/gpuaas/pkg/errs"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// Redacted replaces every environment value in what a caller sees.
const Redacted = "[REDACTED]"

// LeaseServer serves gpuaas.lease.v1.LeaseService.
type LeaseServer struct {
	leasev1.UnimplementedLeaseServiceServer
	Leases *lease.Service
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
