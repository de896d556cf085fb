package harness

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// RegistryComponents are the binaries StartRegistry and Registry.Push
// need: Debian's docker-registry (the CNCF distribution registry) and
// skopeo.
var RegistryComponents = []string{"docker-registry", "skopeo"}

// registryStartAttempts bounds the retries when the free port picked for
// the registry is taken before the registry binds it.
const registryStartAttempts = 3

// Registry is an OCI distribution registry (Debian's docker-registry)
// started as a child process on a free 127.0.0.1 port, plain HTTP, no
// authentication, with private storage.
type Registry struct {
	dir      string
	host     string // 127.0.0.1:PORT
	logPath  string
	cmd      *exec.Cmd
	exited   chan struct{}
	waitErr  error
	closeErr error
	once     sync.Once
}

// StartRegistry starts a registry with its config, storage and log in a
// new directory under parentDir (os.TempDir() if empty) and returns once
// /v2/ answers. ctx bounds the start only; Close stops the registry and
// removes the directory.
func StartRegistry(ctx context.Context, parentDir string) (*Registry, error) {
	bin, err := LookPath("docker-registry")
	if err != nil {
		return nil, fmt.Errorf("start registry: %w", err)
	}
	if parentDir == "" {
		parentDir = os.TempDir()
	}
	var errs []error
	for range registryStartAttempts {
		r, err := startRegistry(ctx, bin, parentDir)
		if err == nil {
			return r, nil
		}
		errs = append(errs, err)
		if ctx.Err() != nil {
			break
		}
	}
	return nil, fmt.Errorf("start registry: %w", errors.Join(errs...))
}

func startRegistry(ctx context.Context, bin, parentDir string) (_ *Registry, err error) {
	dir, err := os.MkdirTemp(parentDir, "registry")
	if err != nil {
		return nil, err
	}
	r := &Registry{dir: dir, logPath: filepath.Join(dir, "registry.log"), exited: make(chan struct{})}
	defer func() {
		if err != nil {
			os.RemoveAll(dir)
		}
	}()
	if r.host, err = freeLoopbackPort(); err != nil {
		return nil, err
	}
	var secret [16]byte
	_, _ = rand.Read(secret[:])
	// Access log on: tests count the requests a client made.
	config := fmt.Sprintf(`version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: %q
  delete:
    enabled: true
http:
  addr: %q
  secret: %q
`, filepath.Join(dir, "storage"), r.host, hex.EncodeToString(secret[:]))
	configPath := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(configPath, []byte(config), 0o600); err != nil {
		return nil, fmt.Errorf("write config: %w", err)
	}
	logFile, err := os.OpenFile(r.logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logFile.Close() // the child has its own descriptor

	r.cmd = exec.Command(bin, "serve", configPath)
	r.cmd.Stdout, r.cmd.Stderr = logFile, logFile
	r.cmd.Env = registryEnv()
	r.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := r.cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		r.waitErr = r.cmd.Wait()
		close(r.exited)
	}()
	if err := r.waitReady(ctx, 10*time.Second); err != nil {
		r.stopProcess()
		return nil, fmt.Errorf("%w (log %s: %s)", err, r.logPath, fileTail(r.logPath))
	}
	return r, nil
}

// registryEnv is the environment without REGISTRY_* variables, which
// would override the private config.
func registryEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "REGISTRY_") {
			env = append(env, kv)
		}
	}
	return env
}

// freeLoopbackPort returns 127.0.0.1:PORT for a port free right now.
func freeLoopbackPort() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// waitReady polls GET /v2/ until it answers 200.
func (r *Registry) waitReady(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil}}
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-r.exited:
			return fmt.Errorf("registry exited: %v", r.waitErr)
		case <-ctx.Done():
			return fmt.Errorf("wait for http://%s/v2/: %w", r.host, ctx.Err())
		case <-tick.C:
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+r.host+"/v2/", nil)
		if err != nil {
			return err
		}
		resp, err := hc.Do(req)
		if err != nil {
			continue
		}
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			return nil
		}
	}
}

// Host is the registry's host:port (127.0.0.1:PORT), the first component
// of references to its images.
func (r *Registry) Host() string { return r.host }

// Dir holds the registry's config, storage and log.
func (r *Registry) Dir() string { return r.dir }

// LogPath is the registry's log (its own log and the access log).
func (r *Registry) LogPath() string { return r.logPath }

// Push copies the OCI image archive (an OCI layout tar holding one image,
// as package ociimage writes) into the registry as repo:tag (e.g.
// "gpuaas/busybox:v1", without the host) with skopeo, keeping the
// manifest as it is, and returns the manifest digest the registry stored.
func (r *Registry) Push(ctx context.Context, archivePath, ref string) (string, error) {
	if strings.Contains(ref, "@") || !strings.Contains(ref, ":") {
		return "", fmt.Errorf("push %s: want repository:tag, got %q", archivePath, ref)
	}
	skopeo, err := LookPath("skopeo")
	if err != nil {
		return "", fmt.Errorf("push %s: %w", archivePath, err)
	}
	digestFile := filepath.Join(r.dir, "push-"+randomSuffix()+".digest")
	defer os.Remove(digestFile)
	dest := "docker://" + r.host + "/" + ref
	// --insecure-policy: no dependence on the host's
	// /etc/containers/policy.json; --preserve-digests: fail rather than
	// convert the manifest, so the pushed digest is the archive's.
	cmd := exec.CommandContext(ctx, skopeo, "--insecure-policy", "copy",
		"--quiet", "--preserve-digests", "--dest-tls-verify=false", "--dest-no-creds",
		"--digestfile", digestFile,
		"oci-archive:"+archivePath, dest)
	cmd.Env = os.Environ()
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("push %s to %s: skopeo: %w: %s", archivePath, dest, err, strings.TrimSpace(string(out)))
	}
	d, err := os.ReadFile(digestFile)
	if err != nil {
		return "", fmt.Errorf("push %s to %s: read digest: %w", archivePath, dest, err)
	}
	return strings.TrimSpace(string(d)), nil
}

// accessLine matches a request in the registry's access log (combined log
// format): `127.0.0.1 - - [date] "GET /v2/ HTTP/1.1" 200 2 "" "agent"`.
var accessLine = regexp.MustCompile(`^\S+ \S+ \S+ \[[^\]]*\] "([A-Z]+) (\S+) HTTP/[0-9.]+"`)

// Requests returns the requests the registry has served so far, in log
// order, as "METHOD PATH" (e.g. "HEAD /v2/gpuaas/busybox/manifests/v1"). A
// request is logged before its response is complete, so a client that has
// its answer finds its request here.
func (r *Registry) Requests() ([]string, error) {
	f, err := os.Open(r.logPath)
	if err != nil {
		return nil, fmt.Errorf("read registry log: %w", err)
	}
	defer f.Close()
	var reqs []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if m := accessLine.FindStringSubmatch(sc.Text()); m != nil {
			reqs = append(reqs, m[1]+" "+m[2])
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read registry log: %w", err)
	}
	return reqs, nil
}

// Close stops the registry (SIGTERM, then SIGKILL after 5 s) and removes
// its directory. Calling it again returns the first result.
func (r *Registry) Close() error {
	r.once.Do(func() {
		var errs []error
		select {
		case <-r.exited:
			errs = append(errs, fmt.Errorf("registry exited before close: %v (log: %s)", r.waitErr, fileTail(r.logPath)))
		default:
		}
		if err := r.stopProcess(); err != nil {
			errs = append(errs, err)
		}
		if err := os.RemoveAll(r.dir); err != nil {
			errs = append(errs, fmt.Errorf("remove registry directory: %w", err))
		}
		r.closeErr = errors.Join(errs...)
	})
	return r.closeErr
}

// stopProcess sends SIGTERM, waits up to 5 s, then SIGKILL.
func (r *Registry) stopProcess() error {
	select {
	case <-r.exited:
		return nil
	default:
	}
	_ = r.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-r.exited:
		return nil
	case <-time.After(5 * time.Second):
	}
	_ = r.cmd.Process.Kill()
	<-r.exited
	return errors.New("registry ignored SIGTERM for 5s and was killed")
}

// fileTail returns the last lines of a log file for error messages.
func fileTail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 10 {
		lines = lines[len(lines)-10:]
	}
	return strings.Join(lines, "\n")
}

// CheckRegistry returns nil when the registry components are installed;
// otherwise an error naming what is missing and the Debian packages.
func CheckRegistry() error {
	var errs []error
	for _, b := range RegistryComponents {
		if _, err := LookPath(b); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("registry components missing (apt-get install docker-registry skopeo): %w", err)
	}
	return nil
}

// StartRegistryT is StartRegistry for tests: without the registry
// components it fails in CI and skips elsewhere (Require); a registry that
// does not start fails the test; Close is a cleanup that fails the test on
// error. The registry itself needs no root.
func StartRegistryT(t testing.TB) *Registry {
	t.Helper()
	Require(t, CheckRegistry())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r, err := StartRegistry(ctx, "")
	if err != nil {
		t.Fatalf("start registry: %v", err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("close registry: %v", err)
		}
	})
	return r
}
