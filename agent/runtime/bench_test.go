package runtime

// Latency benchmarks of the lease path on a real containerd with the
// busybox image already unpacked (the cached-image case): how long a
// lease waits for its container to run, and for it to be gone. They
// report percentiles per container (p50-ms, p99-ms) rather than ns/op,
// which would be the time of a whole batch. Every container is on the
// bridge network, as a lease is by default: its times include creating
// and attaching the network namespace (CNI bridge, host-local, portmap,
// loopback) and, for stop, detaching it. Targets: create->running p99
// under 1 s; stop->deleted under 1 s beyond the process's own exit.
//
//	go test -run '^$' -bench 'CreateToRunning|StopToDeleted' -benchtime 1x ./agent/runtime/

import (
	"context"
	"errors"
	"fmt"
	"math"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/test/harness"
	"github.com/gpuaas/gpuaas/test/ociimage"
)

const (
	// benchSequential is how many containers the sequential case creates
	// one after another per iteration.
	benchSequential = 50
	// benchConcurrent is one GPU fully partitioned: seven 1g instances,
	// each leased at the same moment.
	benchConcurrent = 7
	// benchTarget is the latency target for both paths.
	benchTarget = time.Second
)

// benchEnv is one benchmark's containerd and runtime, with the image
// imported and unpacked; the benchmark's cleanups remove everything.
type benchEnv struct {
	b   *testing.B
	rt  *Containerd
	dir string
}

func newBenchEnv(b *testing.B) *benchEnv {
	b.Helper()
	harness.RequireRoot(b)
	n := harness.NetworkT(b)
	ctrd := harness.StartContainerdT(b, harness.Options{})
	rt, err := NewContainerd(context.Background(), Config{Address: ctrd.Address(), Namespace: testNamespace,
		Network: &NetworkConfig{PluginDirs: []string{n.PluginDir}, Bridge: n.Bridge, Subnet: n.Subnet, RunDir: n.RunDir, StateDir: n.StateDir}})
	if err != nil {
		b.Fatalf("new runtime: %v", err)
	}
	b.Cleanup(func() {
		if err := rt.Close(); err != nil {
			b.Errorf("close runtime: %v", err)
		}
	})
	archive, _ := harness.BusyboxArchiveT(b, ociimage.Options{Name: testImage})
	if names, err := rt.ImportArchive(context.Background(), archive); err != nil || !slices.Equal(names, []string{testImage}) {
		b.Fatalf("import: %v, %v", names, err)
	}
	e := &benchEnv{b: b, rt: rt, dir: b.TempDir()}
	// Unpack the image once, so every measured Create finds it cached.
	s := e.spec("true")
	if _, err := rt.Create(context.Background(), s); err != nil {
		b.Fatalf("warm-up create: %v", err)
	}
	e.stop(s.ID, 0)
	return e
}

// spec is a tenant container bound to the simulated partition of
// tenantPartition (195:0, 195:255, 510:0, 511:21, 511:22), with the
// hardened spec Create always applies and a log file, as a lease has.
func (e *benchEnv) spec(args ...string) Spec {
	return e.specIn(NetworkBridge, args...)
}

// specIn is spec in the network mode.
func (e *benchEnv) specIn(mode NetworkMode, args ...string) Spec {
	id := harness.UniqueID("bench")
	return Spec{
		ID: id, LeaseID: id, Tenant: "tenant-bench", Image: testImage, Args: args,
		LogPath: filepath.Join(e.dir, "logs", id+".log"),
		Device:  tenantPartition(),
		Network: mode,
	}
}

// createToRunning creates and starts s and returns how long it took until
// Status says running.
func (e *benchEnv) createToRunning(s Spec) (time.Duration, error) {
	ctx := context.Background()
	begin := time.Now()
	if _, err := e.rt.Create(ctx, s); err != nil {
		return 0, err
	}
	st, err := e.rt.Start(ctx, s.ID)
	for err == nil && st.State != StateRunning {
		if st.State != StateCreated {
			return 0, fmt.Errorf("container %s is %s, want running", s.ID, st.State)
		}
		time.Sleep(time.Millisecond)
		st, err = e.rt.Status(ctx, s.ID)
	}
	if err != nil {
		return 0, err
	}
	return time.Since(begin), nil
}

func (e *benchEnv) stop(id string, grace time.Duration) {
	e.b.Helper()
	if err := e.rt.Stop(context.Background(), id, grace); err != nil {
		e.b.Fatalf("stop %s: %v", id, err)
	}
}

// stopAll removes the containers concurrently, as a GPU's leases ending
// together would be.
func (e *benchEnv) stopAll(ids []string) {
	e.b.Helper()
	errs := make([]error, len(ids))
	var wg sync.WaitGroup
	for i, id := range ids {
		wg.Go(func() { errs[i] = e.rt.Stop(context.Background(), id, 0) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		e.b.Fatalf("stop: %v", err)
	}
}

// percentile is the nearest-rank p-th percentile of sorted, ascending.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	return sorted[max(i, 0)]
}

// reportLatencies reports p50-ms and p99-ms of ds in place of ns/op, and
// logs them against the target.
func reportLatencies(b *testing.B, what string, ds []time.Duration) {
	b.Helper()
	slices.Sort(ds)
	p50, p99 := percentile(ds, 50), percentile(ds, 99)
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(ms(p50), "p50-ms")
	b.ReportMetric(ms(p99), "p99-ms")
	b.Logf("%s over %d containers: p50 %v, p99 %v, max %v (target p99 < %v)", what, len(ds), p50, p99, ds[len(ds)-1], benchTarget)
	if p99 >= benchTarget {
		b.Logf("%s: p99 %v misses the %v target", what, p99, benchTarget)
	}
}

// BenchmarkCreateToRunning: from the Create call to a running task (Create,
// Start, Status running) of a hardened `sleep 60` container bound to a
// partition, on the bridge network; removal is not timed. The
// sequential-N-none case is the same without a network (loopback only),
// measured in the same run: the difference is what the network costs on
// the machine as loaded at that moment.
func BenchmarkCreateToRunning(b *testing.B) {
	e := newBenchEnv(b)

	for _, mode := range []NetworkMode{NetworkBridge, NetworkNone} {
		name := fmt.Sprintf("sequential-%d", benchSequential)
		if mode == NetworkNone {
			name += "-none"
		}
		b.Run(name, func(b *testing.B) { e.sequential(b, mode) })
	}
	e.concurrent(b, NetworkBridge)
	e.concurrent(b, NetworkNone)
}

func (e *benchEnv) sequential(b *testing.B, mode NetworkMode) {
	{
		var ds []time.Duration
		for b.Loop() {
			ids := make([]string, 0, benchSequential)
			for range benchSequential {
				s := e.specIn(mode, "sleep", "60")
				d, err := e.createToRunning(s)
				ids = append(ids, s.ID)
				if err != nil {
					b.Fatalf("create to running: %v", err)
				}
				ds = append(ds, d)
			}
			b.StopTimer()
			e.stopAll(ids)
			b.StartTimer()
		}
		reportLatencies(b, "create->running, sequential, network "+mode.String(), ds)
	}
}

func (e *benchEnv) concurrent(b *testing.B, mode NetworkMode) {
	name := fmt.Sprintf("concurrent-%d", benchConcurrent)
	if mode == NetworkNone {
		name += "-none"
	}
	b.Run(name, func(b *testing.B) {
		var ds []time.Duration
		for b.Loop() {
			specs := make([]Spec, benchConcurrent)
			ids := make([]string, benchConcurrent)
			for i := range specs {
				specs[i] = e.specIn(mode, "sleep", "60")
				ids[i] = specs[i].ID
			}
			got := make([]time.Duration, benchConcurrent)
			errs := make([]error, benchConcurrent)
			ready := make(chan struct{})
			var wg sync.WaitGroup
			for i, s := range specs {
				wg.Go(func() {
					<-ready
					got[i], errs[i] = e.createToRunning(s)
				})
			}
			close(ready)
			wg.Wait()
			b.StopTimer()
			e.stopAll(ids)
			if err := errors.Join(errs...); err != nil {
				b.Fatalf("create to running: %v", err)
			}
			ds = append(ds, got...)
			b.StartTimer()
		}
		reportLatencies(b, "create->running, 7 concurrent, network "+mode.String(), ds)
	})
}

// BenchmarkStopToDeleted: from the Stop call to its return (task and
// container deleted) for a process that exits on SIGTERM. The process
// polls in 0.1 s steps, so up to 0.1 s of each figure is the shell
// finishing its sleep before the trap runs.
func BenchmarkStopToDeleted(b *testing.B) {
	e := newBenchEnv(b)
	const grace = 10 * time.Second
	var ds []time.Duration
	for b.Loop() {
		for range benchSequential {
			b.StopTimer()
			s := e.spec("sh", "-c", `trap "exit 0" TERM; while true; do sleep 0.1; done`)
			if _, err := e.createToRunning(s); err != nil {
				b.Fatalf("create to running: %v", err)
			}
			time.Sleep(50 * time.Millisecond) // let the shell install its trap
			b.StartTimer()

			begin := time.Now()
			e.stop(s.ID, grace)
			d := time.Since(begin)

			b.StopTimer()
			if d >= grace {
				b.Fatalf("stop of %s took %v: the process did not exit on SIGTERM", s.ID, d)
			}
			if _, err := e.rt.Status(context.Background(), s.ID); !errors.Is(err, ErrNotFound) {
				b.Fatalf("status after stop: %v, want ErrNotFound", err)
			}
			ds = append(ds, d)
			b.StartTimer()
		}
	}
	reportLatencies(b, "stop->deleted", ds)
}
