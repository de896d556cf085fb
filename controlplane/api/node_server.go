package api

import (
	"context"
	"encoding/base64"
	"strings"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/gpuaas/gpuaas/controlplane/fleet"
	"github.com/gpuaas/gpuaas/controlplane/lease"
	"github.com/gpuaas/gpuaas/pkg/errs"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

// NodeServer serves gpuaas.node.v1.NodeService.
type NodeServer struct {
	nodev1.UnimplementedNodeServiceServer
	Fleet  *fleet.Registry
	Leases *lease.Service
	// Attest serves the attestation RPCs; nil answers them
	// FAILED_PRECONDITION (attestation disabled).
	Attest *fleet.Attestor
}

// ListNodes pages through the nodes in id order: a page of the default
// size stays far below gRPC's message limit however large the fleet.
func (s *NodeServer) ListNodes(ctx context.Context, req *nodev1.ListNodesRequest) (*nodev1.ListNodesResponse, error) {
	size := int(req.GetPageSize())
	switch {
	case size < 0 || size > maxNodesPage:
		return nil, errs.InvalidArgument("page_size", "must be 0-%d", maxNodesPage)
	case size == 0:
		size = defaultNodesPage
	}
	after := ""
	if t := req.GetPageToken(); t != "" {
		raw, err := base64.RawURLEncoding.DecodeString(t)
		id, ok := strings.CutPrefix(string(raw), nodesTokenPrefix)
		if err != nil || !ok || !lease.ValidName(id) {
			return nil, errs.InvalidArgument("page_token", "is not a token from a previous response")
		}
		after = id
	}
	live, err := s.Leases.LiveLeases(ctx)
	if err != nil {
		return nil, err
	}
	nodes, more, err := s.Fleet.NodesPage(ctx, after, size, live)
	if err != nil {
		return nil, err
	}
	resp := &nodev1.ListNodesResponse{Nodes: nodes}
	if more && len(nodes) > 0 {
		resp.NextPageToken = base64.RawURLEncoding.EncodeToString([]byte(nodesTokenPrefix + nodes[len(nodes)-1].GetId()))
	}
	return resp, nil
}

// ListNodes page sizes, and the page token: the last id sent, so a page is
// stable while nodes join.
const (
	defaultNodesPage = 500
	maxNodesPage     = 1000
	nodesTokenPrefix = "after:"
)

func (s *NodeServer) GetNode(ctx context.Context, req *nodev1.GetNodeRequest) (*nodev1.GetNodeResponse, error) {
	if !lease.ValidName(req.GetId()) {
		return nil, errs.InvalidArgument("id", "is not a node name")
	}
	n, err := s.node(ctx, req.GetId())
	if err != nil {
		return nil, err
	}
	return &nodev1.GetNodeResponse{Node: n}, nil
}

func (s *NodeServer) node(ctx context.Context, id string) (*nodev1.Node, error) {
	live, err := s.Leases.LiveOn(ctx, id)
	if err != nil {
		return nil, err
	}
	return s.Fleet.Node(ctx, id, live)
}

func (s *NodeServer) cordon(ctx context.Context, id, gpu, reason string, cordon bool) (*nodev1.Node, error) {
	c, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	if !lease.ValidName(id) {
		return nil, errs.InvalidArgument("id", "is not a node name")
	}
	if gpu != "" {
		err = s.Fleet.CordonGPU(ctx, c, id, gpu, cordon, reason)
	} else {
		err = s.Fleet.Cordon(ctx, c, id, cordon, reason)
	}
	if err != nil {
		return nil, err
	}
	return s.node(ctx, id)
}

func (s *NodeServer) DrainNode(ctx context.Context, req *nodev1.DrainNodeRequest) (*nodev1.DrainNodeResponse, error) {
	c, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	if !lease.ValidName(req.GetId()) {
		return nil, errs.InvalidArgument("id", "is not a node name")
	}
	if d := req.GetDeadline(); d != nil && !d.IsValid() {
		return nil, errs.InvalidArgument("deadline", "is not a valid duration")
	}
	if err := s.Fleet.Drain(ctx, c, req.GetId(), req.GetReason(), req.GetDeadline().AsDuration()); err != nil {
		return nil, err
	}
	n, err := s.node(ctx, req.GetId())
	if err != nil {
		return nil, err
	}
	return &nodev1.DrainNodeResponse{Node: n}, nil
}

func (s *NodeServer) CordonNode(ctx context.Context, req *nodev1.CordonNodeRequest) (*nodev1.CordonNodeResponse, error) {
	n, err := s.cordon(ctx, req.GetId(), req.GetGpuUuid(), req.GetReason(), true)
	if err != nil {
		return nil, err
	}
	return &nodev1.CordonNodeResponse{Node: n}, nil
}

func (s *NodeServer) UncordonNode(ctx context.Context, req *nodev1.UncordonNodeRequest) (*nodev1.UncordonNodeResponse, error) {
	n, err := s.cordon(ctx, req.GetId(), req.GetGpuUuid(), req.GetReason(), false)
	if err != nil {
		return nil, err
	}
	return &nodev1.UncordonNodeResponse{Node: n}, nil
}

func (s *NodeServer) attestor(id string) (*fleet.Attestor, error) {
	if !lease.ValidName(id) {
		return nil, errs.InvalidArgument("id", "is not a node name")
	}
	if s.Attest == nil {
		return nil, errs.New(errs.ErrFailedPrecondition, "ATTESTATION_DISABLED", "attestation is disabled on this control plane")
	}
	return s.Attest, nil
}

func (s *NodeServer) GetNodeAttestation(ctx context.Context, req *nodev1.GetNodeAttestationRequest) (*nodev1.GetNodeAttestationResponse, error) {
	a, err := s.attestor(req.GetId())
	if err != nil {
		return nil, err
	}
	if _, err := s.node(ctx, req.GetId()); err != nil {
		return nil, err
	}
	rec, status, found, err := a.Record(ctx, req.GetId())
	if err != nil {
		return nil, err
	}
	out := &nodev1.NodeAttestation{NodeId: req.GetId(), Status: fleet.AttestationStatusProto(status)}
	if found {
		out.Latest = verdictProto(rec.Latest)
		if len(rec.Report.Report) > 0 {
			out.Report = &nodev1.SignedReport{Nonce: rec.Report.Nonce, Report: rec.Report.Report, Signature: rec.Report.Signature}
		}
		out.Count, out.PassCount, out.FailCount, out.StaleCount = rec.Count, rec.PassCount, rec.FailCount, rec.StaleCount
		out.LastSuccess, out.LastFailure = optTime(rec.LastSuccess), optTime(rec.LastFailure)
	}
	return &nodev1.GetNodeAttestationResponse{Attestation: out}, nil
}

func (s *NodeServer) ListNodeAttestations(ctx context.Context, req *nodev1.ListNodeAttestationsRequest) (*nodev1.ListNodeAttestationsResponse, error) {
	a, err := s.attestor(req.GetId())
	if err != nil {
		return nil, err
	}
	n := int(req.GetPageSize())
	if n < 0 || n > 100 {
		return nil, errs.InvalidArgument("page_size", "must be between 0 and 100")
	}
	if n == 0 {
		n = 100
	}
	if _, err := s.node(ctx, req.GetId()); err != nil {
		return nil, err
	}
	hist, err := a.History(ctx, req.GetId(), n)
	if err != nil {
		return nil, err
	}
	out := &nodev1.ListNodeAttestationsResponse{}
	for _, v := range hist {
		out.Verdicts = append(out.Verdicts, verdictProto(v))
	}
	return out, nil
}

func verdictProto(v fleet.VerdictRecord) *nodev1.AttestationVerdict {
	out := &nodev1.AttestationVerdict{Status: fleet.AttestationStatusProto(v.Status), ReportTime: optTime(v.ReportTime),
		VerifyTime: optTime(v.VerifyTime), ReportSha256: v.ReportSHA256}
	for _, c := range v.Checks {
		out.Checks = append(out.Checks, &nodev1.AttestationCheck{Name: c.Name, Ok: c.OK, Expected: c.Expected, Actual: c.Actual})
	}
	return out
}

func optTime(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}
