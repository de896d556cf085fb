package isolation

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"time"

	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"
)

// EventKind is what a denied access was.
type EventKind uint8

const (
	// KindDevice: opening or creating a device node.
	KindDevice EventKind = iota + 1
	// KindConnect: connect(2) on a TCP, UDP or ICMP socket.
	KindConnect
	// KindSendmsg: sendto(2)/sendmsg(2) with a destination on an
	// unconnected UDP socket.
	KindSendmsg
)

func (k EventKind) String() string {
	switch k {
	case KindDevice:
		return "device"
	case KindConnect:
		return "connect"
	case KindSendmsg:
		return "sendmsg"
	}
	return "kind(" + strconv.Itoa(int(k)) + ")"
}

// DenyEvent is one access a lease's programs denied.
type DenyEvent struct {
	// LeaseID is the lease whose fence denied, "" when Cookie matches no
	// fence under the pin root (a fence detached since).
	LeaseID string
	Cookie  uint64
	Kind    EventKind
	// Time is when the kernel denied.
	Time time.Time
	// PID is the denied process (thread group id in the host's pid
	// namespace) and Comm its name; zero when the kernel cannot tell
	// cgroup programs.
	PID  uint32
	Comm string

	// KindDevice: the node and the access asked for ("r", "w", "m", ...).
	DeviceType   byte // 'c' or 'b'
	Major, Minor uint32
	Access       string

	// KindConnect, KindSendmsg: the destination as the caller gave it (an
	// IPv4-mapped IPv6 address stays mapped) and the socket's protocol.
	Dst      netip.AddrPort
	Protocol uint8
}

// Target names what was denied, for counting and audit: "c 195:1 rw",
// "tcp 169.254.169.254:80", "udp [::ffff:10.0.0.1]:53".
func (ev DenyEvent) Target() string {
	if ev.Kind == KindDevice {
		return fmt.Sprintf("%c %d:%d %s", ev.DeviceType, ev.Major, ev.Minor, ev.Access)
	}
	return protocolName(ev.Protocol) + " " + ev.Dst.String()
}

func protocolName(p uint8) string {
	switch p {
	case unix.IPPROTO_TCP:
		return "tcp"
	case unix.IPPROTO_UDP:
		return "udp"
	case unix.IPPROTO_ICMP:
		return "icmp"
	case unix.IPPROTO_ICMPV6:
		return "icmpv6"
	}
	return "proto" + strconv.Itoa(int(p))
}

// decodeEvent parses a ring buffer record (the layout at eventSize).
// bootToWall converts the kernel's boot-time stamp.
func decodeEvent(raw []byte, bootToWall func(uint64) time.Time) (DenyEvent, error) {
	if len(raw) < eventSize {
		return DenyEvent{}, fmt.Errorf("deny event of %d bytes, want %d", len(raw), eventSize)
	}
	u32 := func(off int) uint32 { return binary.NativeEndian.Uint32(raw[off:]) }
	ev := DenyEvent{
		Cookie: binary.NativeEndian.Uint64(raw[0:]),
		Time:   bootToWall(binary.NativeEndian.Uint64(raw[8:])),
		PID:    u32(20),
	}
	comm := raw[56:72]
	if i := bytes.IndexByte(comm, 0); i >= 0 {
		comm = comm[:i]
	}
	ev.Comm = string(comm)
	a, b, c := u32(24), u32(28), u32(32)
	switch kind := u32(16); kind {
	case evKindDevice:
		ev.Kind = KindDevice
		switch a & 0xffff {
		case devcgDevChar:
			ev.DeviceType = 'c'
		case devcgDevBlock:
			ev.DeviceType = 'b'
		default:
			return DenyEvent{}, fmt.Errorf("deny event: device type %d", a&0xffff)
		}
		ev.Access = accessString(a >> 16)
		ev.Major, ev.Minor = b, c
	case evKindConnect4, evKindConnect6, evKindSendmsg4, evKindSendmsg6:
		ev.Kind = KindConnect
		if kind == evKindSendmsg4 || kind == evKindSendmsg6 {
			ev.Kind = KindSendmsg
		}
		if c > 255 {
			return DenyEvent{}, fmt.Errorf("deny event: protocol %d", c)
		}
		ev.Protocol = uint8(c)
		// user_port holds the port in network order in its first two bytes.
		port := binary.BigEndian.Uint16(raw[28:30])
		var addr netip.Addr
		switch a {
		case unix.AF_INET:
			addr = netip.AddrFrom4([4]byte(raw[40:44]))
		case unix.AF_INET6:
			addr = netip.AddrFrom16([16]byte(raw[40:56]))
		default:
			return DenyEvent{}, fmt.Errorf("deny event: address family %d", a)
		}
		ev.Dst = netip.AddrPortFrom(addr, port)
	default:
		return DenyEvent{}, fmt.Errorf("deny event: kind %d", kind)
	}
	return ev, nil
}

// bootToWall converts CLOCK_BOOTTIME nanoseconds to wall time, using the
// clocks' offset now.
func bootToWall(ns uint64) time.Time {
	var ts unix.Timespec
	now := time.Now()
	if unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts) != nil {
		return now
	}
	return now.Add(-time.Duration(uint64(ts.Nano()) - ns))
}

// Events starts reading the shared deny event ring and returns the decoded
// events, attributed to leases. The channel closes when ctx is done or the
// Enforcer is closed. One reader at a time: a second call while one runs
// fails. Events denied while no one reads (the agent was down) wait in the
// ring; when the ring is full the kernel drops new events, never the
// verdicts. A slow consumer slows the reader, which fills the ring.
func (e *Enforcer) Events(ctx context.Context) (<-chan DenyEvent, error) {
	if err := e.lockOpen(); err != nil {
		return nil, err
	}
	defer e.mu.Unlock()
	e.cmu.Lock()
	defer e.cmu.Unlock()
	if e.reading {
		return nil, errors.New("read deny events: a reader is already running")
	}
	rd, err := ringbuf.NewReader(e.events)
	if err != nil {
		return nil, fmt.Errorf("read deny events: %w", err)
	}
	e.reading = true
	out := make(chan DenyEvent, 256)
	stop := make(chan struct{})
	e.wg.Add(2)
	go func() {
		defer e.wg.Done()
		select {
		case <-ctx.Done():
		case <-e.done:
		case <-stop:
		}
		rd.Close()
	}()
	go func() {
		defer e.wg.Done()
		defer func() {
			close(stop)
			e.cmu.Lock()
			e.reading = false
			e.cmu.Unlock()
			close(out)
		}()
		var rec ringbuf.Record
		for {
			if err := rd.ReadInto(&rec); err != nil {
				if !errors.Is(err, ringbuf.ErrClosed) {
					e.log.Error("read deny events", "err", err)
				}
				return
			}
			ev, err := decodeEvent(rec.RawSample, bootToWall)
			if err != nil {
				e.log.Warn("undecodable deny event", "err", err)
				continue
			}
			ev.LeaseID = e.leaseOf(ev.Cookie)
			select {
			case out <- ev:
			case <-ctx.Done():
				return
			case <-e.done:
				return
			}
		}
	}()
	return out, nil
}
