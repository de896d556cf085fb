package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/gpuaas/gpuaas/pkg/identity"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
	"github.com/gpuaas/gpuaas/test/cluster"
	"github.com/gpuaas/gpuaas/test/harness"
	"github.com/gpuaas/gpuaas/test/spire"
)

// TestLeaseEndToEndWithSPIRE runs the control plane and an agent with their
// SVIDs from a real SPIRE (Workload API, unix attestor on each daemon's
// executable path and uid), takes a lease from request to running container
// to cancellation, and keeps the lease running across several SVID
// rotations (20 s SVIDs): no failed RPC, and the agent's session is the
// same one from start to end.
func TestLeaseEndToEndWithSPIRE(t *testing.T) {
	harness.RequireRoot(t)
	harness.Require(t, spire.Check(""))
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	bin := buildBinaries(t)

	sp, err := spire.Start(ctx, spire.Options{TrustDomain: cluster.TrustDomain})
	if err != nil {
		t.Fatal(err)
	}
	defer sp.Close()
	const ttl = 20 * time.Second
	td := spiffeid.RequireTrustDomainFromString(cluster.TrustDomain)
	agentID, _ := identity.AgentID(td, "node-a")
	operatorID, _ := identity.OperatorID(td, "admin")
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	root := "unix:uid:" + strconv.Itoa(os.Geteuid())
	for id, path := range map[string]string{
		identity.ControlPlaneID(td).String(): filepath.Join(bin, "gpuaas-controlplane"),
		agentID.String():                     filepath.Join(bin, "gpuaas-agent"),
		operatorID.String():                  exe,
	} {
		if err := sp.Register(ctx, id, ttl, root, "unix:path:"+path); err != nil {
			t.Fatal(err)
		}
	}
	// The operator's SVID (this test) also says when the entries reached
	// the SPIRE agent.
	var op *identity.WorkloadSource
	for deadline := time.Now().Add(time.Minute); ; {
		if op, err = identity.NewWorkloadSource(ctx, sp.WorkloadAPI(), td, 10*time.Second); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no operator SVID from SPIRE: %v", err)
		}
	}
	defer op.Close()

	c, err := cluster.Start(ctx, cluster.Options{BinDir: bin, Agents: map[string][]string{"node-a": {"H100"}},
		StopGrace: time.Second, WorkloadAPI: sp.WorkloadAPI(), Operator: op})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	lc, err := c.Leases(ctx)
	if err != nil {
		t.Fatal(err)
	}
	nc, err := c.Nodes(ctx)
	if err != nil {
		t.Fatal(err)
	}

	resp, err := lc.CreateLease(ctx, mkReq("spire-1", "1g.10gb", 10*time.Minute, "sh", "-c", "echo spire; sleep 600"))
	if err != nil {
		t.Fatal(err)
	}
	id := resp.GetLease().GetId()
	if _, err := c.WaitPhase(ctx, lc, id, time.Minute, leasev1.Phase_PHASE_RUNNING); err != nil {
		t.Fatal(err)
	}
	node, err := nc.GetNode(ctx, &nodev1.GetNodeRequest{Id: "node-a"})
	if err != nil {
		t.Fatal(err)
	}
	session := node.GetNode().GetSession().GetConnectTime().AsTime()
	if node.GetNode().GetSession().GetPeerId() != agentID.String() {
		t.Fatalf("agent session peer %q, want %s", node.GetNode().GetSession().GetPeerId(), agentID)
	}
	firstSerial := mustSVID(t, op).Certificates[0].SerialNumber

	// Rotations: every SVID (both daemons', the operator's) is replaced
	// about every 10 s. Calls keep working and the session stays.
	for end := time.Now().Add(2*ttl + 5*time.Second); time.Now().Before(end); time.Sleep(time.Second) {
		got, err := lc.GetLease(ctx, &leasev1.GetLeaseRequest{Id: id})
		if err != nil {
			t.Fatalf("GetLease during SVID rotation: %v", err)
		}
		if p := got.GetLease().GetPhase(); p != leasev1.Phase_PHASE_RUNNING {
			t.Fatalf("lease left RUNNING during rotation: %v (%s)", p, got.GetLease().GetReason())
		}
	}
	if mustSVID(t, op).Certificates[0].SerialNumber.Cmp(firstSerial) == 0 {
		t.Fatal("the operator's SVID was never rotated: the test proved nothing")
	}
	node, err = nc.GetNode(ctx, &nodev1.GetNodeRequest{Id: "node-a"})
	if err != nil {
		t.Fatal(err)
	}
	if !node.GetNode().GetConnected() || !node.GetNode().GetSession().GetConnectTime().AsTime().Equal(session) {
		t.Fatalf("the agent's session was dropped during SVID rotation: connected %v, session since %v (was %v)",
			node.GetNode().GetConnected(), node.GetNode().GetSession().GetConnectTime().AsTime(), session)
	}

	if _, err := lc.CancelLease(ctx, &leasev1.CancelLeaseRequest{Id: id}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.WaitPhase(ctx, lc, id, time.Minute, leasev1.Phase_PHASE_TERMINATED); err != nil {
		t.Fatal(err)
	}
}

func mustSVID(t *testing.T, s identity.Source) *x509svid.SVID {
	t.Helper()
	v, err := s.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	return v
}
