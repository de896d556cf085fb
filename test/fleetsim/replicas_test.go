package fleetsim

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/controlplane/store/storetest"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
	"github.com/gpuaas/gpuaas/test/harness"
)

const (
	metricLeader = "gpuaas_controlplane_replica_leader"
	haPrefix     = "/gpuaas/ha/"
)

// replicaSet is several control-plane replicas over one embedded etcd, with
// an operator client for each.
type replicaSet struct {
	etcd   *storetest.Etcd
	cps    []*ControlPlane
	leases []leasev1.LeaseServiceClient
	nodes  []nodev1.NodeServiceClient
}

func startReplicas(t *testing.T, n int, live Liveness) *replicaSet {
	t.Helper()
	ctx := context.Background()
	e, err := storetest.StartEtcd(ctx, t.TempDir(), storetest.EtcdConfig{})
	if err != nil {
		harness.Require(t, fmt.Errorf("embedded etcd: %w", err))
	}
	rs := &replicaSet{etcd: e}
	t.Cleanup(func() {
		for _, cp := range rs.cps {
			cp.Close()
			if t.Failed() {
				t.Logf("replica log (%s), last lines:\n%s", cp.LogPath, cp.LogTail(3000))
			}
		}
		e.Close()
	})
	bin := harness.BuildBinary(t, "./controlplane/cmd/gpuaas-controlplane")
	for i := range n {
		o := ControlPlaneOptions{Binary: bin, Dir: t.TempDir(), Liveness: live, LogLevel: "info",
			EtcdEndpoint: e.Endpoint, EtcdPrefix: haPrefix, ReplicaTTL: 3 * time.Second}
		if i > 0 {
			o.Shared = rs.cps[0]
		}
		cp, err := StartControlPlane(ctx, o)
		if err != nil {
			t.Fatal(err)
		}
		rs.cps = append(rs.cps, cp)
		conn, err := cp.DialOperator()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		rs.leases = append(rs.leases, leasev1.NewLeaseServiceClient(conn))
		rs.nodes = append(rs.nodes, nodev1.NewNodeServiceClient(conn))
	}
	return rs
}

// addrsFrom lists the replicas' addresses starting at the i-th, so that
// agents given different lists spread over the replicas.
func (rs *replicaSet) addrsFrom(i int) string {
	var out []string
	for k := range rs.cps {
		out = append(out, rs.cps[(i+k)%len(rs.cps)].Addr)
	}
	return strings.Join(out, ",")
}

// leader waits until exactly one running replica reports itself leader
// and returns its index.
func (rs *replicaSet) leader(t *testing.T, within time.Duration) int {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		leaders := []int{}
		for i, cp := range rs.cps {
			if !cp.Running() {
				continue
			}
			m, err := cp.Metrics(context.Background(), metricLeader)
			if err == nil && m[metricLeader] == 1 {
				leaders = append(leaders, i)
			}
		}
		if len(leaders) == 1 {
			return leaders[0]
		}
		if time.Now().After(deadline) {
			t.Fatalf("replicas leading: %v after %s, want exactly one", leaders, within)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitEligible waits until every running replica counts want connected,
// attested nodes (its own sessions and the other replicas').
func (rs *replicaSet) waitEligible(t *testing.T, want int, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		var got []int
		ok := true
		for _, cp := range rs.cps {
			if !cp.Running() {
				continue
			}
			m, err := cp.Metrics(context.Background(), metricSessions)
			if err != nil {
				t.Fatal(err)
			}
			got = append(got, int(m[metricSessions]))
			ok = ok && int(m[metricSessions]) == want
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("eligible nodes per running replica: %v, want %d each", got, want)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// waitPresence waits until want nodes are held, none by the replica with
// process id dead (replica ids default to host-pid).
func (rs *replicaSet) waitPresence(t *testing.T, want, dead int, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		resp, err := rs.etcd.Client.Get(context.Background(), haPrefix+"presence/", clientv3.WithPrefix())
		if err != nil {
			t.Fatal(err)
		}
		onDead := 0
		for _, kv := range resp.Kvs {
			if strings.HasSuffix(string(kv.Value), fmt.Sprintf("-%d", dead)) {
				onDead++
			}
		}
		if len(resp.Kvs) == want && onDead == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d nodes held, %d by the dead replica, after %s; want %d, none", len(resp.Kvs), onDead, within, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestReplicasSurviveLeaderKill runs three control-plane replicas on one
// etcd store with agents spread over them, creates leases through all
// three, and kills -9 the leader a third of the way through. Another
// replica takes the leadership; every create the platform saw succeed
// (retrying, with the same idempotency key, on another replica when one
// failed) exists exactly once; the agents of the dead replica reconnect to
// the others before their nodes could be declared down; every lease, made
// on any replica and placed on a node held by any other, reaches its agent
// and runs; and the audit log, appended by all three, verifies with one
// lease.create per lease.
func TestReplicasSurviveLeaderKill(t *testing.T) {
	const agentsPerReplica, creates = 4, 240
	live := Liveness{MinTTL: 4 * time.Second, Grace: 4 * time.Second}
	rs := startReplicas(t, 3, live)
	var fleets []*Fleet
	t.Cleanup(func() {
		for _, f := range fleets {
			f.Close()
		}
	})
	for i := range rs.cps {
		f, err := New(Options{Addr: rs.addrsFrom(i), CA: rs.cps[0].PKI.CA, Heartbeat: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		fleets = append(fleets, f)
		var nodes []string
		for k := range agentsPerReplica {
			nodes = append(nodes, NodeName(i*agentsPerReplica+k))
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		err = f.Add(ctx, nodes)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
	}
	total := agentsPerReplica * len(rs.cps)
	rs.waitEligible(t, total, 2*time.Minute)
	first := rs.leader(t, 30*time.Second)

	// The platform: 8 callers, round-robin over the replicas; a failed
	// call is retried on the next replica with the same idempotency key.
	var (
		next    atomic.Int64
		acked   sync.Map // idempotency key -> lease id
		ackedN  atomic.Int64
		killed  atomic.Bool
		killAt  time.Time
		retries atomic.Int64
		killErr = make(chan error, 1)
		wg      sync.WaitGroup
	)
	spec := &leasev1.LeaseSpec{Tenant: "ha", Gpu: &leasev1.GpuRequest{Kind: &leasev1.GpuRequest_MigProfile{MigProfile: "1g.18gb"}},
		Workload: &leasev1.Workload{Image: "localhost/fleetsim/idle:1"}, Duration: durationpb.New(time.Hour)}
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				n := next.Add(1) - 1
				if n >= creates {
					return
				}
				key := fmt.Sprintf("ha-%04d", n)
				deadline := time.Now().Add(time.Minute)
				for try := int(n) + w; ; try++ {
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					resp, err := rs.leases[try%len(rs.cps)].CreateLease(ctx, &leasev1.CreateLeaseRequest{IdempotencyKey: key, Spec: spec})
					cancel()
					if err == nil {
						acked.Store(key, resp.GetLease().GetId())
						if ackedN.Add(1) == creates/3 && killed.CompareAndSwap(false, true) {
							// Mid-run: kill -9 the leader.
							killAt = time.Now()
							killErr <- rs.cps[first].cmd.Process.Kill()
						}
						break
					}
					retries.Add(1)
					if c := status.Code(err); c != codes.Unavailable && c != codes.DeadlineExceeded && c != codes.Canceled {
						t.Errorf("create %s: %v", key, err)
						return
					}
					if time.Now().After(deadline) {
						t.Errorf("create %s: no replica answered for a minute: %v", key, err)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	if err := <-killErr; err != nil {
		t.Fatalf("kill the leader: %v", err)
	}
	<-rs.cps[first].done
	second := rs.leader(t, 30*time.Second)
	if second == first {
		t.Fatalf("replica %d still leads after it was killed", first)
	}
	t.Logf("leader %d killed after %d creates; replica %d leads %s after the kill; %d calls retried on another replica",
		first, creates/3, second, time.Since(killAt).Round(10*time.Millisecond), retries.Load())
	if retries.Load() == 0 {
		t.Fatal("no create failed over to another replica: the kill was not exercised")
	}

	// Every acknowledged lease exists exactly once, and nothing else.
	ctx := context.Background()
	byID := map[string]*leasev1.Lease{}
	var token string
	for {
		resp, err := rs.leases[second].ListLeases(ctx, &leasev1.ListLeasesRequest{Tenant: "ha", PageSize: 500, PageToken: token})
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range resp.GetLeases() {
			if byID[l.GetId()] != nil {
				t.Fatalf("lease %s listed twice", l.GetId())
			}
			byID[l.GetId()] = l
		}
		if token = resp.GetNextPageToken(); token == "" {
			break
		}
	}
	if int(ackedN.Load()) != creates || len(byID) != creates {
		t.Fatalf("%d creates acknowledged, %d leases stored; want %d of each", ackedN.Load(), len(byID), creates)
	}
	acked.Range(func(k, v any) bool {
		if byID[v.(string)] == nil {
			t.Errorf("acknowledged lease %s (%s) is missing", v, k)
		}
		return true
	})

	// The dead replica's agents are back, on the survivors, and no node
	// was declared down; every lease runs, wherever it was made.
	rs.waitPresence(t, total, rs.cps[first].Pid(), time.Minute)
	rs.waitEligible(t, total, time.Minute)
	if ends := fleets[first].Stats().Ends; ends < agentsPerReplica {
		t.Errorf("%d sessions of the dead replica's agents ended, want at least %d", ends, agentsPerReplica)
	}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		running := 0
		for id := range byID {
			resp, err := rs.leases[second].GetLease(ctx, &leasev1.GetLeaseRequest{Id: id})
			if err != nil {
				t.Fatal(err)
			}
			if p := resp.GetLease().GetPhase(); p == leasev1.Phase_PHASE_RUNNING {
				running++
			} else if p == leasev1.Phase_PHASE_LOST || p == leasev1.Phase_PHASE_FAILED {
				t.Fatalf("lease %s is %s: %s", id, p, resp.GetLease().GetReason())
			}
		}
		if running == creates {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d leases RUNNING after 2m", running, creates)
		}
		time.Sleep(500 * time.Millisecond)
	}
	nodes, err := rs.nodes[second].ListNodes(ctx, &nodev1.ListNodesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes.GetNodes() {
		if n.GetDown() || !n.GetConnected() {
			t.Errorf("node %s: down=%v connected=%v after the failover", n.GetId(), n.GetDown(), n.GetConnected())
		}
	}

	// The audit log all replicas appended to verifies, with exactly one
	// lease.create per lease.
	st, err := store.OpenEtcd(ctx, rs.etcd.Client, store.EtcdOptions{Prefix: haPrefix})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	res, err := audit.Verify(ctx, st)
	if err != nil {
		t.Fatalf("audit log: %v", err)
	}
	creations := map[string]int{}
	err = st.View(ctx, func(tx store.Tx) error {
		// Entry keys are digits (audit.Key); tree nodes sort after them.
		return tx.Scan(store.BucketAudit, "0", false, func(_ string, v []byte) error {
			e, err := auditlog.Decode(v)
			if err != nil {
				return err
			}
			if e.Action == "lease.create" {
				creations[strings.TrimPrefix(e.Resource, "lease/")]++
			}
			return nil
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	for id := range byID {
		if creations[id] != 1 {
			t.Errorf("lease %s has %d lease.create audit entries, want 1", id, creations[id])
		}
	}
	t.Logf("audit log verified: %d entries, %d checkpoints", res.Entries, res.Checkpoints)
}
