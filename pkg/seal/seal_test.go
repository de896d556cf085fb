package seal_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gpuaas/gpuaas/pkg/seal"
)

func ring(t testing.TB, lines ...string) *seal.Keyring {
	t.Helper()
	r, err := seal.ParseKeyring([]byte(strings.Join(lines, "\n")))
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func line(t testing.TB, kid string) string {
	t.Helper()
	l, err := seal.GenerateKeyLine(kid)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func TestSealOpensOnlyWhereItBelongs(t *testing.T) {
	r := ring(t, line(t, "k1"))
	v, err := r.Seal("hunter2", "lease/l-1/API_TOKEN")
	if err != nil {
		t.Fatal(err)
	}
	if !seal.IsSealed(v) || strings.Contains(v, "hunter2") {
		t.Fatalf("sealed value %q", v)
	}
	if got, err := r.Open(v, "lease/l-1/API_TOKEN"); err != nil || got != "hunter2" {
		t.Fatalf("open = %q, %v", got, err)
	}
	again, _ := r.Seal("hunter2", "lease/l-1/API_TOKEN")
	if again == v {
		t.Fatal("two seals of one value are equal: the nonce is not fresh")
	}
	for name, c := range map[string]struct{ v, aad string }{
		"another lease":    {v, "lease/l-2/API_TOKEN"},
		"another variable": {v, "lease/l-1/OTHER"},
		"flipped byte":     {v[:len(v)-2] + string(v[len(v)-2]^1) + v[len(v)-1:], "lease/l-1/API_TOKEN"},
		"not sealed":       {"hunter2", "lease/l-1/API_TOKEN"},
		"truncated":        {v[:len(seal.Prefix)+5], "lease/l-1/API_TOKEN"},
		"unknown key":      {strings.Replace(v, ":k1:", ":k9:", 1), "lease/l-1/API_TOKEN"},
	} {
		if _, err := r.Open(c.v, c.aad); !errors.Is(err, seal.ErrOpen) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// TestRotation: a ring whose new key is first seals with it and still
// opens what the old key sealed; without the old key that value is lost
// (ErrOpen), never read wrong.
func TestRotation(t *testing.T) {
	old, next := line(t, "old"), line(t, "new")
	v, err := ring(t, old).Seal("s3cret", "a")
	if err != nil {
		t.Fatal(err)
	}
	rotated := ring(t, next, old)
	if got, err := rotated.Open(v, "a"); err != nil || got != "s3cret" {
		t.Fatalf("old value after rotation: %q, %v", got, err)
	}
	w, _ := rotated.Seal("s3cret", "a")
	if !strings.Contains(w, ":new:") || rotated.ActiveKey() != "new" {
		t.Fatalf("rotated ring sealed %q", w)
	}
	if _, err := ring(t, next).Open(v, "a"); !errors.Is(err, seal.ErrOpen) {
		t.Fatalf("without the old key: %v", err)
	}
}

func TestKeyFileIsStrict(t *testing.T) {
	good := line(t, "k1")
	for name, body := range map[string]string{
		"empty":      "# nothing\n",
		"short key":  "k1 AAAA\n",
		"not base64": "k1 !!!\n",
		"bad id":     strings.Replace(good, "k1", "k 1/", 1),
		"repeated":   good + "\n" + good,
		"one field":  "k1\n",
	} {
		if _, err := seal.ParseKeyring([]byte(body)); !errors.Is(err, seal.ErrKeyFile) {
			t.Errorf("%s: %v", name, err)
		}
	}
	dir := t.TempDir()
	p := filepath.Join(dir, "keys")
	if err := os.WriteFile(p, []byte(good+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := seal.LoadKeyring(p); !errors.Is(err, seal.ErrKeyFile) {
		t.Fatalf("a world-readable key file: %v", err)
	}
	if err := os.Chmod(p, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := seal.LoadKeyring(p); err != nil {
		t.Fatal(err)
	}
}

// FuzzOpen: arbitrary stored text never panics Open and never opens.
func FuzzOpen(f *testing.F) {
	r := ring(f, line(f, "k1"))
	v, _ := r.Seal("x", "a")
	f.Add(v, "a")
	f.Add("sealed:v1:k1:", "a")
	f.Add("sealed:v1::", "")
	f.Fuzz(func(t *testing.T, s, aad string) {
		got, err := r.Open(s, aad)
		if err == nil && (s != v || aad != "a" || got != "x") {
			// Only genuine seals open; a fuzzer cannot forge GCM.
			t.Fatalf("opened %q for %q: %q", s, aad, got)
		}
	})
}
