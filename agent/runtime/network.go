package runtime

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"

	gocni "github.com/containerd/go-cni"
)

// NetworkMode is how a container reaches the network. No mode shares the
// host's network namespace.
type NetworkMode int

const (
	// NetworkNone: a network namespace of the container's own with
	// loopback only (runc creates it). The zero value.
	NetworkNone NetworkMode = iota
	// NetworkBridge: a network namespace the runtime creates and attaches
	// through CNI to the agent's bridge, with an address from its subnet
	// and NAT to the outside.
	NetworkBridge
)

func (m NetworkMode) String() string {
	switch m {
	case NetworkNone:
		return "none"
	case NetworkBridge:
		return "bridge"
	default:
		return fmt.Sprintf("NetworkMode(%d)", int(m))
	}
}

// Labels recording a container's network, so that Status, Stop and the
// sweep know it after an agent restart.
const (
	LabelNetwork = "dev.gpuaas.network"
	// LabelIP is the container's address on the bridge network.
	LabelIP = "dev.gpuaas.ip"
)

// Defaults for NetworkConfig.
const (
	DefaultBridge      = "gpuaas0"
	DefaultNetNSRunDir = "/run/gpuaas/netns"
)

// DefaultSubnet is the bridge network's subnet when none is configured.
var DefaultSubnet = netip.MustParsePrefix("10.213.0.0/16")

// DefaultCNIPluginDirs are searched for the CNI plugins when
// NetworkConfig.PluginDirs is empty: Debian's containernetworking-plugins,
// then the upstream release's location.
var DefaultCNIPluginDirs = []string{"/usr/lib/cni", "/opt/cni/bin"}

// RequiredCNIPlugins are the plugins bridge networking runs. (The runtime
// brings loopback up itself when it creates a namespace: one plugin run
// fewer per container.)
var RequiredCNIPlugins = []string{"bridge", "host-local", "portmap"}

// ErrNetworkUnavailable: bridge networking was asked for but is not
// configured or cannot work on this host.
var ErrNetworkUnavailable = errors.New("network unavailable")

// NetworkConfig configures the CNI bridge network that containers in
// NetworkBridge mode join. The network list is generated: the bridge
// plugin (gateway on the bridge) with host-local addresses, then portmap;
// traffic leaving the subnet is masqueraded by one rule set for the
// network (ensureMasquerade).
type NetworkConfig struct {
	// PluginDirs are searched for the CNI plugin binaries;
	// DefaultCNIPluginDirs if empty.
	PluginDirs []string
	// Bridge is the host's bridge device; DefaultBridge if empty. Agents
	// sharing a host need distinct bridges and subnets.
	Bridge string
	// Subnet (IPv4) addresses are allocated from; its first address is the
	// gateway on the bridge. DefaultSubnet if invalid (zero).
	Subnet netip.Prefix
	// RunDir holds one bind-mounted network namespace file per container,
	// at RunDir/<containerd namespace>/<container id>;
	// DefaultNetNSRunDir if empty.
	RunDir string
	// StateDir (required) holds host-local's address allocations. It must
	// persist across reboots (under the agent's state directory): an
	// allocation whose container is gone, even after a reboot emptied
	// RunDir, is found there and released.
	StateDir string
}

var bridgeNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$`)

// withDefaults returns c with empty fields set to their defaults.
func (c NetworkConfig) withDefaults() NetworkConfig {
	if len(c.PluginDirs) == 0 {
		c.PluginDirs = slices.Clone(DefaultCNIPluginDirs)
	}
	if c.Bridge == "" {
		c.Bridge = DefaultBridge
	}
	if !c.Subnet.IsValid() {
		c.Subnet = DefaultSubnet
	}
	if c.RunDir == "" {
		c.RunDir = DefaultNetNSRunDir
	}
	return c
}

// Validate checks the configuration (after defaults) without looking at
// the host; NewContainerd also checks that iptables and every plugin in
// RequiredCNIPlugins are there.
func (c NetworkConfig) Validate() error {
	c = c.withDefaults()
	if !bridgeNameRE.MatchString(c.Bridge) {
		return fmt.Errorf("bridge name %q: want 1 to 15 letters, digits, '_', '.' or '-'", c.Bridge)
	}
	if !c.Subnet.Addr().Is4() || c.Subnet.Bits() < 8 || c.Subnet.Bits() > 28 {
		return fmt.Errorf("subnet %s: want an IPv4 prefix from /8 to /28", c.Subnet)
	}
	if c.Subnet.Masked() != c.Subnet {
		return fmt.Errorf("subnet %s: host bits set (want %s)", c.Subnet, c.Subnet.Masked())
	}
	for name, dir := range map[string]string{"run dir": c.RunDir, "state dir": c.StateDir} {
		if dir == "" || !filepath.IsAbs(dir) {
			return fmt.Errorf("network %s %q: want an absolute path", name, dir)
		}
	}
	for _, d := range c.PluginDirs {
		if !filepath.IsAbs(d) {
			return fmt.Errorf("CNI plugin directory %q: want an absolute path", d)
		}
	}
	return nil
}

// checkHost checks that the binaries bridge networking runs are there.
func (c NetworkConfig) checkHost() error {
	c = c.withDefaults()
	// The bridge plugin runs iptables for IP masquerade.
	if _, err := lookPathSbin("iptables"); err != nil {
		return fmt.Errorf("%w (Debian: iptables)", err)
	}
	for _, p := range RequiredCNIPlugins {
		found := false
		for _, d := range c.PluginDirs {
			if fi, err := os.Stat(filepath.Join(d, p)); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0 {
				found = true
				break
			}
		}
		if !found {
			return fmt.Errorf("%w: CNI plugin %q not found in %v (Debian: containernetworking-plugins)", ErrNetworkUnavailable, p, c.PluginDirs)
		}
	}
	return nil
}

// NetworkName is the CNI network name for a bridge: host-local keys its
// allocations by it, and its masquerade rules carry it.
func NetworkName(bridge string) string { return "gpuaas-" + bridge }

// cniNetwork attaches containers' network namespaces to the bridge.
type cniNetwork struct {
	cni      gocni.CNI
	name     string
	netnsDir string // RunDir/<namespace>
	ipamDir  string // host-local's dataDir/<name>: one file per allocation
}

func newCNINetwork(ctx context.Context, namespace string, cfg NetworkConfig) (*cniNetwork, error) {
	cfg = cfg.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if err := cfg.checkHost(); err != nil {
		return nil, err
	}
	if err := checkSharedMountNS(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrNetworkUnavailable, err)
	}
	name := NetworkName(cfg.Bridge)
	if err := ensureMasquerade(ctx, name, cfg.Subnet); err != nil {
		return nil, err
	}
	dataDir := filepath.Join(cfg.StateDir, "ipam")
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return nil, fmt.Errorf("network state directory: %w", err)
	}
	conf, err := json.Marshal(map[string]any{
		"cniVersion": "1.0.0",
		"name":       name,
		"plugins": []any{
			map[string]any{
				"type":      "bridge",
				"bridge":    cfg.Bridge,
				"isGateway": true,
				// NAT is the network's, not each container's: see
				// ensureMasquerade.
				"ipMasq": false,
				"ipam": map[string]any{
					"type":    "host-local",
					"ranges":  [][]map[string]string{{{"subnet": cfg.Subnet.String()}}},
					"routes":  []map[string]string{{"dst": "0.0.0.0/0"}},
					"dataDir": dataDir,
				},
			},
			map[string]any{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}},
		},
	})
	if err != nil {
		return nil, fmt.Errorf("network config: %w", err)
	}
	// One network, eth0. Loopback is up already (newNetNS).
	c, err := gocni.New(gocni.WithPluginDir(cfg.PluginDirs), gocni.WithConfListBytes(conf))
	if err != nil {
		return nil, fmt.Errorf("%w: load CNI config: %w", ErrNetworkUnavailable, err)
	}
	return &cniNetwork{
		cni:      c,
		name:     name,
		netnsDir: filepath.Join(cfg.RunDir, namespace),
		ipamDir:  filepath.Join(dataDir, name),
	}, nil
}

// netnsPath is the container's network namespace file.
func (n *cniNetwork) netnsPath(id string) string { return filepath.Join(n.netnsDir, id) }

// attach attaches the container's network namespace (made by newNetNS) to
// the bridge and returns its address. On error the caller tears down.
func (n *cniNetwork) attach(ctx context.Context, id string) (netip.Addr, error) {
	res, err := n.cni.Setup(ctx, id, n.netnsPath(id))
	if err != nil {
		return netip.Addr{}, fmt.Errorf("attach network of container %s: %w", id, err)
	}
	ip, ok := resultIP(res)
	if !ok {
		return netip.Addr{}, fmt.Errorf("attach network of container %s: CNI result has no IPv4 address on eth0", id)
	}
	return ip, nil
}

func resultIP(res *gocni.Result) (netip.Addr, bool) {
	eth, ok := res.Interfaces["eth0"]
	if !ok {
		return netip.Addr{}, false
	}
	for _, c := range eth.IPConfigs {
		if ip, ok := netip.AddrFromSlice(c.IP); ok && ip.Unmap().Is4() {
			return ip.Unmap(), true
		}
	}
	return netip.Addr{}, false
}

// teardown detaches the container's network (veth, address)
// and removes its namespace file. What is already gone is not an error.
// With the namespace gone (a reboot), the plugins still release the
// address.
func (n *cniNetwork) teardown(ctx context.Context, id string) error {
	path := n.netnsPath(id)
	nsArg := ""
	if isNetNS(path) {
		nsArg = path
	}
	if err := n.cni.Remove(ctx, id, nsArg); err != nil {
		return fmt.Errorf("detach network of container %s: %w", id, err)
	}
	return removeNetNS(path)
}

// masqueradeChain is the nat chain holding a network's masquerade rules.
func masqueradeChain(network string) string {
	sum := sha256.Sum256([]byte(network))
	return "GPUAAS-" + hex.EncodeToString(sum[:])[:16]
}

// ensureMasquerade installs NAT to the outside for the whole subnet, once
// per agent start: POSTROUTING sends the subnet's traffic to the
// network's chain, which returns for destinations on the subnet and
// multicast and masquerades the rest (what the bridge plugin's ipMasq does
// per container). One rule set instead of a chain per container keeps
// iptables, and its lock, out of every container's start and stop, and
// leaves no per-container NAT state to leak. The chain is rebuilt in
// order on every call.
func ensureMasquerade(ctx context.Context, network string, subnet netip.Prefix) error {
	ipt, err := lookPathSbin("iptables")
	if err != nil {
		return err
	}
	chain := masqueradeChain(network)
	comment := fmt.Sprintf("gpuaas masquerade for %s", network)
	run := func(args ...string) (string, error) {
		out, err := exec.CommandContext(ctx, ipt, append([]string{"-w", "-t", "nat"}, args...)...).CombinedOutput()
		return string(bytes.TrimSpace(out)), err
	}
	if out, err := run("-N", chain); err != nil && !strings.Contains(out, "exists") {
		return fmt.Errorf("%w: iptables -N %s: %v: %s", ErrNetworkUnavailable, chain, err, out)
	}
	for _, args := range [][]string{
		{"-F", chain},
		{"-A", chain, "-d", subnet.String(), "-m", "comment", "--comment", comment, "-j", "RETURN"},
		{"-A", chain, "-d", "224.0.0.0/4", "-m", "comment", "--comment", comment, "-j", "RETURN"},
		{"-A", chain, "-m", "comment", "--comment", comment, "-j", "MASQUERADE"},
	} {
		if out, err := run(args...); err != nil {
			return fmt.Errorf("%w: iptables %s: %v: %s", ErrNetworkUnavailable, strings.Join(args, " "), err, out)
		}
	}
	jump := []string{"POSTROUTING", "-s", subnet.String(), "-m", "comment", "--comment", comment, "-j", chain}
	if _, err := run(append([]string{"-C"}, jump...)...); err == nil {
		return nil
	}
	if out, err := run(append([]string{"-A"}, jump...)...); err != nil {
		return fmt.Errorf("%w: iptables -A %s: %v: %s", ErrNetworkUnavailable, strings.Join(jump, " "), err, out)
	}
	return nil
}

// lookPathSbin finds a binary on PATH or in the sbin directories a
// daemon's PATH may lack.
func lookPathSbin(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, d := range []string{"/usr/sbin", "/sbin", "/usr/local/sbin"} {
		p := filepath.Join(d, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().Perm()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%w: %s not found", ErrNetworkUnavailable, name)
}

// holds reports whether the container has a namespace file or an
// address allocation.
func (n *cniNetwork) holds(id string) bool {
	if _, err := os.Lstat(n.netnsPath(id)); err == nil {
		return true
	}
	allocs, err := n.allocations()
	if err != nil {
		return true // let teardown try, and say why
	}
	for _, owner := range allocs {
		if owner == id {
			return true
		}
	}
	return false
}

// leftovers returns the container ids holding a network namespace file or
// an address allocation.
func (n *cniNetwork) leftovers() ([]string, error) {
	ids := map[string]bool{}
	entries, err := os.ReadDir(n.netnsDir)
	if err != nil && !os.IsNotExist(err) {
		return nil, fmt.Errorf("list network namespaces: %w", err)
	}
	for _, e := range entries {
		if ValidateID(e.Name()) == nil {
			ids[e.Name()] = true
		}
	}
	allocs, err := n.allocations()
	if err != nil {
		return nil, err
	}
	for _, id := range allocs {
		ids[id] = true
	}
	out := make([]string, 0, len(ids))
	for id := range ids {
		out = append(out, id)
	}
	slices.Sort(out)
	return out, nil
}

// allocations maps each address host-local has allocated to its
// container id. host-local keeps one file per address, named after it,
// whose first line is the container id.
func (n *cniNetwork) allocations() (map[netip.Addr]string, error) {
	entries, err := os.ReadDir(n.ipamDir)
	if err != nil && !os.IsNotExist(err) {
		return nil, fmt.Errorf("list address allocations: %w", err)
	}
	out := map[netip.Addr]string{}
	for _, e := range entries {
		ip, err := netip.ParseAddr(e.Name())
		if err != nil || !e.Type().IsRegular() {
			continue // lock, last_reserved_ip.0
		}
		id, err := allocationOwner(filepath.Join(n.ipamDir, e.Name()))
		if err != nil {
			return nil, err
		}
		if id != "" {
			out[ip] = id
		}
	}
	return out, nil
}

func allocationOwner(path string) (string, error) {
	f, err := os.Open(path)
	if os.IsNotExist(err) {
		return "", nil // released while listing
	}
	if err != nil {
		return "", fmt.Errorf("read address allocation: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	if !sc.Scan() {
		return "", sc.Err()
	}
	id := strings.TrimSpace(sc.Text())
	if ValidateID(id) != nil {
		return "", nil
	}
	return id, nil
}
