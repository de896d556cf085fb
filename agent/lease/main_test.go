package lease

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package if a test leaves a goroutine behind (an
// executor's converge step, a containerd client connection), as
// Tailscale's ResourceCheck does.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
