package isolation

import (
	"testing"

	"golang.org/x/sys/unix"
)

// gpuLease is a lease's device nodes as the runtime injects them: its GPU,
// nvidiactl, and its GI and CI access capabilities (read only, as the
// driver creates them).
type gpuLease struct {
	gpu, ctl, giCap, ciCap string
	rules                  []DeviceRule
}

// twoLeaseNodes makes driverless nodes for two leases on two GPUs: lease A
// has /dev/nvidia0 and caps 1, 2; lease B /dev/nvidia1 and caps 3, 4. Both
// share nvidiactl (195:255).
func twoLeaseNodes(t *testing.T) (a, b gpuLease) {
	dir := t.TempDir()
	caps := freeCharMajor(t)
	ctl := mknod(t, dir, "nvidiactl", 195, 255)
	a = gpuLease{
		gpu: mknod(t, dir, "nvidia0", 195, 0), ctl: ctl,
		giCap: mknod(t, dir, "nvidia-cap1", caps, 1), ciCap: mknod(t, dir, "nvidia-cap2", caps, 2),
		rules: []DeviceRule{CharDevice(195, 0, "rw"), CharDevice(195, 255, "rw"), CharDevice(caps, 1, "r"), CharDevice(caps, 2, "r")},
	}
	b = gpuLease{
		gpu: mknod(t, dir, "nvidia1", 195, 1), ctl: ctl,
		giCap: mknod(t, dir, "nvidia-cap3", caps, 3), ciCap: mknod(t, dir, "nvidia-cap4", caps, 4),
		rules: []DeviceRule{CharDevice(195, 1, "rw"), CharDevice(195, 255, "rw"), CharDevice(caps, 3, "r"), CharDevice(caps, 4, "r")},
	}
	return a, b
}

// TestDeviceFenceAllowsOnlyTheLeaseNodes proves the device program: a
// process in lease A's cgroup passes the cgroup check for its own GPU,
// nvidiactl and capability nodes (here ENXIO: no driver behind them) and
// opens /dev/null and /dev/urandom, and gets EPERM for lease B's GPU and capability nodes and for
// write access to its own read-only capability; a process outside any
// fence passes the check everywhere.
func TestDeviceFenceAllowsOnlyTheLeaseNodes(t *testing.T) {
	requireRoot(t)
	e := newEnforcer(t)
	a, b := twoLeaseNodes(t)
	cgA, cgB := newCgroup(t), newCgroup(t)
	if _, err := e.Fence("lease-a", cgA, Policy{Devices: a.rules}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Fence("lease-b", cgB, Policy{Devices: b.rules}); err != nil {
		t.Fatal(err)
	}
	ro, rw := unix.O_RDONLY, unix.O_RDWR
	ops := []childOp{
		openExact("/dev/null", rw), openExact("/dev/urandom", ro),
		openOp(a.gpu, rw), openOp(a.ctl, rw), openOp(a.giCap, ro), openOp(a.ciCap, ro),
		openOp(b.gpu, rw), openOp(b.giCap, ro), openOp(b.ciCap, ro),
		openOp(a.giCap, rw),
	}
	cases := []struct {
		name string
		cg   string
		want []string
	}{
		{"lease A", cgA, []string{"ok", "ok", "passed", "passed", "passed", "passed", "EPERM", "EPERM", "EPERM", "EPERM"}},
		{"lease B", cgB, []string{"ok", "ok", "EPERM", "passed", "EPERM", "EPERM", "passed", "passed", "passed", "EPERM"}},
		{"no fence", "", []string{"ok", "ok", "passed", "passed", "passed", "passed", "passed", "passed", "passed", "passed"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := runChild(t, c.cg, ops...)
			for i := range ops {
				if got[i] != c.want[i] {
					t.Errorf("%s: got %s, want %s", ops[i], got[i], c.want[i])
				}
			}
		})
	}
}
