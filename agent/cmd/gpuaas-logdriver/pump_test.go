package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/agent/runtime/logfile"
)

// fakeWriter records what it is given; block holds every write until
// closed, fail makes every other write fail.
type fakeWriter struct {
	mu    sync.Mutex
	got   []logfile.Record
	block chan struct{}
	fail  bool
	n     int
}

func (f *fakeWriter) WriteRecord(r logfile.Record) error {
	if f.block != nil {
		<-f.block
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.n++
	if f.fail && f.n%2 == 0 {
		return errors.New("disk full")
	}
	f.got = append(f.got, r)
	return nil
}

func lines(prefix string, n int) string {
	var b strings.Builder
	for i := 0; i < n; i++ {
		fmt.Fprintf(&b, "%s %d\n", prefix, i)
	}
	return b.String()
}

func TestPumpCopiesBothStreamsInOrder(t *testing.T) {
	w := &fakeWriter{}
	st := newPump(w, 64, time.Minute, slog.New(slog.DiscardHandler)).run(
		strings.NewReader(lines("out", 500)), strings.NewReader(lines("err", 300)+strings.Repeat("x", 100)))
	if st.Records != 802 || st.Failed != 0 || st.Stalled != 0 {
		t.Fatalf("stats %+v", st)
	}
	next := map[logfile.Stream]int{}
	for _, r := range w.got {
		if r.Time.IsZero() {
			t.Fatal("record without a time")
		}
		if r.Stream == logfile.Stderr && next[r.Stream] == 300 {
			// The 100-byte tail at EOF: one partial of 64, one full of 36.
			continue
		}
		want := fmt.Sprintf("%s %d", map[logfile.Stream]string{logfile.Stdout: "out", logfile.Stderr: "err"}[r.Stream], next[r.Stream])
		if string(r.Text) != want || r.Partial {
			t.Fatalf("got %q (partial %v), want %q", r.Text, r.Partial, want)
		}
		next[r.Stream]++
	}
	var last logfile.Record
	for _, r := range w.got {
		if r.Stream == logfile.Stderr {
			last = r
		}
	}
	if last.Stream != logfile.Stderr || last.Partial || len(last.Text) != 36 {
		t.Fatalf("tail record %+v", last)
	}
}

func TestPumpDropsAndCountsWriteErrors(t *testing.T) {
	w := &fakeWriter{fail: true}
	st := newPump(w, 64, time.Minute, slog.New(slog.DiscardHandler)).run(strings.NewReader(lines("out", 100)), nil)
	if st.Records != 50 || st.Failed != 50 {
		t.Fatalf("stats %+v", st)
	}
}

// TestPumpKeepsDrainingWhenTheDiskStalls: a writer that never returns
// must not block the container's pipe; records are dropped and counted.
func TestPumpKeepsDrainingWhenTheDiskStalls(t *testing.T) {
	w := &fakeWriter{block: make(chan struct{})}
	p := newPump(w, 64, time.Millisecond, slog.New(slog.DiscardHandler))
	pr, pw := io.Pipe()
	done := make(chan Stats)
	go func() { done <- p.run(pr, nil) }()
	const n = 5000 // more than the queue holds
	// Every write returns: the pump reads the pipe though nothing reaches
	// the disk.
	if _, err := io.WriteString(pw, lines("out", n)); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	close(w.block)
	st := <-done
	if st.Stalled == 0 || st.Records+st.Stalled != n {
		t.Fatalf("stats %+v", st)
	}
	prev := -1
	for _, r := range w.got {
		var i int
		fmt.Sscanf(string(r.Text), "out %d", &i)
		if i <= prev {
			t.Fatalf("line %d after %d", i, prev)
		}
		prev = i
	}
}

func TestParseArgsTakesTheShimsPairsInAnyOrder(t *testing.T) {
	for _, args := range [][]string{
		{"--file", "/var/log/x.log", "--max-bytes", "65536", "--max-files", "4"},
		{"--max-files", "4", "--file", "/var/log/x.log", "--max-bytes", "65536"},
		{"--max-bytes=65536", "-max-files", "4", "-file=/var/log/x.log"},
	} {
		o, err := parseArgs(args)
		if err != nil || o != (options{file: "/var/log/x.log", maxBytes: 65536, maxFiles: 4}) {
			t.Fatalf("%q: %+v %v", args, o, err)
		}
	}
	for name, args := range map[string][]string{
		"no file":          {"--max-bytes", "65536"},
		"relative file":    {"--file", "x.log"},
		"unclean file":     {"--file", "/var/log/../x.log"},
		"tiny cap":         {"--file", "/x.log", "--max-bytes", "10"},
		"no files":         {"--file", "/x.log", "--max-files", "0"},
		"too many files":   {"--file", "/x.log", "--max-files", "1000"},
		"not a number":     {"--file", "/x.log", "--max-bytes", "ten"},
		"bare key":         {"file", "/x.log"},
		"unknown flag":     {"--file", "/x.log", "--follow", "yes"},
		"stray positional": {"--file", "/x.log", "extra"},
	} {
		if _, err := parseArgs(args); err == nil {
			t.Errorf("%s: %q accepted", name, args)
		}
	}
}

// BenchmarkPumpToRotatedFiles measures the driver's path from a stream to
// the rotated files: splitting, queueing and writing 100-byte lines (1 MiB
// files, 3 kept).
func BenchmarkPumpToRotatedFiles(b *testing.B) {
	w, err := logfile.NewWriter(b.TempDir()+"/x.log", logfile.Options{MaxBytes: 1 << 20, MaxFiles: 3})
	if err != nil {
		b.Fatal(err)
	}
	defer w.Close()
	const n = 10000
	input := strings.Repeat(strings.Repeat("x", 99)+"\n", n)
	b.SetBytes(int64(len(input)))
	for b.Loop() {
		st := newPump(w, w.MaxLine(), time.Minute, slog.New(slog.DiscardHandler)).run(strings.NewReader(input), nil)
		if st.Records != n {
			b.Fatalf("stats %+v", st)
		}
	}
}
