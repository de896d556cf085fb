package nvml

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests if a goroutine (an event monitor
// above all) outlives them.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
