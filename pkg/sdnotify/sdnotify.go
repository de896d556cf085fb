// Package sdnotify tells systemd about a daemon's life (Type=notify units):
// READY once it serves, STATUS lines, STOPPING on shutdown, and WATCHDOG
// pings tied to the daemon's main loop, so that a loop that hangs stops the
// pings and systemd restarts the service (WatchdogSec=). Outside systemd
// (no NOTIFY_SOCKET) every call is a cheap no-op.
//
// The protocol is sd_notify(3), spoken through
// github.com/coreos/go-systemd/v22/daemon.
package sdnotify

import (
	"context"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
)

// Ready reports that the daemon serves, with a status line.
func Ready(status string) {
	notify(daemon.SdNotifyReady + "\nSTATUS=" + status)
}

// Status updates the one-line status `systemctl status` shows.
func Status(status string) {
	notify("STATUS=" + status)
}

// Stopping reports that the daemon is shutting down.
func Stopping() {
	notify(daemon.SdNotifyStopping)
}

func notify(state string) {
	if _, err := daemon.SdNotify(false, state); err != nil {
		slog.Warn("sd_notify failed", "err", err)
	}
}

// Liveness is the main loop's proof of life: the loop calls Beat every
// iteration, and the watchdog pings systemd only while the last beat is
// recent. The zero value is ready to use.
type Liveness struct {
	last atomic.Int64 // unix nanoseconds of the last beat
}

// Beat records that the main loop made progress.
func (l *Liveness) Beat() { l.last.Store(time.Now().UnixNano()) }

// Since is how long ago the last beat was (or since the zero time).
func (l *Liveness) Since(now time.Time) time.Duration {
	return now.Sub(time.Unix(0, l.last.Load()))
}

// Watchdog pings systemd's watchdog every half WatchdogSec for as long as
// ctx lives and live has beaten within maxSilence; when the loop goes
// silent the pings stop (and are logged once), so systemd kills and
// restarts the daemon. It returns at once when the unit has no watchdog.
func Watchdog(ctx context.Context, live *Liveness, maxSilence time.Duration, log *slog.Logger) {
	interval, err := daemon.SdWatchdogEnabled(false)
	if err != nil {
		log.Warn("systemd watchdog settings unreadable", "err", err)
		return
	}
	if interval <= 0 {
		return
	}
	watch(ctx, interval/2, live, maxSilence, log, func() { notify(daemon.SdNotifyWatchdog) })
}

// watch is Watchdog's loop with its clock and ping injected for tests.
func watch(ctx context.Context, every time.Duration, live *Liveness, maxSilence time.Duration, log *slog.Logger, ping func()) {
	t := time.NewTicker(every)
	defer t.Stop()
	silent := false
	for {
		if s := live.Since(time.Now()); s <= maxSilence {
			if silent {
				log.Info("main loop alive again; watchdog pings resumed")
				silent = false
			}
			ping()
		} else if !silent {
			log.Error("main loop silent; withholding watchdog pings so systemd restarts the daemon", "silent_for", s.Round(time.Millisecond))
			silent = true
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
