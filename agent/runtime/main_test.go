package runtime

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package if a test leaves a goroutine behind (a wait
// on a task, a client connection), as Tailscale's ResourceCheck does.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
