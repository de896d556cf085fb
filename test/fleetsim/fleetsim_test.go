package fleetsim

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
	"github.com/gpuaas/gpuaas/test/footprint"
	"github.com/gpuaas/gpuaas/test/harness"
)

// Metric series the tests read.
const (
	metricSessions = "gpuaas_controlplane_agent_sessions"
	metricPass     = `gpuaas_controlplane_attestation_verdicts_total{status="PASS"}`
	metricStale    = `gpuaas_controlplane_attestation_verdicts_total{status="STALE"}`
)

// rig is a control plane, a fleet against it and an operator's clients.
type rig struct {
	cp     *ControlPlane
	fleet  *Fleet
	conn   *grpc.ClientConn
	leases leasev1.LeaseServiceClient
	nodes  nodev1.NodeServiceClient
}

// heartbeatFor is the heartbeat interval of agents in a fleet of n under
// live: a third of the TTL, so that two lost heartbeats never kill a node.
func heartbeatFor(live Liveness, n int) time.Duration {
	return live.Fleet().TTL(n) / 3
}

func newRig(t *testing.T, live Liveness, heartbeat time.Duration, logLevel string) *rig {
	t.Helper()
	ctx := context.Background()
	// GPUAAS_FLEETSIM_READ_BUFFER sets edge.read_buffer_bytes (to compare
	// per-session memory with gRPC's default, 32768).
	readBuf := 0
	if os.Getenv("GPUAAS_FLEETSIM_READ_BUFFER") != "" {
		readBuf = envInts(t, "GPUAAS_FLEETSIM_READ_BUFFER", nil)[0]
	}
	cp, err := StartControlPlane(ctx, ControlPlaneOptions{Binary: harness.BuildBinary(t, "./controlplane/cmd/gpuaas-controlplane"),
		Dir: t.TempDir(), Liveness: live, LogLevel: logLevel, ReadBufferBytes: readBuf})
	if err != nil {
		t.Fatal(err)
	}
	r := &rig{cp: cp}
	t.Cleanup(func() {
		if r.fleet != nil {
			r.fleet.Close()
		}
		if r.conn != nil {
			r.conn.Close()
		}
		cp.Close()
		if t.Failed() {
			t.Logf("control plane log (%s), last lines:\n%s", cp.LogPath, cp.LogTail(4096))
		}
	})
	if r.conn, err = cp.DialOperator(); err != nil {
		t.Fatal(err)
	}
	r.leases, r.nodes = leasev1.NewLeaseServiceClient(r.conn), nodev1.NewNodeServiceClient(r.conn)
	if r.fleet, err = New(Options{Addr: cp.Addr, CA: cp.PKI.CA, Heartbeat: heartbeat}); err != nil {
		t.Fatal(err)
	}
	return r
}

// add starts agents sim-from .. sim-(to-1) and waits until the control
// plane holds all of them attested: its session gauge at want and at
// least want PASS verdicts.
func (r *rig) add(t *testing.T, from, to, want int) (took time.Duration, eligible, stale int) {
	t.Helper()
	nodes := make([]string, 0, to-from)
	for i := from; i < to; i++ {
		nodes = append(nodes, NodeName(i))
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	if err := r.fleet.Add(ctx, nodes); err != nil {
		t.Fatalf("start %d agents: %v", len(nodes), err)
	}
	eligible, stale = r.waitHeld(t, want)
	return time.Since(start), eligible, stale
}

// waitHeld waits until the control plane holds want sessions, every agent
// has answered its challenge, and the control plane counts want eligible
// nodes (its agent_sessions gauge counts connected nodes that are attested
// PASS and not cordoned) or, when some verdicts went STALE under load,
// until that gauge stops moving. It returns the gauge and the STALE count.
// The deadline is a guard against a hang, not a performance assertion.
func (r *rig) waitHeld(t *testing.T, want int) (eligible, stale int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Minute)
	prev, still := -1, 0
	for {
		m, err := r.cp.Metrics(context.Background(), metricSessions, metricPass, metricStale)
		if err != nil {
			t.Fatal(err)
		}
		eligible, stale = int(m[metricSessions]), int(m[metricStale])
		st := r.fleet.Stats()
		if eligible == want && int(m[metricPass]) >= want {
			return eligible, stale
		}
		if eligible == prev && st.Attested >= st.Agents && stale > 0 {
			if still++; still >= 5 {
				return eligible, stale
			}
		} else {
			still = 0
		}
		prev = eligible
		if !r.cp.Running() {
			t.Fatal("the control plane exited")
		}
		if time.Now().After(deadline) {
			t.Fatalf("the control plane holds %v, want %d sessions attested; fleet: %d agents, %d attested", m, want, st.Agents, st.Attested)
		}
		// Each scrape costs the control plane a store scan and a walk of
		// every session (its state collector): poll a large fleet gently,
		// so that the wait does not load what it measures.
		time.Sleep(min(2*time.Second, time.Duration(want)*time.Millisecond))
	}
}

// eligibleVictim is a node at or below index i whose attestation is PASS
// (a lease can be placed there).
func (r *rig) eligibleVictim(t *testing.T, i int) (string, int) {
	t.Helper()
	for ; i >= 0; i-- {
		if r.fleet.Agent(NodeName(i)) == nil {
			continue
		}
		a, err := r.nodes.GetNodeAttestation(context.Background(), &nodev1.GetNodeAttestationRequest{Id: NodeName(i)})
		if err != nil {
			t.Fatal(err)
		}
		if a.GetAttestation().GetStatus() == nodev1.AttestationStatus_ATTESTATION_STATUS_PASS {
			return NodeName(i), i
		}
	}
	t.Fatal("no attested node left to kill")
	return "", 0
}

// createLeaseOn creates a 1g.18gb lease pinned to node and waits until
// the simulated agent has it RUNNING.
func (r *rig) createLeaseOn(t *testing.T, node string) *leasev1.Lease {
	t.Helper()
	ctx := context.Background()
	resp, err := r.leases.CreateLease(ctx, &leasev1.CreateLeaseRequest{IdempotencyKey: "fleetsim-" + node, Spec: &leasev1.LeaseSpec{
		Tenant:   "fleetsim",
		Gpu:      &leasev1.GpuRequest{Kind: &leasev1.GpuRequest_MigProfile{MigProfile: "1g.18gb"}, Node: node},
		Workload: &leasev1.Workload{Image: "localhost/fleetsim/idle:1"},
		Duration: durationpb.New(24 * time.Hour),
	}})
	if err != nil {
		t.Fatalf("create a lease on %s: %v", node, err)
	}
	id := resp.GetLease().GetId()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		l, err := r.leases.GetLease(ctx, &leasev1.GetLeaseRequest{Id: id})
		if err != nil {
			t.Fatal(err)
		}
		if l.GetLease().GetPhase() == leasev1.Phase_PHASE_RUNNING {
			if got := l.GetLease().GetPlacement().GetNode(); got != node {
				t.Fatalf("lease %s placed on %s, want %s", id, got, node)
			}
			return l.GetLease()
		}
		if time.Now().After(deadline) {
			t.Fatalf("lease %s on %s is %s, not RUNNING, after 2m", id, node, l.GetLease().GetPhase())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// death is one measured detection of a dead node.
type death struct {
	node string
	// sinceKill is from the agent's kill to its lease's LOST transition;
	// sinceBeat from its last contact (heartbeat or observed state, what
	// renews its deadline) to that transition.
	sinceKill, sinceBeat time.Duration
}

// killAndWaitLost kills node's agent and waits until the control plane
// has marked its lease LOST and the node down, returning the times. The
// deadline is a hang guard of several TTLs, not the assertion.
func (r *rig) killAndWaitLost(t *testing.T, node, leaseID string, guard time.Duration) death {
	t.Helper()
	ctx := context.Background()
	killed, beat, err := r.fleet.Kill(node)
	if err != nil {
		t.Fatal(err)
	}
	deadline := killed.Add(guard)
	var lost *leasev1.Lease
	for lost == nil {
		l, err := r.leases.GetLease(ctx, &leasev1.GetLeaseRequest{Id: leaseID})
		if err != nil {
			t.Fatal(err)
		}
		if l.GetLease().GetPhase() == leasev1.Phase_PHASE_LOST {
			lost = l.GetLease()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("lease %s of killed node %s is %s %s after the kill", leaseID, node, l.GetLease().GetPhase(), guard)
		}
		time.Sleep(100 * time.Millisecond)
	}
	var at time.Time
	for _, tr := range lost.GetHistory() {
		if tr.GetPhase() == leasev1.Phase_PHASE_LOST {
			at = tr.GetTime().AsTime()
		}
	}
	if at.IsZero() {
		t.Fatalf("lease %s is LOST without a LOST transition in its history: %v", leaseID, lost.GetHistory())
	}
	n, err := r.nodes.GetNode(ctx, &nodev1.GetNodeRequest{Id: node})
	if err != nil {
		t.Fatal(err)
	}
	if !n.GetNode().GetDown() || n.GetNode().GetConnected() {
		t.Fatalf("node %s: down=%v connected=%v once its lease is LOST, want down and not connected", node, n.GetNode().GetDown(), n.GetNode().GetConnected())
	}
	d := death{node: node, sinceKill: at.Sub(killed)}
	if !beat.IsZero() {
		d.sinceBeat = at.Sub(beat)
	}
	return d
}

// TestKilledAgentIsDeclaredDownAndItsLeaseLost runs 50 simulated agents
// against the real control plane: all connect and pass attestation; a
// lease is placed on one node and runs there; that node's agent is killed
// abruptly (its TCP connection reset, no goodbye) and the control plane
// declares the node down and the lease LOST, while the other nodes stay
// up.
func TestKilledAgentIsDeclaredDownAndItsLeaseLost(t *testing.T) {
	const n = 50
	// Short enough for a quick test, long enough that a loaded machine does
	// not stall a live session past it.
	live := Liveness{MinTTL: 5 * time.Second, Grace: 5 * time.Second}
	r := newRig(t, live, heartbeatFor(live, n), "warn")
	if _, eligible, stale := r.add(t, 0, n, n); eligible != n || stale != 0 {
		t.Fatalf("%d of %d nodes eligible, %d STALE verdicts", eligible, n, stale)
	}

	ctx := context.Background()
	for _, node := range []string{NodeName(0), NodeName(n / 2), NodeName(n - 1)} {
		a, err := r.nodes.GetNodeAttestation(ctx, &nodev1.GetNodeAttestationRequest{Id: node})
		if err != nil {
			t.Fatal(err)
		}
		if a.GetAttestation().GetStatus() != nodev1.AttestationStatus_ATTESTATION_STATUS_PASS {
			t.Fatalf("attestation of %s is %s, want PASS: %v", node, a.GetAttestation().GetStatus(), a.GetAttestation().GetLatest())
		}
	}

	victim, bystander := NodeName(7), NodeName(8)
	l := r.createLeaseOn(t, victim)
	if got := r.fleet.Agent(victim).Leases(); !slices.Contains(got, l.GetId()) {
		t.Fatalf("agent %s holds %v, want lease %s in its desired state", victim, got, l.GetId())
	}
	d := r.killAndWaitLost(t, victim, l.GetId(), 20*live.DownAfter(n)+time.Minute)
	t.Logf("node %s declared down %s after its kill, %s after its last contact (TTL+grace %s)",
		victim, d.sinceKill.Round(time.Millisecond), d.sinceBeat.Round(time.Millisecond), live.DownAfter(n))
	got, err := r.leases.GetLease(ctx, &leasev1.GetLeaseRequest{Id: l.GetId()})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(got.GetLease().GetReason(), victim) {
		t.Errorf("LOST lease reason %q does not name node %s", got.GetLease().GetReason(), victim)
	}
	b, err := r.nodes.GetNode(ctx, &nodev1.GetNodeRequest{Id: bystander})
	if err != nil {
		t.Fatal(err)
	}
	if b.GetNode().GetDown() || !b.GetNode().GetConnected() {
		t.Errorf("bystander %s: down=%v connected=%v, want up and connected", bystander, b.GetNode().GetDown(), b.GetNode().GetConnected())
	}
	m, err := r.cp.Metrics(ctx, metricSessions)
	if err != nil {
		t.Fatal(err)
	}
	if int(m[metricSessions]) != n-1 {
		t.Errorf("control plane holds %v sessions after one kill, want %d", m[metricSessions], n-1)
	}
	st := r.fleet.Stats()
	if len(st.Ended) != 0 {
		t.Errorf("sessions ended that nobody killed: %s", st.EndedSummary())
	}
	t.Logf("simulator: %d heartbeats sent, longest gap between two of one agent %s", st.Heartbeats, st.MaxHeartbeatGap.Round(time.Millisecond))
}

// envInts reads a positive integer list from the environment.
func envInts(t *testing.T, name string, def []int) []int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	var out []int
	for _, f := range strings.Split(v, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n <= 0 {
			t.Fatalf("%s=%q: want positive integers separated by commas", name, v)
		}
		out = append(out, n)
	}
	return out
}

func envDuration(t *testing.T, name string, def time.Duration) time.Duration {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		t.Fatalf("%s=%q: want a positive duration", name, v)
	}
	return d
}

// TestFleetScale is the fleet benchmark of issue 7 (make bench, with
// GPUAAS_FLEETSIM=1): one control plane holding 1,000, 2,500, 5,000 and
// 10,000 simulated agent sessions with heartbeats, inventory and
// attestation. At each step, once every session is held and attested, it
// records the control plane's resident memory and CPU over a steady
// window of heartbeats, then kills a few agents abruptly and measures how
// long the control plane takes to declare each node down (its lease
// LOST), against the TTL plus grace at that fleet size.
//
// Figures on a shared machine are noisy, so it reports them and fails
// only when the control plane cannot hold the fleet at all.
//
// Environment: GPUAAS_FLEETSIM_STEPS (default 1000,2500,5000,10000),
// GPUAAS_FLEETSIM_WINDOW (steady window, default 60s),
// GPUAAS_FLEETSIM_KILLS (dead-node measurements per step, default 3),
// GPUAAS_FLEETSIM_READ_BUFFER (edge.read_buffer_bytes; default 8 KiB),
// GPUAAS_FLEETSIM_HB_RATE (liveness.max_heartbeats_per_second, default
// 500), GPUAAS_FLEETSIM_TELEMETRY (per-agent telemetry interval, default
// off).
func TestFleetScale(t *testing.T) {
	if os.Getenv("GPUAAS_FLEETSIM") != "1" {
		t.Skip("fleet benchmark: set GPUAAS_FLEETSIM=1 (make bench)")
	}
	steps := envInts(t, "GPUAAS_FLEETSIM_STEPS", []int{1000, 2500, 5000, 10000})
	window := envDuration(t, "GPUAAS_FLEETSIM_WINDOW", time.Minute)
	kills := envInts(t, "GPUAAS_FLEETSIM_KILLS", []int{3})[0]
	rate := float64(envInts(t, "GPUAAS_FLEETSIM_HB_RATE", []int{500})[0])
	var telemetry time.Duration
	if os.Getenv("GPUAAS_FLEETSIM_TELEMETRY") != "" {
		telemetry = envDuration(t, "GPUAAS_FLEETSIM_TELEMETRY", 0)
	}
	if err := RaiseNoFile(1 << 16); err != nil {
		t.Fatal(err)
	}
	if need := uint64(slices.Max(steps)) + 1024; NoFile() < need {
		t.Fatalf("RLIMIT_NOFILE is %d, the fleet needs %d", NoFile(), need)
	}
	live := Liveness{MinTTL: 10 * time.Second, MaxHeartbeatsPerSecond: rate, Grace: 10 * time.Second}
	// Agents beat at a third of the TTL of the largest step, as an agent
	// told that TTL would.
	hb := heartbeatFor(live, slices.Max(steps))
	r := newRig(t, live, hb, "error")
	r.fleet.o.Telemetry = telemetry
	t.Logf("liveness: min_ttl %s, max_heartbeats_per_second %g, grace %s; heartbeat every %s; telemetry %v; window %s; %d cores",
		live.MinTTL, rate, live.Grace, hb, telemetry, window, runtime.NumCPU())

	held, dead := 0, 0 // agents started so far, agents killed so far
	var rows []string
	for _, step := range steps {
		if step <= held-dead {
			t.Fatalf("steps must grow: %d after %d", step, held-dead)
		}
		add := step - (held - dead)
		took, eligible, stale := r.add(t, held, held+add, step)
		held += add
		t.Logf("step %d: %d sessions opened and attested in %s; %d nodes eligible (attested PASS), %d STALE verdicts so far (a challenge answered after nonce_ttl)",
			step, add, took.Round(time.Millisecond), eligible, stale)
		time.Sleep(5 * time.Second) // let the connect burst settle
		cpS, simS := r.window(t, window)
		perSession := float64(cpS.last.RSSKiB) / float64(step)
		row := fmt.Sprintf("| %d | %.0f MiB | %.1f KiB | %.0f MiB | %.1f%% | %.1f%% | %.0f MiB | %.1f%% | %s |",
			step, float64(cpS.last.RSSKiB)/1024, perSession, float64(cpS.last.HWMKiB)/1024, cpS.cpu, cpS.cpuPeak,
			float64(simS.last.RSSKiB)/1024, simS.cpu, took.Round(time.Second))
		t.Log(row)
		rows = append(rows, row)
		t.Logf("step %d: %s", step, r.nodeCalls(t))

		var ds []death
		next := held - 1
		for range kills {
			victim, i := r.eligibleVictim(t, next)
			next = i - 1
			l := r.createLeaseOn(t, victim)
			// At a random point of its heartbeat cycle, as a crash would.
			time.Sleep(rand.N(hb))
			ds = append(ds, r.killAndWaitLost(t, victim, l.GetId(), 3*live.DownAfter(step)+time.Minute))
			dead++
		}
		t.Logf("step %d: dead node detection (TTL %s + grace %s = %s): %s", step, live.Fleet().TTL(step), live.Grace, live.DownAfter(step), summarize(ds))
		r.waitHeld(t, held-dead)
		// Agents reconnect, as real ones do; sessions the control plane
		// ended (a node declared down while alive) are a finding to report.
		st := r.fleet.Stats()
		t.Logf("step %d: simulator: sessions ended by the control plane or the network: %s; longest gap between two heartbeats of one agent %s",
			step, st.EndedSummary(), st.MaxHeartbeatGap.Round(time.Millisecond))
	}
	t.Log("| sessions | control plane RSS | RSS per session | peak RSS | CPU (window) | CPU (peak 5s) | simulator RSS | simulator CPU | connect+attest |")
	for _, r := range rows {
		t.Log(r)
	}
}

// nodeCalls times the operator's node reads at the current fleet size:
// GetNode of one node, and ListNodes with its response size.
func (r *rig) nodeCalls(t *testing.T) string {
	t.Helper()
	ctx := context.Background()
	start := time.Now()
	if _, err := r.nodes.GetNode(ctx, &nodev1.GetNodeRequest{Id: NodeName(0)}); err != nil {
		t.Fatal(err)
	}
	get := time.Since(start)
	start = time.Now()
	nodes, pages, size := 0, 0, 0
	var first time.Duration
	for token := ""; ; pages++ {
		list, err := r.nodes.ListNodes(ctx, &nodev1.ListNodesRequest{PageToken: token})
		if err != nil {
			t.Fatal(err)
		}
		if pages == 0 {
			first = time.Since(start)
		}
		nodes, size = nodes+len(list.GetNodes()), max(size, proto.Size(list))
		if token = list.GetNextPageToken(); token == "" {
			break
		}
	}
	return fmt.Sprintf("GetNode %s; ListNodes: first page %s, all %d nodes in %d pages %s, largest page %.2f MiB", get.Round(time.Millisecond),
		first.Round(time.Millisecond), nodes, pages+1, time.Since(start).Round(time.Millisecond), float64(size)/(1<<20))
}

// usage is one process's resource use over a window.
type usage struct {
	last footprint.Sample
	// cpu is the mean over the window, cpuPeak the highest 5 s interval,
	// in percent of one core.
	cpu, cpuPeak float64
}

// window samples the control plane and this process every 5 s for d.
func (r *rig) window(t *testing.T, d time.Duration) (cp, self usage) {
	t.Helper()
	hz := footprint.ClockTicks()
	read := func(pid int) footprint.Sample {
		s, err := footprint.ReadSample(pid)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	pct := func(a, b footprint.Sample) float64 {
		return float64(b.CPUTicks-a.CPUTicks) / float64(hz) / b.Time.Sub(a.Time).Seconds() * 100
	}
	cp0, self0 := read(r.cp.Pid()), read(os.Getpid())
	prevCP, prevSelf := cp0, self0
	end := time.Now().Add(d)
	for time.Now().Before(end) {
		time.Sleep(min(5*time.Second, time.Until(end)+time.Millisecond))
		c, s := read(r.cp.Pid()), read(os.Getpid())
		cp.cpuPeak, self.cpuPeak = max(cp.cpuPeak, pct(prevCP, c)), max(self.cpuPeak, pct(prevSelf, s))
		prevCP, prevSelf = c, s
	}
	cp.last, self.last = prevCP, prevSelf
	cp.cpu, self.cpu = pct(cp0, prevCP), pct(self0, prevSelf)
	return cp, self
}

func summarize(ds []death) string {
	if len(ds) == 0 {
		return "none measured"
	}
	k := make([]time.Duration, 0, len(ds))
	b := make([]time.Duration, 0, len(ds))
	for _, d := range ds {
		k, b = append(k, d.sinceKill), append(b, d.sinceBeat)
	}
	slices.Sort(k)
	slices.Sort(b)
	r := func(d time.Duration) time.Duration { return d.Round(10 * time.Millisecond) }
	return fmt.Sprintf("since kill min/median/max %s/%s/%s; since last contact min/median/max %s/%s/%s (n=%d)",
		r(k[0]), r(k[len(k)/2]), r(k[len(k)-1]), r(b[0]), r(b[len(b)/2]), r(b[len(b)-1]), len(ds))
}
