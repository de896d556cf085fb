package isolation

import (
	"cmp"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	egresspkg "github.com/gpuaas/gpuaas/pkg/egress"
)

// Limits on a policy. A lease names a handful of device nodes and, on a
// busy host, a few thousand prefixes (other tenants, host addresses).
const (
	// MaxLeaseDevices bounds Policy.Devices.
	MaxLeaseDevices = 64
	// DefaultMaxPrefixes is the capacity of each LPM trie (deny v4, deny
	// v6, allow v4, allow v6) when Config.MaxPrefixes is zero.
	DefaultMaxPrefixes = 4096
	// maxMajor and maxMinor are the kernel's dev_t limits (MAJOR is 12
	// bits, MINOR 20).
	maxMajor = 1<<12 - 1
	maxMinor = 1<<20 - 1
)

// Wildcard in DeviceRule.Major or Minor matches any number. Only
// StandardDevices use it; a lease's own rules must name one node.
const Wildcard = -1

// DeviceRule allows one kind of access to a device or, with Wildcard, a
// range of them. Rules only ever allow: the device program denies whatever
// no rule allows, so there is no deny rule and no hole punched in a
// wildcard.
type DeviceRule struct {
	// Type is 'c' (character) or 'b' (block). 'a' (any type) is refused:
	// an allow-only list never needs it.
	Type byte
	// Major and Minor number the device; Wildcard matches any.
	Major, Minor int64
	// Access is a non-empty subset of "rwm": read, write, mknod.
	Access string
}

// CharDevice is the rule for one character device node, e.g. a
// gpu.DeviceNode: CharDevice(n.Major, n.Minor, "rw").
func CharDevice(major, minor uint32, access string) DeviceRule {
	return DeviceRule{Type: 'c', Major: int64(major), Minor: int64(minor), Access: access}
}

// String formats the rule as the cgroup v1 devices.allow line does:
// "c 195:0 rw", "c 136:* rwm".
func (r DeviceRule) String() string {
	num := func(n int64) string {
		if n == Wildcard {
			return "*"
		}
		return strconv.FormatInt(n, 10)
	}
	return fmt.Sprintf("%c %s:%s %s", r.Type, num(r.Major), num(r.Minor), r.Access)
}

// ParseDeviceRule parses the String form, "TYPE MAJOR:MINOR ACCESS".
func ParseDeviceRule(s string) (DeviceRule, error) {
	fields := strings.Fields(s)
	if len(fields) != 3 || len(fields[0]) != 1 {
		return DeviceRule{}, fmt.Errorf("%w: device rule %q: want \"TYPE MAJOR:MINOR ACCESS\"", ErrInvalidPolicy, s)
	}
	majS, minS, ok := strings.Cut(fields[1], ":")
	if !ok {
		return DeviceRule{}, fmt.Errorf("%w: device rule %q: want MAJOR:MINOR", ErrInvalidPolicy, s)
	}
	num := func(v string) (int64, error) {
		if v == "*" {
			return Wildcard, nil
		}
		return strconv.ParseInt(v, 10, 64)
	}
	maj, err1 := num(majS)
	min, err2 := num(minS)
	if err1 != nil || err2 != nil {
		return DeviceRule{}, fmt.Errorf("%w: device rule %q: bad number", ErrInvalidPolicy, s)
	}
	r := DeviceRule{Type: fields[0][0], Major: maj, Minor: min, Access: fields[2]}
	if _, err := r.check(true); err != nil {
		return DeviceRule{}, err
	}
	return r, nil
}

// StandardDevices is runc's default allow list (libcontainer/specconv
// AllowedDevices), entry for entry and in its order: mknod of any character
// or block device; /dev/null, random, full, tty, zero, urandom; every
// /dev/pts/N (136:*); /dev/ptmx (5:2); /dev/net/tun (10:200, which runc
// dropped in 1.2.0-rc1 and restored for compatibility). /dev/console (5:1)
// is not in it: runc gives the container a pts as its console, which
// 136:* covers. Fence always compiles these in front of the lease's rules,
// so a fenced container can open exactly what a runc container can, plus
// its own GPU nodes.
func StandardDevices() []DeviceRule {
	return []DeviceRule{
		{Type: 'c', Major: Wildcard, Minor: Wildcard, Access: "m"},
		{Type: 'b', Major: Wildcard, Minor: Wildcard, Access: "m"},
		{Type: 'c', Major: 1, Minor: 3, Access: "rwm"},          // /dev/null
		{Type: 'c', Major: 1, Minor: 8, Access: "rwm"},          // /dev/random
		{Type: 'c', Major: 1, Minor: 7, Access: "rwm"},          // /dev/full
		{Type: 'c', Major: 5, Minor: 0, Access: "rwm"},          // /dev/tty
		{Type: 'c', Major: 1, Minor: 5, Access: "rwm"},          // /dev/zero
		{Type: 'c', Major: 1, Minor: 9, Access: "rwm"},          // /dev/urandom
		{Type: 'c', Major: 136, Minor: Wildcard, Access: "rwm"}, // /dev/pts/*
		{Type: 'c', Major: 5, Minor: 2, Access: "rwm"},          // /dev/ptmx
		{Type: 'c', Major: 10, Minor: 200, Access: "rwm"},       // /dev/net/tun
	}
}

// accessBits maps "rwm" to BPF_DEVCG_ACC_* bits.
func accessBits(access string) (uint32, error) {
	var bits uint32
	for _, c := range access {
		var b uint32
		switch c {
		case 'm':
			b = devcgAccMknod
		case 'r':
			b = devcgAccRead
		case 'w':
			b = devcgAccWrite
		default:
			return 0, fmt.Errorf("access %q: unknown %q", access, c)
		}
		if bits&b != 0 {
			return 0, fmt.Errorf("access %q: %q twice", access, c)
		}
		bits |= b
	}
	if bits == 0 {
		return 0, fmt.Errorf("empty access")
	}
	return bits, nil
}

// accessString is the canonical "rwm" order of bits.
func accessString(bits uint32) string {
	var b strings.Builder
	for _, a := range []struct {
		bit uint32
		c   byte
	}{{devcgAccRead, 'r'}, {devcgAccWrite, 'w'}, {devcgAccMknod, 'm'}} {
		if bits&a.bit != 0 {
			b.WriteByte(a.c)
		}
	}
	return b.String()
}

// check validates r and returns its canonical form. wildcards permits
// Wildcard numbers (StandardDevices, parsed descriptions).
func (r DeviceRule) check(wildcards bool) (DeviceRule, error) {
	bad := func(format string, args ...any) (DeviceRule, error) {
		return DeviceRule{}, fmt.Errorf("%w: device rule %s: %s", ErrInvalidPolicy, r, fmt.Sprintf(format, args...))
	}
	if r.Type != 'c' && r.Type != 'b' {
		return bad("type must be 'c' or 'b'")
	}
	bits, err := accessBits(r.Access)
	if err != nil {
		return bad("%v", err)
	}
	for _, n := range []struct {
		v   int64
		max int64
		who string
	}{{r.Major, maxMajor, "major"}, {r.Minor, maxMinor, "minor"}} {
		switch {
		case n.v == Wildcard && !wildcards:
			return bad("a lease rule must name one node: no wildcard %s", n.who)
		case n.v == Wildcard:
		case n.v < 0 || n.v > n.max:
			return bad("%s out of range 0..%d", n.who, n.max)
		}
	}
	r.Access = accessString(bits)
	return r, nil
}

// covers reports whether r allows everything o allows.
func (r DeviceRule) covers(o DeviceRule) bool {
	rb, _ := accessBits(r.Access)
	ob, _ := accessBits(o.Access)
	return r.Type == o.Type &&
		(r.Major == Wildcard || r.Major == o.Major) &&
		(r.Minor == Wildcard || r.Minor == o.Minor) &&
		ob&^rb == 0
}

// CompileDevices returns the rule list a lease's device program is built
// from (see compileDeviceRules), or ErrInvalidPolicy.
func CompileDevices(lease []DeviceRule) ([]DeviceRule, error) {
	return compileDeviceRules(lease)
}

// compileDeviceRules returns the minimal rule list the device program is
// built from: StandardDevices in runc's order, then the lease's rules
// sorted by type, major, minor, with duplicates merged (accesses joined)
// and every rule another one covers dropped. The list is canonical, so the
// same policy always compiles to the same program (and kernel tag).
func compileDeviceRules(lease []DeviceRule) ([]DeviceRule, error) {
	if len(lease) > MaxLeaseDevices {
		return nil, fmt.Errorf("%w: %d device rules, at most %d", ErrInvalidPolicy, len(lease), MaxLeaseDevices)
	}
	own := make([]DeviceRule, 0, len(lease))
	for _, r := range lease {
		c, err := r.check(false)
		if err != nil {
			return nil, err
		}
		own = append(own, c)
	}
	slices.SortFunc(own, func(a, b DeviceRule) int {
		return cmp.Or(cmp.Compare(a.Type, b.Type), cmp.Compare(a.Major, b.Major), cmp.Compare(a.Minor, b.Minor))
	})
	all := append(StandardDevices(), own...)
	// Merge rules for the same node.
	var merged []DeviceRule
	for _, r := range all {
		i := slices.IndexFunc(merged, func(m DeviceRule) bool {
			return m.Type == r.Type && m.Major == r.Major && m.Minor == r.Minor
		})
		if i < 0 {
			merged = append(merged, r)
			continue
		}
		a, _ := accessBits(merged[i].Access)
		b, _ := accessBits(r.Access)
		merged[i].Access = accessString(a | b)
	}
	// Drop rules another rule covers.
	var out []DeviceRule
	for i, r := range merged {
		covered := false
		for j, o := range merged {
			if i != j && o.covers(r) {
				covered = true
				break
			}
		}
		if !covered {
			out = append(out, r)
		}
	}
	return out, nil
}

// Policy is what a lease's fence enforces.
type Policy struct {
	// Devices are the lease's own device nodes (its GPU, nvidiactl, the
	// UVM nodes, its MIG capability nodes), each naming one node.
	// StandardDevices are always allowed as well; every other device is
	// denied.
	Devices []DeviceRule
	// DenyPrefixes are destinations a connect or sendmsg may not reach:
	// usually DefaultDenyPrefixes plus the control plane, the agent, the
	// host's addresses (HostAddresses) and other tenants.
	DenyPrefixes []netip.Prefix
	// AllowPrefixes carve exceptions out of DenyPrefixes: an allow prefix
	// wins over every deny prefix that is no more specific than it.
	AllowPrefixes []netip.Prefix
}

// Validate checks p as Fence would (device rules, prefixes, at most
// DefaultMaxPrefixes per family and list), so that a caller can refuse a
// lease before creating anything for it. Errors wrap ErrInvalidPolicy.
func (p Policy) Validate() error {
	if _, err := compileDeviceRules(p.Devices); err != nil {
		return err
	}
	_, err := p.egress(DefaultMaxPrefixes)
	return err
}

// egress is a policy's prefixes, normalized and split by family.
type egress struct {
	deny4, deny6, allow4, allow6 []netip.Prefix
}

// normalizePrefixes masks, de-duplicates and sorts prefixes, turns
// IPv4-mapped IPv6 prefixes (::ffff:0:0/96 and longer) into the IPv4
// prefixes they mean, and splits them by family.
func normalizePrefixes(in []netip.Prefix, maxPerFamily int, what string) (v4, v6 []netip.Prefix, err error) {
	for _, p := range in {
		if !p.IsValid() {
			return nil, nil, fmt.Errorf("%w: %s prefix %q is not valid", ErrInvalidPolicy, what, p)
		}
		p = egresspkg.Canonical(p)
		if p.Addr().Is4() {
			v4 = append(v4, p)
		} else {
			v6 = append(v6, p)
		}
	}
	sortPrefixes := func(ps []netip.Prefix) []netip.Prefix {
		slices.SortFunc(ps, comparePrefix)
		return slices.Compact(ps)
	}
	v4, v6 = sortPrefixes(v4), sortPrefixes(v6)
	if len(v4) > maxPerFamily || len(v6) > maxPerFamily {
		return nil, nil, fmt.Errorf("%w: %d IPv4 and %d IPv6 %s prefixes, at most %d each", ErrInvalidPolicy, len(v4), len(v6), what, maxPerFamily)
	}
	return v4, v6, nil
}

func comparePrefix(a, b netip.Prefix) int {
	return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
}

func (p Policy) egress(maxPerFamily int) (egress, error) {
	var e egress
	var err error
	// Defense in depth behind the control plane's own check: no allow
	// entry may open a cloud metadata endpoint.
	for _, a := range p.AllowPrefixes {
		if m, ok := egresspkg.CoversMetadata(a); ok {
			return egress{}, fmt.Errorf("%w: allow prefix %s covers the cloud metadata endpoint %s, which is never allowed", ErrInvalidPolicy, a, m)
		}
	}
	if e.deny4, e.deny6, err = normalizePrefixes(p.DenyPrefixes, maxPerFamily, "deny"); err != nil {
		return egress{}, err
	}
	if e.allow4, e.allow6, err = normalizePrefixes(p.AllowPrefixes, maxPerFamily, "allow"); err != nil {
		return egress{}, err
	}
	return e, nil
}

// nat64Prefix is the well-known NAT64 prefix (RFC 6052): 64:ff9b::a.b.c.d
// reaches a.b.c.d through a translator where the network has one.
var nat64Prefix = netip.MustParsePrefix("64:ff9b::/96")

// Allows reports whether the fence lets a connect or sendmsg reach addr.
// It is the programs' decision, written in Go, and the specification the
// kernel tests check them against:
//
//   - Longest match per list: D is the longest deny prefix containing the
//     address, A the longest allow prefix. The address is denied when D
//     exists and A does not, or A is shorter than D. An allow prefix thus
//     wins over a deny prefix of equal or shorter length; a deny prefix
//     more specific than every matching allow prefix wins over them. No
//     match at all allows.
//   - An IPv4-mapped IPv6 address (::ffff:a.b.c.d, from an IPv6 socket
//     without IPV6_V6ONLY) is IPv4 on the wire: it is decided by the IPv4
//     lists alone, with a.b.c.d.
//   - A NAT64 address (64:ff9b::a.b.c.d) is IPv6 on the wire to a
//     translator that reaches a.b.c.d: it is denied when either the IPv6
//     lists deny it or the IPv4 lists deny a.b.c.d.
func (p Policy) Allows(addr netip.Addr) bool {
	e, err := p.egress(1 << 30)
	if err != nil {
		return false
	}
	return e.allows(addr)
}

func (e egress) allows(addr netip.Addr) bool {
	addr = addr.WithZone("")
	switch {
	case addr.Is4():
		return verdict(addr, e.deny4, e.allow4)
	case addr.Is4In6():
		return verdict(addr.Unmap(), e.deny4, e.allow4)
	case nat64Prefix.Contains(addr):
		b := addr.As16()
		v4 := netip.AddrFrom4([4]byte(b[12:]))
		return verdict(v4, e.deny4, e.allow4) && verdict(addr, e.deny6, e.allow6)
	default:
		return verdict(addr, e.deny6, e.allow6)
	}
}

func verdict(addr netip.Addr, deny, allow []netip.Prefix) bool {
	longest := func(ps []netip.Prefix) int {
		l := -1
		for _, p := range ps {
			if p.Contains(addr) && p.Bits() > l {
				l = p.Bits()
			}
		}
		return l
	}
	d := longest(deny)
	return d < 0 || longest(allow) >= d
}

// DefaultDenyPrefixes is what no lease may reach whatever else its policy
// says; callers add the control plane, the agent, HostAddresses and other
// tenants' addresses.
//
//   - cloud metadata and link-local: 169.254.0.0/16 (169.254.169.254 on
//     AWS, GCP, Azure, OCI), fd00:ec2::254/128 (AWS IMDS over IPv6),
//     168.63.129.16/32 (Azure WireServer), fe80::/10
//   - private networks: 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16,
//     100.64.0.0/10 (CGNAT, also Alibaba's metadata 100.100.100.200),
//     fc00::/7 (ULA), fec0::/10 (deprecated site-local)
//   - multicast and broadcast, which reach neighbours without a route:
//     224.0.0.0/4, 255.255.255.255/32, ff00::/8
//
// Loopback (127.0.0.0/8, ::1) is not in it: a lease runs in its own network
// namespace, where loopback is the container's own and denying it breaks
// workloads that talk to themselves. A lease sharing the host's network
// namespace must add LoopbackPrefixes to its deny list.
func DefaultDenyPrefixes() []netip.Prefix {
	// The metadata endpoints are single-address entries: more specific
	// than any allow entry a lease may have, they always win.
	return append(mustPrefixes(
		"169.254.0.0/16",
		"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
		"224.0.0.0/4", "255.255.255.255/32",
		"fe80::/10", "fc00::/7", "fec0::/10", "ff00::/8",
	), egresspkg.Metadata()...)
}

// LoopbackPrefixes are 127.0.0.0/8 and ::1/128, for a lease that shares
// the host's network namespace (see DefaultDenyPrefixes).
func LoopbackPrefixes() []netip.Prefix {
	return mustPrefixes("127.0.0.0/8", "::1/128")
}

func mustPrefixes(ss ...string) []netip.Prefix {
	out := make([]netip.Prefix, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParsePrefix(s)
	}
	return out
}

// HostAddresses returns every address of the host's interfaces as a
// single-address prefix (/32, /128), for a lease's deny list: services
// bound to the host's own addresses (the agent's metrics, an SSH daemon)
// must not be reachable from a container through the bridge. Loopback
// addresses are left out (see DefaultDenyPrefixes); IPv6 zones are dropped.
func HostAddresses() ([]netip.Prefix, error) {
	ifaces, err := net.Interfaces()
	if err != nil {
		return nil, fmt.Errorf("list host interfaces: %w", err)
	}
	var out []netip.Prefix
	for _, ifc := range ifaces {
		addrs, err := ifc.Addrs()
		if err != nil {
			return nil, fmt.Errorf("list addresses of %s: %w", ifc.Name, err)
		}
		for _, a := range addrs {
			ipn, ok := a.(*net.IPNet)
			if !ok {
				continue
			}
			ip, ok := netip.AddrFromSlice(ipn.IP)
			if !ok {
				continue
			}
			ip = ip.Unmap().WithZone("")
			if ip.IsLoopback() || ip.IsUnspecified() {
				continue
			}
			out = append(out, netip.PrefixFrom(ip, ip.BitLen()))
		}
	}
	slices.SortFunc(out, comparePrefix)
	return slices.Compact(out), nil
}
