package fleetsim

import (
	"testing"

	"go.uber.org/goleak"

	"github.com/gpuaas/gpuaas/test/harness"
)

// TestMain fails the package if a test leaves a goroutine behind (an
// agent, a client connection, a process waiter), and removes the binaries
// the tests built.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.Cleanup(func(int) { _ = harness.RemoveBuilt() }))
}
