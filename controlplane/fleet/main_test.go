package fleet_test

import (
	"os"
	"testing"

	"github.com/gpuaas/gpuaas/controlplane/store/storetest"
)

// TestMain stops the embedded etcd the tests share.
func TestMain(m *testing.M) {
	code := m.Run()
	storetest.StopSharedEtcd()
	os.Exit(code)
}
