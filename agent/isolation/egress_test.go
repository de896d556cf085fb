package isolation

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
)

// Test addresses. The child runs in a network namespace with only
// loopback, so a destination that is not loopback has no route: an
// allowed connect fails with ENETUNREACH, a denied one with EPERM, and no
// packet can leave the machine either way.
var (
	controlPlane4 = netip.MustParsePrefix("198.51.100.7/32") // TEST-NET-2
	controlPlane6 = netip.MustParsePrefix("2001:db8::7/128")
)

// testPolicy denies the defaults, the control plane and loopback, and
// allows 127.0.0.1 (more specific than the 127.0.0.0/8 deny) and ::1
// (equal to the ::1 deny): the allow precedence under test.
func testPolicy() Policy {
	return Policy{
		DenyPrefixes:  slices.Concat(DefaultDenyPrefixes(), LoopbackPrefixes(), []netip.Prefix{controlPlane4, controlPlane6}),
		AllowPrefixes: mustPrefixes("127.0.0.1/32", "::1/128"),
	}
}

func port(p int) string { return fmt.Sprint(p) }

// TestEgressFenceDeniesWithEPERM proves the connect4/6 and sendmsg4/6
// programs over TCP and UDP (connect and sendto), IPv4 and IPv6: metadata,
// RFC 1918, the control plane, the ULA metadata address, v4-mapped and
// NAT64 forms of denied addresses all get EPERM inside the cgroup, while
// allow entries override the loopback deny. Outside the cgroup the same
// calls are not denied (ENETUNREACH: no route in the namespace; ok on
// loopback).
func TestEgressFenceDeniesWithEPERM(t *testing.T) {
	requireRoot(t)
	e := newEnforcer(t)
	cg := newCgroup(t)
	if _, err := e.Fence("lease-net", cg, testPolicy()); err != nil {
		t.Fatal(err)
	}
	lp := port(childPort)
	cases := []struct {
		op      childOp
		in, out string
	}{
		// TCP, connect4 / connect6
		{netOp("tcp", "169.254.169.254:80"), "EPERM", "ENETUNREACH"},
		{netOp("tcp", "10.1.2.3:80"), "EPERM", "ENETUNREACH"},
		{netOp("tcp", "172.20.0.1:80"), "EPERM", "ENETUNREACH"},
		{netOp("tcp", "192.168.1.1:80"), "EPERM", "ENETUNREACH"},
		{netOp("tcp", "100.100.100.200:80"), "EPERM", "ENETUNREACH"},
		{netOp("tcp", "198.51.100.7:443"), "EPERM", "ENETUNREACH"},
		{netOp("tcp", "127.0.0.2:"+lp), "EPERM", "ok"},
		{netOp("tcp", "127.0.0.1:"+lp), "ok", "ok"},
		{netOp("tcp", "[::1]:"+lp), "ok", "ok"},
		{netOp("tcp", "[::ffff:169.254.169.254]:80"), "EPERM", "ENETUNREACH"},
		{netOp("tcp", "[::ffff:127.0.0.2]:"+lp), "EPERM", "ok"},
		{netOp("tcp", "[::ffff:127.0.0.1]:"+lp), "ok", "ok"},
		{netOp("tcp", "[64:ff9b::a9fe:a9fe]:80"), "EPERM", "ENETUNREACH"},
		{netOp("tcp", "[fd00:ec2::254]:80"), "EPERM", "ENETUNREACH"},
		{netOp("tcp", "[2001:db8::7]:443"), "EPERM", "ENETUNREACH"},
		{netOp("tcp", "[2001:db8::8]:443"), "ENETUNREACH", "ENETUNREACH"},
		{netOp("tcp", "203.0.113.9:443"), "ENETUNREACH", "ENETUNREACH"},
		// UDP connect: connect4 / connect6
		{netOp("udp-connect", "169.254.169.254:53"), "EPERM", "ENETUNREACH"},
		{netOp("udp-connect", "10.1.2.3:53"), "EPERM", "ENETUNREACH"},
		{netOp("udp-connect", "198.51.100.7:53"), "EPERM", "ENETUNREACH"},
		{netOp("udp-connect", "127.0.0.2:53"), "EPERM", "ok"},
		{netOp("udp-connect", "127.0.0.1:53"), "ok", "ok"},
		{netOp("udp-connect", "[::ffff:169.254.169.254]:53"), "EPERM", "ENETUNREACH"},
		{netOp("udp-connect", "[::ffff:127.0.0.2]:53"), "EPERM", "ok"},
		{netOp("udp-connect", "[fd00:ec2::254]:53"), "EPERM", "ENETUNREACH"},
		{netOp("udp-connect", "[::1]:53"), "ok", "ok"},
		// UDP sendto on an unconnected socket: sendmsg4 / sendmsg6
		{netOp("udp-sendto", "169.254.169.254:53"), "EPERM", "ENETUNREACH"},
		{netOp("udp-sendto", "10.1.2.3:53"), "EPERM", "ENETUNREACH"},
		{netOp("udp-sendto", "198.51.100.7:53"), "EPERM", "ENETUNREACH"},
		{netOp("udp-sendto", "127.0.0.2:53"), "EPERM", "ok"},
		{netOp("udp-sendto", "127.0.0.1:53"), "ok", "ok"},
		{netOp("udp-sendto", "[::ffff:169.254.169.254]:53"), "EPERM", "ENETUNREACH"},
		{netOp("udp-sendto", "[::ffff:127.0.0.2]:53"), "EPERM", "ok"},
		{netOp("udp-sendto", "[fd00:ec2::254]:53"), "EPERM", "ENETUNREACH"},
		{netOp("udp-sendto", "[2001:db8::7]:53"), "EPERM", "ENETUNREACH"},
		{netOp("udp-sendto", "[::1]:53"), "ok", "ok"},
		// TCP Fast Open connects inside sendto: still the connect hook.
		{netOp("tcp-fastopen", "127.0.0.2:"+lp), "EPERM", "ok"},
		{netOp("tcp-fastopen", "127.0.0.1:"+lp), "ok", "ok"},
	}
	ops := make([]childOp, len(cases))
	for i, c := range cases {
		ops[i] = c.op
	}
	in := runChild(t, cg, ops...)
	out := runChild(t, "", ops...)
	for i, c := range cases {
		if in[i] != c.in {
			t.Errorf("in the fenced cgroup, %s: got %s, want %s", c.op, in[i], c.in)
		}
		if out[i] != c.out {
			t.Errorf("outside the fence, %s: got %s, want %s", c.op, out[i], c.out)
		}
	}
}

// TestEgressMatchesPolicyModel checks the kernel's decisions against
// Policy.Allows, the written precedence rules, on random policies of
// nested prefixes and random addresses around them (IPv4, IPv6,
// v4-mapped, NAT64): every UDP connect (no packet is sent) is EPERM
// exactly when Allows says no.
func TestEgressMatchesPolicyModel(t *testing.T) {
	requireRoot(t)
	e := newEnforcer(t)
	cg := newCgroup(t)
	rng := rand.New(rand.NewPCG(1, 2))
	// Addresses come from a small space so that prefixes nest and overlap.
	randAddr := func() netip.Addr {
		switch rng.IntN(4) {
		case 0, 1:
			return netip.AddrFrom4([4]byte{10, byte(rng.IntN(4)), byte(rng.IntN(4)), byte(rng.IntN(8))})
		default:
			return netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: byte(rng.IntN(8)), 14: byte(rng.IntN(4))})
		}
	}
	randPrefix := func() netip.Prefix {
		a := randAddr()
		bits := 8 + rng.IntN(25)
		if a.Is6() {
			bits = 100 + rng.IntN(29)
		}
		p, _ := a.Prefix(bits)
		return p
	}
	contested := map[bool]int{} // addresses both lists match, by verdict
	for round := range 4 {
		var p Policy
		for range 6 + rng.IntN(6) {
			p.DenyPrefixes = append(p.DenyPrefixes, randPrefix())
		}
		for range 3 + rng.IntN(6) {
			p.AllowPrefixes = append(p.AllowPrefixes, randPrefix())
		}
		// The same policy through the v4-mapped and NAT64 spellings.
		p.DenyPrefixes = append(p.DenyPrefixes, netip.MustParsePrefix("::ffff:10.3.0.0/112"))
		var err error
		if round == 0 {
			_, err = e.Fence("lease-model", cg, p)
		} else {
			err = e.UpdatePolicy("lease-model", p)
		}
		if err != nil {
			t.Fatal(err)
		}
		var ops []childOp
		var addrs []netip.Addr
		for range 300 {
			a := randAddr()
			switch {
			case a.Is4() && rng.IntN(3) == 0:
				b := a.As4()
				a = netip.AddrFrom16([16]byte{10: 0xff, 11: 0xff, 12: b[0], 13: b[1], 14: b[2], 15: b[3]})
			case a.Is4() && rng.IntN(3) == 0:
				b := a.As4()
				a = netip.AddrFrom16([16]byte{1: 0x64, 2: 0xff, 3: 0x9b, 12: b[0], 13: b[1], 14: b[2], 15: b[3]})
			}
			addrs = append(addrs, a)
			ops = append(ops, netOp("udp-connect", netip.AddrPortFrom(a, 53).String()))
		}
		got := runChild(t, cg, ops...)
		eg, err := p.egress(DefaultMaxPrefixes)
		if err != nil {
			t.Fatal(err)
		}
		denied := 0
		for i, a := range addrs {
			want := !p.Allows(a)
			if want {
				denied++
			}
			if a.Is4() && matches(a, eg.deny4) && matches(a, eg.allow4) ||
				a.Is6() && matches(a, eg.deny6) && matches(a, eg.allow6) {
				contested[want]++
			}
			if (got[i] == "EPERM") != want {
				t.Errorf("round %d: %s: kernel says %s, Policy.Allows says allowed=%v\npolicy: %+v", round, a, got[i], !want, p)
			}
		}
		if denied == 0 || denied == len(addrs) {
			t.Errorf("round %d: %d of %d denied: the test does not discriminate", round, denied, len(addrs))
		}
	}
	t.Logf("addresses matched by both lists: %d denied, %d allowed", contested[true], contested[false])
	if contested[true] == 0 || contested[false] == 0 {
		t.Errorf("precedence untested: addresses matched by both lists: %d denied, %d allowed", contested[true], contested[false])
	}
}

func matches(a netip.Addr, ps []netip.Prefix) bool {
	return slices.ContainsFunc(ps, func(p netip.Prefix) bool { return p.Contains(a) })
}
