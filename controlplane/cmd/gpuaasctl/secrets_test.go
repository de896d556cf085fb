package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gpuaas/gpuaas/pkg/seal"
)

// TestSecretsKeygenRotates: keygen creates a 0600 key file, and a second
// keygen puts its key first (it seals) while the first keeps opening.
func TestSecretsKeygenRotates(t *testing.T) {
	f := filepath.Join(t.TempDir(), "secrets.key")
	if _, err := ctl(t, "secrets", "keygen", "--kid", "k1", "--file", f); err != nil {
		t.Fatal(err)
	}
	r1, err := seal.LoadKeyring(f)
	if err != nil {
		t.Fatalf("the key file keygen wrote: %v", err)
	}
	v, _ := r1.Seal("x", "a")
	if _, err := ctl(t, "secrets", "keygen", "--kid", "k2", "--file", f); err != nil {
		t.Fatal(err)
	}
	st, _ := os.Stat(f)
	r2, err := seal.LoadKeyring(f)
	if err != nil || st.Mode().Perm() != 0o600 || r2.ActiveKey() != "k2" {
		t.Fatalf("after rotation: %v, mode %v, active %v", err, st.Mode().Perm(), r2.ActiveKey())
	}
	if got, err := r2.Open(v, "a"); err != nil || got != "x" {
		t.Fatalf("the old key no longer opens: %v", err)
	}
	if _, err := ctl(t, "secrets", "keygen", "--kid", "k2", "--file", f); err == nil {
		t.Fatal("a repeated key id was accepted")
	}
	out, err := ctl(t, "secrets", "keygen", "--kid", "bad id")
	if err == nil || strings.Contains(out, "bad id ") {
		t.Fatalf("an invalid key id: %v %q", err, out)
	}
}
