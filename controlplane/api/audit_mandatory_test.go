package api

import (
	"context"
	"fmt"
	"io"
	"sort"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	auditv1 "github.com/gpuaas/gpuaas/proto/gpuaas/audit/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

// privilegedRPCs lists every RPC marked (gpuaas.audit.v1.privileged) in the
// registered proto contracts, as "/pkg.Service/Method".
func privilegedRPCs() []string {
	var out []string
	protoregistry.GlobalFiles.RangeFiles(func(fd protoreflect.FileDescriptor) bool {
		svcs := fd.Services()
		for i := 0; i < svcs.Len(); i++ {
			ms := svcs.Get(i).Methods()
			for j := 0; j < ms.Len(); j++ {
				m := ms.Get(j)
				opts, ok := m.Options().(*descriptorpb.MethodOptions)
				if ok && opts != nil && proto.GetExtension(opts, auditv1.E_Privileged).(bool) {
					out = append(out, fmt.Sprintf("/%s/%s", svcs.Get(i).FullName(), m.Name()))
				}
			}
		}
		return true
	})
	sort.Strings(out)
	return out
}

// auditCall makes one call of a privileged RPC as an operator. setup runs
// first (its calls may append entries of their own, which are not
// counted). The call may fail: the entry is owed whatever the outcome.
type auditCall struct {
	setup func(ctx context.Context, t *testing.T, lc leasev1.LeaseServiceClient) string
	call  func(ctx context.Context, lc leasev1.LeaseServiceClient, id string) error
	// nodeCall, for a NodeService RPC, is made instead of call, on a
	// control plane that knows node-a.
	nodeCall func(ctx context.Context, nc nodev1.NodeServiceClient) error
	// auditCall, for an AuditLogService RPC, is made instead of call.
	auditCall func(ctx context.Context, ac auditv1.AuditLogServiceClient) error
}

func createdLease(ctx context.Context, t *testing.T, lc leasev1.LeaseServiceClient) string {
	t.Helper()
	r, err := lc.CreateLease(ctx, createReq(fmt.Sprintf("setup-%p", t)))
	if err != nil {
		t.Fatalf("setup: create lease: %v", err)
	}
	return r.GetLease().GetId()
}

// auditCalls has one call for every privileged RPC. A newly marked RPC
// fails TestPrivilegedRPCsAppendExactlyOneEntry until it gets one here.
var auditCalls = map[string]auditCall{
	leasev1.LeaseService_CreateLease_FullMethodName: {
		call: func(ctx context.Context, lc leasev1.LeaseServiceClient, _ string) error {
			_, err := lc.CreateLease(ctx, createReq("guard"))
			return err
		},
	},
	leasev1.LeaseService_CancelLease_FullMethodName: {
		setup: createdLease,
		call: func(ctx context.Context, lc leasev1.LeaseServiceClient, id string) error {
			_, err := lc.CancelLease(ctx, &leasev1.CancelLeaseRequest{Id: id, Reason: "guard"})
			return err
		},
	},
	leasev1.LeaseService_ExtendLease_FullMethodName: {
		setup: createdLease,
		call: func(ctx context.Context, lc leasev1.LeaseServiceClient, id string) error {
			_, err := lc.ExtendLease(ctx, &leasev1.ExtendLeaseRequest{Id: id, ExtendBy: durationpb.New(time.Minute)})
			return err
		},
	},
	nodev1.NodeService_CordonNode_FullMethodName: {
		nodeCall: func(ctx context.Context, nc nodev1.NodeServiceClient) error {
			_, err := nc.CordonNode(ctx, &nodev1.CordonNodeRequest{Id: "node-a", Reason: "guard"})
			return err
		},
	},
	nodev1.NodeService_UncordonNode_FullMethodName: {
		nodeCall: func(ctx context.Context, nc nodev1.NodeServiceClient) error {
			_, err := nc.UncordonNode(ctx, &nodev1.UncordonNodeRequest{Id: "node-a", Reason: "guard"})
			return err
		},
	},
	nodev1.NodeService_DrainNode_FullMethodName: {
		nodeCall: func(ctx context.Context, nc nodev1.NodeServiceClient) error {
			_, err := nc.DrainNode(ctx, &nodev1.DrainNodeRequest{Id: "node-a", Reason: "guard", Deadline: durationpb.New(time.Hour)})
			return err
		},
	},
	auditv1.AuditLogService_ListAuditEntries_FullMethodName: {
		auditCall: func(ctx context.Context, ac auditv1.AuditLogServiceClient) error {
			_, err := ac.ListAuditEntries(ctx, &auditv1.ListAuditEntriesRequest{})
			return err
		},
	},
	auditv1.AuditLogService_GetInclusionProof_FullMethodName: {
		setup: createdLease,
		auditCall: func(ctx context.Context, ac auditv1.AuditLogServiceClient) error {
			_, err := ac.GetInclusionProof(ctx, &auditv1.GetInclusionProofRequest{Seq: 1})
			return err
		},
	},
	leasev1.LeaseService_GetLeaseLogs_FullMethodName: {
		setup: createdLease,
		call: func(ctx context.Context, lc leasev1.LeaseServiceClient, id string) error {
			s, err := lc.GetLeaseLogs(ctx, &leasev1.GetLeaseLogsRequest{LeaseId: id})
			if err != nil {
				return err
			}
			for {
				if _, err := s.Recv(); err != nil {
					if err == io.EOF {
						return nil
					}
					return err
				}
			}
		},
	},
}

func auditSize(t *testing.T, st store.Store) uint64 {
	t.Helper()
	var n uint64
	if err := st.View(context.Background(), func(tx store.Tx) error {
		var err error
		n, err = store.GetU64(tx, "audit_seq")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestPrivilegedRPCsAppendExactlyOneEntry is the audit-mandatory guard
// (DESIGN.md contract 1): every RPC marked privileged in the proto
// contracts is called against the real control plane edge, and must leave
// exactly one new audit entry naming the caller, an action, a resource, an
// outcome and the call's request id.
func TestPrivilegedRPCsAppendExactlyOneEntry(t *testing.T) {
	marked := privilegedRPCs()
	if len(marked) == 0 {
		t.Fatal("no RPC is marked (gpuaas.audit.v1.privileged): the option was lost, the guard checks nothing")
	}
	for _, m := range marked {
		t.Run(strings.TrimPrefix(m, "/"), func(t *testing.T) {
			c, ok := auditCalls[m]
			if !ok {
				t.Fatalf("%s is marked privileged but has no call in auditCalls (controlplane/api/audit_mandatory_test.go): add one, so the guard can check it appends its audit entry", m)
			}
			if err := checkOneEntry(t, m, c); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// checkOneEntry makes the call on a fresh control plane and reports
// whether it appended exactly one complete entry.
func checkOneEntry(t *testing.T, m string, c auditCall) error {
	s := startServer(t)
	operator := s.pki.Operators["alice"]
	conn := s.dial(t, sourceFor(t, s.pki, operator))
	lc := leasev1.NewLeaseServiceClient(conn)
	ctx := context.Background()
	id := ""
	if c.setup != nil {
		id = c.setup(ctx, t, lc)
	}
	if c.nodeCall != nil {
		s.addNode(t, "node-a")
	}
	before := auditSize(t, s.st)
	reqID := "guard-" + m[strings.LastIndex(m, "/")+1:]
	cctx := metadata.AppendToOutgoingContext(ctx, "x-request-id", reqID)
	var callErr error
	if c.nodeCall != nil {
		callErr = c.nodeCall(cctx, nodev1.NewNodeServiceClient(conn))
	} else if c.auditCall != nil {
		callErr = c.auditCall(cctx, auditv1.NewAuditLogServiceClient(conn))
	} else {
		callErr = c.call(cctx, lc, id)
	}
	after := auditSize(t, s.st)
	if after != before+1 {
		return fmt.Errorf("%s appended %d audit entries (call error: %v), want exactly 1", m, after-before, callErr)
	}
	var raw []byte
	if err := s.st.View(ctx, func(tx store.Tx) error {
		var err error
		raw, err = tx.Get(store.BucketAudit, fmt.Sprintf("%020d", after))
		return err
	}); err != nil {
		return err
	}
	e, err := auditlog.Decode(raw)
	if err != nil {
		return err
	}
	if e.Actor != operator.ID.String() || e.Action == "" || e.Resource == "" || e.RequestID != reqID ||
		(e.Outcome != auditlog.OutcomeSuccess && e.Outcome != auditlog.OutcomeFailure && e.Outcome != auditlog.OutcomeDenied) {
		return fmt.Errorf("%s appended an incomplete entry %+v (want actor %s, an action, a resource, an outcome and request id %s)", m, e, operator.ID, reqID)
	}
	return nil
}

// TestAuditGuardCatchesAnUnauditedRPC proves the check fails for an RPC
// that appends nothing (GetLease, a read), as it would for a privileged
// RPC whose audit was forgotten.
func TestAuditGuardCatchesAnUnauditedRPC(t *testing.T) {
	err := checkOneEntry(t, leasev1.LeaseService_GetLease_FullMethodName, auditCall{
		setup: createdLease,
		call: func(ctx context.Context, lc leasev1.LeaseServiceClient, id string) error {
			_, err := lc.GetLease(ctx, &leasev1.GetLeaseRequest{Id: id})
			return err
		},
	})
	if err == nil || !strings.Contains(err.Error(), "appended 0 audit entries") {
		t.Fatalf("the guard passed an RPC that appends nothing: %v", err)
	}
}

// TestAuditGuardCoversTheKnownPrivilegedRPCs pins what must stay marked:
// removing the option from one of these would silently drop it from the
// guard.
func TestAuditGuardCoversTheKnownPrivilegedRPCs(t *testing.T) {
	marked := map[string]bool{}
	for _, m := range privilegedRPCs() {
		marked[m] = true
	}
	for _, m := range []string{
		leasev1.LeaseService_CreateLease_FullMethodName, leasev1.LeaseService_CancelLease_FullMethodName,
		leasev1.LeaseService_ExtendLease_FullMethodName, leasev1.LeaseService_GetLeaseLogs_FullMethodName,
	} {
		if !marked[m] {
			t.Errorf("%s is not marked (gpuaas.audit.v1.privileged) in its .proto", m)
		}
	}
}
