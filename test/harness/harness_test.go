package harness

import (
	"context"
	"errors"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"

	"github.com/gpuaas/gpuaas/test/ociimage"
)

func TestCgroupV2RootHasControllersFile(t *testing.T) {
	root, err := CgroupV2Root()
	if errors.Is(err, ErrNoCgroupV2) {
		Require(t, err)
	}
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "cgroup.controllers")); err != nil {
		t.Fatalf("%s is not a cgroup2 root: %v", root, err)
	}
	if CgroupHybrid() != (root == "/sys/fs/cgroup/unified") {
		t.Errorf("CgroupHybrid() = %v with root %s", CgroupHybrid(), root)
	}
}

func TestRequireFailsOnlyInCI(t *testing.T) {
	t.Setenv("CI", "true")
	if !InCI() {
		t.Fatal("CI=true not detected")
	}
	t.Setenv("CI", "")
	if InCI() {
		t.Fatal("empty CI detected as CI")
	}
	if err := CheckRoot("no-such-binary-gpuaas"); err == nil || !strings.Contains(err.Error(), "no-such-binary-gpuaas") {
		t.Errorf("CheckRoot with a missing binary = %v, want it named", err)
	}
}

func TestStartContainerdAnswersAndCloseRemovesEverything(t *testing.T) {
	RequireRoot(t)
	ctx := context.Background()
	c, err := StartContainerd(ctx, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("containerd answered after %v", c.StartDuration())
	if !filepath.IsAbs(c.Address()) || len(c.Address()) >= 100 {
		t.Errorf("address %q must be absolute and short", c.Address())
	}
	cl, err := c.NewClient("harness-test")
	if err != nil {
		t.Fatal(err)
	}
	v, err := cl.Version(ctx)
	cl.Close()
	if err != nil || v.Version == "" {
		t.Fatalf("version: %+v, %v", v, err)
	}
	if _, err := os.Stat(c.LogPath()); err != nil {
		t.Errorf("no log: %v", err)
	}
	dir := c.Dir()
	if err := c.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
	if c.cmd.ProcessState == nil {
		t.Error("containerd still running after Close")
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s not removed: %v", dir, err)
	}
}

func TestStartContainerdMovesSocketsOutOfALongDir(t *testing.T) {
	RequireRoot(t)
	long := filepath.Join(t.TempDir(), strings.Repeat("d", 60), strings.Repeat("e", 60))
	c := StartContainerdT(t, Options{Dir: long})
	if len(c.Address()) >= 100 || strings.HasPrefix(c.Address(), long) {
		t.Errorf("socket %q should be in a short directory", c.Address())
	}
	if !strings.HasPrefix(c.LogPath(), long) {
		t.Errorf("log %q should stay in Dir", c.LogPath())
	}
}

func TestStartContainerdReportsADaemonThatDies(t *testing.T) {
	RequireRoot(t)
	start := time.Now()
	_, err := StartContainerd(context.Background(), Options{Binary: "/bin/false"})
	if err == nil {
		t.Fatal("want an error")
	}
	if time.Since(start) > 5*time.Second {
		t.Errorf("took %v to notice the daemon exited", time.Since(start))
	}
}

func TestCloseKillsRunningContainers(t *testing.T) {
	RequireRoot(t)
	archive, _ := BusyboxArchiveT(t, ociimage.Options{})
	ctx := context.Background()
	c, err := StartContainerd(ctx, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	const ns = "harness-test"
	id := UniqueID("sleeper")
	cl, err := c.NewClient(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	nctx := namespaces.WithNamespace(ctx, ns)
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	imgs, err := cl.Import(nctx, f)
	f.Close()
	if err != nil || len(imgs) != 1 {
		t.Fatalf("import: %v, %v", imgs, err)
	}
	img := client.NewImage(cl, imgs[0])
	if err := img.Unpack(nctx, ""); err != nil {
		t.Fatal(err)
	}
	ctr, err := cl.NewContainer(nctx, id,
		client.WithNewSnapshot(id, img),
		client.WithNewSpec(oci.WithImageConfig(img), oci.WithProcessArgs("sleep", "1000")))
	if err != nil {
		t.Fatal(err)
	}
	task, err := ctr.NewTask(nctx, cio.NullIO)
	if err != nil {
		t.Fatal(err)
	}
	if err := task.Start(nctx); err != nil {
		t.Fatal(err)
	}
	pid := task.Pid()
	if pids := c.shimPids(); len(pids) == 0 {
		t.Fatal("no shim found for a running task")
	}
	cgroups := CgroupDirs(path.Join("/", ns, id))
	if len(cgroups) == 0 {
		t.Fatal("no cgroup for a running task")
	}

	dir := c.Dir()
	if err := c.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	if _, err := os.Stat(filepath.Join("/proc", strconv.Itoa(int(pid)))); err == nil {
		t.Errorf("container process %d survived Close", pid)
	}
	if pids := c.shimPids(); len(pids) != 0 {
		t.Errorf("shims survived Close: %v", pids)
	}
	for _, d := range cgroups {
		if _, err := os.Stat(d); err == nil {
			t.Errorf("cgroup %s survived Close", d)
		}
	}
	if _, err := os.Stat(filepath.Join(runcRoot, ns, id)); err == nil {
		t.Error("runc state survived Close")
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s not removed: %v", dir, err)
	}
}
