package sim_test

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests if any goroutine outlives them: an
// Events subscription must leave nothing behind once its context ends.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
