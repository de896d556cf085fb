package main

import (
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gpuaas/gpuaas/agent/runtime/logfile"
)

// recordWriter is where the pump puts records (a *logfile.Writer).
type recordWriter interface {
	WriteRecord(logfile.Record) error
}

// Stats counts what a pump did.
type Stats struct {
	Records int64 // written
	Failed  int64 // the writer returned an error: dropped
	Stalled int64 // the writer did not take them in time: dropped
}

// pump copies a container's streams into a writer. The streams are pipes
// the container writes to: they must keep draining whatever the disk does,
// or the tenant's process blocks in write(2). So the readers hand records to
// one writing goroutine through a bounded queue; a record the writer cannot
// take within stall is dropped, and until the queue has room again every
// further record is dropped at once rather than waited for. A write error
// drops the record too. Either way the pump counts and goes on.
type pump struct {
	w       recordWriter
	maxLine int
	stall   time.Duration
	log     *slog.Logger
	now     func() time.Time

	queue    chan logfile.Record
	stalled  atomic.Bool
	records  atomic.Int64
	failed   atomic.Int64
	dropped  atomic.Int64
	errOnce  sync.Once
	stallMsg sync.Once
}

func newPump(w recordWriter, maxLine int, stall time.Duration, log *slog.Logger) *pump {
	return &pump{w: w, maxLine: maxLine, stall: stall, log: log, now: time.Now, queue: make(chan logfile.Record, 1024)}
}

// run copies both streams until each reaches EOF (or fails to read), and
// every record taken has been written or dropped.
func (p *pump) run(stdout, stderr io.Reader) Stats {
	done := make(chan struct{})
	go func() {
		defer close(done)
		for r := range p.queue {
			if err := p.w.WriteRecord(r); err != nil {
				p.failed.Add(1)
				p.errOnce.Do(func() { p.log.Error("write container log; dropping records", "err", err) })
				continue
			}
			p.records.Add(1)
		}
	}()
	var wg sync.WaitGroup
	for _, s := range []struct {
		r      io.Reader
		stream logfile.Stream
	}{{stdout, logfile.Stdout}, {stderr, logfile.Stderr}} {
		if s.r == nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := logfile.Split(s.r, p.maxLine, func(text []byte, partial bool) {
				p.put(logfile.Record{Time: p.now(), Stream: s.stream, Partial: partial, Text: append([]byte(nil), text...)})
			})
			if err != nil {
				p.log.Warn("read container stream", "stream", string(s.stream), "err", err)
			}
		}()
	}
	wg.Wait()
	close(p.queue)
	<-done
	return Stats{Records: p.records.Load(), Failed: p.failed.Load(), Stalled: p.dropped.Load()}
}

// put queues r, waiting at most stall for room (not at all while the
// writer is known to be stuck).
func (p *pump) put(r logfile.Record) {
	select {
	case p.queue <- r:
		p.stalled.Store(false)
		return
	default:
	}
	if p.stalled.Load() {
		p.dropped.Add(1)
		return
	}
	t := time.NewTimer(p.stall)
	defer t.Stop()
	select {
	case p.queue <- r:
	case <-t.C:
		p.stalled.Store(true)
		p.dropped.Add(1)
		p.stallMsg.Do(func() { p.log.Error("container log writer stalled; dropping records", "after", p.stall) })
	}
}
