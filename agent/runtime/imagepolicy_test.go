package runtime

import (
	"errors"
	"strings"
	"testing"

	"github.com/distribution/reference"
)

const (
	digestA = "sha256:1111111111111111111111111111111111111111111111111111111111111111"
	digestB = "sha256:2222222222222222222222222222222222222222222222222222222222222222"
)

func TestImagePolicyCheck(t *testing.T) {
	allow := ImagePolicy{AllowedRegistries: []string{
		"docker.io", "registry.example.com", "127.0.0.1:5000", "*.corp.example", "*.mirror.example:8443", "[::1]:5000",
	}}
	pinned := allow
	pinned.RequireDigest = true

	tests := []struct {
		name    string
		policy  ImagePolicy
		ref     string
		want    string // normalized reference when allowed
		wantErr error
	}{
		{"docker hub short name gets library and latest", allow, "busybox", "docker.io/library/busybox:latest", nil},
		{"docker hub user repository", allow, "nvidia/cuda:12.4.0-base", "docker.io/nvidia/cuda:12.4.0-base", nil},
		{"legacy docker hub host is docker.io", allow, "index.docker.io/library/busybox:1", "docker.io/library/busybox:1", nil},
		{"exact registry", allow, "registry.example.com/team/app:v2", "registry.example.com/team/app:v2", nil},
		{"registry host is case-insensitive", allow, "Registry.Example.COM/team/app:v2", "Registry.Example.COM/team/app:v2", nil},
		{"exact registry with port", allow, "127.0.0.1:5000/app:v1", "127.0.0.1:5000/app:v1", nil},
		{"ipv6 loopback with port", allow, "[::1]:5000/app:v1", "[::1]:5000/app:v1", nil},
		{"wildcard matches a subdomain", allow, "gpu.corp.example/app:v1", "gpu.corp.example/app:v1", nil},
		{"wildcard matches any depth", allow, "a.b.corp.example/app", "a.b.corp.example/app:latest", nil},
		{"wildcard with port", allow, "m.mirror.example:8443/app:v1", "m.mirror.example:8443/app:v1", nil},
		{"digest reference", allow, "registry.example.com/app@" + digestA, "registry.example.com/app@" + digestA, nil},
		{"tag next to a digest is dropped", allow, "registry.example.com/app:v1@" + digestA, "registry.example.com/app@" + digestA, nil},
		{"require digest accepts a digest", pinned, "busybox@" + digestA, "docker.io/library/busybox@" + digestA, nil},
		{"any registry", ImagePolicy{AllowedRegistries: []string{"*"}}, "quay.io/x/y:z", "quay.io/x/y:z", nil},

		{"empty reference", allow, "", "", ErrInvalidSpec},
		{"upper case repository", allow, "registry.example.com/App:v1", "", ErrInvalidSpec},
		{"space", allow, "busybox latest", "", ErrInvalidSpec},
		{"bad digest", allow, "busybox@sha256:abc", "", ErrInvalidSpec},
		{"empty tag", allow, "busybox:", "", ErrInvalidSpec},
		{"scheme is not a reference", allow, "https://registry.example.com/app:v1", "", ErrInvalidSpec},
		{"bare 64-hex id", allow, strings.Repeat("a", 64), "", ErrInvalidSpec},
		{"too long", allow, "registry.example.com/" + strings.Repeat("a", 300), "", ErrInvalidSpec},

		{"zero policy refuses everything", ImagePolicy{}, "busybox", "", ErrImagePolicy},
		{"registry not allowlisted", allow, "quay.io/x/y:z", "", ErrImagePolicy},
		{"exact host does not match another port", allow, "registry.example.com:5000/app:v1", "", ErrImagePolicy},
		{"exact host with port does not match without", allow, "127.0.0.1/app:v1", "", ErrImagePolicy},
		{"wildcard does not match its apex", allow, "corp.example/app:v1", "", ErrImagePolicy},
		{"wildcard is a label boundary", allow, "evilcorp.example/app:v1", "", ErrImagePolicy},
		{"wildcard without port does not match a port", allow, "gpu.corp.example:5000/app:v1", "", ErrImagePolicy},
		{"allowlisted name inside the path does not count", allow, "evil.example/registry.example.com/app:v1", "", ErrImagePolicy},
		{"require digest refuses a tag", pinned, "busybox:1.36", "", ErrImagePolicy},
		{"require digest refuses no tag", pinned, "busybox", "", ErrImagePolicy},
		{"registry is checked before the digest rule", pinned, "quay.io/x/y:z", "", ErrImagePolicy},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.policy.Check(tt.ref)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("Check(%q) = %v, %v; want %v", tt.ref, got, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Check(%q): %v", tt.ref, err)
			}
			if got.String() != tt.want {
				t.Errorf("Check(%q) = %q, want %q", tt.ref, got, tt.want)
			}
		})
	}
}

func TestImagePolicyErrorsSayWhy(t *testing.T) {
	p := ImagePolicy{AllowedRegistries: []string{"registry.example.com"}, RequireDigest: true}
	for ref, want := range map[string]string{
		"quay.io/x/y:z":                 `registry "quay.io" is not in the allowed registries`,
		"registry.example.com/app:v1":   "a digest is required",
		"registry.example.com/App:v1":   "invalid container spec",
		"registry.example.com/app@sha1": "invalid container spec",
	} {
		_, err := p.Check(ref)
		if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), ref) {
			t.Errorf("Check(%q) = %v, want an error naming the reference and %q", ref, err, want)
		}
	}
}

func TestImagePolicyValidate(t *testing.T) {
	for _, pat := range []string{"*", "docker.io", "index.docker.io", "localhost", "localhost:5000", "127.0.0.1:5000", "[::1]:5000", "*.example.com", "*.example.com:8443", "Registry.Example.com"} {
		if err := (ImagePolicy{AllowedRegistries: []string{pat}}).Validate(); err != nil {
			t.Errorf("Validate(%q): %v", pat, err)
		}
	}
	for _, pat := range []string{"", "*.", "**.example.com", "ex*ample.com", "example.com/path", "https://example.com", "busybox", "example.com:port", " example.com"} {
		err := (ImagePolicy{AllowedRegistries: []string{pat}}).Validate()
		if !errors.Is(err, ErrInvalidSpec) {
			t.Errorf("Validate(%q) = %v, want ErrInvalidSpec", pat, err)
		}
	}
}

func TestPinnedNamesTheRepositoryAtTheDigest(t *testing.T) {
	got, err := Pinned("busybox:1.36", digestA)
	if err != nil || got != "docker.io/library/busybox@"+digestA {
		t.Errorf("Pinned = %q, %v", got, err)
	}
	got, err = Pinned("127.0.0.1:5000/app@"+digestB, digestA)
	if err != nil || got != "127.0.0.1:5000/app@"+digestA {
		t.Errorf("Pinned of a digest reference = %q, %v", got, err)
	}
	for _, bad := range [][2]string{{"Bad/Ref", digestA}, {"busybox", "sha256:abc"}, {"busybox", ""}} {
		if _, err := Pinned(bad[0], bad[1]); !errors.Is(err, ErrInvalidSpec) {
			t.Errorf("Pinned(%q, %q) = %v, want ErrInvalidSpec", bad[0], bad[1], err)
		}
	}
}

func TestPlainHTTPOnlyForLoopbackRegistries(t *testing.T) {
	for host, want := range map[string]bool{
		"127.0.0.1:5000":     true,
		"127.0.0.1":          true,
		"127.1.2.3:5000":     true,
		"localhost:5000":     true,
		"LOCALHOST":          true,
		"[::1]:5000":         true,
		"[::1]":              true,
		"::1":                true,
		"registry.example":   false,
		"10.0.0.1:5000":      false,
		"0.0.0.0:5000":       false,
		"[::ffff:10.0.0.1]":  false,
		"localhost.evil.com": false,
		"127.0.0.1.nip.io":   false,
		"docker.io":          false,
	} {
		got, err := plainHTTPAllowed(host)
		if err != nil || got != want {
			t.Errorf("plainHTTPAllowed(%q) = %v, %v; want %v", host, got, err, want)
		}
	}
	// The resolver built for pulls uses https for everything else.
	hosts, closeIdle := registryHosts()
	defer closeIdle()
	for host, scheme := range map[string]string{"127.0.0.1:5000": "http", "registry.example.com": "https", "docker.io": "https"} {
		rh, err := hosts(host)
		if err != nil || len(rh) != 1 || rh[0].Scheme != scheme {
			t.Errorf("registry hosts for %s = %+v, %v; want scheme %s", host, rh, err, scheme)
		}
	}
}

// FuzzImagePolicyCheck: Check never panics on outside input, and what it
// accepts is normalized (checking it again gives the same reference), from
// an allowed registry, and pinned to a digest when the policy says so.
func FuzzImagePolicyCheck(f *testing.F) {
	for _, seed := range []string{
		"busybox", "busybox:latest", "docker.io/library/busybox@" + digestA,
		"registry.example.com/app:v1@" + digestA, "a.corp.example:443/x/y:z",
		"[::1]:5000/app:v1", "127.0.0.1:5000/app", "UPPER/case", "", ":", "@", "a@sha256:",
		"evilcorp.example/app", "x/" + strings.Repeat("a/", 100),
	} {
		f.Add(seed, false)
		f.Add(seed, true)
	}
	f.Fuzz(func(t *testing.T, ref string, requireDigest bool) {
		p := ImagePolicy{
			AllowedRegistries: []string{"docker.io", "registry.example.com", "*.corp.example", "127.0.0.1:5000", "[::1]:5000"},
			RequireDigest:     requireDigest,
		}
		named, err := p.Check(ref)
		if err != nil {
			if !errors.Is(err, ErrInvalidSpec) && !errors.Is(err, ErrImagePolicy) {
				t.Fatalf("Check(%q): unclassified error %v", ref, err)
			}
			return
		}
		again, err := p.Check(named.String())
		if err != nil || again.String() != named.String() {
			t.Fatalf("Check(%q) = %q, but checking that gives %v, %v", ref, named, again, err)
		}
		if !p.allowsRegistry(reference.Domain(named)) {
			t.Fatalf("Check(%q) = %q from a registry not allowed", ref, named)
		}
		_, digested := named.(reference.Canonical)
		_, tagged := named.(reference.Tagged)
		if digested == tagged {
			t.Fatalf("Check(%q) = %q: want exactly one of tag and digest", ref, named)
		}
		if requireDigest && !digested {
			t.Fatalf("Check(%q) = %q without a digest under RequireDigest", ref, named)
		}
	})
}
