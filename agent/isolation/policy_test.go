package isolation

import (
	"errors"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf/asm"
)

// TestStandardDevicesAreRuncs pins the standard list to runc's
// AllowedDevices (libcontainer/specconv), entry for entry.
func TestStandardDevicesAreRuncs(t *testing.T) {
	want := []string{
		"c *:* m", "b *:* m",
		"c 1:3 rwm", "c 1:8 rwm", "c 1:7 rwm", "c 5:0 rwm", "c 1:5 rwm", "c 1:9 rwm",
		"c 136:* rwm", "c 5:2 rwm", "c 10:200 rwm",
	}
	if got := ruleStrings(StandardDevices()); !slices.Equal(got, want) {
		t.Errorf("StandardDevices = %v\nwant %v", got, want)
	}
	rules, err := compileDeviceRules(nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := ruleStrings(rules); !slices.Equal(got, want) {
		t.Errorf("compiled standard list = %v, want it unchanged", got)
	}
}

// TestCompileDeviceRulesIsMinimalAndCanonical proves the compiled list:
// lease rules sorted after the standard ones, duplicates merged, rules the
// standard list covers dropped, and the same list whatever the input
// order.
func TestCompileDeviceRulesIsMinimalAndCanonical(t *testing.T) {
	lease := []DeviceRule{
		CharDevice(240, 2, "r"),
		CharDevice(195, 255, "rw"),
		CharDevice(195, 0, "w"),
		CharDevice(195, 0, "r"),  // merged with the line above: rw
		CharDevice(1, 3, "rw"),   // covered by /dev/null rwm
		CharDevice(136, 4, "rw"), // covered by 136:* rwm
		CharDevice(300, 1, "m"),  // covered by c *:* m
		{Type: 'b', Major: 8, Minor: 0, Access: "r"},
	}
	got, err := compileDeviceRules(lease)
	if err != nil {
		t.Fatal(err)
	}
	want := append(ruleStrings(StandardDevices()), "b 8:0 r", "c 195:0 rw", "c 195:255 rw", "c 240:2 r")
	if !slices.Equal(ruleStrings(got), want) {
		t.Errorf("compiled %v\nwant %v", ruleStrings(got), want)
	}
	slices.Reverse(lease)
	again, _ := compileDeviceRules(lease)
	if !slices.Equal(got, again) {
		t.Errorf("input order changed the compiled list: %v vs %v", got, again)
	}
}

// TestLeaseDeviceRulesAreRefused lists the rules a lease may not have.
func TestLeaseDeviceRulesAreRefused(t *testing.T) {
	for name, r := range map[string]DeviceRule{
		"wildcard minor":  {Type: 'c', Major: 195, Minor: Wildcard, Access: "rw"},
		"wildcard major":  {Type: 'c', Major: Wildcard, Minor: 0, Access: "rw"},
		"type a":          {Type: 'a', Major: 195, Minor: 0, Access: "rw"},
		"no access":       CharDevice(195, 0, ""),
		"bad access":      CharDevice(195, 0, "rx"),
		"repeated access": CharDevice(195, 0, "rr"),
		"major too big":   CharDevice(4096, 0, "r"),
		"minor too big":   CharDevice(195, 1<<20, "r"),
		"negative":        {Type: 'c', Major: -2, Minor: 0, Access: "r"},
	} {
		if _, err := compileDeviceRules([]DeviceRule{r}); !errors.Is(err, ErrInvalidPolicy) {
			t.Errorf("%s (%s): %v, want ErrInvalidPolicy", name, r, err)
		}
	}
	many := make([]DeviceRule, MaxLeaseDevices+1)
	for i := range many {
		many[i] = CharDevice(195, uint32(i), "r")
	}
	if _, err := compileDeviceRules(many); !errors.Is(err, ErrInvalidPolicy) {
		t.Errorf("%d rules: %v, want ErrInvalidPolicy", len(many), err)
	}
}

func TestParseDeviceRule(t *testing.T) {
	for _, s := range []string{"c 195:0 rw", "c 136:* rwm", "b *:* m", "c 240:3 r"} {
		r, err := ParseDeviceRule(s)
		if err != nil || r.String() != s {
			t.Errorf("ParseDeviceRule(%q) = %v, %v", s, r, err)
		}
	}
	if r, err := ParseDeviceRule("c 195:0 wr"); err != nil || r.Access != "wr" {
		t.Errorf("access order is the caller's until compiled: %v %v", r, err)
	}
	for _, s := range []string{"", "c 195 rw", "c 195:0", "x 1:1 r", "c a:1 r", "c 1:1 z", "cc 1:1 r"} {
		if _, err := ParseDeviceRule(s); !errors.Is(err, ErrInvalidPolicy) {
			t.Errorf("ParseDeviceRule(%q): %v, want ErrInvalidPolicy", s, err)
		}
	}
}

// TestPolicyAllowsPrecedence is the precedence specification, case by
// case.
func TestPolicyAllowsPrecedence(t *testing.T) {
	p := Policy{
		DenyPrefixes: mustPrefixes("10.0.0.0/8", "10.1.2.3/32", "127.0.0.0/8", "::1/128", "2001:db8::/32",
			"2001:db8:1::/48", "::ffff:192.0.2.0/120", "::/0"),
		AllowPrefixes: mustPrefixes("10.1.0.0/16", "127.0.0.1/32", "::1/128", "2001:db8:1:2::/64", "64:ff9b::/96"),
	}
	for _, c := range []struct {
		addr  string
		allow bool
		why   string
	}{
		{"8.8.8.8", true, "no prefix matches"},
		{"10.9.9.9", false, "deny /8, no allow"},
		{"10.1.9.9", true, "allow /16 is more specific than deny /8"},
		{"10.1.2.3", false, "deny /32 is more specific than allow /16"},
		{"127.0.0.1", true, "allow /32 over deny /8"},
		{"127.0.0.2", false, "deny /8"},
		{"::1", true, "allow /128 equal to deny /128: allow wins"},
		{"2001:db8:1:2::5", true, "allow /64 over deny /48"},
		{"2001:db8:1:3::5", false, "deny /48"},
		{"2001:db9::1", false, "deny ::/0"},
		{"192.0.2.7", false, "the v4-mapped deny prefix is an IPv4 prefix"},
		{"::ffff:10.9.9.9", false, "v4-mapped: IPv4 lists"},
		{"::ffff:10.1.9.9", true, "v4-mapped: IPv4 allow, the ::/0 deny does not apply"},
		{"::ffff:8.8.8.8", true, "v4-mapped: no IPv4 prefix matches"},
		{"64:ff9b::8.8.8.8", true, "NAT64: v6 allow /96 over ::/0 and no IPv4 deny"},
		{"64:ff9b::10.9.9.9", false, "NAT64: IPv4 deny of the embedded address"},
		{"fe80::1%eth0", false, "zone ignored: deny ::/0"},
	} {
		if got := p.Allows(netip.MustParseAddr(c.addr)); got != c.allow {
			t.Errorf("%s: Allows = %v, want %v (%s)", c.addr, got, c.allow, c.why)
		}
	}
}

func TestNormalizePrefixes(t *testing.T) {
	v4, v6, err := normalizePrefixes(mustPrefixes("10.1.2.3/8", "10.0.0.0/8", "::ffff:10.0.0.0/104", "2001:db8::1/32", "::ffff:0:0/80"), 10, "deny")
	if err != nil {
		t.Fatal(err)
	}
	if want := mustPrefixes("10.0.0.0/8"); !slices.Equal(v4, want) {
		t.Errorf("v4 %v, want %v", v4, want)
	}
	if want := mustPrefixes("::/80", "2001:db8::/32"); !slices.Equal(v6, want) {
		t.Errorf("v6 %v, want %v", v6, want)
	}
	for name, in := range map[string][]netip.Prefix{
		"invalid":  {{}},
		"too many": mustPrefixes("1.0.0.0/8", "2.0.0.0/8", "3.0.0.0/8"),
	} {
		if _, _, err := normalizePrefixes(in, 2, "deny"); !errors.Is(err, ErrInvalidPolicy) {
			t.Errorf("%s: %v, want ErrInvalidPolicy", name, err)
		}
	}
}

// TestDefaultDenyPrefixesCoverMetadataAndPrivateNetworks checks the
// addresses the default list exists for, and that loopback stays open.
func TestDefaultDenyPrefixesCoverMetadataAndPrivateNetworks(t *testing.T) {
	p := Policy{DenyPrefixes: DefaultDenyPrefixes()}
	for _, a := range []string{
		"169.254.169.254", "::ffff:169.254.169.254", "fd00:ec2::254", "168.63.129.16", "100.100.100.200",
		"10.0.0.1", "172.16.0.1", "172.31.255.255", "192.168.0.1", "100.64.0.1", "fc00::1", "fd12::1",
		"fe80::1", "224.0.0.251", "255.255.255.255", "ff02::1",
	} {
		if p.Allows(netip.MustParseAddr(a)) {
			t.Errorf("%s is allowed by the default deny list", a)
		}
	}
	for _, a := range []string{"127.0.0.1", "::1", "8.8.8.8", "2606:4700::1111", "172.32.0.1", "100.128.0.1"} {
		if !p.Allows(netip.MustParseAddr(a)) {
			t.Errorf("%s is denied by the default deny list", a)
		}
	}
	p.DenyPrefixes = append(p.DenyPrefixes, LoopbackPrefixes()...)
	if p.Allows(netip.MustParseAddr("127.0.0.1")) || p.Allows(netip.MustParseAddr("::1")) {
		t.Error("LoopbackPrefixes do not deny loopback")
	}
}

// TestHostAddresses checks HostAddresses against the standard library's
// view: every non-loopback interface address, as a single-address prefix.
func TestHostAddresses(t *testing.T) {
	got, err := HostAddresses()
	if err != nil {
		t.Fatal(err)
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		ipn, ok := a.(*net.IPNet)
		if !ok {
			continue
		}
		ip, _ := netip.AddrFromSlice(ipn.IP)
		ip = ip.Unmap()
		want := netip.PrefixFrom(ip, ip.BitLen())
		if ip.IsLoopback() != !slices.Contains(got, want) {
			t.Errorf("%s: loopback %v, in HostAddresses %v", ip, ip.IsLoopback(), slices.Contains(got, want))
		}
	}
	for _, p := range got {
		if p.Bits() != p.Addr().BitLen() || p.Addr().Zone() != "" {
			t.Errorf("%s is not a single zone-less address", p)
		}
	}
}

func TestCookieIsStablePerLease(t *testing.T) {
	a1, a2 := cookieOf("l-a"), cookieOf("l-a")
	if a1 != a2 || a1 == cookieOf("l-b") {
		t.Error("cookie not a stable per-lease value")
	}
}

func TestLeaseIDs(t *testing.T) {
	for _, id := range []string{"l-0123456789abcdefghij", "lease_1", "A"} {
		if err := checkLeaseID(id); err != nil {
			t.Errorf("%q: %v", id, err)
		}
	}
	for _, id := range []string{"", "_events", "_staging-x", "a.b", "../x", "a/b", "-a", strings.Repeat("a", 129)} {
		if err := checkLeaseID(id); !errors.Is(err, ErrInvalidPolicy) {
			t.Errorf("%q: %v, want ErrInvalidPolicy", id, err)
		}
	}
}

func TestMetaRoundTrip(t *testing.T) {
	m := leaseMeta{Version: metaVersion, LeaseID: "l-1", Cookie: 7, Cgroup: "/sys/fs/cgroup/x", CgroupID: 9,
		Devices: ruleStrings(StandardDevices()), Features: featPID}
	buf, err := encodeMeta(m)
	if err != nil {
		t.Fatal(err)
	}
	got, err := decodeMeta(buf)
	if err != nil || got.LeaseID != m.LeaseID || !slices.Equal(got.Devices, m.Devices) || got.Features != m.Features {
		t.Errorf("round trip: %+v, %v", got, err)
	}
	m.Version = 99
	buf, _ = encodeMeta(m)
	if _, err := decodeMeta(buf); !errors.Is(err, ErrCorrupt) {
		t.Errorf("future version: %v, want ErrCorrupt", err)
	}
}

// FuzzDecodeMeta: the meta map is read back from bpffs, where anyone with
// root could have written it; decoding must never panic.
func FuzzDecodeMeta(f *testing.F) {
	buf, _ := encodeMeta(leaseMeta{Version: metaVersion, LeaseID: "l-1", Devices: []string{"c 1:3 rwm"}})
	f.Add(buf)
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, '{'})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := decodeMeta(b)
		if err == nil {
			if _, err := m.rules(); err != nil {
				t.Errorf("decoded meta with bad rules: %v", err)
			}
		}
	})
}

// TestDeviceProgramIsOneBlockPerRule checks the shape runc's devicefilter
// has: one allow exit per compiled rule, one deny exit, nothing else
// returns; and every program assembles (labels resolve) without a kernel.
func TestDeviceProgramIsOneBlockPerRule(t *testing.T) {
	rules, err := compileDeviceRules([]DeviceRule{CharDevice(195, 0, "rw"), CharDevice(240, 1, "r")})
	if err != nil {
		t.Fatal(err)
	}
	for _, ap := range attachPoints {
		spec, err := buildProgram(ap, rules, 42, mapFDs{}, featPID|featComm)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := programMatches(spec, ""); err != nil {
			t.Errorf("%s does not assemble: %v", ap.role, err)
		}
		allow, deny := 0, 0
		insns := spec.Instructions
		for i, ins := range insns {
			if ins.OpCode.JumpOp() != asm.Exit {
				continue
			}
			switch prev := insns[i-1]; {
			case prev.OpCode.ALUOp() == asm.Mov && prev.Dst == asm.R0 && prev.Constant == 1:
				allow++
			case prev.OpCode.ALUOp() == asm.Mov && prev.Dst == asm.R0 && prev.Constant == 0:
				deny++
			default:
				t.Errorf("%s: exit %d without a constant verdict", ap.role, i)
			}
		}
		wantAllow := 1
		if ap.role == "device" {
			wantAllow = len(rules)
		}
		if allow != wantAllow || deny != 1 {
			t.Errorf("%s: %d allow and %d deny exits, want %d and 1", ap.role, allow, deny, wantAllow)
		}
	}
}
