package runtime

import (
	"bufio"
	"context"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"

	"github.com/gpuaas/gpuaas/test/harness"
)

// residue is what containerd, the shims and runc hold for the test
// namespace at one moment, by kind, each a sorted list of names.
type residue map[string][]string

// residue records the namespace's containers, tasks, snapshots and leases
// as containerd reports them, and what the shims left on disk: the task
// bundles under the state and root directories.
func (e *env) residue() residue {
	e.t.Helper()
	r := residue{}
	cs, err := e.raw.Containers(e.ctx)
	if err != nil {
		e.t.Fatalf("list containers: %v", err)
	}
	for _, c := range cs {
		r["container"] = append(r["container"], c.ID())
	}
	// A nil request is the empty one: every task of the namespace.
	tasks, err := e.raw.TaskService().List(e.ctx, nil)
	if err != nil {
		e.t.Fatalf("list tasks: %v", err)
	}
	for _, tk := range tasks.Tasks {
		r["task"] = append(r["task"], tk.ID)
	}
	err = e.raw.SnapshotService(e.rt.Snapshotter()).Walk(e.ctx, func(_ context.Context, info snapshots.Info) error {
		r["snapshot"] = append(r["snapshot"], fmt.Sprintf("%s (%s)", info.Name, info.Kind))
		return nil
	})
	if err != nil {
		e.t.Fatalf("walk snapshots: %v", err)
	}
	ls, err := e.raw.LeasesService().List(e.ctx)
	if err != nil {
		e.t.Fatalf("list leases: %v", err)
	}
	for _, l := range ls {
		r["lease"] = append(r["lease"], l.ID)
	}
	for _, base := range []string{"state", "root"} {
		dir := filepath.Join(e.ctrd.Dir(), base, "io.containerd.runtime.v2.task", testNamespace)
		err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if os.IsNotExist(err) && p == dir {
				return nil
			}
			if err != nil {
				return err
			}
			if p != dir {
				r["bundle"] = append(r["bundle"], fmt.Sprintf("%s (%s)", p, d.Type()))
			}
			return nil
		})
		if err != nil {
			e.t.Fatalf("walk %s: %v", dir, err)
		}
	}
	for _, v := range r {
		slices.Sort(v)
	}
	return r
}

// added returns, by kind, what after holds that before did not.
func (before residue) added(after residue) residue {
	out := residue{}
	for kind, names := range after {
		for _, n := range names {
			if !slices.Contains(before[kind], n) {
				out[kind] = append(out[kind], n)
			}
		}
	}
	return out
}

// hostLeftovers returns what the host still holds for the containers:
// runc state directories, cgroups (every hierarchy on a hybrid host), and
// mounts whose source or mount point names a container or lies below
// containerd's directory.
func (e *env) hostLeftovers(ids []string) []string {
	e.t.Helper()
	var left []string
	for _, id := range ids {
		state := filepath.Join("/run/containerd/runc", testNamespace, id)
		if _, err := os.Stat(state); err == nil {
			left = append(left, "runc state "+state)
		}
		for _, d := range harness.CgroupDirs(CgroupsPath(testNamespace, id)) {
			left = append(left, "cgroup "+d)
		}
	}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		e.t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		fields := strings.Fields(line)
		if len(fields) >= 5 && strings.HasPrefix(fields[4], e.ctrd.Dir()+"/") {
			left = append(left, "mount "+line)
			continue
		}
		for _, id := range ids {
			if strings.Contains(line, id) {
				left = append(left, "mount "+line)
				break
			}
		}
	}
	if err := sc.Err(); err != nil {
		e.t.Fatalf("read mountinfo: %v", err)
	}
	return left
}

// shimPids returns the pids of the shims serving this test's containerd.
func (e *env) shimPids() []int {
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, ent := range entries {
		pid, err := strconv.Atoi(ent.Name())
		if err != nil {
			continue
		}
		raw, err := os.ReadFile(filepath.Join("/proc", ent.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(strings.TrimRight(string(raw), "\x00"), "\x00")
		if !strings.Contains(filepath.Base(args[0]), "containerd-shim") {
			continue
		}
		if i := slices.Index(args, "-address"); i >= 0 && i+1 < len(args) && args[i+1] == e.ctrd.Address() {
			pids = append(pids, pid)
		}
	}
	return pids
}

// TestLeaseCyclesLeaveNothingBehind: a lease's life on the node is
// Create, Start, Stop, and an agent runs thousands; any per-cycle leak (a
// snapshot, a containerd lease, a shim, a bundle, runc state, a cgroup, a
// mount, a network namespace, a veth, an address, a NAT rule) would grow
// without bound. After many cycles, two in three on the bridge network,
// the namespace and the host hold exactly what they held before the
// first.
func TestLeaseCyclesLeaveNothingBehind(t *testing.T) {
	cycles := 200
	if testing.Short() {
		cycles = 20
	}
	e := newNetEnv(t)
	// The image's layers stay unpacked between leases: unpack them before
	// the baseline so that what remains is only what cycles left.
	img, err := e.raw.GetImage(e.ctx, testImage)
	if err != nil {
		t.Fatal(err)
	}
	if err := img.Unpack(e.ctx, e.rt.Snapshotter()); err != nil {
		t.Fatalf("unpack: %v", err)
	}
	before := e.residue()
	logDir := t.TempDir()

	ctx := context.Background()
	ids := make([]string, 0, cycles)
	begin := time.Now()
	for i := range cycles {
		id := harness.UniqueID("cycle")
		ids = append(ids, id)
		s := Spec{
			ID: id, LeaseID: id, Tenant: "tenant-a", Image: testImage, Args: []string{"true"},
			LogPath: filepath.Join(logDir, id+".log"),
			Device:  tenantPartition(),
		}
		if i%3 != 2 {
			s.Network = NetworkBridge
		}
		if _, err := e.rt.Create(ctx, s); err != nil {
			t.Fatalf("cycle %d: create: %v", i, err)
		}
		if _, err := e.rt.Start(ctx, id); err != nil {
			t.Fatalf("cycle %d: start: %v", i, err)
		}
		// Both ways a lease ends: killed at once, and given a grace period
		// (which `true` may or may not have exited within).
		grace := time.Duration(i%2) * 50 * time.Millisecond
		if err := e.rt.Stop(ctx, id, grace); err != nil {
			t.Fatalf("cycle %d: stop: %v", i, err)
		}
	}
	took := time.Since(begin)
	t.Logf("%d cycles in %v (%v per cycle)", cycles, took, took/time.Duration(cycles))

	if added := before.added(e.residue()); len(added) > 0 {
		for _, kind := range slices.Sorted(maps.Keys(added)) {
			names := added[kind]
			t.Errorf("%d %s(s) left after %d cycles, e.g. %q", len(names), kind, cycles, names[:min(len(names), 5)])
		}
	}
	if left := e.hostLeftovers(ids); len(left) > 0 {
		t.Errorf("%d host resource(s) left after %d cycles, e.g. %q", len(left), cycles, left[:min(len(left), 5)])
	}
	// Network namespace files, veths on the bridge, host-local address
	// files, CNI result caches and per-container NAT rules.
	if left := e.net.Leftovers(); len(left) > 0 {
		t.Errorf("%d network resource(s) left after %d cycles, e.g. %q", len(left), cycles, left[:min(len(left), 5)])
	}
	// A shim exits shortly after its last task is deleted.
	deadline := time.Now().Add(3 * time.Second)
	shims := e.shimPids()
	for len(shims) > 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
		shims = e.shimPids()
	}
	if len(shims) > 0 {
		t.Errorf("%d shim(s) outlived their tasks by 3s: pids %v", len(shims), shims)
	}
}
