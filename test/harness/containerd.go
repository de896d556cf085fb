package harness

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
)

// maxSocketPath keeps unix socket paths (plus ".ttrpc") under the kernel's
// 108-byte sun_path limit.
const maxSocketPath = 100

// runcRoot is where the runc shim keeps container state unless the client
// overrides it: it is shared by every containerd on the host, so tests that
// run containerd in parallel must use distinct container ids.
const runcRoot = "/run/containerd/runc"

// Options configure StartContainerd.
type Options struct {
	// Dir holds the config, root, state, sockets and containerd.log. If
	// empty a new directory under /tmp is created and Close removes it; a
	// given Dir is left in place.
	Dir string
	// Binary is the containerd executable; LookPath("containerd") if empty.
	Binary string
	// StartTimeout bounds the wait for the API to answer; 15 s if zero.
	StartTimeout time.Duration
	// LogLevel is containerd's log level; "info" if empty.
	LogLevel string
}

// Containerd is a containerd daemon started as a child process with a
// private root, state and socket.
type Containerd struct {
	dir      string
	ownDir   bool
	sockDir  string // a separate short directory for the sockets, if any
	address  string
	logPath  string
	started  time.Duration
	cmd      *exec.Cmd
	exited   chan struct{}
	waitErr  error
	closeErr error
	once     sync.Once
}

// StartContainerd starts containerd and returns once its API answers. ctx
// bounds the start only: the daemon runs until Close, which must be called
// even when the caller's context is cancelled.
func StartContainerd(ctx context.Context, opts Options) (_ *Containerd, err error) {
	if opts.StartTimeout == 0 {
		opts.StartTimeout = 15 * time.Second
	}
	if opts.LogLevel == "" {
		opts.LogLevel = "info"
	}
	if opts.Binary == "" {
		if opts.Binary, err = LookPath("containerd"); err != nil {
			return nil, fmt.Errorf("start containerd: %w", err)
		}
	}
	c := &Containerd{exited: make(chan struct{})}
	defer func() {
		if err != nil {
			c.removeDirs()
		}
	}()
	if opts.Dir == "" {
		if c.dir, err = os.MkdirTemp("/tmp", "ctrd"); err != nil {
			return nil, fmt.Errorf("start containerd: %w", err)
		}
		c.ownDir = true
		// Traversable by others, as containerd's own state directory is: a
		// container with a user namespace runs runc as the mapped root,
		// which must reach the bundle's rootfs below Dir.
		if err := os.Chmod(c.dir, 0o711); err != nil {
			return nil, fmt.Errorf("start containerd: %w", err)
		}
	} else {
		if c.dir, err = filepath.Abs(opts.Dir); err != nil {
			return nil, fmt.Errorf("start containerd: %w", err)
		}
		if err := os.MkdirAll(c.dir, 0o700); err != nil {
			return nil, fmt.Errorf("start containerd: %w", err)
		}
	}
	sockDir := c.dir
	if len(filepath.Join(sockDir, "c.sock.ttrpc")) > maxSocketPath {
		if c.sockDir, err = os.MkdirTemp("/tmp", "ctrd"); err != nil {
			return nil, fmt.Errorf("start containerd: %w", err)
		}
		sockDir = c.sockDir
	}
	c.address = filepath.Join(sockDir, "c.sock")
	c.logPath = filepath.Join(c.dir, "containerd.log")

	config := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = %q

[ttrpc]
  address = %q

[debug]
  level = %q

[plugins."io.containerd.internal.v1.opt"]
  path = %q
`, filepath.Join(c.dir, "root"), filepath.Join(c.dir, "state"), c.address,
		c.address+".ttrpc", opts.LogLevel, filepath.Join(c.dir, "opt"))
	configPath := filepath.Join(c.dir, "config.toml")
	if err := os.WriteFile(configPath, []byte(config), 0o600); err != nil {
		return nil, fmt.Errorf("start containerd: write config: %w", err)
	}
	logFile, err := os.OpenFile(c.logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("start containerd: %w", err)
	}
	defer logFile.Close() // the child has its own descriptor

	begin := time.Now()
	c.cmd = exec.Command(opts.Binary, "--config", configPath)
	c.cmd.Stdout, c.cmd.Stderr = logFile, logFile
	c.cmd.Env = append(os.Environ(), "PATH="+os.Getenv("PATH")+":"+sbinPath)
	// Its own process group: a Ctrl-C meant for the test binary must not
	// kill the daemon before Close has removed its containers.
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := c.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start containerd: %w", err)
	}
	go func() {
		c.waitErr = c.cmd.Wait()
		close(c.exited)
	}()

	if err := c.waitReady(ctx, opts.StartTimeout); err != nil {
		c.stopProcess()
		return nil, fmt.Errorf("start containerd: %w (log %s: %s)", err, c.logPath, c.logTail())
	}
	c.started = time.Since(begin)
	return c, nil
}

// waitReady polls the socket until the version API answers.
func (c *Containerd) waitReady(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-c.exited:
			return fmt.Errorf("containerd exited: %v", c.waitErr)
		case <-ctx.Done():
			return fmt.Errorf("wait for %s: %w", c.address, ctx.Err())
		case <-tick.C:
		}
		conn, err := net.Dial("unix", c.address)
		if err != nil {
			continue
		}
		conn.Close()
		cl, err := client.New(c.address)
		if err != nil {
			return err
		}
		_, err = cl.Version(ctx)
		cl.Close()
		if err == nil {
			return nil
		}
	}
}

// Address is the absolute path of containerd's gRPC socket.
func (c *Containerd) Address() string { return c.address }

// Dir is the directory holding containerd's config, root, state and log.
func (c *Containerd) Dir() string { return c.dir }

// LogPath is containerd's log file.
func (c *Containerd) LogPath() string { return c.logPath }

// StartDuration is how long containerd took from exec to answering.
func (c *Containerd) StartDuration() time.Duration { return c.started }

// NewClient connects a containerd client with namespace as its default.
func (c *Containerd) NewClient(namespace string) (*client.Client, error) {
	return client.New(c.address, client.WithDefaultNamespace(namespace))
}

// Close kills and deletes every task and container in every namespace,
// stops containerd (SIGTERM, then SIGKILL), checks that no shim, runc
// state, cgroup or mount of those containers is left (removing what it
// can), and removes the directories it created. It reports what it had to
// clean up by force. Calling it again returns the first result.
func (c *Containerd) Close() error {
	c.once.Do(func() {
		var errs []error
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		ids, err := c.deleteAll(ctx)
		if err != nil {
			errs = append(errs, err)
		}
		if err := c.stopProcess(); err != nil {
			errs = append(errs, err)
		}
		if err := c.checkLeftovers(ids); err != nil {
			errs = append(errs, err)
		}
		c.removeDirs()
		c.closeErr = errors.Join(errs...)
	})
	return c.closeErr
}

type nsID struct{ ns, id string }

// deleteAll removes every container (and its task and snapshot) in every
// namespace and returns their ids.
func (c *Containerd) deleteAll(ctx context.Context) ([]nsID, error) {
	select {
	case <-c.exited:
		return nil, fmt.Errorf("containerd exited before close: %v (log %s)", c.waitErr, c.logPath)
	default:
	}
	cl, err := client.New(c.address)
	if err != nil {
		return nil, fmt.Errorf("clean up containerd: %w", err)
	}
	defer cl.Close()
	nss, err := cl.NamespaceService().List(ctx)
	if err != nil {
		return nil, fmt.Errorf("clean up containerd: list namespaces: %w", err)
	}
	var ids []nsID
	var errs []error
	for _, ns := range nss {
		nctx := namespaces.WithNamespace(ctx, ns)
		cs, err := cl.Containers(nctx)
		if err != nil {
			errs = append(errs, fmt.Errorf("list containers in %s: %w", ns, err))
			continue
		}
		for _, ctr := range cs {
			ids = append(ids, nsID{ns, ctr.ID()})
			if task, err := ctr.Task(nctx, nil); err == nil {
				if _, err := task.Delete(nctx, client.WithProcessKill); err != nil && !errdefs.IsNotFound(err) {
					errs = append(errs, fmt.Errorf("delete task %s/%s: %w", ns, ctr.ID(), err))
				}
			} else if !errdefs.IsNotFound(err) {
				errs = append(errs, fmt.Errorf("load task %s/%s: %w", ns, ctr.ID(), err))
			}
			if err := ctr.Delete(nctx, client.WithSnapshotCleanup); err != nil && !errdefs.IsNotFound(err) {
				errs = append(errs, fmt.Errorf("delete container %s/%s: %w", ns, ctr.ID(), err))
			}
		}
	}
	return ids, errors.Join(errs...)
}

// stopProcess sends SIGTERM, waits up to 5 s, then SIGKILL.
func (c *Containerd) stopProcess() error {
	if c.cmd == nil || c.cmd.Process == nil {
		return nil
	}
	select {
	case <-c.exited:
		return nil
	default:
	}
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.exited:
		return nil
	case <-time.After(5 * time.Second):
	}
	_ = c.cmd.Process.Kill()
	<-c.exited
	return fmt.Errorf("containerd ignored SIGTERM for 5s and was killed (log %s)", c.logPath)
}

// checkLeftovers looks for what a container of ours may leave behind after
// containerd is gone: shim processes, runc state, cgroups, mounts under Dir.
// Whatever it finds it removes, and reports.
func (c *Containerd) checkLeftovers(ids []nsID) error {
	var errs []error
	// Shims exit shortly after their last task is deleted.
	deadline := time.Now().Add(3 * time.Second)
	shims := c.shimPids()
	for len(shims) > 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
		shims = c.shimPids()
	}
	for _, pid := range shims {
		_ = syscall.Kill(pid, syscall.SIGKILL)
		errs = append(errs, fmt.Errorf("shim pid %d outlived its tasks; killed", pid))
	}
	for _, x := range ids {
		state := filepath.Join(runcRoot, x.ns, x.id)
		if _, err := os.Stat(state); err == nil {
			errs = append(errs, fmt.Errorf("runc state %s left behind", state))
		}
		for _, dir := range CgroupDirs(path.Join("/", x.ns, x.id)) {
			if err := os.Remove(dir); err != nil {
				errs = append(errs, fmt.Errorf("cgroup %s left behind: %w", dir, err))
			} else {
				errs = append(errs, fmt.Errorf("cgroup %s left behind; removed", dir))
			}
		}
	}
	for _, m := range mountsUnder(c.dir) {
		if err := syscall.Unmount(m, syscall.MNT_DETACH); err != nil {
			errs = append(errs, fmt.Errorf("mount %s left behind: %w", m, err))
		} else {
			errs = append(errs, fmt.Errorf("mount %s left behind; unmounted", m))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("containerd left resources behind: %w", errors.Join(errs...))
	}
	return nil
}

// shimPids returns the pids of shims serving this containerd.
func (c *Containerd) shimPids() []int {
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		raw, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(strings.TrimRight(string(raw), "\x00"), "\x00")
		if len(args) == 0 || !strings.Contains(filepath.Base(args[0]), "containerd-shim") {
			continue
		}
		for i := 0; i+1 < len(args); i++ {
			if args[i] == "-address" && args[i+1] == c.address {
				pids = append(pids, pid)
				break
			}
		}
	}
	return pids
}

// mountsUnder returns the mount points below dir, deepest first.
func mountsUnder(dir string) []string {
	if dir == "" {
		return nil
	}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var ms []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMount(fields[4])
		if strings.HasPrefix(mp, dir+"/") {
			ms = append([]string{mp}, ms...)
		}
	}
	return ms
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func (c *Containerd) removeDirs() {
	if c.ownDir && c.dir != "" && len(mountsUnder(c.dir)) == 0 {
		os.RemoveAll(c.dir)
	}
	if c.sockDir != "" {
		os.RemoveAll(c.sockDir)
	}
}

// logTail returns the last lines of containerd's log for error messages.
func (c *Containerd) logTail() string {
	b, err := os.ReadFile(c.logPath)
	if err != nil {
		return err.Error()
	}
	lines := bytes.Split(bytes.TrimSpace(b), []byte("\n"))
	if len(lines) > 10 {
		lines = lines[len(lines)-10:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}
