// Package ops tests what an operator runs against the built daemons on a
// host: `promtool check metrics` over both daemons' /metrics,
// `gpuaas-agent status` against a running agent, and -check-config with
// environment and -set overrides. The tests build the binaries and start a
// test/cluster; they fail under CI when something they need is missing.
package ops

import (
	"errors"
	"os"
	"path/filepath"

	"github.com/gpuaas/gpuaas/test/harness"
)

// FindPromtool returns the promtool scripts/setup.sh extracted from
// Debian's prometheus package (.cache/bin/promtool), else one on PATH.
func FindPromtool() (string, error) {
	if root, err := harness.RepoRoot(); err == nil {
		p := filepath.Join(root, ".cache", "bin", "promtool")
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0 {
			return p, nil
		}
	}
	if p, err := harness.LookPath("promtool"); err == nil {
		return p, nil
	}
	return "", errors.New("promtool not found in .cache/bin (run scripts/setup.sh) or on PATH")
}
