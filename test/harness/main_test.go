package harness

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package if a test leaves a goroutine behind (a daemon
// waiter, a client connection), as Tailscale's ResourceCheck does.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.Cleanup(func(int) { _ = RemoveNamespaceDirs("harness-test") }))
}
