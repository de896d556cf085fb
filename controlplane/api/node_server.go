package api

import (
	"context"

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
}

func (s *NodeServer) ListNodes(ctx context.Context, _ *nodev1.ListNodesRequest) (*nodev1.ListNodesResponse, error) {
	live, err := s.Leases.LiveLeases(ctx)
	if err != nil {
		return nil, err
	}
	nodes, err := s.Fleet.Nodes(ctx, live)
	if err != nil {
		return nil, err
	}
	return &nodev1.ListNodesResponse{Nodes: nodes}, nil
}

func (s *NodeServer) GetNode(ctx context.Context, req *nodev1.GetNodeRequest) (*nodev1.GetNodeResponse, error) {
	if !lease.ValidName(req.GetId()) {
		return nil, errs.InvalidArgument("id", "is not a node name")
	}
	live, err := s.Leases.LiveLeases(ctx)
	if err != nil {
		return nil, err
	}
	n, err := s.Fleet.Node(ctx, req.GetId(), live)
	if err != nil {
		return nil, err
	}
	return &nodev1.GetNodeResponse{Node: n}, nil
}
