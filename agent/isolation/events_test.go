package isolation

import (
	"context"
	"encoding/binary"
	"net/netip"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// rawEvent builds a ring record the way the programs lay it out.
func rawEvent(cookie uint64, kind, pid, a, b, c uint32, addr []byte, comm string) []byte {
	raw := make([]byte, eventSize)
	binary.NativeEndian.PutUint64(raw[0:], cookie)
	binary.NativeEndian.PutUint64(raw[8:], 1000)
	binary.NativeEndian.PutUint32(raw[16:], kind)
	binary.NativeEndian.PutUint32(raw[20:], pid)
	binary.NativeEndian.PutUint32(raw[24:], a)
	binary.NativeEndian.PutUint32(raw[28:], b)
	binary.NativeEndian.PutUint32(raw[32:], c)
	copy(raw[40:56], addr)
	copy(raw[56:72], comm)
	return raw
}

// netPort is a port as user_port holds it: network order in its first two
// bytes.
func netPort(p uint16) uint32 {
	var b [4]byte
	binary.BigEndian.PutUint16(b[:], p)
	return binary.NativeEndian.Uint32(b[:])
}

func TestDecodeEvent(t *testing.T) {
	fixed := func(uint64) time.Time { return time.Unix(1, 0) }
	v6 := netip.MustParseAddr("::ffff:169.254.169.254").As16()
	for _, c := range []struct {
		raw    []byte
		kind   EventKind
		target string
	}{
		{rawEvent(1, evKindDevice, 42, devcgAccRead<<16|devcgAccWrite<<16|devcgDevChar, 195, 1, nil, "python3"), KindDevice, "c 195:1 rw"},
		{rawEvent(1, evKindDevice, 42, devcgAccMknod<<16|devcgDevBlock, 8, 0, nil, "sh"), KindDevice, "b 8:0 m"},
		{rawEvent(1, evKindConnect4, 42, unix.AF_INET, netPort(80), unix.IPPROTO_TCP, []byte{169, 254, 169, 254}, "curl"), KindConnect, "tcp 169.254.169.254:80"},
		{rawEvent(1, evKindConnect6, 42, unix.AF_INET6, netPort(443), unix.IPPROTO_TCP, v6[:], "curl"), KindConnect, "tcp [::ffff:169.254.169.254]:443"},
		{rawEvent(1, evKindSendmsg4, 42, unix.AF_INET, netPort(53), unix.IPPROTO_UDP, []byte{10, 0, 0, 1}, "dig"), KindSendmsg, "udp 10.0.0.1:53"},
		{rawEvent(1, evKindConnect4, 42, unix.AF_INET, 0, unix.IPPROTO_ICMP, []byte{10, 0, 0, 1}, "ping"), KindConnect, "icmp 10.0.0.1:0"},
	} {
		ev, err := decodeEvent(c.raw, fixed)
		if err != nil {
			t.Errorf("%s: %v", c.target, err)
			continue
		}
		if ev.Kind != c.kind || ev.Target() != c.target || ev.PID != 42 || ev.Cookie != 1 || ev.Comm == "" {
			t.Errorf("decoded %+v (target %s), want kind %v target %s", ev, ev.Target(), c.kind, c.target)
		}
	}
	for name, raw := range map[string][]byte{
		"short":       make([]byte, eventSize-1),
		"kind":        rawEvent(1, 99, 0, 0, 0, 0, nil, ""),
		"device type": rawEvent(1, evKindDevice, 0, 7, 0, 0, nil, ""),
		"family":      rawEvent(1, evKindConnect4, 0, 99, 0, 6, nil, ""),
		"protocol":    rawEvent(1, evKindConnect4, 0, unix.AF_INET, 0, 300, nil, ""),
	} {
		if _, err := decodeEvent(raw, fixed); err == nil {
			t.Errorf("%s: decoded", name)
		}
	}
}

// FuzzDecodeEvent: ring records come from the kernel, but the ring is
// pinned where root can write; decoding must never panic.
func FuzzDecodeEvent(f *testing.F) {
	f.Add(rawEvent(1, evKindDevice, 42, devcgAccRead<<16|devcgDevChar, 195, 1, nil, "x"))
	f.Add(rawEvent(1, evKindConnect6, 42, unix.AF_INET6, 80, 6, make([]byte, 16), "x"))
	f.Add([]byte{1, 2, 3})
	f.Fuzz(func(t *testing.T, raw []byte) {
		ev, err := decodeEvent(raw, func(uint64) time.Time { return time.Time{} })
		if err == nil {
			_ = ev.Target()
		}
	})
}

func TestBootToWall(t *testing.T) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		t.Skip(err)
	}
	got := bootToWall(uint64(ts.Nano()) - uint64(time.Second))
	if d := time.Since(got); d < 900*time.Millisecond || d > 2*time.Second {
		t.Errorf("an event one second old converts to %v ago", d)
	}
}

func ev(lease string, kind EventKind, target string, at time.Time) DenyEvent {
	e := DenyEvent{LeaseID: lease, Cookie: cookieOf(lease), Kind: kind, Time: at}
	if kind == KindDevice {
		e.DeviceType, e.Major, e.Access = 'c', 195, "rw"
		e.Minor = uint32(len(target))
	} else {
		e.Dst, e.Protocol = netip.MustParseAddrPort(target), unix.IPPROTO_TCP
	}
	return e
}

// TestAggregatorRateLimits proves the summary contract: the first denial
// of a lease and kind is summarized at once; later ones within Interval
// are only counted, and summarized together when Interval has passed;
// leases and kinds are limited independently.
func TestAggregatorRateLimits(t *testing.T) {
	a := NewAggregator(time.Minute)
	t0 := time.Unix(1000, 0)
	s, due := a.Add(ev("l-a", KindConnect, "10.0.0.1:80", t0), t0)
	if !due || s.Count != 1 || s.LeaseID != "l-a" || s.Kind != KindConnect || s.Targets[0] != (TargetCount{"tcp 10.0.0.1:80", 1}) {
		t.Fatalf("first denial: %v %+v", due, s)
	}
	for i := range 100 {
		at := t0.Add(time.Duration(i) * 100 * time.Millisecond)
		target := "10.0.0.1:80"
		if i%4 == 0 {
			target = "10.0.0.2:443"
		}
		if _, due := a.Add(ev("l-a", KindConnect, target, at), at); due {
			t.Fatalf("denial %d within the interval was summarized", i)
		}
	}
	// Another lease, another kind: not limited by l-a's connects.
	if _, due := a.Add(ev("l-b", KindConnect, "10.0.0.1:80", t0), t0); !due {
		t.Error("first denial of another lease was not summarized")
	}
	if _, due := a.Add(ev("l-a", KindDevice, "x", t0), t0); !due {
		t.Error("first denial of another kind was not summarized")
	}
	if got := a.Flush(t0.Add(30 * time.Second)); len(got) != 0 {
		t.Errorf("flush within the interval: %+v", got)
	}
	got := a.Flush(t0.Add(time.Minute))
	if len(got) != 1 {
		t.Fatalf("flush after the interval: %+v", got)
	}
	s = got[0]
	want := []TargetCount{{"tcp 10.0.0.1:80", 75}, {"tcp 10.0.0.2:443", 25}}
	if s.LeaseID != "l-a" || s.Kind != KindConnect || s.Count != 100 || !slices.Equal(s.Targets, want) ||
		!s.First.Equal(t0) || !s.Last.Equal(t0.Add(9900*time.Millisecond)) {
		t.Errorf("summary %+v, want 100 connects of l-a: %v", s, want)
	}
	// The summary just emitted starts a new interval.
	if _, due := a.Add(ev("l-a", KindConnect, "10.0.0.1:80", t0.Add(61*time.Second)), t0.Add(61*time.Second)); due {
		t.Error("denial right after a flushed summary was summarized")
	}
	// Idle leases are forgotten.
	a.Flush(t0.Add(3 * time.Minute))
	a.Flush(t0.Add(5 * time.Minute))
	if n := len(a.buckets); n != 0 {
		t.Errorf("%d idle buckets kept", n)
	}
}

func TestAggregatorBoundsTargets(t *testing.T) {
	a := &Aggregator{Interval: time.Minute, MaxTargets: 3}
	t0 := time.Unix(1000, 0)
	a.Add(ev("l-a", KindConnect, "10.0.0.1:1", t0), t0)
	for i := range 10 {
		a.Add(ev("l-a", KindConnect, netip.AddrPortFrom(netip.MustParseAddr("10.0.0.2"), uint16(i)).String(), t0), t0)
	}
	s := a.Flush(t0.Add(time.Hour))[0]
	// The first denial was summarized at once; the next ten count here.
	if len(s.Targets) != 3 || s.Other != 7 || s.Count != 10 {
		t.Errorf("summary %+v: want 3 targets, 7 other, 10 in all", s)
	}
}

// TestAggregatorRun proves Run's plumbing: immediate first summaries, the
// rest summarized when the input closes, the output closed after.
func TestAggregatorRun(t *testing.T) {
	a := NewAggregator(time.Hour)
	in := make(chan DenyEvent)
	out := a.Run(context.Background(), in)
	now := time.Now()
	go func() {
		for range 5 {
			in <- ev("l-a", KindDevice, "x", now)
		}
		in <- ev("l-b", KindConnect, "10.0.0.1:80", now)
		close(in)
	}()
	var got []Summary
	for s := range out {
		got = append(got, s)
	}
	var counts []uint64
	for _, s := range got {
		counts = append(counts, s.Count)
	}
	if len(got) != 3 || got[0].LeaseID != "l-a" || !slices.Equal(counts, []uint64{1, 1, 4}) {
		t.Errorf("summaries %v, want l-a ×1, l-b ×1, then l-a ×4 at close", got)
	}
	ctx, cancel := context.WithCancel(context.Background())
	out = a.Run(ctx, make(chan DenyEvent))
	cancel()
	for range out {
	}
}
