package isolation

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"
)

// benchPolicy is a realistic lease policy: the default deny list, the
// host's addresses, the control plane, 1000 other tenants' addresses, and
// the loopback exceptions of testPolicy (so a connect to 127.0.0.1 does
// both trie lookups: the slow path).
func benchPolicy(b *testing.B) Policy {
	p := testPolicy()
	hosts, err := HostAddresses()
	if err != nil {
		b.Fatal(err)
	}
	p.DenyPrefixes = append(p.DenyPrefixes, hosts...)
	for i := range 1000 {
		p.DenyPrefixes = append(p.DenyPrefixes,
			netip.PrefixFrom(netip.AddrFrom4([4]byte{203, 0, byte(i >> 8), byte(i)}), 32),
			netip.PrefixFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 14: byte(i >> 8), 15: byte(i)}), 128))
	}
	return p
}

// inCgroup moves the whole test process (cgroup membership is per
// process) into dir for the rest of the benchmark, and back afterwards.
func inCgroup(b *testing.B, dir string) {
	orig, err := CgroupDirOfPID(os.Getpid())
	if err != nil {
		b.Fatal(err)
	}
	move := func(to string) error {
		return os.WriteFile(filepath.Join(to, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0)
	}
	if err := move(dir); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		if err := move(orig); err != nil {
			b.Errorf("move back to %s: %v", orig, err)
		}
	})
}

// benchConnect measures the system calls the egress programs hook, from a
// process in a fresh cgroup (fenced or not): connect(2) on a UDP socket,
// re-connected each time (connect4/connect6; no packet is sent), and
// sendto(2) on an unconnected one (sendmsg4; one loopback datagram).
func benchConnect(b *testing.B, fenced bool) {
	requireRoot(b)
	cg := newCgroup(b)
	if fenced {
		e := newEnforcer(b)
		if _, err := e.Fence("lease-bench", cg, benchPolicy(b)); err != nil {
			b.Fatal(err)
		}
	}
	inCgroup(b, cg)
	for _, c := range []struct {
		name string
		dst  string
		send bool
	}{
		{"udp4-connect", "127.0.0.1:9", false},
		{"udp6-connect", "[::1]:9", false},
		{"udp6-connect-v4mapped", "[::ffff:127.0.0.1]:9", false},
		{"udp4-sendto", "127.0.0.1:9", true},
	} {
		b.Run(c.name, func(b *testing.B) {
			family, sa := sockaddr(netip.MustParseAddrPort(c.dst))
			fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				b.Fatal(err)
			}
			defer unix.Close(fd)
			msg := []byte("x")
			for b.Loop() {
				if c.send {
					err = unix.Sendto(fd, msg, 0, sa)
				} else {
					err = unix.Connect(fd, sa)
				}
				if err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkConnectWithout is the baseline for
// BenchmarkConnectWithEgressPrograms: the same calls from an unfenced
// cgroup.
func BenchmarkConnectWithout(b *testing.B) { benchConnect(b, false) }

// BenchmarkConnectWithEgressPrograms measures the calls from a cgroup
// fenced with a 2000-prefix policy; the difference to
// BenchmarkConnectWithout is the programs' cost per call.
func BenchmarkConnectWithEgressPrograms(b *testing.B) { benchConnect(b, true) }

// BenchmarkFence measures Fence: create and fill the maps, load the five
// programs, attach and pin them, and read the fence back (Describe,
// including the tag checks). Detach is outside the timer.
func BenchmarkFence(b *testing.B) {
	requireRoot(b)
	e := newEnforcer(b)
	cg := newCgroup(b)
	a := leaseRules()
	for _, c := range []struct {
		name string
		p    Policy
	}{
		{"default-policy", Policy{Devices: a, DenyPrefixes: slices.Concat(DefaultDenyPrefixes(), []netip.Prefix{controlPlane4})}},
		{"2000-prefixes", func() Policy { p := benchPolicy(b); p.Devices = a; return p }()},
	} {
		b.Run(c.name, func(b *testing.B) {
			i := 0
			for b.Loop() {
				id := fmt.Sprintf("bench-%d", i)
				i++
				if _, err := e.Fence(id, cg, c.p); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				if err := e.Detach(id); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
	}
}

// leaseRules are a MIG lease's device rules: GPU, nvidiactl, UVM, and two
// capabilities.
func leaseRules() []DeviceRule {
	return []DeviceRule{
		CharDevice(195, 0, "rw"), CharDevice(195, 255, "rw"), CharDevice(510, 0, "rw"), CharDevice(510, 1, "rw"),
		CharDevice(511, 1, "r"), CharDevice(511, 2, "r"),
	}
}
