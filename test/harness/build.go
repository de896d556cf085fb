package harness

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// ModuleRoot returns the directory of the main module's go.mod, found from
// the working directory upwards (a test runs in its package's directory).
func ModuleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no go.mod above %s", dir)
		}
		dir = parent
	}
}

// goTool is the go command: on PATH, else Go's standard install location.
func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return "/usr/local/go/bin/go"
}

// Build compiles the main package pkg, given relative to the module root
// ("./agent/cmd/gpuaas-logdriver"), into dir and returns the binary's
// absolute path.
func Build(ctx context.Context, dir, pkg string) (string, error) {
	root, err := ModuleRoot()
	if err != nil {
		return "", fmt.Errorf("build %s: %w", pkg, err)
	}
	out, err := filepath.Abs(filepath.Join(dir, filepath.Base(pkg)))
	if err != nil {
		return "", fmt.Errorf("build %s: %w", pkg, err)
	}
	// Built as `make build` builds what ships (cgo as the environment
	// says, on by default), which also shares the compiled packages with
	// go vet and staticcheck in a cold CI run.
	cmd := exec.CommandContext(ctx, goTool(), "build", "-o", out, pkg)
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build %s: %w: %s", pkg, err, strings.TrimSpace(string(b)))
	}
	return out, nil
}

// built holds the binaries BuildBinary made in this process.
var built struct {
	mu   sync.Mutex
	dir  string
	bins map[string]string
	errs map[string]error
}

// BuildBinary builds the main package pkg (see Build) once per test
// binary and returns its path; later calls, from any test, reuse it. A
// package that does not build fails the test. The binaries live in a
// temporary directory RemoveBuilt deletes: call it from TestMain.
func BuildBinary(t testing.TB, pkg string) string {
	t.Helper()
	built.mu.Lock()
	defer built.mu.Unlock()
	if p, ok := built.bins[pkg]; ok {
		return p
	}
	if err, ok := built.errs[pkg]; ok {
		t.Fatal(err)
	}
	if built.dir == "" {
		dir, err := os.MkdirTemp("", "gpuaas-bin")
		if err != nil {
			t.Fatal(err)
		}
		built.dir, built.bins, built.errs = dir, map[string]string{}, map[string]error{}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	p, err := Build(ctx, built.dir, pkg)
	if err != nil {
		built.errs[pkg] = err
		t.Fatal(err)
	}
	built.bins[pkg] = p
	return p
}

// RemoveBuilt deletes what BuildBinary built in this process.
func RemoveBuilt() error {
	built.mu.Lock()
	defer built.mu.Unlock()
	if built.dir == "" {
		return nil
	}
	err := os.RemoveAll(built.dir)
	built.dir, built.bins, built.errs = "", nil, nil
	return err
}
