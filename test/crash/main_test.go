package crash

import (
	"testing"

	"go.uber.org/goleak"

	"github.com/gpuaas/gpuaas/test/harness"
)

// TestMain fails the package if a test leaves a goroutine behind (a process
// waiter, a client connection), and removes the binaries the test built.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.Cleanup(func(int) { _ = harness.RemoveBuilt() }))
}
