package ops

import (
	"testing"

	"go.uber.org/goleak"

	"github.com/gpuaas/gpuaas/test/harness"
)

// TestMain fails the package if a test leaves a goroutine behind, and
// removes the binaries the tests built.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.Cleanup(func(int) { _ = harness.RemoveBuilt() }))
}
