package packaging

import (
	"bytes"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/gpuaas/gpuaas/test/harness"
)

// buildPackages runs scripts/package.sh for one version and returns the
// output directory.
func buildPackages(t *testing.T, root, version, formats string) string {
	t.Helper()
	out := t.TempDir()
	cmd := exec.Command(filepath.Join(root, "scripts", "package.sh"))
	cmd.Dir = root
	// TRIMPATH=0: the binaries share the compiled packages of the rest of
	// the suite (a -trimpath build would compile every dependency again).
	cmd.Env = append(os.Environ(), "VERSION="+version, "OUT_DIR="+out, "FORMATS="+formats, "TRIMPATH=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("scripts/package.sh (VERSION=%s): %v\n%s", version, err, b)
	}
	return out
}

func pkgFile(t *testing.T, dir, prefix, ext string) string {
	t.Helper()
	m, _ := filepath.Glob(filepath.Join(dir, prefix+"*"+ext))
	if len(m) != 1 {
		t.Fatalf("want one %s*%s in %s, got %v", prefix, ext, dir, m)
	}
	return m[0]
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	b, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, b)
	}
	return string(b)
}

type fileWant struct {
	path  string
	mode  fs.FileMode
	owner string // user:group
}

func checkFiles(t *testing.T, wants []fileWant) {
	t.Helper()
	for _, w := range wants {
		fi, err := os.Stat(w.path)
		if err != nil {
			t.Errorf("%s: %v", w.path, err)
			continue
		}
		if fi.Mode().Perm() != w.mode {
			t.Errorf("%s: mode %v, want %v", w.path, fi.Mode().Perm(), w.mode)
		}
		st := fi.Sys().(*syscall.Stat_t)
		u, _ := user.LookupId(fmt.Sprint(st.Uid))
		g, _ := user.LookupGroupId(fmt.Sprint(st.Gid))
		if u == nil || g == nil || u.Username+":"+g.Name != w.owner {
			t.Errorf("%s: owner %d:%d, want %s", w.path, st.Uid, st.Gid, w.owner)
		}
	}
}

func installed(pkg string) bool {
	out, err := exec.Command("dpkg-query", "-W", "-f", "${Status}", pkg).Output()
	return err == nil && strings.Contains(string(out), "installed") && !strings.Contains(string(out), "not-installed")
}

func purgeIfInstalled(t *testing.T, pkgs ...string) {
	for _, p := range pkgs {
		if out, err := exec.Command("dpkg-query", "-W", "-f", "${Status}", p).Output(); err == nil && !strings.Contains(string(out), "not-installed") {
			if b, err := exec.Command("dpkg", "--purge", p).CombinedOutput(); err != nil {
				t.Errorf("cleanup: dpkg --purge %s: %v\n%s", p, err, b)
			}
		}
	}
}

// TestDebInstallUpgradeRemovePurge installs the control plane, agent and
// gpuaasctl packages with dpkg, upgrades them over an operator-edited
// configuration, removes and purges them, asserting files, modes, owners,
// versions and what each step keeps.
func TestDebInstallUpgradeRemovePurge(t *testing.T) {
	harness.RequireRoot(t, "dpkg", "dpkg-deb", "dpkg-query", "go")
	pkgs := []string{"gpuaas-controlplane", "gpuaas-agent", "gpuaasctl"}
	for _, p := range pkgs {
		if installed(p) {
			t.Skipf("%s is installed on this host outside the test; not touching it", p)
		}
	}
	root := repoRoot(t)
	v1 := buildPackages(t, root, "1.0.0", "deb rpm")
	v2 := buildPackages(t, root, "1.0.1", "deb")
	t.Cleanup(func() { purgeIfInstalled(t, pkgs...) })

	// The rpm builds too, and is an rpm (lead magic).
	for _, p := range pkgs {
		b, err := os.ReadFile(pkgFile(t, v1, p+"-1.0.0", ".rpm"))
		if err != nil || len(b) < 4 || !bytes.Equal(b[:4], []byte{0xed, 0xab, 0xee, 0xdb}) {
			t.Errorf("%s rpm: not an rpm package (%v)", p, err)
		}
	}

	// Install.
	for _, p := range pkgs {
		run(t, "dpkg", "-i", pkgFile(t, v1, p+"_1.0.0", ".deb"))
	}
	for bin, want := range map[string]string{
		"/usr/bin/gpuaas-controlplane": "gpuaas-controlplane 1.0.0",
		"/usr/bin/gpuaas-agent":        "gpuaas-agent 1.0.0",
	} {
		if got := strings.TrimSpace(run(t, bin, "-version")); got != want {
			t.Errorf("%s -version = %q, want %q", bin, got, want)
		}
	}
	if got := run(t, "/usr/bin/gpuaasctl", "--version"); !strings.Contains(got, "1.0.0") {
		t.Errorf("gpuaasctl --version = %q", got)
	}
	if _, err := user.Lookup("gpuaas"); err != nil {
		t.Fatalf("service user not created: %v", err)
	}
	checkFiles(t, []fileWant{
		{"/usr/bin/gpuaas-controlplane", 0o755, "root:root"},
		{"/usr/bin/gpuaas-agent", 0o755, "root:root"},
		{"/usr/bin/gpuaas-logdriver", 0o755, "root:root"},
		{"/usr/bin/gpuaasctl", 0o755, "root:root"},
		{"/etc/gpuaas/controlplane.yaml", 0o640, "root:gpuaas"},
		{"/etc/gpuaas/agent.yaml", 0o640, "root:root"},
		// The agent installed after the control plane leaves the shared
		// directory readable by the control plane's group.
		{"/etc/gpuaas", 0o750, "root:gpuaas"},
		{"/var/lib/gpuaas-controlplane", 0o700, "gpuaas:gpuaas"},
		{"/var/lib/gpuaas-agent", 0o700, "root:root"},
		{"/lib/systemd/system/gpuaas-controlplane.service", 0o644, "root:root"},
		{"/lib/systemd/system/gpuaas-agent.service", 0o644, "root:root"},
		{"/usr/lib/sysusers.d/gpuaas-controlplane.conf", 0o644, "root:root"},
		{"/usr/lib/tmpfiles.d/gpuaas-agent.conf", 0o644, "root:root"},
	})
	conffiles := run(t, "dpkg-query", "--control-show", "gpuaas-controlplane", "conffiles")
	if !strings.Contains(conffiles, "/etc/gpuaas/controlplane.yaml") {
		t.Errorf("controlplane.yaml is not a conffile: %q", conffiles)
	}

	// The operator edits the configuration and the daemon writes state.
	const edited = "# edited by the operator\n"
	cfg := "/etc/gpuaas/controlplane.yaml"
	orig, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cfg, append([]byte(edited), orig...), 0o640); err != nil {
		t.Fatal(err)
	}
	state := "/var/lib/gpuaas-controlplane/state.db"
	if err := os.WriteFile(state, []byte("state"), 0o600); err != nil {
		t.Fatal(err)
	}

	// Upgrade: new binaries, the edited configuration and the state kept.
	for _, p := range pkgs {
		run(t, "dpkg", "-i", "--force-confold", pkgFile(t, v2, p+"_1.0.1", ".deb"))
	}
	if got := strings.TrimSpace(run(t, "/usr/bin/gpuaas-controlplane", "-version")); got != "gpuaas-controlplane 1.0.1" {
		t.Errorf("after upgrade: %q", got)
	}
	if b, _ := os.ReadFile(cfg); !bytes.HasPrefix(b, []byte(edited)) {
		t.Errorf("upgrade replaced the operator's configuration")
	}
	if _, err := os.Stat(state); err != nil {
		t.Errorf("upgrade lost the state: %v", err)
	}
	checkFiles(t, []fileWant{{cfg, 0o640, "root:gpuaas"}, {"/var/lib/gpuaas-controlplane", 0o700, "gpuaas:gpuaas"}})

	// Remove: binaries gone, configuration and state kept.
	run(t, "dpkg", "-r", "gpuaas-controlplane")
	if _, err := os.Stat("/usr/bin/gpuaas-controlplane"); !os.IsNotExist(err) {
		t.Errorf("remove left the binary: %v", err)
	}
	for _, p := range []string{cfg, state} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("remove deleted %s: %v", p, err)
		}
	}

	// Purge: configuration and state gone too.
	run(t, "dpkg", "--purge", "gpuaas-controlplane", "gpuaas-agent", "gpuaasctl")
	for _, p := range []string{cfg, "/var/lib/gpuaas-controlplane", "/etc/gpuaas/agent.yaml", "/var/lib/gpuaas-agent", "/usr/bin/gpuaas-agent", "/usr/bin/gpuaasctl"} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("purge left %s (%v)", p, err)
		}
	}
}
