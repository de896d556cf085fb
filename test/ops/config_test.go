package ops

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gpuaas/gpuaas/test/harness"
)

// TestCheckConfigAppliesOverrides runs both daemons' -check-config on the
// shipped configurations: -set and GPUAAS_<DAEMON>_* variables are applied
// over the file and validated like it, an unknown key is named, and the
// flag wins over the environment.
func TestCheckConfigAppliesOverrides(t *testing.T) {
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	policy := filepath.Join(root, "packaging", "config", "attestation-policy.json")
	daemons := []struct {
		name, pkg, cfg, prefix string
		// fix makes the shipped file valid on this machine.
		fix []string
	}{
		{"agent", "./agent/cmd/gpuaas-agent", "agent.yaml", "GPUAAS_AGENT_", nil},
		{"controlplane", "./controlplane/cmd/gpuaas-controlplane", "controlplane.yaml", "GPUAAS_CONTROLPLANE_", []string{"-set", "attestation.policy_file=" + policy}},
	}
	for _, d := range daemons {
		t.Run(d.name, func(t *testing.T) {
			bin := harness.BuildBinary(t, d.pkg)
			run := func(env []string, args ...string) (int, string) {
				t.Helper()
				cmd := exec.Command(bin, append(append([]string{"-config", filepath.Join(root, "packaging", "config", d.cfg), "-check-config"}, d.fix...), args...)...)
				// Only the variables the case sets: none of the
				// developer's GPUAAS_* leak in.
				cmd.Env = append([]string{"PATH=" + os.Getenv("PATH")}, env...)
				out, err := cmd.CombinedOutput()
				code := 0
				if ee, ok := err.(*exec.ExitError); ok {
					code = ee.ExitCode()
				} else if err != nil {
					t.Fatal(err)
				}
				return code, string(out)
			}
			cases := []struct {
				name string
				env  []string
				args []string
				code int
				want []string
			}{
				{"file alone", nil, nil, 0, []string{"is valid"}},
				{"environment", []string{d.prefix + "LOG_LEVEL=debug"}, nil, 0, []string{"overridden: log.level (environment " + d.prefix + "LOG_LEVEL)"}},
				{"flag", nil, []string{"-set", "log.level=warn"}, 0, []string{"overridden: log.level (-set log.level)"}},
				{"invalid from the environment", []string{d.prefix + "LOG_LEVEL=loud"}, nil, 2, []string{"log.level: must be debug, info, warn or error"}},
				{"flag over an invalid environment", []string{d.prefix + "LOG_LEVEL=loud"}, []string{"-set", "log.level=info"}, 0, []string{"is valid"}},
				{"invalid from a flag", nil, []string{"-set", "log.level=loud"}, 2, []string{"log.level: must be"}},
				{"unknown key from a flag", nil, []string{"-set", "log.levle=debug"}, 2, []string{`no such key "log.levle"`}},
				{"unknown key from the environment", []string{d.prefix + "NO_SUCH_KEY=1"}, nil, 2, []string{d.prefix + "NO_SUCH_KEY names no configuration key"}},
				{"wrong type", nil, []string{"-set", "log.json=maybe"}, 2, []string{"log.json", "cannot unmarshal"}},
				{"malformed flag", nil, []string{"-set", "log.level"}, 2, []string{"not key.path=value"}},
			}
			for _, tc := range cases {
				code, out := run(tc.env, tc.args...)
				if code != tc.code {
					t.Errorf("%s: exit %d, want %d\n%s", tc.name, code, tc.code, out)
					continue
				}
				for _, w := range tc.want {
					if !strings.Contains(out, w) {
						t.Errorf("%s: output lacks %q:\n%s", tc.name, w, out)
					}
				}
			}
		})
	}
}
