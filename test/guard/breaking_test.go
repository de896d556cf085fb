package guard

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
)

// The released contracts: proto/released/<version>.json are buf images
// (descriptor sets, JSON) of every published version. The newest is the
// one the current .proto files must stay wire- and source-compatible with
// (buf's FILE rules). Cutting a release adds a new image:
//
//	(cd proto && ../.cache/bin/buf build --exclude-source-info -o released/vX.Y.Z.json)

// latestReleasedImage returns the newest image under proto/released.
func latestReleasedImage(root string) (string, error) {
	m, err := filepath.Glob(filepath.Join(root, "proto", "released", "v*.json"))
	if err != nil || len(m) == 0 {
		return "", fmt.Errorf("no released descriptor set under proto/released (%v)", err)
	}
	sort.Slice(m, func(i, j int) bool { return semverLess(filepath.Base(m[i]), filepath.Base(m[j])) })
	return m[len(m)-1], nil
}

// semverLess orders "vMAJOR.MINOR.PATCH.json" names numerically.
func semverLess(a, b string) bool {
	pa, pb := versionParts(a), versionParts(b)
	for i := range pa {
		if pa[i] != pb[i] {
			return pa[i] < pb[i]
		}
	}
	return false
}

func versionParts(name string) [3]int {
	var v [3]int
	fmt.Sscanf(strings.TrimSuffix(strings.TrimPrefix(name, "v"), ".json"), "%d.%d.%d", &v[0], &v[1], &v[2])
	return v
}

// bufBinary is the pinned buf that scripts/setup.sh builds.
func bufBinary(t *testing.T, root string) string {
	t.Helper()
	p := filepath.Join(root, ".cache", "bin", "buf")
	if _, err := os.Stat(p); err != nil {
		msg := fmt.Sprintf("buf not built at %s (run scripts/setup.sh): %v", p, err)
		if inCI() {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return p
}

// bufBreaking runs buf breaking in protoDir against image; the error holds
// buf's findings.
func bufBreaking(buf, protoDir, image string) error {
	cmd := exec.Command(buf, "breaking", "--against", image)
	cmd.Dir = protoDir
	out, err := cmd.CombinedOutput()
	if err != nil {
		return errors.New(strings.TrimSpace(string(out)))
	}
	return nil
}

func TestProtoContractsAreNotBroken(t *testing.T) {
	root := repoRoot(t)
	buf := bufBinary(t, root)
	image, err := latestReleasedImage(root)
	if err != nil {
		t.Fatal(err)
	}
	if err := bufBreaking(buf, filepath.Join(root, "proto"), image); err != nil {
		t.Fatalf("the .proto contracts break the released %s:\n%s\n\n"+
			"Released contracts never bend (DESIGN.md): add a field or an RPC instead of changing or removing one, "+
			"or reserve the old number and name.", filepath.Base(image), err)
	}
}

// TestBreakingGuardCatchesViolations removes a field from a copy of the
// contracts and expects the gate to fail naming it.
func TestBreakingGuardCatchesViolations(t *testing.T) {
	root := repoRoot(t)
	buf := bufBinary(t, root)
	image, err := latestReleasedImage(root)
	if err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir()
	if err := os.CopyFS(tmp, os.DirFS(filepath.Join(root, "proto"))); err != nil {
		t.Fatal(err)
	}
	leaseProto := filepath.Join(tmp, "gpuaas", "lease", "v1", "lease.proto")
	b, err := os.ReadFile(leaseProto)
	if err != nil {
		t.Fatal(err)
	}
	const field = "  string tenant = 1;\n"
	if !strings.Contains(string(b), field) {
		t.Fatalf("lease.proto no longer has %q; pick another field for this test", field)
	}
	if err := os.WriteFile(leaseProto, []byte(strings.Replace(string(b), field, "", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	err = bufBreaking(buf, tmp, image)
	if err == nil {
		t.Fatal("removing LeaseSpec.tenant passed the breaking-change gate")
	}
	if !strings.Contains(err.Error(), "tenant") {
		t.Errorf("the gate's finding does not name the removed field:\n%v", err)
	}
}
