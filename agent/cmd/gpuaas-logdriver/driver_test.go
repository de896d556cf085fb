package main

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/gpuaas/gpuaas/agent/runtime/logfile"
)

var (
	buildOnce sync.Once
	buildDir  string
	buildPath string
	buildErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// BuildDriver builds this command once per test binary and returns the
// path of the executable.
func BuildDriver(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		goBin, err := exec.LookPath("go")
		if err != nil {
			buildErr = err
			return
		}
		if buildDir, buildErr = os.MkdirTemp("", "logdriver"); buildErr != nil {
			return
		}
		// Traversable by the shim, which may run as another user.
		if buildErr = os.Chmod(buildDir, 0o755); buildErr != nil {
			return
		}
		buildPath = filepath.Join(buildDir, "gpuaas-logdriver")
		out, err := exec.Command(goBin, "build", "-o", buildPath, ".").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatalf("build gpuaas-logdriver: %v", buildErr)
	}
	return buildPath
}

// shimRun starts the driver the way the containerd shim does: fd 3 and 4
// the read ends of the container's stdout and stderr pipes, fd 5 the write
// end of the ready pipe, and only the two CONTAINER_ variables.
type shimRun struct {
	cmd            *exec.Cmd
	stdout, stderr *os.File // write ends: the container's side
	ready          *os.File // read end
	log            bytes.Buffer
}

func startDriver(t *testing.T, args ...string) *shimRun {
	t.Helper()
	bin := BuildDriver(t)
	or, ow, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	er, ew, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	rr, rw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	s := &shimRun{stdout: ow, stderr: ew, ready: rr}
	s.cmd = exec.Command(bin, args...)
	s.cmd.ExtraFiles = []*os.File{or, er, rw}
	s.cmd.Env = []string{"CONTAINER_ID=ctr-1", "CONTAINER_NAMESPACE=gpuaas-test"}
	s.cmd.Stderr = &s.log
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// The shim closes its copies of the driver's ends after the start.
	or.Close()
	er.Close()
	rw.Close()
	t.Cleanup(func() {
		ow.Close()
		ew.Close()
		rr.Close()
		if s.cmd.ProcessState == nil {
			s.cmd.Process.Kill()
			s.cmd.Wait()
		}
	})
	return s
}

// waitReady returns what the driver wrote to the ready pipe before closing it.
func (s *shimRun) waitReady(t *testing.T) []byte {
	t.Helper()
	b, err := io.ReadAll(s.ready)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestDriverRotatesAndKeepsBothStreamsWholeLines(t *testing.T) {
	path := filepath.Join(t.TempDir(), "logs", "l-aaaaaaaaaaaaaaaaaaaa.log")
	// The streams reach the driver through separate pipes, so one can run
	// ahead of the other by a pipe buffer plus the queue (about 230 KB of
	// records here): what is kept must hold more than that for both
	// streams' last lines to be in it, and much less than what is written
	// (about 900 KB) so rotation happens.
	const maxBytes, maxFiles = 128 << 10, 3
	s := startDriver(t, "--max-files", strconv.Itoa(maxFiles), "--file", path, "--max-bytes", strconv.Itoa(maxBytes))
	if got := s.waitReady(t); !bytes.Equal(got, []byte{1}) {
		t.Fatalf("ready pipe got %q before closing", got)
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("log not created before ready: %v", err)
	}
	// Far more than the cap, from both streams (the driver reads them at
	// once), ending with a line longer than a record on each.
	const n = 6000
	for i := 0; i < n; i++ {
		fmt.Fprintf(s.stdout, "out %d %s\n", i, strings.Repeat("x", 20))
		fmt.Fprintf(s.stderr, "err %d %s\n", i, strings.Repeat("x", 20))
	}
	fmt.Fprintf(s.stdout, "out long %s\n", strings.Repeat("y", 40<<10))
	fmt.Fprintf(s.stderr, "err long %s\n", strings.Repeat("y", 40<<10))
	s.stdout.Close()
	s.stderr.Close()
	if err := s.cmd.Wait(); err != nil {
		t.Fatalf("driver exit: %v\n%s", err, s.log.String())
	}

	var total int64
	for i := 0; i < maxFiles; i++ {
		p := path
		if i > 0 {
			p += "." + strconv.Itoa(i)
		}
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatalf("rotated file %d: %v", i, err)
		}
		if fi.Size() > maxBytes || fi.Mode().Perm() != 0o600 {
			t.Fatalf("%s: %d bytes, mode %v", p, fi.Size(), fi.Mode())
		}
		total += fi.Size()
	}
	if _, err := os.Stat(path + "." + strconv.Itoa(maxFiles)); !os.IsNotExist(err) {
		t.Fatalf("more than %d files kept", maxFiles)
	}
	data, truncated, err := logfile.Read(path, 0, 0)
	if err != nil || !truncated || int64(len(data)) != total {
		t.Fatalf("read %d of %d bytes, truncated %v: %v", len(data), total, truncated, err)
	}
	next := map[logfile.Stream]int{}
	long := map[logfile.Stream]string{}
	for _, line := range strings.SplitAfter(strings.TrimSuffix(string(data), "\n"), "\n") {
		r, err := logfile.ParseRecord([]byte(line))
		if err != nil {
			t.Fatalf("line %q: %v", line, err)
		}
		text := string(r.Text)
		if strings.Contains(text, " long ") || long[r.Stream] != "" {
			long[r.Stream] += text
			continue
		}
		var prefix string
		var i int
		if _, err := fmt.Sscanf(text, "%s %d", &prefix, &i); err != nil || prefix != map[logfile.Stream]string{logfile.Stdout: "out", logfile.Stderr: "err"}[r.Stream] {
			t.Fatalf("record %q on %s", text, r.Stream)
		}
		// Oldest output was rotated away: each stream starts anywhere,
		// then goes on without a gap.
		if seen, ok := next[r.Stream]; ok && i != seen {
			t.Fatalf("%s: line %d after %d", r.Stream, i, seen-1)
		}
		next[r.Stream] = i + 1
	}
	for _, st := range []logfile.Stream{logfile.Stdout, logfile.Stderr} {
		if next[st] != n {
			t.Fatalf("%s ends at line %d", st, next[st]-1)
		}
		if want := map[logfile.Stream]string{logfile.Stdout: "out", logfile.Stderr: "err"}[st] + " long " + strings.Repeat("y", 40<<10); long[st] != want {
			t.Fatalf("%s: long line reassembles to %d bytes", st, len(long[st]))
		}
	}
}

func TestDriverDrainsWhenTheLogCannotBeOpened(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "target")
	os.WriteFile(target, nil, 0o600)
	path := filepath.Join(dir, "x.log")
	if err := os.Symlink(target, path); err != nil {
		t.Fatal(err)
	}
	s := startDriver(t, "--file", path, "--max-bytes", "65536", "--max-files", "2")
	s.waitReady(t)
	// The container can still write all it wants.
	if _, err := io.WriteString(s.stdout, lines("out", 20000)); err != nil {
		t.Fatal(err)
	}
	s.stdout.Close()
	s.stderr.Close()
	err := s.cmd.Wait()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
		t.Fatalf("exit: %v", err)
	}
	if !strings.Contains(s.log.String(), "symbolic link") {
		t.Fatalf("driver log: %s", s.log.String())
	}
	if b, _ := os.ReadFile(target); len(b) != 0 {
		t.Fatal("wrote through a symlink")
	}
}

func TestDriverRefusesBadArgumentsBeforeReady(t *testing.T) {
	s := startDriver(t, "--file", "relative.log")
	if got := s.waitReady(t); len(got) != 0 {
		t.Fatalf("ready signalled: %q", got)
	}
	err := s.cmd.Wait()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 {
		t.Fatalf("exit: %v", err)
	}
}
