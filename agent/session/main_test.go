package session_test

import (
	"testing"

	"go.uber.org/goleak"
)

// Every test stops its agents and fake control planes: nothing may outlive
// the package's tests.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
