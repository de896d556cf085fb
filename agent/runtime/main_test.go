package runtime

import (
	"testing"

	"go.uber.org/goleak"

	"github.com/gpuaas/gpuaas/test/harness"
)

// TestMain fails the package if a test leaves a goroutine behind (a wait
// on a task, a client connection), as Tailscale's ResourceCheck does.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.Cleanup(func(int) {
		// The package's own containerd namespace: its empty parent
		// cgroups and runc state go with the package.
		_ = harness.RemoveNamespaceDirs(testNamespace)
		_ = harness.RemoveBuilt()
	}))
}
