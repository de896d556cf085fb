package runtime

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/gpuaas/gpuaas/agent/runtime/logfile"
	"github.com/gpuaas/gpuaas/test/harness"
)

// TestLogDriverCapsAndRotatesTheLog: with a log driver configured, the
// shim runs gpuaas-logdriver for the task, and the container's output
// lands in size-capped, rotated files: no file over the cap, no more files
// than configured, the newest output readable (the last line is there)
// and the cut marked. The shim owns the driver, so the output written
// while no agent is connected (its runtime closed right after Start, a
// new one reading the end) is not lost.
func TestLogDriverCapsAndRotatesTheLog(t *testing.T) {
	driver := harness.BuildBinary(t, "./agent/cmd/gpuaas-logdriver")
	e := newEnv(t)
	const maxBytes, maxFiles = logfile.MinMaxBytes, 2
	e.tweak = func(c *Config) { c.LogDriver, c.LogMaxBytes, c.LogMaxFiles = driver, maxBytes, maxFiles }
	rt := e.connect()
	ctx := context.Background()

	// About 60 KiB of stdout, then (once the driver has had time to drain
	// the stdout pipe: the streams are separate pipes, pumped
	// independently) a marker on stderr and one on stdout.
	s := e.spec("sh", "-c", `sleep 0.3; i=0; while [ $i -lt 1000 ]; do echo "line $i of the tenant's output, padded...."; i=$((i+1)); done; sleep 1; echo oops >&2; sleep 0.2; echo END`)
	if _, err := rt.Create(ctx, s); err != nil {
		t.Fatal(err)
	}
	if _, err := rt.Start(ctx, s.ID); err != nil {
		t.Fatal(err)
	}
	if err := rt.Close(); err != nil { // the agent goes away while it runs
		t.Fatal(err)
	}
	e.rt = e.connect()
	if st := e.waitExit(s.ID); st.ExitCode != 0 {
		t.Fatalf("exit %d", st.ExitCode)
	}
	var out []byte
	deadline := 200
	for ; deadline > 0; deadline-- {
		b, _, err := logfile.Read(s.LogPath, 0, 0)
		// The streams are separate pipes: either marker may come last.
		if err == nil && strings.Contains(string(b), " stdout F END\n") && strings.Contains(string(b), " stderr F oops\n") {
			out = b
			break
		}
		e.waitBriefly()
	}
	if out == nil {
		t.Fatalf("log %s never held the last lines of both streams", s.LogPath)
	}
	for i := 0; i <= maxFiles+1; i++ {
		name := s.LogPath
		if i > 0 {
			name = fmt.Sprintf("%s.%d", s.LogPath, i)
		}
		fi, err := os.Stat(name)
		switch {
		case i < maxFiles && err != nil:
			t.Errorf("%s: %v, want a rotated file", name, err)
		case i < maxFiles && fi.Size() > maxBytes:
			t.Errorf("%s is %d bytes, over the %d cap", name, fi.Size(), maxBytes)
		case i >= maxFiles && err == nil:
			t.Errorf("%s exists: more than %d files kept", name, maxFiles)
		}
	}
	if _, err := os.Stat(s.LogPath + logfile.DroppedSuffix); err != nil {
		t.Errorf("no marker of the dropped output: %v", err)
	}
	if !strings.Contains(string(out), " stderr F oops\n") || !strings.Contains(string(out), " stdout F line 999 of") {
		t.Errorf("log lacks the newest records:\n%s", out[max(0, len(out)-300):])
	}
	if strings.Contains(string(out), " stdout F line 0 of") {
		t.Error("the oldest output survived rotation past the cap")
	}
	e.stop(s.ID, 0)
}
