package logfile

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// model is the reader's selection computed on one byte slice: the
// specification Open implements over several files.
func model(all []byte, tail, limit int64) ([]byte, bool) {
	cut := false
	if i := bytes.LastIndexByte(all, '\n'); i >= 0 {
		all = all[:i+1]
	}
	if tail > 0 && int64(len(all)) > tail {
		cut = true
		start := int64(len(all)) - tail
		if all[start-1] != '\n' {
			i := bytes.IndexByte(all[start:], '\n')
			if i < 0 {
				start = int64(len(all))
			} else {
				start += int64(i) + 1
			}
		}
		all = all[start:]
	}
	if limit > 0 && int64(len(all)) > limit {
		cut = true
		end := limit
		if i := bytes.LastIndexByte(all[:limit], '\n'); i >= 0 {
			end = int64(i) + 1
		}
		all = all[:end]
	}
	return all, cut
}

// FuzzRead checks the reader against the model for logs split over rotated
// files with arbitrary content (the files are the tenant's output).
func FuzzRead(f *testing.F) {
	f.Add([]byte("2026-01-01T00:00:00Z stdout F a\n"), []byte("2026-01-01T00:00:01Z stderr F b\n"), []byte{}, int64(0), int64(0), false)
	f.Add([]byte("aaaa\nbbbb\ncc"), []byte("cc\ndddd\n"), []byte("eeee\nff"), int64(7), int64(0), true)
	f.Add([]byte(strings.Repeat("x", 9000)), []byte("\n"), []byte("yy\n"), int64(5), int64(3), false)
	f.Add([]byte{}, []byte{}, []byte("only\n"), int64(0), int64(2), false)
	f.Fuzz(func(t *testing.T, f2, f1, f0 []byte, tail, limit int64, dropped bool) {
		if tail < 0 || limit < 0 {
			if _, err := Open("/nonexistent/x.log", tail, limit); err == nil {
				t.Fatal("negative tail or limit accepted")
			}
			return
		}
		dir := t.TempDir()
		path := filepath.Join(dir, "x.log")
		var all []byte
		for i, data := range [][]byte{f2, f1, f0} {
			n := 2 - i
			if n > 0 && len(data) == 0 {
				continue
			}
			if err := os.WriteFile(name(path, n), data, 0o600); err != nil {
				t.Fatal(err)
			}
			all = append(all, data...)
		}
		if len(f1) == 0 {
			// .2 is not part of the log without .1.
			all = append([]byte(nil), f0...)
		}
		if dropped {
			if err := os.WriteFile(path+DroppedSuffix, nil, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		want, cut := model(all, tail, limit)
		got, truncated, err := Read(path, tail, limit)
		if len(f1) == 0 && len(f2) > 0 {
			// What is behind a gap is left out, and the log is cut.
			dropped = true
		}
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("read %q, want %q", got, want)
		}
		if truncated != (cut || dropped) {
			t.Fatalf("truncated = %v, want %v", truncated, cut || dropped)
		}
	})
}

// FuzzParseRecord checks the record parser never panics and that what it
// accepts formats back to the same line.
func FuzzParseRecord(f *testing.F) {
	f.Add([]byte("2026-11-28T22:00:00.123456789Z stdout F hello\n"))
	f.Add([]byte("2026-11-28T22:00:00Z stderr P \n"))
	f.Add([]byte("2026-11-28T22:00:00Z stdin F x"))
	f.Add([]byte("garbage"))
	f.Fuzz(func(t *testing.T, line []byte) {
		r, err := ParseRecord(line)
		if err != nil {
			return
		}
		tag := "F"
		if r.Partial {
			tag = "P"
		}
		again := r.Time.UTC().Format(time.RFC3339Nano) + " " + string(r.Stream) + " " + tag + " " + string(r.Text)
		r2, err := ParseRecord([]byte(again))
		if err != nil || !r2.Time.Equal(r.Time) || r2.Stream != r.Stream || r2.Partial != r.Partial || !bytes.Equal(r2.Text, r.Text) {
			t.Fatalf("%q reformatted as %q: %+v %v", line, again, r2, err)
		}
	})
}

// BenchmarkWrite measures write throughput of 100-byte lines through
// rotation (1 MiB files, 3 kept).
func BenchmarkWrite(b *testing.B) {
	w, _ := newWriter(b, Options{MaxBytes: 1 << 20, MaxFiles: 3})
	line := bytes.Repeat([]byte("x"), 100)
	b.SetBytes(int64(len(line)))
	b.ReportAllocs()
	for b.Loop() {
		if err := w.Write(Stdout, line, false); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkRead measures reading a full 3 MiB retained log.
func BenchmarkRead(b *testing.B) {
	w, path := newWriter(b, Options{MaxBytes: 1 << 20, MaxFiles: 3})
	line := bytes.Repeat([]byte("x"), 100)
	for i := 0; i < 40000; i++ {
		if err := w.Write(Stdout, line, false); err != nil {
			b.Fatal(err)
		}
	}
	data, _, err := Read(path, 0, 0)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		if _, _, err := Read(path, 0, 0); err != nil {
			b.Fatal(err)
		}
	}
}
