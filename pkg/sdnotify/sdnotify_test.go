package sdnotify

import (
	"context"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// listen stands in for systemd's notify socket.
func listen(t *testing.T) (*net.UnixConn, string) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "notify.sock")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: p, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, p
}

func recv(t *testing.T, c *net.UnixConn) string {
	t.Helper()
	buf := make([]byte, 4096)
	if err := c.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("no notification: %v", err)
	}
	return string(buf[:n])
}

func TestReadyStatusStoppingReachSystemd(t *testing.T) {
	c, p := listen(t)
	t.Setenv("NOTIFY_SOCKET", p)
	Ready("serving on :7443")
	if got := recv(t, c); got != "READY=1\nSTATUS=serving on :7443" {
		t.Errorf("ready: %q", got)
	}
	Status("3 sessions")
	if got := recv(t, c); got != "STATUS=3 sessions" {
		t.Errorf("status: %q", got)
	}
	Stopping()
	if got := recv(t, c); got != "STOPPING=1" {
		t.Errorf("stopping: %q", got)
	}
}

func TestNoSocketIsANoOp(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	Ready("x") // must neither block nor fail
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	t.Setenv("WATCHDOG_USEC", "")
	Watchdog(ctx, &Liveness{}, time.Second, slog.Default()) // returns at once: no watchdog
}

// TestWatchdogPingsOnlyWhileTheLoopBeats is the control: a hung main loop
// stops the pings (so systemd restarts the daemon), and pings resume when
// it beats again.
func TestWatchdogPingsOnlyWhileTheLoopBeats(t *testing.T) {
	var mu sync.Mutex
	pings := 0
	ping := func() { mu.Lock(); pings++; mu.Unlock() }
	count := func() int { mu.Lock(); defer mu.Unlock(); return pings }

	live := &Liveness{}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{})
	go func() { defer close(done); watch(ctx, time.Millisecond, live, time.Hour, slog.Default(), ping) }()

	// Never beaten: the zero time is far more than an hour ago.
	time.Sleep(20 * time.Millisecond)
	if n := count(); n != 0 {
		t.Fatalf("%d pings before the main loop ever beat", n)
	}
	live.Beat()
	waitFor(t, func() bool { return count() > 0 })
	// Silence: make the last beat two hours old.
	live.last.Store(time.Now().Add(-2 * time.Hour).UnixNano())
	time.Sleep(5 * time.Millisecond)
	n := count()
	time.Sleep(20 * time.Millisecond)
	if m := count(); m != n {
		t.Fatalf("pings continued while the main loop was silent: %d -> %d", n, m)
	}
	live.Beat()
	waitFor(t, func() bool { return count() > n })
	cancel()
	<-done
}

func TestWatchdogUsesTheUnitsInterval(t *testing.T) {
	c, p := listen(t)
	t.Setenv("NOTIFY_SOCKET", p)
	t.Setenv("WATCHDOG_USEC", strconv.Itoa(20000)) // 20 ms: pings every 10 ms
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	live := &Liveness{}
	live.Beat()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); Watchdog(ctx, live, time.Hour, slog.Default()) }()
	for i := 0; i < 3; i++ {
		if got := recv(t, c); !strings.Contains(got, "WATCHDOG=1") {
			t.Fatalf("ping %d: %q", i, got)
		}
	}
	cancel()
	<-done
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached in 5s")
		}
		time.Sleep(time.Millisecond)
	}
}
