package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"

	"github.com/gpuaas/gpuaas/agent/runtime/logfile"
	"github.com/gpuaas/gpuaas/test/harness"
)

// TestDriverUnderContainerdShim runs a busybox container whose output the
// real containerd shim hands to the driver (cio.BinaryIO), and reads the
// rotated log back.
func TestDriverUnderContainerdShim(t *testing.T) {
	harness.RequireRoot(t, harness.ContainerdComponents...)
	ns := harness.UniqueID("logdriver")
	// Registered first, so it runs after containerd is closed.
	t.Cleanup(func() { _ = harness.RemoveNamespaceDirs(ns) })
	ctrd := harness.StartContainerdT(t, harness.Options{})
	bin := BuildDriver(t)

	cl, err := ctrd.NewClient(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), ns), time.Minute)
	defer cancel()
	img, snap := harness.ImportBusyboxT(t, ctx, cl, "localhost/gpuaas/busybox:logdriver")

	id := harness.UniqueID("logdriver")
	script := "i=0; while [ $i -lt 8000 ]; do echo \"out $i padding-padding-padding\"; echo \"err $i\" >&2; i=$((i+1)); done; echo done"
	ctr, err := cl.NewContainer(ctx, id, client.WithSnapshotter(snap), client.WithNewSnapshot(id, img),
		client.WithNewSpec(oci.WithImageConfig(img), oci.WithProcessArgs("sh", "-c", script)))
	if err != nil {
		t.Fatal(err)
	}
	defer ctr.Delete(context.WithoutCancel(ctx), client.WithSnapshotCleanup)

	path := filepath.Join(t.TempDir(), "logs", "l-aaaaaaaaaaaaaaaaaaaa.log")
	task, err := ctr.NewTask(ctx, cio.BinaryIO(bin, map[string]string{"--file": path, "--max-bytes": "262144", "--max-files": "2"}))
	if err != nil {
		t.Fatalf("new task through the log driver: %v", err)
	}
	defer task.Delete(context.WithoutCancel(ctx), client.WithProcessKill)
	// The shim waited for ready: the log exists before the task starts.
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("log not created at task creation: %v", err)
	}
	exited, err := task.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := task.Start(ctx); err != nil {
		t.Fatal(err)
	}
	st := <-exited
	if st.ExitCode() != 0 {
		t.Fatalf("container exit %d: %v", st.ExitCode(), st.Error())
	}
	// The driver reads both pipes on its own time: wait for the last line
	// of each.
	var data []byte
	for deadline := time.Now().Add(20 * time.Second); ; {
		data, _, err = logfile.Read(path, 0, 0)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(data), " stdout F done\n") && strings.Contains(string(data), " stderr F err 7999\n") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the log never got the last line; it ends %q", data[max(0, len(data)-200):])
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, err := os.Stat(path + ".1"); err != nil {
		t.Fatalf("no rotation: %v", err)
	}
	if _, err := os.Stat(path + ".2"); !os.IsNotExist(err) {
		t.Fatal("more than --max-files files kept")
	}
	sawErr := false
	for _, line := range strings.SplitAfter(strings.TrimSuffix(string(data), "\n"), "\n") {
		r, err := logfile.ParseRecord([]byte(line))
		if err != nil {
			t.Fatalf("line %q: %v", line, err)
		}
		if r.Stream == logfile.Stderr {
			sawErr = true
			if !strings.HasPrefix(string(r.Text), "err ") {
				t.Fatalf("stderr record %q", r.Text)
			}
		}
	}
	if !sawErr || !strings.Contains(string(data), " stderr F err 7999\n") || !strings.Contains(string(data), " stdout F out 7999 padding") {
		t.Fatal("the last lines of both streams are missing")
	}
}
