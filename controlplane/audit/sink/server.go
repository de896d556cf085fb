package sink

import (
	"context"
	"crypto/x509"
	"fmt"
	"slices"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"

	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/errs"
	"github.com/gpuaas/gpuaas/pkg/identity"
	auditv1 "github.com/gpuaas/gpuaas/proto/gpuaas/audit/v1"
)

// Server serves a Sink over gRPC. Connections are authorized at the TLS
// layer (AuthorizeSenders); every RPC is then allowed.
type Server struct {
	auditv1.UnimplementedAuditSinkServiceServer
	Sink *Sink
}

// AuthorizeSenders admits the given SPIFFE IDs, the control planes allowed
// to deliver.
func AuthorizeSenders(ids ...spiffeid.ID) tlsconfig.Authorizer {
	allowed := slices.Clone(ids)
	return func(id spiffeid.ID, _ [][]*x509.Certificate) error {
		if slices.Contains(allowed, id) {
			return nil
		}
		return fmt.Errorf("authorize %s: %w: not an allowed audit sender", id, identity.ErrUnauthorizedPeer)
	}
}

// GetSinkState implements AuditSinkServiceServer.
func (s *Server) GetSinkState(_ context.Context, req *auditv1.GetSinkStateRequest) (*auditv1.GetSinkStateResponse, error) {
	size, cp, err := s.Sink.State(req.GetOrigin())
	if err != nil {
		return nil, errs.ToStatus(err).Err()
	}
	return &auditv1.GetSinkStateResponse{TreeSize: size, Checkpoint: cp}, nil
}

// DeliverBatch implements AuditSinkServiceServer.
func (s *Server) DeliverBatch(ctx context.Context, req *auditv1.DeliverBatchRequest) (*auditv1.DeliverBatchResponse, error) {
	if len(req.GetCheckpoint()) > auditlog.MaxCheckpointSize || len(req.GetPreviousCheckpoint()) > auditlog.MaxCheckpointSize {
		return nil, errs.ToStatus(errs.InvalidArgument("checkpoint", "larger than %d bytes", auditlog.MaxCheckpointSize)).Err()
	}
	b := auditlog.Batch{ID: req.GetBatchId(), PrevSize: req.GetPreviousTreeSize(), PrevCheckpoint: req.GetPreviousCheckpoint(),
		Entries: req.GetEntries(), Checkpoint: req.GetCheckpoint(), Consistency: req.GetConsistencyProof()}
	size, dup, err := s.Sink.Deliver(ctx, b)
	if err != nil {
		return nil, errs.ToStatus(err).Err()
	}
	return &auditv1.DeliverBatchResponse{TreeSize: size, Duplicate: dup}, nil
}
