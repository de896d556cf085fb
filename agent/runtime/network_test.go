package runtime

import (
	"bufio"
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	goruntime "runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/containerd/containerd/v2/client"

	"github.com/gpuaas/gpuaas/test/harness"
)

// gatewayListener accepts TCP connections on the bridge's gateway address
// and answers each with "pong"; the bridge exists once the first bridge
// container was created. port is reserved beforehand (see reservePort)
// so the container's command can name it.
type gatewayListener struct {
	ln       net.Listener
	mu       sync.Mutex
	accepted []netip.Addr
	done     chan struct{}
}

// reservePort returns a free TCP port, kept bound on the host's loopback
// until the test ends: the port the gateway listener will use, and a
// listener only the host's own network namespace can reach.
func reservePort(t *testing.T) (int, *gatewayListener) {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ln.Addr().(*net.TCPAddr).Port, serve(t, ln)
}

func serve(t *testing.T, ln net.Listener) *gatewayListener {
	g := &gatewayListener{ln: ln, done: make(chan struct{})}
	go func() {
		defer close(g.done)
		for {
			c, err := ln.Accept()
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if err != nil {
				continue
			}
			if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
				g.mu.Lock()
				g.accepted = append(g.accepted, a.AddrPort().Addr().Unmap())
				g.mu.Unlock()
			}
			_, _ = c.Write([]byte("pong\n"))
			c.Close()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-g.done
	})
	return g
}

func (g *gatewayListener) peers() []netip.Addr {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.accepted)
}

// listenOnGateway serves on the gateway's address at port.
func (e *env) listenOnGateway(port int) *gatewayListener {
	e.t.Helper()
	ln, err := net.Listen("tcp4", netip.AddrPortFrom(e.net.Gateway(), uint16(port)).String())
	if err != nil {
		e.t.Fatalf("listen on the gateway: %v", err)
	}
	return serve(e.t, ln)
}

// netnsInode is the inode of a network namespace file ("net:[N]").
func netnsInode(t *testing.T, path string) string {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatalf("stat %s: %v", path, err)
	}
	return "net:[" + strconv.FormatUint(st.Ino, 10) + "]"
}

// hostNetNS is the network namespace of the test process (the agent's:
// the host's).
func hostNetNS(t *testing.T) string {
	t.Helper()
	goruntime.LockOSThread()
	defer goruntime.UnlockOSThread()
	return netnsInode(t, "/proc/thread-self/ns/net")
}

// hostVeths are the interfaces attached to the bridge.
func (e *env) hostVeths() []string {
	ports, _ := os.ReadDir(filepath.Join("/sys/class/net", e.net.Bridge, "brif"))
	var out []string
	for _, p := range ports {
		out = append(out, p.Name())
	}
	return out
}

// assertNoNetworkLeft checks the bridge network holds nothing of any
// container: no veth, no namespace file, no address, no CNI cache entry,
// no NAT rule.
func (e *env) assertNoNetworkLeft(when string) {
	e.t.Helper()
	if left := e.net.Leftovers(); len(left) > 0 {
		e.t.Errorf("%s: network resources left: %q", when, left)
	}
}

const netProbe = `
echo "interfaces=$(ls /sys/class/net | tr '\n' ' ')"
echo "netns=$(readlink /proc/self/ns/net)"
echo "addr=$(ip -4 -o addr show dev eth0 2>&1 | awk '{print $4}')"
echo "route=$(ip route show default 2>&1 | awk '{print $3}')"
echo "lo=$(cat /sys/class/net/lo/operstate)"
echo "gateway=$(nc -w 5 $GATEWAY $PORT </dev/null 2>&1)"
`

// TestBridgeContainerHasItsOwnAttachedNamespace: a bridge-mode container
// runs in the network namespace the runtime created (not the host's),
// sees only lo and eth0, has an address on the agent's subnet (the one
// Status reports) with the bridge as its default route, and reaches a
// listener on the gateway. Stop leaves no namespace file, veth, address
// or NAT rule.
func TestBridgeContainerHasItsOwnAttachedNamespace(t *testing.T) {
	e := newNetEnv(t)
	port, _ := reservePort(t)
	s := e.spec("sh", "-c", netProbe+"echo END")
	s.Network = NetworkBridge
	s.Env = append(s.Env, "GATEWAY="+e.net.Gateway().String(), "PORT="+strconv.Itoa(port))

	created := e.create(s)
	if created.Network != NetworkBridge || !e.net.Subnet.Contains(created.IP) || created.IP == e.net.Gateway() {
		t.Fatalf("after create: network %s, ip %v; want bridge, an address in %s", created.Network, created.IP, e.net.Subnet)
	}
	nsPath := filepath.Join(e.net.RunDir, testNamespace, s.ID)
	nsInode := netnsInode(t, nsPath)
	if host := hostNetNS(t); host == nsInode {
		t.Fatalf("container namespace %s is the host's", nsInode)
	}
	if v := e.hostVeths(); len(v) != 1 {
		t.Errorf("veths on the bridge after create: %v, want one", v)
	}
	gw := e.listenOnGateway(port)
	e.start(s.ID)
	st := e.waitExit(s.ID)
	out := e.readLog(s.LogPath, "END")
	if st.ExitCode != 0 || st.IP != created.IP {
		t.Fatalf("exit status %+v (ip %v, want %v):\n%s", st, st.IP, created.IP, out)
	}
	r := parseProbe(out)
	r.expect(t, map[string]string{
		"interfaces": "eth0 lo ",
		"netns":      nsInode,
		"addr":       netip.PrefixFrom(created.IP, e.net.Subnet.Bits()).String(),
		"route":      e.net.Gateway().String(),
		"lo":         "unknown", // up: loopback has no carrier state
		"gateway":    "pong",
	})
	if peers := gw.peers(); !slices.Equal(peers, []netip.Addr{created.IP}) {
		t.Errorf("gateway listener saw %v, want one connection from %v", peers, created.IP)
	}

	// The leftover check sees a live attachment (so its silence after
	// Stop means something): veth, namespace file, address.
	kinds := map[string]bool{}
	for _, l := range e.net.Leftovers() {
		kind, _, _ := strings.Cut(l, " ")
		kinds[kind] = true
	}
	for _, k := range []string{"veth", "netns", "address"} {
		if !kinds[k] {
			t.Errorf("a running bridge container shows no %s in %q", k, e.net.Leftovers())
		}
	}
	// NAT to the outside: the subnet's traffic is masqueraded unless it
	// stays on the subnet (one rule set for the network).
	nat := strings.Join(e.net.NATRules(), "\n")
	for _, want := range []string{"-A POSTROUTING -s " + e.net.Subnet.String(), "-d " + e.net.Subnet.String(), "-j MASQUERADE"} {
		if !strings.Contains(nat, want) {
			t.Errorf("nat rules of the network lack %q:\n%s", want, nat)
		}
	}

	e.stop(s.ID, 0)
	e.assertGone(s.ID, 0)
	if _, err := os.Stat(nsPath); !os.IsNotExist(err) {
		t.Errorf("namespace file after stop: %v", err)
	}
	e.assertNoNetworkLeft("after stop")
}

func parseProbe(out string) probeResults {
	r := probeResults{}
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok && !strings.ContainsAny(k, " \t") {
			r[k] = append(r[k], v)
		}
	}
	return r
}

// TestNoneContainerHasLoopbackOnly: with a network configured, a
// NetworkNone container still gets a namespace of its own with only lo,
// and takes nothing from the bridge network.
func TestNoneContainerHasLoopbackOnly(t *testing.T) {
	e := newNetEnv(t)
	s := e.spec("sh", "-c", `echo "interfaces=$(ls /sys/class/net | tr '\n' ' ')"; echo "netns=$(readlink /proc/self/ns/net)"; echo END`)
	created := e.create(s)
	if created.Network != NetworkNone || created.IP.IsValid() {
		t.Fatalf("after create: network %s, ip %v; want none without an address", created.Network, created.IP)
	}
	e.assertNoNetworkLeft("none container created")
	e.start(s.ID)
	e.waitExit(s.ID)
	r := parseProbe(e.readLog(s.LogPath, "END"))
	r.expect(t, map[string]string{"interfaces": "lo "})
	if r.one("netns") == hostNetNS(t) {
		t.Errorf("container runs in the host's network namespace")
	}
	e.stop(s.ID, 0)
}

// TestBridgeNeedsAConfiguredNetwork: a runtime without a network refuses
// a bridge-mode container before creating anything.
func TestBridgeNeedsAConfiguredNetwork(t *testing.T) {
	e := newEnv(t)
	s := e.spec("true")
	s.Network = NetworkBridge
	if _, err := e.rt.Create(context.Background(), s); !errors.Is(err, ErrNetworkUnavailable) {
		t.Fatalf("create = %v, want ErrNetworkUnavailable", err)
	}
	if _, err := e.rt.Status(context.Background(), s.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("status after refused create: %v", err)
	}
}

// TestNetworkOfAContainerLostInACrashIsReleased: the agent crashes (its
// runtime is dropped without Stop) and the containers go behind its back:
// one deleted through containerd while its namespace file stays, one
// whose namespace file is gone too, as after a reboot (which empties
// /run but not the address allocations in the state directory). The
// restarted agent's sweep releases both addresses and leaves no veth,
// namespace file or NAT rule; a container that still exists keeps its
// network.
func TestNetworkOfAContainerLostInACrashIsReleased(t *testing.T) {
	e := newNetEnv(t)
	ctx := context.Background()
	var ids []string
	for range 3 {
		s := e.spec("sleep", "600")
		s.Network = NetworkBridge
		e.create(s)
		e.start(s.ID)
		ids = append(ids, s.ID)
	}
	deleted, rebooted, kept := ids[0], ids[1], ids[2]
	if n := len(e.hostVeths()); n != 3 {
		t.Fatalf("%d veths on the bridge, want 3", n)
	}
	// The crash: no Stop; the runtime's connection just goes.
	if err := e.rt.Close(); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{deleted, rebooted} {
		c, err := e.raw.LoadContainer(e.ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if task, err := c.Task(e.ctx, nil); err == nil {
			if _, err := task.Delete(e.ctx, client.WithProcessKill); err != nil {
				t.Fatal(err)
			}
		}
		if err := c.Delete(e.ctx, client.WithSnapshotCleanup); err != nil {
			t.Fatal(err)
		}
	}
	// The reboot: the namespace is gone with its veth, the file with /run.
	ns := filepath.Join(e.net.RunDir, testNamespace, rebooted)
	if err := syscall.Unmount(ns, syscall.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(ns); err != nil {
		t.Fatal(err)
	}

	rt := e.connect()
	gone, err := rt.SweepNetwork(ctx)
	if err != nil {
		t.Fatalf("sweep: %v", err)
	}
	slices.Sort(gone)
	want := []string{deleted, rebooted}
	slices.Sort(want)
	if !slices.Equal(gone, want) {
		t.Errorf("sweep released %v, want %v", gone, want)
	}
	keptSt, err := rt.Status(ctx, kept)
	if err != nil || keptSt.State != StateRunning || !keptSt.IP.IsValid() {
		t.Fatalf("surviving container: %+v, %v", keptSt, err)
	}
	if v := e.hostVeths(); len(v) != 1 {
		t.Errorf("veths on the bridge after the sweep: %v, want the survivor's only", v)
	}
	if again, err := rt.SweepNetwork(ctx); err != nil || len(again) != 0 {
		t.Errorf("second sweep = %v, %v; want nothing to do", again, err)
	}
	if err := rt.Stop(ctx, kept, 0); err != nil {
		t.Fatal(err)
	}
	e.assertNoNetworkLeft("after the sweep and the survivor's stop")
}

// TestAdoptFinishesAHalfCreatedBridgeContainer: a crash after the
// container record but before its network and task leaves a container
// Create must finish (attach, task) rather than run without a network.
func TestAdoptFinishesAHalfCreatedBridgeContainer(t *testing.T) {
	e := newNetEnv(t)
	s := e.spec("sleep", "600")
	s.Network = NetworkBridge
	first := e.create(s)
	// Undo the network and task behind the runtime's back, as if Create
	// had stopped right after the container record.
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
	if err := e.rt.net.teardown(context.Background(), s.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := c.SetLabels(e.ctx, map[string]string{LabelIP: ""}); err != nil {
		t.Fatal(err)
	}

	again := e.create(s)
	if again.State != StateCreated || !again.IP.IsValid() || !e.net.Subnet.Contains(again.IP) {
		t.Fatalf("re-create: %+v (first ip %v)", again, first.IP)
	}
	if v := e.hostVeths(); len(v) != 1 {
		t.Errorf("veths after re-create: %v", v)
	}
	e.stop(s.ID, 0)
	e.assertNoNetworkLeft("after stop")
}

// TestNetworkConfigValidate rejects what would break or collide.
func TestNetworkConfigValidate(t *testing.T) {
	pluginDir, err := harness.CNIPluginDir()
	harness.Require(t, err)
	good := NetworkConfig{PluginDirs: []string{pluginDir}, StateDir: "/var/lib/gpuaas-agent/network"}
	if err := good.Validate(); err != nil {
		t.Fatalf("defaults: %v", err)
	}
	for name, mut := range map[string]func(*NetworkConfig){
		"long bridge name":    func(c *NetworkConfig) { c.Bridge = "a-very-long-bridge" },
		"bridge name slash":   func(c *NetworkConfig) { c.Bridge = "br/0" },
		"ipv6 subnet":         func(c *NetworkConfig) { c.Subnet = netip.MustParsePrefix("fd00::/64") },
		"tiny subnet":         func(c *NetworkConfig) { c.Subnet = netip.MustParsePrefix("10.1.2.0/30") },
		"host bits":           func(c *NetworkConfig) { c.Subnet = netip.MustParsePrefix("10.1.2.3/24") },
		"relative run dir":    func(c *NetworkConfig) { c.RunDir = "run/netns" },
		"no state dir":        func(c *NetworkConfig) { c.StateDir = "" },
		"relative plugin dir": func(c *NetworkConfig) { c.PluginDirs = []string{"cni"} },
	} {
		c := good
		mut(&c)
		if err := c.Validate(); err == nil {
			t.Errorf("%s: Validate accepted %+v", name, c)
		}
	}
	if err := good.checkHost(); err != nil {
		t.Errorf("plugins in %s: %v", pluginDir, err)
	}
	empty := NetworkConfig{PluginDirs: []string{t.TempDir()}, StateDir: good.StateDir}
	if err := empty.checkHost(); !errors.Is(err, ErrNetworkUnavailable) || !strings.Contains(err.Error(), "bridge") {
		t.Errorf("no plugins: %v, want ErrNetworkUnavailable naming the bridge plugin", err)
	}
}

// The harness names the network as the runtime does, so its leftover
// checks look in the right place.
func TestHarnessNetworkNameMatches(t *testing.T) {
	n := &harness.Network{Bridge: "gptabc"}
	if n.NetworkName() != NetworkName(n.Bridge) {
		t.Fatalf("harness %q, runtime %q", n.NetworkName(), NetworkName(n.Bridge))
	}
}
