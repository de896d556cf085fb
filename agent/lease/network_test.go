package lease

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"

	"github.com/gpuaas/gpuaas/agent/isolation"
	"github.com/gpuaas/gpuaas/pkg/mig"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	"github.com/gpuaas/gpuaas/test/harness"
)

// hostListener accepts TCP connections on every host address and answers
// "pong"; the bridge's gateway is one of them once a lease made the bridge.
func hostListener(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp4", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if err == nil {
				_, _ = c.Write([]byte("pong\n"))
				c.Close()
			}
		}
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	return ln.Addr().(*net.TCPAddr).Port
}

// connectProbe is a workload that connects to $GW:$PORT once and prints
// connect=<nc's output>.
var connectProbe = []string{"sh", "-c", `echo "connect=$(nc -w 3 $GW $PORT </dev/null 2>&1)"; echo END`}

func (r *rig) leaseLog(id string) string {
	r.t.Helper()
	var out string
	r.waitFor("the workload's log", func() (bool, string) {
		b, _ := os.ReadFile(filepath.Join(r.logDir, id+".log"))
		out = string(b)
		return strings.Contains(out, "END"), out
	})
	return out
}

// newFencer is a real eBPF enforcer with a pin root of the test's own.
func newFencer(t *testing.T, log *slog.Logger) *isolation.Enforcer {
	t.Helper()
	harness.RequireRoot(t)
	pin := filepath.Join(isolation.DefaultBPFFS, "gpuaas-lease-"+strings.ToLower(harness.UniqueID("t")))
	enf, err := isolation.NewEnforcer(isolation.Config{PinRoot: pin, Logger: log})
	harness.Require(t, err)
	t.Cleanup(func() {
		enf.Close()
		os.RemoveAll(pin)
	})
	return enf
}

// TestBridgeLeaseIsFencedInItsOwnNamespace: leases get their own network
// namespace on the node's bridge (bridge is the default) and report their
// address; the eBPF egress fence, attached to the container's cgroup,
// still decides what a connect from that namespace may reach: the
// gateway (a private address, on the base deny list) is refused with
// EPERM unless the lease's egress_allow names it. A lease asking for no
// network has loopback only and no address: even allowed, the gateway is
// unreachable from it.
func TestBridgeLeaseIsFencedInItsOwnNamespace(t *testing.T) {
	r := newRig(t)
	opts := r.options()
	opts.Fencer = newFencer(t, opts.Logger)
	opts.BaseDeny = isolation.DefaultDenyPrefixes()
	ex := &running{Executor: New(opts), done: make(chan error, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	ex.cancel = cancel
	go func() { ex.done <- ex.Run(ctx) }()
	t.Cleanup(func() { ex.stop(t) })

	port := hostListener(t)
	gw := r.net.Gateway().String()
	env := map[string]string{"GW": gw, "PORT": strconv.Itoa(port)}
	fenced := r.lease(mig.Profile1g, at(0, 1), connectProbe...)
	fenced.Spec.Workload.Env = env
	allowed := r.lease(mig.Profile1g, at(1, 1), connectProbe...)
	allowed.Spec.Workload.Env = env
	allowed.Spec.Workload.EgressAllow = []string{gw + "/32"}
	allowed.Spec.Workload.Network = leasev1.NetworkMode_NETWORK_MODE_BRIDGE
	none := r.lease(mig.Profile1g, at(2, 1), connectProbe...)
	none.Spec.Workload.Env = env
	none.Spec.Workload.Network = leasev1.NetworkMode_NETWORK_MODE_NONE
	none.Spec.Workload.EgressAllow = []string{gw + "/32"} // allowed, but no route
	r.desire(ex, fenced, allowed, none)

	want := map[string]string{
		fenced.GetId():  "connect=nc: can't connect to remote host (" + gw + "): Operation not permitted",
		allowed.GetId(): "connect=pong",
		none.GetId():    "connect=nc: can't connect to remote host (" + gw + "): Network is unreachable",
	}
	for id, line := range want {
		rec := r.waitPhase(id, leasev1.Phase_PHASE_TERMINATED)
		if out := r.leaseLog(id); !strings.Contains(out, line+"\n") {
			t.Errorf("lease %s: log %q, want the line %q", id, out, line)
		}
		_, ol := observed(t, ex.Executor, id)
		ip := ol.GetStatus().GetIp()
		if id == none.GetId() {
			if ip != "" || rec.IP != "" {
				t.Errorf("lease without network reports address %q", ip)
			}
			continue
		}
		if a, err := netip.ParseAddr(ip); err != nil || !r.net.Subnet.Contains(a) || a == r.net.Gateway() {
			t.Errorf("lease %s reports address %q, want one in %s", id, ip, r.net.Subnet)
		}
	}
	if left := r.net.Leftovers(); len(left) > 0 {
		t.Errorf("network resources left after the leases ended: %q", left)
	}
}

// TestRestartedAgentReleasesTheNetworkOfAVanishedContainer: the agent
// dies; meanwhile the container of its running lease is deleted behind its
// back (its namespace file, veth and address stay). The restarted agent's
// sweep releases the network along with failing the lease.
func TestRestartedAgentReleasesTheNetworkOfAVanishedContainer(t *testing.T) {
	r := newRig(t)
	ex := r.start()
	l := r.lease(mig.Profile1g, at(3, 1), sleeper...)
	r.desire(ex, l)
	rec := r.waitPhase(l.GetId(), leasev1.Phase_PHASE_RUNNING)
	if rec.IP == "" {
		t.Fatalf("running bridge lease has no address: %+v", rec)
	}
	ex.stop(t) // the crash: nothing is stopped
	ctx := namespaces.WithNamespace(context.Background(), testNamespace)

	raw, err := client.New(r.address, client.WithDefaultNamespace(testNamespace))
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	c, err := raw.LoadContainer(ctx, ContainerID(l.GetId()))
	if err != nil {
		t.Fatal(err)
	}
	if task, err := c.Task(ctx, nil); err == nil {
		if _, err := task.Delete(ctx, client.WithProcessKill); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Delete(ctx, client.WithSnapshotCleanup); err != nil {
		t.Fatal(err)
	}
	if len(r.net.Leftovers()) == 0 {
		t.Fatal("deleting the container behind the agent's back released its network: nothing to prove")
	}

	// While the agent is down the lease is cancelled: the restarted
	// agent's first sweep, not a re-created container, meets the leftovers.
	r.gen++
	if _, err := r.journal.SetDesired(r.gen, nil); err != nil {
		t.Fatal(err)
	}
	r.journal.Close()
	r.journal, r.rt = r.openJournal(), r.connect()
	ex = r.start()
	r.waitPhase(l.GetId(), leasev1.Phase_PHASE_TERMINATED)
	if n := r.logs.count("released the network of a container that is gone", ContainerID(l.GetId())); n != 1 {
		t.Errorf("the restarted agent's sweep released the vanished container's network %d times, want once", n)
	}
	if left := r.net.Leftovers(); len(left) > 0 {
		t.Errorf("network resources left: %q", left)
	}
	ex.stop(t)
}
