package runtime

import (
	"bufio"
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/errdefs"

	"github.com/gpuaas/gpuaas/test/harness"
	"github.com/gpuaas/gpuaas/test/ociimage"
)

const (
	testImage     = "localhost/gpuaas/busybox:test"
	rootImage     = "localhost/gpuaas/busybox:root"
	userImage     = "localhost/gpuaas/busybox:user"
	testNamespace = "gpuaas-test"
)

// env is one test's containerd, runtime and raw client, all removed by the
// test's cleanups (harness.Containerd.Close fails the test if a shim,
// runc state, cgroup or mount is left).
type env struct {
	t    *testing.T
	ctrd *harness.Containerd
	rt   *Containerd
	raw  *client.Client
	ctx  context.Context // in testNamespace, for raw
	// net is the test's bridge network (newNetEnv only); its Close, a
	// cleanup, fails the test if a container left anything on it.
	net *harness.Network
	// tweak, if set, changes the runtime configuration of later connects.
	tweak func(*Config)
}

func newEnv(t *testing.T) *env {
	t.Helper()
	return newEnvWith(t, nil)
}

// newNetEnv is newEnv with a bridge network of the test's own.
func newNetEnv(t *testing.T) *env {
	t.Helper()
	n := harness.NetworkT(t)
	return newEnvWith(t, n)
}

func newEnvWith(t *testing.T, n *harness.Network) *env {
	t.Helper()
	ctrd := harness.StartContainerdT(t, harness.Options{})
	ctx := context.Background()
	e := &env{t: t, ctrd: ctrd, net: n, ctx: namespaces.WithNamespace(ctx, testNamespace)}
	e.rt = e.connect()
	raw, err := ctrd.NewClient(testNamespace)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { raw.Close() })
	e.raw = raw
	e.importImage(ociimage.Options{Name: testImage})
	return e
}

// config is the runtime configuration of the test's agent.
func (e *env) config() Config {
	cfg := Config{Address: e.ctrd.Address(), Namespace: testNamespace}
	if e.net != nil {
		cfg.Network = &NetworkConfig{
			PluginDirs: []string{e.net.PluginDir}, Bridge: e.net.Bridge, Subnet: e.net.Subnet,
			RunDir: e.net.RunDir, StateDir: e.net.StateDir,
		}
	}
	if e.tweak != nil {
		e.tweak(&cfg)
	}
	return cfg
}

// connect opens a runtime client (a new agent process, as far as
// containerd can tell), closed by the test's cleanups.
func (e *env) connect() *Containerd {
	e.t.Helper()
	rt, err := NewContainerd(context.Background(), e.config())
	if err != nil {
		e.t.Fatalf("new runtime: %v", err)
	}
	e.t.Cleanup(func() {
		if err := rt.Close(); err != nil {
			e.t.Errorf("close runtime: %v", err)
		}
	})
	return rt
}

func (e *env) importImage(opts ociimage.Options) {
	e.t.Helper()
	archive, _ := harness.BusyboxArchiveT(e.t, opts)
	names, err := e.rt.ImportArchive(context.Background(), archive)
	if err != nil || !slices.Equal(names, []string{opts.Name}) {
		e.t.Fatalf("import: %v, %v", names, err)
	}
}

// spec returns a valid spec with a unique id, a simulated MIG partition and
// a log file in the test's temporary directory.
func (e *env) spec(args ...string) Spec {
	id := harness.UniqueID("lease")
	return Spec{
		ID: id, LeaseID: id, Tenant: "tenant-a", Image: testImage, Args: args,
		Env:     []string{"TENANT_VAR=hello"},
		LogPath: filepath.Join(e.t.TempDir(), "logs", id+".log"),
		Device:  fakeMIG(),
	}
}

func (e *env) create(s Spec) Status {
	e.t.Helper()
	st, err := e.rt.Create(context.Background(), s)
	if err != nil {
		e.t.Fatalf("create %s: %v", s.ID, err)
	}
	return st
}

func (e *env) start(id string) Status {
	e.t.Helper()
	st, err := e.rt.Start(context.Background(), id)
	if err != nil {
		e.t.Fatalf("start %s: %v", id, err)
	}
	return st
}

// waitExit polls until the task has exited.
func (e *env) waitExit(id string) Status {
	e.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := e.rt.Status(context.Background(), id)
		if err != nil {
			e.t.Fatalf("status %s: %v", id, err)
		}
		if st.State == StateStopped {
			return st
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("%s still %s after 10s", id, st.State)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// run creates and starts a container, waits for it to exit and returns its
// status and output (key: value lines parsed into a map as well).
func (e *env) run(s Spec) (Status, string, map[string]string) {
	e.t.Helper()
	e.create(s)
	e.start(s.ID)
	st := e.waitExit(s.ID)
	out := e.readLog(s.LogPath, "END")
	kv := map[string]string{}
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ":"); ok {
			kv[k] = strings.TrimSpace(v)
		}
	}
	return st, out, kv
}

// readLog waits until the shim has written marker to the log.
func (e *env) readLog(path, marker string) string {
	e.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		b, _ := os.ReadFile(path)
		if strings.Contains(string(b), marker) {
			return string(b)
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("log %s lacks %q: %q", path, marker, b)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitBriefly paces a poll.
func (e *env) waitBriefly() { time.Sleep(20 * time.Millisecond) }

func (e *env) stop(id string, grace time.Duration) {
	e.t.Helper()
	if err := e.rt.Stop(context.Background(), id, grace); err != nil {
		e.t.Fatalf("stop %s: %v", id, err)
	}
}

// assertGone checks that nothing of the container is left: no record, no
// task, no snapshot, no runc state, no cgroup.
func (e *env) assertGone(id string, pid uint32) {
	e.t.Helper()
	if _, err := e.rt.Status(context.Background(), id); !errors.Is(err, ErrNotFound) {
		e.t.Errorf("status after stop: %v, want ErrNotFound", err)
	}
	if _, err := e.raw.SnapshotService(e.rt.Snapshotter()).Stat(e.ctx, id); !errdefs.IsNotFound(err) {
		e.t.Errorf("snapshot %s left: %v", id, err)
	}
	if pid != 0 {
		if _, err := os.Stat(filepath.Join("/proc", strconv.Itoa(int(pid)))); err == nil {
			e.t.Errorf("process %d still exists", pid)
		}
	}
	if _, err := os.Stat(filepath.Join("/run/containerd/runc", testNamespace, id)); err == nil {
		e.t.Errorf("runc state of %s left", id)
	}
	if dirs := harness.CgroupDirs(CgroupsPath(testNamespace, id)); len(dirs) > 0 {
		e.t.Errorf("cgroups left: %v", dirs)
	}
}

func TestCreateStartRunsToExitWithLogAndExitCode(t *testing.T) {
	e := newEnv(t)
	s := e.spec("sh", "-c", `echo "hello from $(hostname)"; env; echo END; exit 3`)

	begin := time.Now()
	created := e.create(s)
	if created.State != StateCreated || created.Pid == 0 {
		t.Fatalf("after create: %+v, want created with a pid", created)
	}
	if created.LeaseID != s.LeaseID || created.Image != testImage || !strings.HasPrefix(created.ImageDigest, "sha256:") {
		t.Errorf("status = %+v", created)
	}
	// The isolation layer attaches to this directory before the task
	// starts: it must exist and hold the task's init process.
	assertInCgroup(t, created)

	started := e.start(s.ID)
	if started.State != StateRunning && started.State != StateStopped {
		t.Errorf("after start: %s", started.State)
	}
	st := e.waitExit(s.ID)
	out := e.readLog(s.LogPath, "END")
	t.Logf("containerd start %v; create+start+exit %v", e.ctrd.StartDuration(), time.Since(begin))

	if st.ExitCode != 3 || st.ExitedAt.IsZero() || st.Pid != created.Pid || st.CgroupPath != "" {
		t.Errorf("exit status = %+v", st)
	}
	for _, want := range []string{
		"hello from " + s.ID,
		"TENANT_VAR=hello",
		"GPUAAS_LEASE_ID=" + s.LeaseID,
		"NVIDIA_VISIBLE_DEVICES=" + s.Device.UUID,
		"NVIDIA_DRIVER_CAPABILITIES=compute,utility",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
	e.stop(s.ID, time.Second)
	e.assertGone(s.ID, st.Pid)
	leases, err := e.raw.LeasesService().List(e.ctx)
	if err != nil || len(leases) != 0 {
		t.Errorf("leases left after the operations: %v, %v", leases, err)
	}
}

func assertInCgroup(t *testing.T, st Status) {
	t.Helper()
	if st.CgroupPath == "" {
		t.Fatal("no cgroup path")
	}
	procs, err := os.ReadFile(filepath.Join(st.CgroupPath, "cgroup.procs"))
	if err != nil {
		t.Fatalf("task cgroup: %v", err)
	}
	if !slices.Contains(strings.Fields(string(procs)), strconv.Itoa(int(st.Pid))) {
		t.Errorf("pid %d not in %s: %q", st.Pid, st.CgroupPath, procs)
	}
}

const probeScript = `
echo "uid: $(id -u)"
echo "gid: $(id -g)"
echo "groups: $(id -G)"
grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status
if touch /probe 2>/dev/null; then echo "rootfs: writable"; else echo "rootfs: read-only"; fi
if echo x > /tmp/probe; then echo "tmp: writable"; fi
echo "tmpmount: $(grep ' /tmp ' /proc/mounts)"
echo "pid1: $$"
echo "net: $(ls /sys/class/net | tr '\n' ' ')"
echo "gpu: $(stat -c '%F %t:%T' /dev/nvidia0)"
echo "gpuopen: $(cat /dev/nvidia0 2>&1)"
echo "othergpu: $(ls /dev/nvidia1 2>&1)"
echo END
`

func TestContainerIsHardened(t *testing.T) {
	e := newEnv(t)
	e.importImage(ociimage.Options{Name: rootImage, User: "0:0"})
	e.importImage(ociimage.Options{Name: userImage, User: "1000:1000"})

	tests := []struct {
		image   string
		wantUID string
	}{
		{testImage, "65534"}, // image asks for nobody
		{rootImage, "65534"}, // image asks for root: replaced
		{userImage, "1000"},  // image's non-root user kept
	}
	for _, tt := range tests {
		t.Run(tt.image, func(t *testing.T) {
			s := e.spec("sh", "-c", probeScript)
			s.Image = tt.image
			st, out, kv := e.run(s)
			defer e.stop(s.ID, 0)
			if st.ExitCode != 0 {
				t.Fatalf("probe exited %d:\n%s", st.ExitCode, out)
			}
			want := map[string]string{
				"uid":        tt.wantUID,
				"CapInh":     "0000000000000000",
				"CapPrm":     "0000000000000000",
				"CapEff":     "0000000000000000",
				"CapBnd":     "0000000000000000",
				"CapAmb":     "0000000000000000",
				"NoNewPrivs": "1",
				"Seccomp":    "2", // filter mode
				"rootfs":     "read-only",
				"tmp":        "writable",
				"pid1":       "1",
				"net":        "lo",
				"gpu":        "character special file c3:0",
				"gpuopen":    "cat: can't open '/dev/nvidia0': No such device or address",
			}
			for k, v := range want {
				if kv[k] != v {
					t.Errorf("%s = %q, want %q", k, kv[k], v)
				}
			}
			if g := kv["groups"]; strings.Contains(" "+g+" ", " 0 ") {
				t.Errorf("member of group 0: %q", g)
			}
			if m := kv["tmpmount"]; !strings.Contains(m, "tmpfs") || !strings.Contains(m, "nosuid") || !strings.Contains(m, "nodev") || !strings.Contains(m, "size=") {
				t.Errorf("/tmp mount = %q", m)
			}
			if !strings.Contains(kv["othergpu"], "No such file") {
				t.Errorf("another GPU's node is visible: %q", kv["othergpu"])
			}
		})
	}
}

func TestLimitsReachTheCgroup(t *testing.T) {
	e := newEnv(t)
	tests := []struct {
		name                string
		limits              Limits
		memory, quota, pids int64
	}{
		{"lease limits", Limits{MemoryBytes: 64 << 20, CPUMillis: 500, Pids: 64}, 64 << 20, 50000, 64},
		{"defaults", Limits{}, DefaultMemoryBytes, DefaultCPUMillis * 100, DefaultPids},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := e.spec("sleep", "1000")
			s.Limits = tt.limits
			st := e.create(s)
			defer e.stop(s.ID, 0)

			c, err := e.raw.LoadContainer(e.ctx, s.ID)
			if err != nil {
				t.Fatal(err)
			}
			sp, err := c.Spec(e.ctx)
			if err != nil {
				t.Fatal(err)
			}
			r := sp.Linux.Resources
			if *r.Memory.Limit != tt.memory || *r.CPU.Quota != tt.quota || *r.Pids.Limit != tt.pids {
				t.Errorf("spec limits: memory %d quota %d pids %d", *r.Memory.Limit, *r.CPU.Quota, *r.Pids.Limit)
			}

			rel := CgroupsPath(testNamespace, s.ID)
			files := map[string]string{}
			if harness.CgroupHybrid() {
				files["/sys/fs/cgroup/memory"+rel+"/memory.limit_in_bytes"] = strconv.FormatInt(tt.memory, 10)
				files["/sys/fs/cgroup/cpu"+rel+"/cpu.cfs_quota_us"] = strconv.FormatInt(tt.quota, 10)
				files["/sys/fs/cgroup/pids"+rel+"/pids.max"] = strconv.FormatInt(tt.pids, 10)
			} else {
				files[st.CgroupPath+"/memory.max"] = strconv.FormatInt(tt.memory, 10)
				files[st.CgroupPath+"/cpu.max"] = strconv.FormatInt(tt.quota, 10) + " 100000"
				files[st.CgroupPath+"/pids.max"] = strconv.FormatInt(tt.pids, 10)
			}
			for f, want := range files {
				b, err := os.ReadFile(f)
				if err != nil {
					t.Errorf("read %s: %v", f, err)
					continue
				}
				if got := strings.TrimSpace(string(b)); got != want {
					t.Errorf("%s = %s, want %s", f, got, want)
				}
			}
		})
	}
}

func TestCreateIsIdempotent(t *testing.T) {
	e := newEnv(t)
	s := e.spec("sleep", "1000")
	first := e.create(s)
	again := e.create(s)
	if again.Pid != first.Pid || again.State != StateCreated {
		t.Errorf("second create = %+v, first %+v", again, first)
	}

	other := s
	other.LeaseID = "another-lease"
	if _, err := e.rt.Create(context.Background(), other); !errors.Is(err, ErrInvalidSpec) {
		t.Errorf("create for another lease under the same id: %v, want ErrInvalidSpec", err)
	}

	// A container whose task is gone (deleted behind our back) gets a new
	// one.
	c, err := e.raw.LoadContainer(e.ctx, s.ID)
	if err != nil {
		t.Fatal(err)
	}
	task, err := c.Task(e.ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := task.Delete(e.ctx, client.WithProcessKill); err != nil {
		t.Fatal(err)
	}
	if st, err := e.rt.Status(context.Background(), s.ID); err != nil || st.State != StateNoTask {
		t.Fatalf("status without task = %+v, %v", st, err)
	}
	if _, err := e.rt.Start(context.Background(), s.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("start without a task: %v, want ErrNotFound", err)
	}
	recreated := e.create(s)
	if recreated.State != StateCreated || recreated.Pid == 0 || recreated.Pid == first.Pid {
		t.Errorf("create after task loss = %+v", recreated)
	}
	e.stop(s.ID, 0)
	e.assertGone(s.ID, recreated.Pid)
}

func TestStartIsIdempotent(t *testing.T) {
	e := newEnv(t)
	s := e.spec("sleep", "1000")
	e.create(s)
	first := e.start(s.ID)
	again := e.start(s.ID)
	if first.State != StateRunning || again.State != StateRunning || again.Pid != first.Pid {
		t.Errorf("start twice: %+v then %+v", first, again)
	}
	assertInCgroup(t, again)
	e.stop(s.ID, 0)

	exits := e.spec("true")
	e.create(exits)
	e.start(exits.ID)
	e.waitExit(exits.ID)
	if st := e.start(exits.ID); st.State != StateStopped {
		t.Errorf("start of an exited task = %s, want it left stopped", st.State)
	}
	e.stop(exits.ID, 0)
}

func TestStop(t *testing.T) {
	e := newEnv(t)
	tests := []struct {
		name    string
		args    []string
		start   bool
		grace   time.Duration
		atLeast time.Duration
		atMost  time.Duration
	}{
		// sh handles SIGTERM and exits well within the grace period.
		{"exits on SIGTERM", []string{"sh", "-c", `trap "exit 0" TERM; while :; do sleep 0.05; done`}, true, 10 * time.Second, 0, 3 * time.Second},
		// sleep as pid 1 of its namespace ignores SIGTERM: killed after grace.
		{"killed after grace", []string{"sleep", "1000"}, true, 500 * time.Millisecond, 500 * time.Millisecond, 5 * time.Second},
		{"created, never started", []string{"sleep", "1000"}, false, time.Second, 0, 3 * time.Second},
		{"already exited", []string{"true"}, true, time.Second, 0, 3 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := e.spec(tt.args...)
			st := e.create(s)
			if tt.start {
				st = e.start(s.ID)
				time.Sleep(100 * time.Millisecond) // let the shell install its trap
			}
			begin := time.Now()
			e.stop(s.ID, tt.grace)
			took := time.Since(begin)
			if took < tt.atLeast || took > tt.atMost {
				t.Errorf("stop took %v, want between %v and %v", took, tt.atLeast, tt.atMost)
			}
			e.assertGone(s.ID, st.Pid)
		})
	}
	t.Run("missing container", func(t *testing.T) {
		if err := e.rt.Stop(context.Background(), "never-created", time.Second); err != nil {
			t.Errorf("stop of a missing container: %v", err)
		}
	})
}

func TestRestartedAgentAdoptsRunningContainer(t *testing.T) {
	e := newEnv(t)
	s := e.spec("sleep", "1000")
	e.create(s)
	before := e.start(s.ID)
	if err := e.rt.Close(); err != nil {
		t.Fatal(err)
	}

	// A new client is what a restarted agent has.
	rt2, err := NewContainerd(context.Background(), Config{Address: e.ctrd.Address(), Namespace: testNamespace})
	if err != nil {
		t.Fatal(err)
	}
	defer rt2.Close()
	e.rt = rt2

	after, err := rt2.Status(context.Background(), s.ID)
	if err != nil {
		t.Fatal(err)
	}
	if after.State != StateRunning || after.Pid != before.Pid || after.CgroupPath != before.CgroupPath || after.LeaseID != s.LeaseID {
		t.Errorf("adopted status = %+v, before restart %+v", after, before)
	}
	list, err := rt2.List(context.Background())
	if err != nil || len(list) != 1 || list[0].Pid != before.Pid {
		t.Errorf("list after restart = %+v, %v", list, err)
	}
	again, err := rt2.Create(context.Background(), s)
	if err != nil || again.Pid != before.Pid || again.State != StateRunning {
		t.Errorf("re-create after restart = %+v, %v", again, err)
	}
	e.stop(s.ID, 0)
	e.assertGone(s.ID, before.Pid)
}

func TestListReturnsOnlyLeaseContainersOfTheNamespace(t *testing.T) {
	e := newEnv(t)
	a, b := e.spec("sleep", "1000"), e.spec("true")
	e.create(a)
	e.create(b)
	// Not ours: no lease label in our namespace; a lease label in another.
	if _, err := e.raw.NewContainer(e.ctx, harness.UniqueID("foreign"), client.WithNewSpec()); err != nil {
		t.Fatal(err)
	}
	octx := namespaces.WithNamespace(context.Background(), "someone-else")
	if _, err := e.raw.NewContainer(octx, harness.UniqueID("foreign"), client.WithNewSpec(oci.WithProcessArgs("true")),
		client.WithContainerLabels(map[string]string{LabelLease: "x"})); err != nil {
		t.Fatal(err)
	}
	list, err := e.rt.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, st := range list {
		ids = append(ids, st.ID)
	}
	want := []string{a.ID, b.ID}
	slices.Sort(want)
	if !slices.Equal(ids, want) {
		t.Errorf("list = %v, want %v", ids, want)
	}
	e.stop(a.ID, 0)
	e.stop(b.ID, 0)
}

func TestCreateRejectsBadSpecsAndLeavesNothing(t *testing.T) {
	e := newEnv(t)
	tests := []struct {
		name   string
		mutate func(*Spec)
		want   error
	}{
		{"bad id", func(s *Spec) { s.ID = "../escape" }, ErrInvalidSpec},
		{"empty image", func(s *Spec) { s.Image = "" }, ErrInvalidSpec},
		{"empty lease", func(s *Spec) { s.LeaseID = "" }, ErrInvalidSpec},
		{"reserved env", func(s *Spec) { s.Env = []string{"NVIDIA_VISIBLE_DEVICES=all"} }, ErrInvalidSpec},
		{"unknown image", func(s *Spec) { s.Image = "localhost/gpuaas/missing:1" }, ErrImageNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := e.spec("true")
			tt.mutate(&s)
			if _, err := e.rt.Create(context.Background(), s); !errors.Is(err, tt.want) {
				t.Fatalf("create: %v, want %v", err, tt.want)
			}
		})
	}
	t.Run("runc refuses the task", func(t *testing.T) {
		// Passes validation, fails in runc create: the container and its
		// snapshot must be rolled back.
		s := e.spec("/no/such/binary")
		if _, err := e.rt.Create(context.Background(), s); err == nil {
			t.Fatal("create with a missing executable succeeded")
		}
		e.assertGone(s.ID, 0)
	})
	if list, err := e.rt.List(context.Background()); err != nil || len(list) != 0 {
		t.Errorf("rejected creates left containers: %+v, %v", list, err)
	}
	cs, err := e.raw.Containers(e.ctx)
	if err != nil || len(cs) != 0 {
		t.Errorf("containers in the namespace: %d, %v", len(cs), err)
	}
	if _, err := e.rt.Status(context.Background(), "nope"); !errors.Is(err, ErrNotFound) {
		t.Errorf("status of a missing container: %v, want ErrNotFound", err)
	}
	if _, err := e.rt.Start(context.Background(), "nope"); !errors.Is(err, ErrNotFound) {
		t.Errorf("start of a missing container: %v, want ErrNotFound", err)
	}
	if _, err := e.rt.Status(context.Background(), "a/b"); !errors.Is(err, ErrInvalidSpec) {
		t.Errorf("status of a malformed id: %v, want ErrInvalidSpec", err)
	}
}

func TestNewContainerdDetectsTheSnapshotter(t *testing.T) {
	e := newEnv(t)
	if got := e.rt.Snapshotter(); got != "overlayfs" && got != "native" {
		t.Errorf("snapshotter = %q", got)
	}
	t.Logf("snapshotter: %s", e.rt.Snapshotter())
	if _, err := NewContainerd(context.Background(), Config{Address: e.ctrd.Address(), Snapshotter: "no-such"}); err == nil {
		t.Error("a snapshotter containerd did not load must be an error")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	if _, err := NewContainerd(ctx, Config{Address: filepath.Join(t.TempDir(), "no.sock")}); err == nil {
		t.Error("connecting to a socket nobody serves must fail")
	}
}
