package runtime

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/distribution/reference"
)

// ErrImagePolicy: the image reference is well formed but the agent's image
// policy does not allow it (registry not allowlisted, tag without digest).
var ErrImagePolicy = errors.New("image refused by policy")

// ImagePolicy says which images the agent may run. It is checked on the
// reference alone, before the local store or any registry is consulted, so
// a refused reference never causes a network request.
//
// The zero value refuses every reference: an agent without an image policy
// runs nothing (fail closed).
type ImagePolicy struct {
	// AllowedRegistries lists the registries images may come from, matched
	// against the registry of the normalized reference ("docker.io" for
	// Docker Hub names such as "busybox"), case-insensitively:
	//   - "host" or "host:port": exactly that host and port ("localhost"
	//     does not match "localhost:5000");
	//   - "*.example.com" (optionally ":port"): any subdomain of
	//     example.com, at any depth, not example.com itself;
	//   - "*": any registry.
	AllowedRegistries []string
	// RequireDigest refuses references without a digest
	// (name@sha256:...): a tag can be moved to other content, a digest
	// cannot.
	RequireDigest bool
}

// Validate rejects allowlist entries that can never match a registry, so a
// typo in the configuration is an error at startup rather than a refusal
// of every image later.
func (p ImagePolicy) Validate() error {
	for _, pat := range p.AllowedRegistries {
		if pat == "*" {
			continue
		}
		host := strings.TrimPrefix(pat, "*.")
		if host == "" || strings.Contains(host, "*") || strings.Contains(host, "/") {
			return fmt.Errorf("%w: allowed registry %q: want host[:port], *.domain[:port] or *", ErrInvalidSpec, pat)
		}
		named, err := reference.ParseNormalizedNamed(host + "/x")
		if err != nil || !strings.EqualFold(reference.Domain(named), canonicalRegistry(host)) {
			return fmt.Errorf("%w: allowed registry %q: not a registry host[:port]", ErrInvalidSpec, pat)
		}
	}
	return nil
}

// Check parses ref, normalizes it as Docker does ("busybox" is
// "docker.io/library/busybox:latest") and applies the policy. The result
// is "name:tag", or "name@digest" when ref has a digest (a tag next to a
// digest is dropped: the digest decides the content).
//
// A malformed reference is ErrInvalidSpec; a reference the policy refuses
// is ErrImagePolicy.
func (p ImagePolicy) Check(ref string) (reference.Named, error) {
	if ref == "" {
		return nil, fmt.Errorf("check image: %w: empty image reference", ErrInvalidSpec)
	}
	named, err := reference.ParseNormalizedNamed(ref)
	if err != nil {
		return nil, fmt.Errorf("check image %q: %w: %w", ref, ErrInvalidSpec, err)
	}
	registry := reference.Domain(named)
	if !p.allowsRegistry(registry) {
		return nil, fmt.Errorf("check image %q: %w: registry %q is not in the allowed registries", ref, ErrImagePolicy, registry)
	}
	if c, ok := named.(reference.Canonical); ok {
		pinned, err := reference.WithDigest(reference.TrimNamed(named), c.Digest())
		if err != nil {
			return nil, fmt.Errorf("check image %q: %w: %w", ref, ErrInvalidSpec, err)
		}
		return pinned, nil
	}
	if p.RequireDigest {
		return nil, fmt.Errorf("check image %q: %w: a digest is required (name@sha256:...), not a tag", ref, ErrImagePolicy)
	}
	return reference.TagNameOnly(named), nil
}

func (p ImagePolicy) allowsRegistry(registry string) bool {
	registry = strings.ToLower(registry)
	host, port := splitRegistryPort(registry)
	for _, pat := range p.AllowedRegistries {
		pat = strings.ToLower(pat)
		switch {
		case pat == "*":
			return true
		case strings.HasPrefix(pat, "*."):
			suffix, patPort := splitRegistryPort(pat[1:]) // ".example.com"
			if port == patPort && len(host) > len(suffix) && strings.HasSuffix(host, suffix) {
				return true
			}
		case canonicalRegistry(pat) == registry:
			return true
		}
	}
	return false
}

// canonicalRegistry maps Docker Hub's legacy host onto the name the
// reference parser gives it.
func canonicalRegistry(host string) string {
	if strings.EqualFold(host, "index.docker.io") {
		return "docker.io"
	}
	return strings.ToLower(host)
}

// splitRegistryPort splits "host:port" (and "[v6]:port"); port is empty
// when there is none.
func splitRegistryPort(hostport string) (host, port string) {
	i := strings.LastIndexByte(hostport, ':')
	if i < 0 || strings.LastIndexByte(hostport, ']') > i {
		return hostport, ""
	}
	return hostport[:i], hostport[i+1:]
}

func (p ImagePolicy) clone() ImagePolicy {
	p.AllowedRegistries = slices.Clone(p.AllowedRegistries)
	return p
}
