package lease

// The executor's test rig: a real containerd (test/harness), the GPU
// simulator with its state in a file, a journal on disk and a clock the
// test moves. Everything a test starts is stopped by its cleanups, the
// executor first.

import (
	"context"
	"crypto/rand"
	"fmt"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/agent/gpu/sim"
	"github.com/gpuaas/gpuaas/agent/runtime"
	"github.com/gpuaas/gpuaas/pkg/mig"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	"github.com/gpuaas/gpuaas/test/harness"
	"github.com/gpuaas/gpuaas/test/ociimage"
)

const (
	testImage     = "localhost/gpuaas/busybox:lease-test"
	testNamespace = "gpuaas-lease-test"
	// waitLimit bounds every wait for the executor to converge: generous,
	// since these tests check what happens, not how fast.
	waitLimit = 60 * time.Second
	stopGrace = 200 * time.Millisecond
	resync    = 100 * time.Millisecond
)

// clock is the agent's clock, moved by the test.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func newClock() *clock {
	return &clock{now: time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)}
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = t
}

// logSink collects the executor's log lines and shows them with -v.
type logSink struct {
	t     testing.TB
	mu    sync.Mutex
	lines []string
}

func (s *logSink) Write(p []byte) (int, error) {
	line := strings.TrimSpace(string(p))
	s.mu.Lock()
	s.lines = append(s.lines, line)
	s.mu.Unlock()
	s.t.Log(line)
	return len(p), nil
}

// count is how many lines contain every one of the substrings.
func (s *logSink) count(substrs ...string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, l := range s.lines {
		all := true
		for _, sub := range substrs {
			all = all && strings.Contains(l, sub)
		}
		if all {
			n++
		}
	}
	return n
}

// rig is one test's host.
type rig struct {
	t           *testing.T
	address     string // containerd's socket
	rt          *runtime.Containerd
	gpu         *sim.Sim
	gpuUUID     string
	simPath     string
	journal     *Journal
	journalPath string
	logDir      string
	clock       *clock
	logs        *logSink
	gen         uint64
	// net is the rig's bridge network: leases get their own bridge and
	// subnet, as every agent on a host does.
	net *harness.Network
}

// newRig starts containerd for the test and builds a host around it.
func newRig(t *testing.T) *rig {
	t.Helper()
	ctrd := harness.StartContainerdT(t, harness.Options{})
	return newRigAt(t, ctrd.Address())
}

// newRigAt builds a host on the containerd serving address, importing the
// test image into it.
func newRigAt(t *testing.T, address string) *rig {
	t.Helper()
	dir := t.TempDir()
	r := &rig{
		t:           t,
		address:     address,
		simPath:     filepath.Join(dir, "sim.json"),
		journalPath: filepath.Join(dir, "data", "journal.db"),
		logDir:      filepath.Join(dir, "logs"),
		clock:       newClock(),
		logs:        &logSink{t: t},
		net:         harness.NetworkT(t),
	}
	// Before the network's check and containerd's cleanup: stop what the
	// test left running through the runtime, which releases each
	// container's network (containerd's cleanup alone would not).
	t.Cleanup(func() {
		rt, err := runtime.NewContainerd(context.Background(), r.config())
		if err != nil {
			t.Logf("final cleanup: %v", err)
			return
		}
		defer rt.Close()
		list, _ := rt.List(context.Background())
		for _, st := range list {
			if err := rt.Stop(context.Background(), st.ID, 0); err != nil {
				t.Errorf("final cleanup: stop %s: %v", st.ID, err)
			}
		}
	})
	r.rt = r.connect()
	archive, _ := harness.BusyboxArchiveT(t, ociimage.Options{Name: testImage})
	names, err := r.rt.ImportArchive(context.Background(), archive)
	if err != nil || !slices.Equal(names, []string{testImage}) {
		t.Fatalf("import test image: %v, %v", names, err)
	}
	r.gpu = r.loadSim()
	devs, err := r.gpu.Devices(context.Background())
	if err != nil || len(devs) != 1 {
		t.Fatalf("sim devices = %v, %v", devs, err)
	}
	r.gpuUUID = devs[0].UUID
	r.journal = r.openJournal()
	return r
}

// config is the rig's runtime configuration.
func (r *rig) config() runtime.Config {
	return runtime.Config{
		Address: r.address, Namespace: testNamespace, Images: runtime.ImagePolicy{AllowedRegistries: []string{"localhost"}},
		Network: &runtime.NetworkConfig{
			PluginDirs: []string{r.net.PluginDir}, Bridge: r.net.Bridge, Subnet: r.net.Subnet,
			RunDir: r.net.RunDir, StateDir: r.net.StateDir,
		},
	}
}

// connect opens a runtime client, closed by the test's cleanups.
func (r *rig) connect() *runtime.Containerd {
	r.t.Helper()
	rt, err := runtime.NewContainerd(context.Background(), r.config())
	if err != nil {
		r.t.Fatalf("connect runtime: %v", err)
	}
	r.t.Cleanup(func() { rt.Close() })
	return rt
}

// loadSim is the simulated driver, with whatever partitions the state file
// records (as a restarted agent finds them on hardware).
func (r *rig) loadSim() *sim.Sim {
	r.t.Helper()
	s, err := sim.New(sim.Config{
		GPUs:                []sim.GPUConfig{{Model: "H200", MIGEnabled: true}},
		StatePath:           r.simPath,
		ImmediateModeChange: true,
	})
	if err != nil {
		r.t.Fatalf("load gpu simulator: %v", err)
	}
	return s
}

func (r *rig) openJournal() *Journal {
	r.t.Helper()
	j, err := OpenJournal(r.journalPath)
	if err != nil {
		r.t.Fatalf("open journal: %v", err)
	}
	r.t.Cleanup(func() { j.Close() })
	return j
}

func (r *rig) options() Options {
	return Options{
		Journal: r.journal, GPU: r.gpu, Runtime: r.rt, LogDir: r.logDir,
		StopGrace: stopGrace, Resync: resync, Now: r.clock.Now,
		Logger: slog.New(slog.NewTextHandler(r.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
}

// running is an executor whose Run is in progress.
type running struct {
	*Executor
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
}

// start runs a new executor on the rig's journal, GPU and runtime until
// stop (or the test's end).
func (r *rig) start(mods ...func(*Options)) *running {
	r.t.Helper()
	o := r.options()
	for _, m := range mods {
		m(&o)
	}
	ex := &running{Executor: New(o), done: make(chan error, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	ex.cancel = cancel
	go func() { ex.done <- ex.Run(ctx) }()
	r.t.Cleanup(func() { ex.stop(r.t) })
	return ex
}

// stop cancels Run and waits for it, and so for every converge step, to
// return.
func (ex *running) stop(t testing.TB) {
	t.Helper()
	ex.once.Do(func() {
		ex.cancel()
		select {
		case err := <-ex.done:
			if err != nil {
				t.Errorf("Run = %v, want nil after cancel", err)
			}
		case <-time.After(waitLimit):
			t.Errorf("Run did not return %s after cancel", waitLimit)
		}
	})
}

// newLeaseID returns an id of the control plane's shape, l- and 20 lower
// case letters and digits; unique, since runc state is shared host-wide.
func newLeaseID() string {
	const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 20)
	_, _ = rand.Read(b)
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return "l-" + string(b)
}

// lease is a desired lease for the profile at the placement on the rig's
// GPU, running args in the test image, ending an hour from the rig's now.
func (r *rig) lease(profile mig.ProfileID, at mig.Placement, args ...string) *leasev1.Lease {
	m, _ := mig.LookupModel("H200")
	p, ok := m.Profile(profile)
	if !ok {
		r.t.Fatalf("H200 has no profile %d", profile)
	}
	return &leasev1.Lease{
		Id: newLeaseID(),
		Spec: &leasev1.LeaseSpec{
			Tenant:   "tenant-a",
			Workload: &leasev1.Workload{Image: testImage, Args: args},
		},
		Phase: leasev1.Phase_PHASE_SCHEDULED,
		Placement: &leasev1.Placement{
			Node: "node-1", GpuUuid: r.gpuUUID, GpuModel: m.Name,
			ProfileId: int32(profile), Start: uint32(at.Start), Size: uint32(at.Size), MigProfile: p.Name,
		},
		NotAfter: timestamppb.New(r.clock.Now().Add(time.Hour)),
	}
}

func at(start, size int) mig.Placement { return mig.Placement{Start: start, Size: size} }

// sleeper is a workload that runs until stopped.
var sleeper = []string{"sh", "-c", "exec sleep 600"}

// desire sends the next generation of the desired set.
func (r *rig) desire(ex *running, leases ...*leasev1.Lease) {
	r.t.Helper()
	r.gen++
	if err := ex.SetDesired(&agentv1.DesiredState{Generation: r.gen, Leases: leases}); err != nil {
		r.t.Fatalf("SetDesired(generation %d): %v", r.gen, err)
	}
}

// waitFor polls cond until it holds, failing the test after waitLimit with
// cond's last description of what it saw.
func (r *rig) waitFor(what string, cond func() (bool, string)) {
	r.t.Helper()
	deadline := time.Now().Add(waitLimit)
	for {
		ok, saw := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("waited %s for %s; last saw %s", waitLimit, what, saw)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (r *rig) record(id string) (Record, bool) {
	r.t.Helper()
	rec, ok, err := r.journal.Record(id)
	if err != nil {
		r.t.Fatalf("journal record %s: %v", id, err)
	}
	return rec, ok
}

// waitPhase waits until the lease's journaled phase is phase.
func (r *rig) waitPhase(id string, phase leasev1.Phase) Record {
	r.t.Helper()
	var rec Record
	r.waitFor(fmt.Sprintf("lease %s to be %s", id, phase), func() (bool, string) {
		var ok bool
		rec, ok = r.record(id)
		return ok && rec.Phase == phase, fmt.Sprintf("%+v (found %t)", rec, ok)
	})
	return rec
}

// events are the lease's audit events in the outbox,
// oldest first.
func (r *rig) events(id string) []*agentv1.AuditEvent {
	r.t.Helper()
	all, err := r.journal.PendingEvents(1 << 20)
	if err != nil {
		r.t.Fatalf("pending events: %v", err)
	}
	var out []*agentv1.AuditEvent
	for _, e := range all {
		if e.GetLeaseId() == id {
			out = append(out, e)
		}
	}
	return out
}

func (r *rig) actions(id string) []string {
	r.t.Helper()
	var out []string
	for _, e := range r.events(id) {
		out = append(out, e.GetAction())
	}
	return out
}

// gpuInstances is what the simulated driver holds.
func (r *rig) gpuInstances() []gpu.GPUInstance {
	r.t.Helper()
	gis, err := r.gpu.GPUInstances(context.Background(), r.gpuUUID)
	if err != nil {
		r.t.Fatalf("gpu instances: %v", err)
	}
	return gis
}

// containers are the ids of the lease containers containerd holds.
func (r *rig) containers() []string {
	r.t.Helper()
	list, err := r.rt.List(context.Background())
	if err != nil {
		r.t.Fatalf("list containers: %v", err)
	}
	var ids []string
	for _, st := range list {
		ids = append(ids, st.ID)
	}
	return ids
}

func (r *rig) status(id string) (runtime.Status, error) {
	return r.rt.Status(context.Background(), id)
}

// observed is the executor's report entry for the lease.
func observed(t *testing.T, ex *Executor, id string) (*agentv1.ObservedState, *agentv1.ObservedLease) {
	t.Helper()
	obs, err := ex.Observed()
	if err != nil {
		t.Fatalf("Observed: %v", err)
	}
	for _, l := range obs.GetLeases() {
		if l.GetLeaseId() == id {
			return obs, l
		}
	}
	t.Fatalf("Observed %v has no lease %s", obs, id)
	return nil, nil
}
