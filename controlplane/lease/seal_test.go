package lease

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/controlplane/store/storetest"
	"github.com/gpuaas/gpuaas/pkg/seal"
)

func keyLine(t testing.TB, kid string) string {
	t.Helper()
	l, err := seal.GenerateKeyLine(kid)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func keyring(t testing.TB, lines ...string) *seal.Keyring {
	t.Helper()
	r, err := seal.ParseKeyring([]byte(strings.Join(lines, "\n")))
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestEnvIsSealedAtRest(t *testing.T) { storetest.Each(t, testEnvIsSealedAtRest) }

// testEnvIsSealedAtRest: with a secrets key, no env value is stored in
// plain text (neither in the lease nor as a plain hash in the idempotency
// record), the agent that runs the lease gets the values, a retry with the
// same key and body is still recognised, and a value whose key left the
// keyring is never handed out.
func testEnvIsSealedAtRest(t *testing.T) {
	f := newFixture(t, h200("node-a", 1))
	k1 := keyLine(t, "k1")
	f.svc.sealer = keyring(t, k1)
	ctx := context.Background()
	r := req("sealed", "1g.18gb")
	l, err := f.svc.Create(ctx, operator, r)
	if err != nil {
		t.Fatal(err)
	}
	if l.GetPlacement() == nil {
		t.Fatalf("not placed: %v", l)
	}
	err = f.st.View(ctx, func(tx store.Tx) error {
		for _, b := range []string{store.BucketLeases, store.BucketIdempotency, store.BucketAudit} {
			if err := tx.Scan(b, "", false, func(k string, v []byte) error {
				if bytes.Contains(v, []byte("s3cret")) {
					t.Errorf("bucket %s key %q holds the env value in plain text", b, k)
				}
				return nil
			}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	ds, err := f.svc.DesiredState(ctx, "node-a")
	if err != nil || len(ds.GetLeases()) != 1 || ds.GetLeases()[0].GetSpec().GetWorkload().GetEnv()["TOKEN"] != "s3cret" {
		t.Fatalf("desired state for the agent: %v, %v", ds, err)
	}
	again, err := f.svc.Create(ctx, operator, req("sealed", "1g.18gb"))
	if err != nil || again.GetId() != l.GetId() {
		t.Fatalf("retry with the same key: %v, %v", again.GetId(), err)
	}
	// Rotation: a new key first, the old one kept: still handed out.
	k2 := keyLine(t, "k2")
	f.svc.sealer = keyring(t, k2, k1)
	if ds, err := f.svc.DesiredState(ctx, "node-a"); err != nil || ds.GetLeases()[0].GetSpec().GetWorkload().GetEnv()["TOKEN"] != "s3cret" {
		t.Fatalf("after rotation: %v, %v", ds, err)
	}
	// The old key gone: the value is never handed out (wrong or empty).
	f.svc.sealer = keyring(t, k2)
	if _, err := f.svc.DesiredState(ctx, "node-a"); err == nil || !strings.Contains(err.Error(), l.GetId()) {
		t.Fatalf("a value whose key left the keyring was handed out: %v", err)
	}
}
