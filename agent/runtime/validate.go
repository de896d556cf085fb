package runtime

import (
	"fmt"
	"path/filepath"
	"strings"
	"unicode"

	"github.com/containerd/containerd/v2/pkg/identifiers"
)

// Limits on values that end up in containerd labels and in the container's
// environment.
const (
	maxLabelValue = 256
	// minMemoryBytes is the smallest memory limit a runc container starts
	// with reliably (Docker uses the same floor).
	minMemoryBytes = 6 << 20
	// minCPUMillis gives a CFS quota of 1 ms per 100 ms period, the
	// kernel's minimum quota.
	minCPUMillis = 10
)

// reservedEnvPrefixes are environment keys a tenant may not set: the
// runtime sets the GPU and lease variables itself, and other NVIDIA_*
// variables (NVIDIA_MIG_CONFIG_DEVICES, ...) would ask a GPU-aware runtime
// hook for more than the partition.
var reservedEnvPrefixes = []string{"NVIDIA_", "GPUAAS_"}

// ValidateID checks a container id against containerd's identifier rules
// (alphanumerics separated by single '.', '_' or '-', at most 76
// characters), which also satisfy runc's.
func ValidateID(id string) error {
	if err := identifiers.Validate(id); err != nil {
		return fmt.Errorf("%w: container id: %w", ErrInvalidSpec, err)
	}
	return nil
}

// validateSpec rejects a spec the runtime could not create safely. Every
// error wraps ErrInvalidSpec and names the field, never an env value.
func validateSpec(s Spec) error {
	if err := ValidateID(s.ID); err != nil {
		return err
	}
	invalid := func(format string, args ...any) error {
		return fmt.Errorf("%w: container %s: %s", ErrInvalidSpec, s.ID, fmt.Sprintf(format, args...))
	}
	if s.LeaseID == "" {
		return invalid("empty lease id")
	}
	if !labelSafe(s.LeaseID) {
		return invalid("lease id must be printable and at most %d bytes", maxLabelValue)
	}
	if s.Tenant != "" && !labelSafe(s.Tenant) {
		return invalid("tenant must be printable and at most %d bytes", maxLabelValue)
	}
	if s.Image == "" {
		return invalid("empty image reference")
	}
	if !labelSafe(s.Image) || strings.ContainsAny(s.Image, " \t") {
		return invalid("malformed image reference %q", s.Image)
	}
	if s.LogPath != "" && (!filepath.IsAbs(s.LogPath) || filepath.Clean(s.LogPath) != s.LogPath) {
		return invalid("log path %q must be absolute and clean", s.LogPath)
	}
	for i, a := range s.Args {
		if strings.ContainsRune(a, 0) {
			return invalid("argument %d contains a NUL byte", i)
		}
	}
	for i, kv := range s.Env {
		key, _, ok := strings.Cut(kv, "=")
		if !ok || key == "" || strings.ContainsRune(kv, 0) {
			return invalid("environment entry %d is not KEY=VALUE", i)
		}
		for _, p := range reservedEnvPrefixes {
			if strings.HasPrefix(strings.ToUpper(key), p) {
				return invalid("environment key %q is reserved (%s*)", key, p)
			}
		}
	}
	l := s.Limits
	switch {
	case l.MemoryBytes < 0 || (l.MemoryBytes > 0 && l.MemoryBytes < minMemoryBytes):
		return invalid("memory limit %d: want 0 (default) or at least %d bytes", l.MemoryBytes, minMemoryBytes)
	case l.CPUMillis < 0 || (l.CPUMillis > 0 && l.CPUMillis < minCPUMillis):
		return invalid("cpu limit %d: want 0 (default) or at least %d millis", l.CPUMillis, minCPUMillis)
	case l.Pids < 0:
		return invalid("pids limit %d is negative", l.Pids)
	}
	if u := s.Device.UUID; u != "" && !deviceUUIDSafe(u) {
		// NVIDIA_VISIBLE_DEVICES is a comma-separated list: a ',' would
		// name a second device.
		return invalid("MIG device uuid %q: want letters, digits and '-'", u)
	}
	seen := map[string][2]uint32{}
	for _, n := range s.Device.DeviceNodes {
		if !filepath.IsAbs(n.Path) || filepath.Clean(n.Path) != n.Path || !strings.HasPrefix(n.Path, "/dev/") {
			return invalid("device node %q must be a clean path under /dev", n.Path)
		}
		num := [2]uint32{n.Major, n.Minor}
		if prev, ok := seen[n.Path]; ok && prev != num {
			return invalid("device node %s listed as %d:%d and %d:%d", n.Path, prev[0], prev[1], n.Major, n.Minor)
		}
		seen[n.Path] = num
	}
	return nil
}

func labelSafe(v string) bool {
	if len(v) > maxLabelValue {
		return false
	}
	for _, r := range v {
		if !unicode.IsPrint(r) {
			return false
		}
	}
	return true
}

func deviceUUIDSafe(u string) bool {
	for _, r := range u {
		if !(r == '-' || r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z') {
			return false
		}
	}
	return true
}
