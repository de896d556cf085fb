// Package spire runs a real SPIRE deployment for tests: a spire-server and
// a spire-agent on loopback, the agent attested with a join token, workloads
// attested by the unix workload attestor (uid and executable path), and
// entries registered through the server's CLI. The binaries are built by
// scripts/setup.sh (scripts/build-spire.sh) from the release pinned in
// tools/spire into .cache/bin/spire-<version>/, with only the built-in
// plugins these tests configure (tools/spire/trimcatalog). Close stops both
// daemons and removes their directory.
package spire

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/gpuaas/gpuaas/test/harness"
)

// Version is the SPIRE release pinned in tools/spire/go.mod.
const Version = "v1.13.3"

// Options configure Start.
type Options struct {
	// BinDir holds spire-server and spire-agent; FindBinDir() if empty.
	BinDir string
	// TrustDomain is the SPIRE trust domain (e.g. "gpuaas.test").
	TrustDomain string
	// SVIDTTL is the default X.509 SVID lifetime; the agent rotates an SVID
	// at half its life. Default 1h.
	SVIDTTL time.Duration
	// StartTimeout bounds the wait for each daemon to be healthy; 30s if
	// zero.
	StartTimeout time.Duration
}

// SPIRE is a running server and agent.
type SPIRE struct {
	dir, bin     string
	td           string
	serverSock   string
	agentSock    string
	agentID      string
	server, agnt *exec.Cmd
	exited       map[*exec.Cmd]chan struct{}
}

// FindBinDir returns .cache/bin/spire-<Version> of the repository that
// contains the working directory.
func FindBinDir() (string, error) {
	root, err := harness.RepoRoot()
	if err != nil {
		return "", fmt.Errorf("spire: %w", err)
	}
	return filepath.Join(root, ".cache", "bin", "spire-"+Version), nil
}

// Check reports whether the SPIRE binaries are present. While
// scripts/setup.sh is still building them in the background (its pid in
// BIN_DIR.building is alive) it waits for the build, up to buildWait.
func Check(binDir string) error {
	if binDir == "" {
		var err error
		if binDir, err = FindBinDir(); err != nil {
			return err
		}
	}
	missing := func() error {
		for _, b := range []string{"spire-server", "spire-agent"} {
			if _, err := os.Stat(filepath.Join(binDir, b)); err != nil {
				return fmt.Errorf("spire: %s not built (run scripts/setup.sh): %w", b, err)
			}
		}
		return nil
	}
	for deadline := time.Now().Add(buildWait); ; time.Sleep(2 * time.Second) {
		err := missing()
		if err == nil || !building(binDir) {
			if err != nil {
				if log, rerr := os.ReadFile(filepath.Join(filepath.Dir(filepath.Dir(binDir)), "spire-build.log")); rerr == nil && len(log) > 0 {
					err = fmt.Errorf("%w; the background build's log ends: %s", err, tail(log, 800))
				}
			}
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("spire: still building after %s (see .cache/spire-build.log): %w", buildWait, err)
		}
	}
}

// buildWait bounds how long Check waits for setup's background build.
const buildWait = 25 * time.Minute

// building reports whether setup's background build of binDir is running.
func building(binDir string) bool {
	b, err := os.ReadFile(binDir + ".building")
	if err != nil {
		return false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return false
	}
	return syscall.Kill(pid, 0) == nil
}

func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(bytes.TrimSpace(b))
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Start starts a SPIRE server and an agent attested with a join token.
func Start(ctx context.Context, o Options) (_ *SPIRE, err error) {
	if o.BinDir == "" {
		if o.BinDir, err = FindBinDir(); err != nil {
			return nil, err
		}
	}
	if err := Check(o.BinDir); err != nil {
		return nil, err
	}
	if o.TrustDomain == "" {
		return nil, errors.New("spire: trust domain required")
	}
	if o.SVIDTTL == 0 {
		o.SVIDTTL = time.Hour
	}
	if o.StartTimeout == 0 {
		o.StartTimeout = 30 * time.Second
	}
	// Short: unix socket paths are limited to 108 bytes.
	dir, err := os.MkdirTemp("", "spire")
	if err != nil {
		return nil, err
	}
	s := &SPIRE{dir: dir, bin: o.BinDir, td: o.TrustDomain, exited: map[*exec.Cmd]chan struct{}{},
		serverSock: filepath.Join(dir, "s.sock"), agentSock: filepath.Join(dir, "w", "a.sock")}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	for _, d := range []string{"sdata", "adata", "w", "admin"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return nil, err
		}
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	serverConf := fmt.Sprintf(`server {
  bind_address = "127.0.0.1"
  bind_port = "%d"
  socket_path = %q
  trust_domain = %q
  data_dir = %q
  log_level = "WARN"
  ca_ttl = "24h"
  default_x509_svid_ttl = %q
}
plugins {
  DataStore "sql" {
    plugin_data {
      database_type = "sqlite3"
      connection_string = %q
    }
  }
  NodeAttestor "join_token" {
    plugin_data {}
  }
  KeyManager "memory" {
    plugin_data {}
  }
}
`, port, s.serverSock, s.td, filepath.Join(dir, "sdata"), o.SVIDTTL.String(), filepath.Join(dir, "sdata", "datastore.sqlite3"))
	if err := os.WriteFile(filepath.Join(dir, "server.conf"), []byte(serverConf), 0o600); err != nil {
		return nil, err
	}
	if s.server, err = s.daemon("server", filepath.Join(o.BinDir, "spire-server"), "run", "-config", filepath.Join(dir, "server.conf")); err != nil {
		return nil, err
	}
	if err := s.waitHealthy(ctx, s.server, o.StartTimeout, filepath.Join(o.BinDir, "spire-server"), s.serverSock); err != nil {
		return nil, err
	}
	out, err := s.serverCLI(ctx, "token", "generate", "-ttl", "600")
	if err != nil {
		return nil, err
	}
	token := ""
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		if t, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "Token: "); ok {
			token = t
		}
	}
	if token == "" {
		return nil, fmt.Errorf("spire: no join token in %q", out)
	}
	// The join token attestor names the agent after its token; entries
	// are registered under it.
	s.agentID = "spiffe://" + s.td + "/spire/agent/join_token/" + token
	agentConf := fmt.Sprintf(`agent {
  data_dir = %q
  log_level = "WARN"
  server_address = "127.0.0.1"
  server_port = "%d"
  socket_path = %q
  admin_socket_path = %q
  trust_domain = %q
  insecure_bootstrap = true
}
plugins {
  NodeAttestor "join_token" {
    plugin_data {}
  }
  KeyManager "memory" {
    plugin_data {}
  }
  WorkloadAttestor "unix" {
    plugin_data {
      discover_workload_path = true
    }
  }
}
`, filepath.Join(dir, "adata"), port, s.agentSock, filepath.Join(dir, "admin", "a.sock"), s.td)
	if err := os.WriteFile(filepath.Join(dir, "agent.conf"), []byte(agentConf), 0o600); err != nil {
		return nil, err
	}
	if s.agnt, err = s.daemon("agent", filepath.Join(o.BinDir, "spire-agent"), "run", "-config", filepath.Join(dir, "agent.conf"), "-joinToken", token); err != nil {
		return nil, err
	}
	if err := s.waitHealthy(ctx, s.agnt, o.StartTimeout, filepath.Join(o.BinDir, "spire-agent"), s.agentSock); err != nil {
		return nil, err
	}
	return s, nil
}

// WorkloadAPI is the agent's Workload API address, for a daemon's
// svid.workload_api.
func (s *SPIRE) WorkloadAPI() string { return "unix://" + s.agentSock }

// Dir is where the daemons keep their state and logs.
func (s *SPIRE) Dir() string { return s.dir }

// Register creates an entry for spiffeID under the agent, matching
// workloads by the given unix selectors (e.g. "unix:uid:0",
// "unix:path:/usr/bin/gpuaas-agent"), with an optional SVID TTL.
func (s *SPIRE) Register(ctx context.Context, spiffeID string, ttl time.Duration, selectors ...string) error {
	args := []string{"entry", "create", "-parentID", s.agentID, "-spiffeID", spiffeID}
	if ttl > 0 {
		args = append(args, "-x509SVIDTTL", strconv.Itoa(int(ttl/time.Second)))
	}
	for _, sel := range selectors {
		args = append(args, "-selector", sel)
	}
	_, err := s.serverCLI(ctx, args...)
	return err
}

func (s *SPIRE) serverCLI(ctx context.Context, args ...string) (string, error) {
	// "spire-server <noun> <verb> -socketPath SOCK <flags...>"
	full := append([]string{args[0], args[1], "-socketPath", s.serverSock}, args[2:]...)
	out, err := exec.CommandContext(ctx, filepath.Join(s.bin, "spire-server"), full...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("spire-server %s %s: %v: %s", args[0], args[1], err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

func (s *SPIRE) daemon(name, bin string, args ...string) (*exec.Cmd, error) {
	logf, err := os.Create(filepath.Join(s.dir, name+".log"))
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Dir = s.dir
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start spire-%s: %w", name, err)
	}
	done := make(chan struct{})
	s.exited[cmd] = done
	go func() { cmd.Wait(); logf.Close(); close(done) }()
	return cmd, nil
}

func (s *SPIRE) waitHealthy(ctx context.Context, cmd *exec.Cmd, timeout time.Duration, bin, sock string) error {
	deadline := time.Now().Add(timeout)
	for {
		select {
		case <-s.exited[cmd]:
			log, _ := os.ReadFile(filepath.Join(s.dir, filepath.Base(bin)[len("spire-"):]+".log"))
			return fmt.Errorf("%s exited at start: %s", filepath.Base(bin), bytes.TrimSpace(log))
		default:
		}
		if exec.CommandContext(ctx, bin, "healthcheck", "-socketPath", sock).Run() == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not healthy after %s", filepath.Base(bin), timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Close stops the agent and the server and removes their directory.
func (s *SPIRE) Close() error {
	for _, cmd := range []*exec.Cmd{s.agnt, s.server} {
		if cmd == nil || cmd.Process == nil {
			continue
		}
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-s.exited[cmd]:
		case <-time.After(5 * time.Second):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-s.exited[cmd]
		}
	}
	return os.RemoveAll(s.dir)
}
