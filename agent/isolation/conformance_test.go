package isolation_test

import (
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/gpuaas/gpuaas/agent/isolation"
	"github.com/gpuaas/gpuaas/agent/isolation/isolationtest"
	"golang.org/x/sys/unix"
)

// TestEnforcerKeepsTheContract runs the conformance suite the Fake also
// passes on the real Enforcer, with real cgroups.
func TestEnforcerKeepsTheContract(t *testing.T) {
	root, err := isolation.CgroupV2Root()
	if os.Geteuid() != 0 || err != nil {
		why := fmt.Sprintf("needs root and cgroup v2 (euid %d, %v)", os.Geteuid(), err)
		if v := os.Getenv("CI"); v == "true" || v == "1" {
			t.Fatalf("CI must run this test: %s", why)
		}
		t.Skip("skipping (set CI=true to make this a failure): " + why)
	}
	isolationtest.Run(t, func(t *testing.T) isolation.Fencer {
		pins := filepath.Join(isolation.DefaultBPFFS, fmt.Sprintf("gpuaas-conformance-%08x", rand.Uint32()))
		e, err := isolation.NewEnforcer(isolation.Config{PinRoot: pins, RingBufferSize: 64 << 10, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			ls, _ := e.Leases()
			for _, id := range ls {
				if err := e.Detach(id); err != nil {
					t.Error(err)
				}
			}
			e.Close()
			os.RemoveAll(pins)
		})
		return e
	}, func(t *testing.T) string {
		dir := filepath.Join(root, fmt.Sprintf("gpuaas-conformance-%08x", rand.Uint32()))
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := unix.Rmdir(dir); err != nil {
				t.Errorf("remove cgroup: %v", err)
			}
		})
		return dir
	})
}
