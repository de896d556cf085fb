package isolation

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf/link"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

// childEnv makes the test binary a child process that performs operations
// inside a cgroup (see childMain) instead of running tests.
const (
	childEnv    = "GPUAAS_ISOLATION_CHILD"
	childOpsEnv = "GPUAAS_ISOLATION_OPS"
	// childPort is where the child, in its own network namespace, listens
	// on 127.0.0.1, 127.0.0.2 and ::1.
	childPort = 7777
)

// TestMain runs the child mode, or the tests with a goroutine leak check
// (the event reader and the aggregator are goroutines).
func TestMain(m *testing.M) {
	if os.Getenv(childEnv) == "1" {
		os.Exit(childMain())
	}
	goleak.VerifyTestMain(m)
}

// inCI reports whether the tests run in CI, where a root test that cannot
// run must fail.
func inCI() bool {
	v := strings.ToLower(os.Getenv("CI"))
	return v == "true" || v == "1"
}

// requireRoot stops a test that needs root, a cgroup2 hierarchy and cgroup
// BPF: in CI it fails, elsewhere it is skipped with the reason.
func requireRoot(t testing.TB) {
	t.Helper()
	var errs []error
	if os.Geteuid() != 0 {
		errs = append(errs, fmt.Errorf("not running as root (euid %d)", os.Geteuid()))
	} else {
		if _, err := CgroupV2Root(); err != nil {
			errs = append(errs, err)
		}
		if _, err := probeKernel(); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		if inCI() {
			t.Fatalf("CI must run this test: %v", err)
		}
		t.Skipf("skipping (set CI=true to make this a failure): %v", err)
	}
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// newPinRoot returns a fresh pin root under /sys/fs/bpf and removes it,
// with anything still pinned there, when the test ends.
func newPinRoot(t testing.TB) string {
	t.Helper()
	if err := EnsureBPFFS(DefaultBPFFS); err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(DefaultBPFFS, fmt.Sprintf("gpuaas-test-%08x", rand.Uint32()))
	t.Cleanup(func() {
		entries, _ := os.ReadDir(root)
		for _, ent := range entries {
			if ent.IsDir() {
				if err := removePinDir(filepath.Join(root, ent.Name())); err != nil {
					t.Errorf("clean up pins: %v", err)
				}
			}
		}
		if err := os.RemoveAll(root); err != nil {
			t.Errorf("clean up pin root: %v", err)
		}
	})
	return root
}

// newEnforcer returns an Enforcer on a fresh pin root, closed at the end.
func newEnforcer(t testing.TB) *Enforcer {
	t.Helper()
	return newEnforcerAt(t, newPinRoot(t))
}

func newEnforcerAt(t testing.TB, root string) *Enforcer {
	t.Helper()
	e, err := NewEnforcer(Config{PinRoot: root, Logger: testLogger(t), RingBufferSize: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	return e
}

// newCgroup creates an empty cgroup2 directory for a test and removes it
// at the end.
func newCgroup(t testing.TB) string {
	t.Helper()
	root, err := CgroupV2Root()
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(root, fmt.Sprintf("gpuaas-isolation-test-%08x", rand.Uint32()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeCgroup(t, dir) })
	return dir
}

func removeCgroup(t testing.TB, dir string) {
	t.Helper()
	// A child that just exited may take a moment to leave the cgroup.
	var err error
	for range 100 {
		if err = unix.Rmdir(dir); err == nil || errors.Is(err, fs.ErrNotExist) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Errorf("remove cgroup %s: %v", dir, err)
}

// childOp is one operation the child performs; the child reports "ok" or
// the errno name (EPERM, ENXIO, ...). For an open of a device node it
// reports EPERM or "passed": any other outcome means the cgroup check let
// the open through (a driverless node then fails with ENXIO, a node with a
// driver behind it may open), unless Exact asks for the errno.
type childOp struct {
	Op    string `json:"op"` // open, tcp, udp-connect, udp-sendto, tcp-fastopen
	Path  string `json:"path,omitempty"`
	Flags int    `json:"flags,omitempty"`
	Exact bool   `json:"exact,omitempty"`
	Addr  string `json:"addr,omitempty"` // netip.AddrPort
}

func (o childOp) String() string {
	if o.Op == "open" {
		return fmt.Sprintf("open %s (flags %#x)", filepath.Base(o.Path), o.Flags)
	}
	return o.Op + " " + o.Addr
}

func openOp(path string, flags int) childOp { return childOp{Op: "open", Path: path, Flags: flags} }

// openExact is an open whose exact result matters (/dev/null: "ok").
func openExact(path string, flags int) childOp {
	return childOp{Op: "open", Path: path, Flags: flags, Exact: true}
}
func netOp(op, addr string) childOp { return childOp{Op: op, Addr: addr} }

// runChild runs ops in a child process in a network namespace of its own
// (only loopback, so nothing it does can leave the machine), placed in
// cgroupDir first ("" leaves it in the test's cgroup). It returns one
// result per op.
func runChild(t testing.TB, cgroupDir string, ops ...childOp) []string {
	t.Helper()
	js, err := json.Marshal(ops)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"=1", childOpsEnv+"="+string(js))
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET, Pdeathsig: syscall.SIGKILL}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		stdin.Close()
		cmd.Process.Kill()
		cmd.Wait()
	}()
	rd := bufio.NewReader(stdout)
	line, err := rd.ReadString('\n')
	if err != nil || line != "ready\n" {
		t.Fatalf("child not ready: %q %v; stderr: %s", line, err, stderr.String())
	}
	if cgroupDir != "" {
		if err := os.WriteFile(filepath.Join(cgroupDir, "cgroup.procs"), []byte(strconv.Itoa(cmd.Process.Pid)), 0); err != nil {
			t.Fatalf("move child into %s: %v", cgroupDir, err)
		}
	}
	if _, err := io.WriteString(stdin, "go\n"); err != nil {
		t.Fatal(err)
	}
	var res []string
	if err := json.NewDecoder(rd).Decode(&res); err != nil {
		t.Fatalf("child results: %v; stderr: %s", err, stderr.String())
	}
	if len(res) != len(ops) {
		t.Fatalf("child returned %d results for %d ops", len(res), len(ops))
	}
	return res
}

// childMain is the child process: set up loopback and listeners, wait to
// be moved into the cgroup, perform the ops, print the results.
func childMain() int {
	var ops []childOp
	if err := json.Unmarshal([]byte(os.Getenv(childOpsEnv)), &ops); err != nil {
		fmt.Fprintln(os.Stderr, "ops:", err)
		return 2
	}
	if err := loopbackUp(); err != nil {
		fmt.Fprintln(os.Stderr, "loopback:", err)
		return 2
	}
	for _, addr := range []string{"127.0.0.1", "127.0.0.2", "::1"} {
		ln, err := net.Listen("tcp", net.JoinHostPort(addr, strconv.Itoa(childPort)))
		if err != nil {
			fmt.Fprintln(os.Stderr, "listen:", err)
			return 2
		}
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Close()
			}
		}()
	}
	fmt.Println("ready")
	if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
		return 2
	}
	res := make([]string, len(ops))
	for i, op := range ops {
		res[i] = errnoName(doOp(op))
		if op.Op == "open" && !op.Exact && res[i] != "EPERM" {
			res[i] = "passed"
		}
	}
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		return 2
	}
	return 0
}

func errnoName(err error) string {
	if err == nil {
		return "ok"
	}
	var errno unix.Errno
	if errors.As(err, &errno) {
		if name := unix.ErrnoName(errno); name != "" {
			return name
		}
	}
	return err.Error()
}

// loopbackUp brings lo up in the child's new network namespace.
func loopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return err
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	return unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr)
}

func sockaddr(ap netip.AddrPort) (int, unix.Sockaddr) {
	if ap.Addr().Is4() {
		return unix.AF_INET, &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}
	}
	return unix.AF_INET6, &unix.SockaddrInet6{Addr: ap.Addr().As16(), Port: int(ap.Port())}
}

// doOp performs one op with raw system calls, so the errno is the
// kernel's.
func doOp(op childOp) error {
	if op.Op == "open" {
		fd, err := unix.Open(op.Path, op.Flags|unix.O_CLOEXEC, 0)
		if err == nil {
			unix.Close(fd)
		}
		return err
	}
	ap, err := netip.ParseAddrPort(op.Addr)
	if err != nil {
		return err
	}
	family, sa := sockaddr(ap)
	typ := unix.SOCK_STREAM
	if strings.HasPrefix(op.Op, "udp") {
		typ = unix.SOCK_DGRAM
	}
	fd, err := unix.Socket(family, typ|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	// A connect that would wait (it cannot in a namespace with only
	// loopback) gives up after a second.
	tv := unix.Timeval{Sec: 1}
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
	switch op.Op {
	case "tcp", "udp-connect":
		return unix.Connect(fd, sa)
	case "udp-sendto":
		return unix.Sendto(fd, []byte("x"), 0, sa)
	case "tcp-fastopen":
		return unix.Sendto(fd, []byte("x"), unix.MSG_FASTOPEN, sa)
	}
	return fmt.Errorf("unknown op %q", op.Op)
}

// freeCharMajor returns a character major no driver has registered, for
// capability nodes that must exist without a driver.
func freeCharMajor(t testing.TB) uint32 {
	t.Helper()
	data, err := os.ReadFile("/proc/devices")
	if err != nil {
		t.Fatal(err)
	}
	used := map[uint32]bool{}
	inChar := false
	for _, line := range strings.Split(string(data), "\n") {
		switch {
		case strings.HasPrefix(line, "Character devices:"):
			inChar = true
		case strings.HasPrefix(line, "Block devices:"):
			inChar = false
		case inChar:
			f := strings.Fields(line)
			if len(f) > 0 {
				if n, err := strconv.Atoi(f[0]); err == nil {
					used[uint32(n)] = true
				}
			}
		}
	}
	for m := uint32(240); m > 200; m-- {
		if !used[m] {
			return m
		}
	}
	t.Fatal("no free character major between 200 and 240")
	return 0
}

// mknod creates a character device node in dir.
func mknod(t testing.TB, dir, name string, major, minor uint32) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := unix.Mknod(path, unix.S_IFCHR|0o666, int(unix.Mkdev(major, minor))); err != nil {
		t.Fatalf("mknod %s: %v", path, err)
	}
	return path
}

// cgroupPrograms lists the program ids attached to dir, per attach point
// role.
func cgroupPrograms(t testing.TB, dir string) map[string][]uint32 {
	t.Helper()
	f, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string][]uint32{}
	for _, ap := range attachPoints {
		res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: ap.attach})
		if err != nil {
			t.Fatalf("query %s programs on %s: %v", ap.role, dir, err)
		}
		for _, p := range res.Programs {
			out[ap.role] = append(out[ap.role], uint32(p.ID))
		}
	}
	return out
}

// pinEntries lists the pin root, without the event ring.
func pinEntries(t testing.TB, root string) []string {
	t.Helper()
	entries, err := os.ReadDir(root)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, ent := range entries {
		if ent.Name() != eventsPin {
			out = append(out, ent.Name())
		}
	}
	return out
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t testing.TB, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("timed out waiting for %s", what)
		case <-time.After(10 * time.Millisecond):
		}
	}
}
