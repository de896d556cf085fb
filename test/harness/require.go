// Package harness starts the real components integration tests and the demo
// run against (containerd today) and cleans up after them, so that nothing
// started by a test outlives it: no daemon, shim, task, cgroup, mount or
// temporary directory.
//
// The core API takes a context and returns a value with Close, so the demo
// program can use it without a testing.T; the functions taking a
// testing.TB are thin wrappers for tests.
//
// Tests that need root call RequireRoot first. In CI (CI=true) a missing
// privilege or component fails the test; elsewhere the test is skipped and
// says why, as containerd's RequiresRoot does.
package harness

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// sbinPath is appended to PATH when looking for binaries (and given to the
// containerd child): Debian installs runc in /usr/sbin, which a non-login
// root shell may not have on its PATH.
const sbinPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// ContainerdComponents are the binaries StartContainerd and a runc
// container need.
var ContainerdComponents = []string{"containerd", "containerd-shim-runc-v2", "runc"}

// InCI reports whether the tests run in CI, where a test that cannot start
// its component must fail instead of skipping.
func InCI() bool {
	v := strings.ToLower(os.Getenv("CI"))
	return v == "true" || v == "1"
}

// LookPath finds a binary on PATH or in the sbin directories.
func LookPath(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, dir := range filepath.SplitList(sbinPath) {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found in PATH or %s", name, sbinPath)
}

// CheckRoot returns nil when the process runs as root and every named
// binary is found (LookPath); otherwise an error listing what is missing.
func CheckRoot(binaries ...string) error {
	var errs []error
	if os.Geteuid() != 0 {
		errs = append(errs, fmt.Errorf("not running as root (euid %d)", os.Geteuid()))
	}
	for _, b := range binaries {
		if _, err := LookPath(b); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// RequireRoot stops the test unless it runs as root with every named binary
// available (default: ContainerdComponents). In CI the test fails; elsewhere
// it is skipped with the reason.
func RequireRoot(t testing.TB, binaries ...string) {
	t.Helper()
	if len(binaries) == 0 {
		binaries = ContainerdComponents
	}
	Require(t, CheckRoot(binaries...))
}

// Require fails (CI) or skips (elsewhere) the test when err, the result of
// a feature probe, is not nil.
func Require(t testing.TB, err error) {
	t.Helper()
	if err == nil {
		return
	}
	if InCI() {
		t.Fatalf("CI must run this test: %v", err)
	}
	t.Skipf("skipping (set CI=true to make this a failure): %v", err)
}
