// Command gpuaas-logdriver stores a tenant container's stdout and stderr in
// size-capped, rotated files (package agent/runtime/logfile), as a
// containerd binary logging driver.
//
// The containerd shim runs it for each task with fd 3 the container's
// stdout pipe, fd 4 its stderr pipe and fd 5 a pipe the driver writes one
// byte to and closes once it is ready (the "binary-v2" protocol; the older
// "binary" one takes the close alone), and CONTAINER_ID and
// CONTAINER_NAMESPACE in the environment. The arguments come from the log
// URI's query, which cio.BinaryIO builds from a map and the shim turns into
// "key value" pairs in no fixed order, so the keys carry their dashes:
//
//	cio.BinaryIO("/usr/lib/gpuaas/gpuaas-logdriver", map[string]string{
//		"--file": "/var/lib/gpuaas/logs/<lease>.log", "--max-bytes": "10485760", "--max-files": "3"})
//
// It copies both streams until both reach EOF, then exits 0. It never makes
// the container wait on the disk: a record that cannot be written is
// dropped and counted. It must never write to the log anything but the
// container's own output.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/gpuaas/gpuaas/agent/runtime/logfile"
	"github.com/gpuaas/gpuaas/pkg/sanitize"
)

// The descriptors the shim passes.
const (
	fdStdout = 3
	fdStderr = 4
	fdReady  = 5
)

// stallTimeout is how long a stream waits for a stuck disk before the
// driver starts dropping its records. Long enough that a loaded host (or a
// slow fsync) never loses output, short enough that a dead disk does not
// hold a tenant's writes for long: its pipe and the queue absorb the wait.
const stallTimeout = 10 * time.Second

type options struct {
	file     string
	maxBytes int64
	maxFiles int
}

func parseArgs(args []string) (options, error) {
	var o options
	fs := flag.NewFlagSet("gpuaas-logdriver", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&o.file, "file", "", "absolute path of the log file")
	fs.Int64Var(&o.maxBytes, "max-bytes", 10<<20, "cap of each file in bytes")
	fs.IntVar(&o.maxFiles, "max-files", 3, "files kept, the current one included")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() != 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if o.file == "" || !filepath.IsAbs(o.file) || filepath.Clean(o.file) != o.file {
		return o, fmt.Errorf("--file %q must be an absolute, clean path", o.file)
	}
	if o.maxBytes < logfile.MinMaxBytes {
		return o, fmt.Errorf("--max-bytes %d is below %d", o.maxBytes, logfile.MinMaxBytes)
	}
	if o.maxFiles < 1 || o.maxFiles > logfile.MaxMaxFiles {
		return o, fmt.Errorf("--max-files %d is not in 1..%d", o.maxFiles, logfile.MaxMaxFiles)
	}
	return o, nil
}

func main() {
	// The shim closes the pipes, then sends SIGTERM (and SIGKILL 12 s
	// later): what is still queued must reach the file, and EOF follows
	// the close anyway.
	signal.Ignore(syscall.SIGTERM, syscall.SIGINT)
	log := sanitize.Logger(os.Stderr, slog.LevelInfo, true).With(
		"container", os.Getenv("CONTAINER_ID"), "namespace", os.Getenv("CONTAINER_NAMESPACE"))
	os.Exit(run(os.Args[1:], log))
}

func run(args []string, log *slog.Logger) int {
	o, err := parseArgs(args)
	if err != nil {
		log.Error("bad arguments", "err", err)
		return 2
	}
	stdout, stderr := os.NewFile(fdStdout, "stdout"), os.NewFile(fdStderr, "stderr")
	ready := os.NewFile(fdReady, "ready")
	for _, f := range []*os.File{stdout, stderr, ready} {
		if _, err := f.Stat(); err != nil {
			log.Error("the shim's descriptors 3, 4 and 5 are required", "missing", f.Name(), "err", err)
			return 2
		}
	}
	defer stdout.Close()
	defer stderr.Close()

	var w recordWriter
	maxLine := logfile.DefaultMaxLine
	lw, err := logfile.NewWriter(o.file, logfile.Options{MaxBytes: o.maxBytes, MaxFiles: o.maxFiles})
	if err != nil {
		// Still drain the pipes: a tenant's write(2) must never block on
		// its log.
		log.Error("open container log; output is discarded", "err", err)
		w = discard{}
	} else {
		w, maxLine = lw, lw.MaxLine()
		defer lw.Close()
	}
	signalReady(ready, log)

	p := newPump(w, maxLine, stallTimeout, log)
	st := p.run(stdout, stderr)
	if lw != nil {
		if err := lw.Close(); err != nil {
			log.Error("close container log", "err", err)
		}
	}
	log.Info("container streams closed", "records", st.Records, "dropped_failed", st.Failed, "dropped_stalled", st.Stalled)
	if err != nil {
		return 1
	}
	return 0
}

// signalReady tells the shim the driver is set up: one byte (binary-v2),
// then the close (binary).
func signalReady(ready *os.File, log *slog.Logger) {
	_, werr := ready.Write([]byte{1})
	if err := errors.Join(werr, ready.Close()); err != nil {
		log.Warn("signal ready", "err", err)
	}
}

// discard stands in for a log that could not be opened.
type discard struct{}

func (discard) WriteRecord(logfile.Record) error { return errors.New("container log is not open") }
