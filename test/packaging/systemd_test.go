// Package packaging tests what operators install: the systemd units (they
// verify, and their exposure scores stay under the gates) and the .deb/.rpm
// packages built by scripts/package.sh (they install, upgrade, keep the
// operator's configuration, and remove and purge cleanly with dpkg).
package packaging

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/gpuaas/gpuaas/test/harness"
)

// Exposure gates for `systemd-analyze security --offline=true` (0 is
// best, 10 worst). The control plane needs no privilege and must stay under
// 2.0; the agent is root with a bounded capability set (see its unit) and
// must not regress past its recorded score.
const (
	controlPlaneMaxExposure = 2.0
	agentMaxExposure        = 6.5
)

func repoRoot(t testing.TB) string {
	t.Helper()
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	return root
}

// stageUnit copies a unit into dir with its daemon paths pointed at an
// existing executable, since systemd-analyze checks that ExecStart exists.
func stageUnit(t testing.TB, src, dir string) string {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	s := regexp.MustCompile(`/usr/bin/gpuaas-[a-z]+`).ReplaceAllString(string(b), "/bin/true")
	dst := filepath.Join(dir, filepath.Base(src))
	if err := os.WriteFile(dst, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
	return dst
}

var exposureRE = regexp.MustCompile(`Overall exposure level for \S+: ([0-9.]+)`)

// exposure runs systemd-analyze security offline and returns the score.
func exposure(unit string) (float64, string, error) {
	out, err := exec.Command("systemd-analyze", "security", "--offline=true", "--no-pager", unit).CombinedOutput()
	m := exposureRE.FindSubmatch(out)
	if m == nil {
		return 0, string(out), fmt.Errorf("systemd-analyze security %s: no score in output (%v)", unit, err)
	}
	v, perr := strconv.ParseFloat(string(m[1]), 64)
	return v, string(out), perr
}

// checkExposure is the gate: an error when the unit scores above max.
func checkExposure(unit string, max float64) (float64, error) {
	v, out, err := exposure(unit)
	if err != nil {
		return 0, err
	}
	if v > max {
		var failed []string
		sc := bufio.NewScanner(strings.NewReader(out))
		for sc.Scan() {
			if strings.HasPrefix(strings.TrimSpace(sc.Text()), "✗") {
				failed = append(failed, strings.Join(strings.Fields(sc.Text())[:2], " "))
			}
		}
		return v, fmt.Errorf("%s: exposure %.1f is above the gate %.1f; unhardened: %s", filepath.Base(unit), v, max, strings.Join(failed, "; "))
	}
	return v, nil
}

func requireSystemdAnalyze(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		harness.Require(t, fmt.Errorf("systemd-analyze not installed (Debian package systemd): %w", err))
	}
}

func TestSystemdUnitsVerify(t *testing.T) {
	requireSystemdAnalyze(t)
	root, dir := repoRoot(t), t.TempDir()
	for _, name := range []string{"gpuaas-agent.service", "gpuaas-controlplane.service"} {
		unit := stageUnit(t, filepath.Join(root, "systemd", name), dir)
		out, err := exec.Command("systemd-analyze", "verify", unit).CombinedOutput()
		if err != nil || len(strings.TrimSpace(string(out))) != 0 {
			t.Errorf("systemd-analyze verify %s: %v\n%s", name, err, out)
		}
	}
}

func TestSystemdUnitsMeetExposureGates(t *testing.T) {
	requireSystemdAnalyze(t)
	root, dir := repoRoot(t), t.TempDir()
	for name, max := range map[string]float64{
		"gpuaas-controlplane.service": controlPlaneMaxExposure,
		"gpuaas-agent.service":        agentMaxExposure,
	} {
		v, err := checkExposure(stageUnit(t, filepath.Join(root, "systemd", name), dir), max)
		if err != nil {
			t.Error(err)
			continue
		}
		t.Logf("%s: exposure %.1f (gate %.1f)", name, v, max)
	}
}

// TestExposureGateRejectsWeakUnit proves the gate can fail: the control
// plane's unit without its hardening section scores above the gate.
func TestExposureGateRejectsWeakUnit(t *testing.T) {
	requireSystemdAnalyze(t)
	dir := t.TempDir()
	weak := filepath.Join(dir, "weak.service")
	unit := "[Unit]\nDescription=weak\n[Service]\nType=simple\nUser=nobody\nExecStart=/bin/true\n"
	if err := os.WriteFile(weak, []byte(unit), 0o644); err != nil {
		t.Fatal(err)
	}
	v, err := checkExposure(weak, controlPlaneMaxExposure)
	if err == nil {
		t.Fatalf("an unhardened unit passed the %.1f gate with %.1f", controlPlaneMaxExposure, v)
	}
	if !strings.Contains(err.Error(), "NoNewPrivileges") && !strings.Contains(err.Error(), "ProtectSystem") {
		t.Errorf("gate error does not name what is missing: %v", err)
	}
}
