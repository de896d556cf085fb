package logfile

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

func newWriter(t testing.TB, o Options) (*Writer, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "logs", "l-aaaaaaaaaaaaaaaaaaaa.log")
	w, err := NewWriter(path, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close() })
	return w, path
}

// records parses every line of data, failing the test on a malformed one.
func records(t testing.TB, data []byte) []Record {
	t.Helper()
	var out []Record
	for len(data) > 0 {
		i := bytes.IndexByte(data, '\n')
		if i < 0 {
			t.Fatalf("log ends without a newline: %q", data)
		}
		r, err := ParseRecord(data[:i+1])
		if err != nil {
			t.Fatalf("line %q: %v", data[:i+1], err)
		}
		out = append(out, r)
		data = data[i+1:]
	}
	return out
}

func TestWriterWritesCRIRecords(t *testing.T) {
	at := time.Date(2026, 11, 28, 22, 0, 0, 123456789, time.FixedZone("CET", 3600))
	w, path := newWriter(t, Options{MaxBytes: 1 << 20, MaxFiles: 2, Now: func() time.Time { return at }})
	if err := w.Write(Stdout, []byte("hello world"), false); err != nil {
		t.Fatal(err)
	}
	if err := w.Write(Stderr, []byte(""), false); err != nil {
		t.Fatal(err)
	}
	if err := w.Write(Stdout, []byte("two\nlines"), false); err == nil {
		t.Fatal("a record with a newline was written")
	}
	if err := w.WriteRecord(Record{Stream: "stdin", Text: []byte("x")}); err == nil {
		t.Fatal("a record of an unknown stream was written")
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	want := "2026-11-28T21:00:00.123456789Z stdout F hello world\n2026-11-28T21:00:00.123456789Z stderr F \n"
	if string(got) != want {
		t.Fatalf("file = %q, want %q", got, want)
	}
	rs := records(t, got)
	if !rs[0].Time.Equal(at) || rs[0].Stream != Stdout || rs[0].Partial || string(rs[0].Text) != "hello world" || rs[1].Stream != Stderr {
		t.Fatalf("parsed %+v", rs)
	}
}

func TestFilesAndDirectoriesAreNotWorldReadable(t *testing.T) {
	_, path := newWriter(t, Options{MaxBytes: MinMaxBytes, MaxFiles: 1})
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("file mode %v %v", fi.Mode(), err)
	}
	di, err := os.Stat(filepath.Dir(path))
	if err != nil || di.Mode().Perm() != 0o750 {
		t.Fatalf("dir mode %v %v", di.Mode(), err)
	}
}

func TestWriterRefusesBadOptionsAndSymlinks(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "target")
	if err := os.WriteFile(target, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link.log")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	for name, tc := range map[string]struct {
		path string
		o    Options
	}{
		"symlink":       {link, Options{MaxBytes: MinMaxBytes, MaxFiles: 2}},
		"relative path": {"x.log", Options{MaxBytes: MinMaxBytes, MaxFiles: 2}},
		"unclean path":  {dir + "/a/../x.log", Options{MaxBytes: MinMaxBytes, MaxFiles: 2}},
		"tiny cap":      {filepath.Join(dir, "x.log"), Options{MaxBytes: 100, MaxFiles: 2}},
		"no files":      {filepath.Join(dir, "x.log"), Options{MaxBytes: MinMaxBytes, MaxFiles: 0}},
		"too many":      {filepath.Join(dir, "x.log"), Options{MaxBytes: MinMaxBytes, MaxFiles: MaxMaxFiles + 1}},
		"directory":     {dir, Options{MaxBytes: MinMaxBytes, MaxFiles: 2}},
	} {
		if w, err := NewWriter(tc.path, tc.o); err == nil {
			w.Close()
			t.Errorf("%s: accepted", name)
		}
	}
	if b, _ := os.ReadFile(target); len(b) != 0 {
		t.Fatalf("wrote through the symlink: %q", b)
	}
}

func TestReaderRefusesSymlinks(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "secret")
	if err := os.WriteFile(target, []byte("secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "x.log")
	if err := os.WriteFile(path, []byte("2026-01-01T00:00:00Z stdout F a\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, path+".1"); err != nil {
		t.Fatal(err)
	}
	if data, _, err := Read(path, 0, 0); err == nil {
		t.Fatalf("read through a symlinked rotated file: %q", data)
	}
	if err := os.Symlink(target, filepath.Join(dir, "y.log")); err != nil {
		t.Fatal(err)
	}
	if data, _, err := Read(filepath.Join(dir, "y.log"), 0, 0); err == nil {
		t.Fatalf("read through a symlink: %q", data)
	}
}

func TestMissingLogReadsEmpty(t *testing.T) {
	data, truncated, err := Read(filepath.Join(t.TempDir(), "none.log"), 100, 100)
	if err != nil || len(data) != 0 || truncated {
		t.Fatalf("missing log: %q %v %v", data, truncated, err)
	}
}

func TestLongLinesAreSplitIntoPartialRecords(t *testing.T) {
	w, path := newWriter(t, Options{MaxBytes: 1 << 20, MaxFiles: 1, MaxLine: 16 << 10})
	long := strings.Repeat("x", 40<<10) + "\nshort\n" + strings.Repeat("y", 16<<10) + "\ntail without newline"
	err := Split(strings.NewReader(long), w.MaxLine(), func(text []byte, partial bool) {
		if err := w.Write(Stdout, text, partial); err != nil {
			t.Fatal(err)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(path)
	rs := records(t, data)
	var tags []string
	var joined []string
	cur := ""
	for _, r := range rs {
		if len(r.Text) > 16<<10 {
			t.Fatalf("record of %d bytes", len(r.Text))
		}
		cur += string(r.Text)
		if r.Partial {
			tags = append(tags, "P")
			continue
		}
		tags = append(tags, "F")
		joined = append(joined, cur)
		cur = ""
	}
	if got := strings.Join(tags, ""); got != "PPFFPFF" {
		t.Fatalf("tags = %s", got)
	}
	if strings.Join(joined, "\n") != long {
		t.Fatal("joined records differ from the input")
	}
	// Write splits on its own too.
	if err := w.Write(Stderr, bytes.Repeat([]byte("z"), 33<<10), false); err != nil {
		t.Fatal(err)
	}
	data, _ = os.ReadFile(path)
	rs = records(t, data)
	if n := len(rs); !rs[n-3].Partial || !rs[n-2].Partial || rs[n-1].Partial || len(rs[n-1].Text) != 1<<10 {
		t.Fatalf("oversized write not split: %+v", rs[n-3:])
	}
}

// seqLines writes n numbered lines "line <i> <pad>".
func seqLines(t testing.TB, w *Writer, from, n int, pad string) {
	t.Helper()
	for i := from; i < from+n; i++ {
		s := Stdout
		if i%3 == 0 {
			s = Stderr
		}
		if err := w.Write(s, []byte("line "+strconv.Itoa(i)+" "+pad), false); err != nil {
			t.Fatal(err)
		}
	}
}

// seqs returns the line numbers of data's records, checking they increase
// by one.
func seqs(t testing.TB, data []byte) []int {
	t.Helper()
	var out []int
	for _, r := range records(t, data) {
		f := strings.Fields(string(r.Text))
		n, err := strconv.Atoi(f[1])
		if err != nil {
			t.Fatalf("record %q", r.Text)
		}
		if len(out) > 0 && n != out[len(out)-1]+1 {
			t.Fatalf("line %d follows %d", n, out[len(out)-1])
		}
		out = append(out, n)
	}
	return out
}

func TestRotationKeepsAtMostMaxFilesOfMaxBytes(t *testing.T) {
	const maxBytes, maxFiles = 8 << 10, 3
	w, path := newWriter(t, Options{MaxBytes: maxBytes, MaxFiles: maxFiles})
	seqLines(t, w, 0, 10, "")
	if data, truncated, err := Read(path, 0, 0); err != nil || truncated || len(seqs(t, data)) != 10 {
		t.Fatalf("before rotation: %v %v", truncated, err)
	}
	pad := strings.Repeat("p", 100)
	seqLines(t, w, 10, 2000, pad)
	var total int64
	for i := 0; i < maxFiles; i++ {
		fi, err := os.Stat(name(path, i))
		if err != nil {
			t.Fatalf("file %d: %v", i, err)
		}
		if fi.Size() > maxBytes {
			t.Fatalf("file %d holds %d bytes, cap %d", i, fi.Size(), maxBytes)
		}
		total += fi.Size()
	}
	if _, err := os.Stat(name(path, maxFiles)); !os.IsNotExist(err) {
		t.Fatalf("a file beyond max files exists: %v", err)
	}
	if total > maxFiles*maxBytes || total < (maxFiles-1)*maxBytes-1024 {
		t.Fatalf("retained %d bytes", total)
	}
	data, truncated, err := Read(path, 0, 0)
	if err != nil || !truncated {
		t.Fatalf("read: truncated=%v %v", truncated, err)
	}
	got := seqs(t, data)
	if got[len(got)-1] != 2009 || got[0] <= 10 {
		t.Fatalf("read lines %d..%d", got[0], got[len(got)-1])
	}
	if int64(len(data)) != total {
		t.Fatalf("read %d of %d bytes", len(data), total)
	}
	if err := Remove(path); err != nil {
		t.Fatal(err)
	}
	if m, _ := filepath.Glob(path + "*"); len(m) != 0 {
		t.Fatalf("left after Remove: %v", m)
	}
}

func TestSingleFileLogRotatesIntoItself(t *testing.T) {
	w, path := newWriter(t, Options{MaxBytes: MinMaxBytes, MaxFiles: 1})
	seqLines(t, w, 0, 500, strings.Repeat("p", 50))
	fi, err := os.Stat(path)
	if err != nil || fi.Size() > MinMaxBytes {
		t.Fatalf("size %v %v", fi, err)
	}
	data, truncated, err := Read(path, 0, 0)
	if err != nil || !truncated || seqs(t, data)[len(seqs(t, data))-1] != 499 {
		t.Fatalf("read %v %v", truncated, err)
	}
}

func TestReaderTailAndLimitCutAtLineBoundaries(t *testing.T) {
	w, path := newWriter(t, Options{MaxBytes: 4 << 10, MaxFiles: 4})
	seqLines(t, w, 0, 150, "0123456789")
	all, truncated, err := Read(path, 0, 0)
	if err != nil || truncated {
		t.Fatalf("all: %v %v", truncated, err)
	}
	if _, err := os.Stat(path + ".1"); err != nil {
		t.Fatal("the test needs a rotated file")
	}
	for _, tc := range []struct {
		tail, limit int64
	}{{1, 0}, {100, 0}, {1000, 0}, {5000, 0}, {int64(len(all)), 0}, {0, 1}, {0, 100}, {0, 5000}, {3000, 1000}, {int64(len(all)) + 1, 0}} {
		got, truncated, err := Read(path, tc.tail, tc.limit)
		if err != nil {
			t.Fatal(err)
		}
		name := fmt.Sprintf("tail %d limit %d", tc.tail, tc.limit)
		whole := (tc.tail == 0 || tc.tail >= int64(len(all))) && (tc.limit == 0 || tc.limit >= int64(len(all)))
		if truncated != !whole {
			t.Errorf("%s: truncated = %v", name, truncated)
		}
		if first := bytes.IndexByte(all, '\n') + 1; tc.limit > 0 && tc.limit < int64(first) {
			// No whole line fits: the limit cuts inside the first line.
			if !bytes.Equal(got, all[:tc.limit]) {
				t.Errorf("%s: %q", name, got)
			}
			continue
		}
		if !bytes.Contains(all, got) {
			t.Fatalf("%s: not a part of the log", name)
		}
		start := bytes.Index(all, got)
		if len(got) > 0 && (start > 0 && all[start-1] != '\n' || got[len(got)-1] != '\n') {
			t.Errorf("%s: %q does not start and end at line boundaries", name, got)
		}
		if tc.tail > 0 && int64(len(got)) > tc.tail || tc.limit > 0 && int64(len(got)) > tc.limit && len(got) > 0 && bytes.Count(got, []byte{'\n'}) > 1 {
			t.Errorf("%s: %d bytes", name, len(got))
		}
		if tc.tail > 0 && tc.limit == 0 && len(got) > 0 && !bytes.HasSuffix(all, got) {
			t.Errorf("%s: not the end of the log", name)
		}
		if tc.tail == 0 && tc.limit > 0 && !bytes.HasPrefix(all, got) {
			t.Errorf("%s: not the start of the log", name)
		}
		seqs(t, got)
	}
}

func TestWriterRepairsATornLastRecord(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.log")
	if err := os.WriteFile(path, []byte("2026-01-01T00:00:00Z stdout F line 0\n2026-01-01T00:00:00Z stdout F li"), 0o600); err != nil {
		t.Fatal(err)
	}
	w, err := NewWriter(path, Options{MaxBytes: 1 << 20, MaxFiles: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if err := w.Write(Stdout, []byte("line 1"), false); err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimSuffix(string(data), "\n"), "\n")
	if len(lines) != 3 || !strings.HasSuffix(lines[2], " stdout F line 1") {
		t.Fatalf("lines = %q", lines)
	}
}

// TestReadsDuringRotationSeeConsistentLogs runs readers against a writer
// that rotates all the time: every read must be whole records in order,
// with no line twice and none missing in the middle.
func TestReadsDuringRotationSeeConsistentLogs(t *testing.T) {
	w, path := newWriter(t, Options{MaxBytes: MinMaxBytes, MaxFiles: 3})
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(done)
		seqLines(t, w, 0, 20000, "abcdefghij")
	}()
	reads := 0
	for !t.Failed() {
		select {
		case <-done:
			wg.Wait()
			if reads == 0 {
				t.Fatal("no read ran")
			}
			return
		default:
		}
		data, _, err := Read(path, 0, 0)
		if err != nil {
			t.Error(err)
			break
		}
		seqs(t, data)
		reads++
	}
	w.Close()
	wg.Wait()
}
