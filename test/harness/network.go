package harness

import (
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
)

// CNIPlugins are the CNI plugins the agent's bridge networking runs.
var CNIPlugins = []string{"bridge", "host-local", "portmap"}

// cniPluginDirs are where Debian's containernetworking-plugins and the
// upstream release put the plugins.
var cniPluginDirs = []string{"/usr/lib/cni", "/opt/cni/bin"}

// CNIPluginDir returns the first directory holding every plugin in
// CNIPlugins.
func CNIPluginDir() (string, error) {
	for _, d := range cniPluginDirs {
		ok := true
		for _, p := range CNIPlugins {
			if fi, err := os.Stat(filepath.Join(d, p)); err != nil || fi.Mode().Perm()&0o111 == 0 {
				ok = false
				break
			}
		}
		if ok {
			return d, nil
		}
	}
	return "", fmt.Errorf("CNI plugins %v not found in %v (Debian: containernetworking-plugins)", CNIPlugins, cniPluginDirs)
}

// CheckNetwork returns nil when a bridge network can be built here: root,
// the CNI plugins, iptables (for NAT) and ip (to remove the bridge).
func CheckNetwork() error {
	var errs []error
	if err := CheckRoot("iptables", "ip"); err != nil {
		errs = append(errs, err)
	}
	if _, err := CNIPluginDir(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Network is a private bridge network for one test's (or the demo's)
// agent runtime: a bridge name and an IPv4 /24 no other interface of the
// host uses, so agents running in parallel never share addresses, plus a
// run directory for network namespace files and a state directory for
// address allocations. Close removes the bridge and the directories.
type Network struct {
	Bridge    string
	Subnet    netip.Prefix
	PluginDir string
	RunDir    string
	StateDir  string
	dir       string
}

// NetworkName is the CNI network name the agent's runtime uses for the
// bridge (runtime.NetworkName): host-local's allocation directory and the
// comments of the NAT rules carry it.
func (n *Network) NetworkName() string { return "gpuaas-" + n.Bridge }

// Gateway is the bridge's address: the subnet's first.
func (n *Network) Gateway() netip.Addr { return n.Subnet.Addr().Next() }

// NewNetwork picks a bridge name and a free subnet and creates the
// directories (under /tmp). It creates no device: the CNI bridge plugin
// does on first use.
func NewNetwork() (*Network, error) {
	pluginDir, err := CNIPluginDir()
	if err != nil {
		return nil, err
	}
	subnet, err := freeSubnet()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("/tmp", "gpnet")
	if err != nil {
		return nil, fmt.Errorf("network directory: %w", err)
	}
	n := &Network{
		Bridge:    "gpt" + randomSuffix()[:8],
		Subnet:    subnet,
		PluginDir: pluginDir,
		RunDir:    filepath.Join(dir, "netns"),
		StateDir:  filepath.Join(dir, "state"),
		dir:       dir,
	}
	return n, nil
}

// freeSubnet returns a random /24 in 10.240.0.0/12 that no address or
// route of the host overlaps.
func freeSubnet() (netip.Prefix, error) {
	used, err := hostPrefixes()
	if err != nil {
		return netip.Prefix{}, err
	}
	for range 64 {
		var b [2]byte
		_, _ = rand.Read(b[:])
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 240 | b[0]&0x0f, b[1], 0}), 24)
		free := true
		for _, u := range used {
			free = free && !u.Overlaps(p)
		}
		if free {
			return p, nil
		}
	}
	return netip.Prefix{}, errors.New("no free /24 in 10.240.0.0/12")
}

// hostPrefixes are the host's interface networks and IPv4 routes.
func hostPrefixes() ([]netip.Prefix, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, fmt.Errorf("host addresses: %w", err)
	}
	var out []netip.Prefix
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil && p.Addr().Is4() {
			out = append(out, p.Masked())
		}
	}
	b, err := os.ReadFile("/proc/net/route")
	if err != nil {
		return out, nil
	}
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 8 || f[1] == "00000000" {
			continue // the default route overlaps everything
		}
		dst, mask := hexLE(f[1]), hexLE(f[7])
		bits, _ := net.IPMask(mask[:]).Size()
		out = append(out, netip.PrefixFrom(netip.AddrFrom4(dst), bits).Masked())
	}
	return out, nil
}

// hexLE decodes /proc/net/route's little-endian hex IPv4 fields.
func hexLE(s string) [4]byte {
	var out [4]byte
	var v uint32
	_, _ = fmt.Sscanf(s, "%x", &v)
	out[0], out[1], out[2], out[3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
	return out
}

// Leftovers lists what containers left on the network: veths attached to
// the bridge, network namespace files, address allocations, CNI result
// cache entries and NAT rules naming the network.
func (n *Network) Leftovers() []string {
	var left []string
	ports, _ := os.ReadDir(filepath.Join("/sys/class/net", n.Bridge, "brif"))
	for _, p := range ports {
		left = append(left, "veth "+p.Name())
	}
	_ = filepath.Walk(n.RunDir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			left = append(left, "netns "+p)
		}
		return nil
	})
	allocs, _ := os.ReadDir(filepath.Join(n.StateDir, "ipam", n.NetworkName()))
	for _, a := range allocs {
		if _, err := netip.ParseAddr(a.Name()); err == nil {
			left = append(left, "address "+a.Name())
		}
	}
	cache, _ := filepath.Glob(filepath.Join("/var/lib/cni/results", n.NetworkName()+"-*"))
	for _, c := range cache {
		left = append(left, "cni cache "+c)
	}
	for _, rule := range n.NATRules() {
		// Per container, as the bridge plugin's ipMasq writes them; the
		// network's own masquerade rules stay with the network.
		if strings.Contains(rule, `id: \"`) {
			left = append(left, "nat rule "+rule)
		}
	}
	return left
}

// NATRules are the nat table's rules (iptables -S) naming the network in
// their comment: the agent's masquerade rules for the subnet, and any a
// CNI plugin added per container.
func (n *Network) NATRules() []string {
	out, err := exec.Command(mustLookPath("iptables"), "-w", "-t", "nat", "-S").Output()
	if err != nil {
		return nil
	}
	var rules []string
	for _, line := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(line, "-A ") && strings.Contains(line, n.NetworkName()) {
			rules = append(rules, line)
		}
	}
	return rules
}

// removeNATRules deletes the network's NAT rules and the per-container
// chains they jump to.
func (n *Network) removeNATRules() error {
	ipt := mustLookPath("iptables")
	var errs []error
	chains := map[string]bool{}
	for _, rule := range n.NATRules() {
		args := splitRule(strings.TrimPrefix(rule, "-A "))
		if i := slices.Index(args, "-j"); i >= 0 && i+1 < len(args) && (strings.HasPrefix(args[i+1], "CNI-") || strings.HasPrefix(args[i+1], "GPUAAS-")) {
			chains[args[i+1]] = true
		}
		if out, err := exec.Command(ipt, append([]string{"-w", "-t", "nat", "-D"}, args...)...).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("delete nat rule %q: %v: %s", rule, err, out))
		}
	}
	for c := range chains {
		_ = exec.Command(ipt, "-w", "-t", "nat", "-F", c).Run()
		_ = exec.Command(ipt, "-w", "-t", "nat", "-X", c).Run()
	}
	return errors.Join(errs...)
}

// splitRule splits an iptables -S rule into arguments, undoing its
// double quotes and backslash escapes.
func splitRule(s string) []string {
	var args []string
	var cur strings.Builder
	inQuote, have := false, false
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '\\' && i+1 < len(s):
			i++
			cur.WriteByte(s[i])
			have = true
		case c == '"':
			inQuote, have = !inQuote, true
		case c == ' ' && !inQuote:
			if have {
				args = append(args, cur.String())
				cur.Reset()
				have = false
			}
		default:
			cur.WriteByte(c)
			have = true
		}
	}
	if have {
		args = append(args, cur.String())
	}
	return args
}

func mustLookPath(name string) string {
	if p, err := LookPath(name); err == nil {
		return p
	}
	return name
}

// Close reports what containers left on the network (Leftovers) as an
// error, and removes everything (Remove).
func (n *Network) Close() error {
	var errs []error
	if left := n.Leftovers(); len(left) > 0 {
		errs = append(errs, fmt.Errorf("network %s left behind: %s", n.NetworkName(), strings.Join(left, "; ")))
	}
	return errors.Join(append(errs, n.Remove())...)
}

// Remove removes the bridge, the directories, and whatever containers
// left: network namespace files (unmounted), NAT rules, CNI result caches.
// It is for an installation whose containers were removed without their
// agent (the demo, the end-to-end cluster).
func (n *Network) Remove() error {
	var errs []error
	_ = filepath.Walk(n.RunDir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			_ = syscall.Unmount(p, syscall.MNT_DETACH)
		}
		return nil
	})
	if err := n.removeNATRules(); err != nil {
		errs = append(errs, err)
	}
	cache, _ := filepath.Glob(filepath.Join("/var/lib/cni/results", n.NetworkName()+"-*"))
	for _, c := range cache {
		_ = os.Remove(c)
	}
	if _, err := os.Stat(filepath.Join("/sys/class/net", n.Bridge)); err == nil {
		if out, err := exec.Command(mustLookPath("ip"), "link", "del", n.Bridge).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("delete bridge %s: %v: %s", n.Bridge, err, out))
		}
	}
	if len(mountsUnder(n.dir)) == 0 {
		if err := os.RemoveAll(n.dir); err != nil {
			errs = append(errs, err)
		}
	} else {
		errs = append(errs, fmt.Errorf("mounts left under %s: %v", n.dir, mountsUnder(n.dir)))
	}
	return errors.Join(errs...)
}

// NetworkT is NewNetwork for tests: without root, the CNI plugins or
// iptables it fails in CI and skips elsewhere; Close runs as a cleanup and
// fails the test if containers left anything on the network.
func NetworkT(t testing.TB) *Network {
	t.Helper()
	Require(t, CheckNetwork())
	n, err := NewNetwork()
	if err != nil {
		t.Fatalf("test network: %v", err)
	}
	t.Cleanup(func() {
		if err := n.Close(); err != nil {
			t.Errorf("close test network: %v", err)
		}
	})
	return n
}
