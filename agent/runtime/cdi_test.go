package runtime

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"tags.cncf.io/container-device-interface/pkg/cdi"
	cdispec "tags.cncf.io/container-device-interface/specs-go"
)

// TestWriteCDISpecValidates: the written spec is a valid CDI spec of the
// current version, read back by the CDI library and resolved by a cache
// over the directory, holding exactly the partition's nodes (duplicates
// once) and the NVIDIA variables; RemoveCDISpec removes it, idempotently.
func TestWriteCDISpecValidates(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "cdi")
	dev := fakeMIG()
	name, err := WriteCDISpec(dir, dev)
	if err != nil {
		t.Fatalf("WriteCDISpec: %v", err)
	}
	if want := "gpuaas.dev/mig=" + dev.UUID; name != want {
		t.Errorf("qualified name = %q, want %q", name, want)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].Name() != "gpuaas.dev-mig-"+dev.UUID+".json" {
		t.Fatalf("spec directory holds %v, want one file named after the MIG uuid", entries)
	}
	path := filepath.Join(dir, entries[0].Name())
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o644 {
		t.Errorf("spec file mode: %v, %v; want 0644", fi.Mode(), err)
	}

	spec, err := cdi.ReadSpec(path, 0)
	if err != nil {
		t.Fatalf("CDI library rejects the spec: %v", err)
	}
	if err := cdispec.ValidateVersion(spec.Spec); err != nil {
		t.Errorf("version: %v", err)
	}
	if spec.Version != cdispec.CurrentVersion || spec.Kind != "gpuaas.dev/mig" {
		t.Errorf("cdiVersion, kind = %q, %q; want %q, gpuaas.dev/mig", spec.Version, spec.Kind, cdispec.CurrentVersion)
	}
	if len(spec.Devices) != 1 || spec.Devices[0].Name != dev.UUID {
		t.Fatalf("devices = %+v, want one named %s", spec.Devices, dev.UUID)
	}

	cache, err := cdi.NewCache(cdi.WithSpecDirs(dir), cdi.WithAutoRefresh(false))
	if err != nil {
		t.Fatal(err)
	}
	if errs := cache.GetErrors(); len(errs) != 0 {
		t.Errorf("CDI cache errors: %v", errs)
	}
	if got := cache.ListDevices(); !slices.Equal(got, []string{name}) {
		t.Errorf("cache devices = %v, want [%s]", got, name)
	}
	d := cache.GetDevice(name)
	if d == nil {
		t.Fatalf("cache does not resolve %s", name)
	}
	edits := d.ContainerEdits
	var got []string
	for _, n := range edits.DeviceNodes {
		mode := "<nil>"
		if n.FileMode != nil {
			mode = n.FileMode.Perm().String()
		}
		got = append(got, n.Path+" "+n.Type+" "+itoa(n.Major)+":"+itoa(n.Minor)+" "+n.Permissions+" "+mode)
	}
	want := []string{
		"/dev/nvidia0 c 195:0 rw -rw-rw-rw-",
		"/dev/nvidiactl c 195:255 rw -rw-rw-rw-",
		"/dev/nvidia-caps/nvidia-cap21 c 237:21 rw -rw-rw-rw-",
	}
	if !slices.Equal(got, want) {
		t.Errorf("device nodes:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	wantEnv := []string{"NVIDIA_VISIBLE_DEVICES=" + dev.UUID, "NVIDIA_DRIVER_CAPABILITIES=compute,utility"}
	if !slices.Equal(edits.Env, wantEnv) {
		t.Errorf("env = %q, want %q", edits.Env, wantEnv)
	}

	// Rewriting replaces the file atomically and leaves no temporary.
	if _, err := WriteCDISpec(dir, dev); err != nil {
		t.Fatalf("rewrite: %v", err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("after rewrite the directory holds %v", entries)
	}

	if err := RemoveCDISpec(dir, dev.UUID); err != nil {
		t.Fatalf("RemoveCDISpec: %v", err)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("spec still there after RemoveCDISpec: %v", err)
	}
	if err := RemoveCDISpec(dir, dev.UUID); err != nil {
		t.Errorf("second RemoveCDISpec: %v", err)
	}

	for _, bad := range []string{"", "MIG-../../etc/x", "MIG-a,MIG-b", "MIG-a/b"} {
		d := fakeMIG()
		d.UUID = bad
		if _, err := WriteCDISpec(dir, d); err == nil {
			t.Errorf("WriteCDISpec accepted uuid %q", bad)
		}
		if err := RemoveCDISpec(dir, bad); err == nil {
			t.Errorf("RemoveCDISpec accepted uuid %q", bad)
		}
	}
	if _, err := WriteCDISpec("", dev); err == nil {
		t.Error("WriteCDISpec accepted an empty directory")
	}
}

func itoa(v int64) string { return strconv.FormatInt(v, 10) }

// TestCDIInjectionMatchesDirectInjection: the OCI spec Create generates
// through CDI equals the one from direct device-node injection: the same
// device nodes (modes, owners), the same cgroup allow rules for exactly
// those majors:minors, the same environment, and nothing else changed.
func TestCDIInjectionMatchesDirectInjection(t *testing.T) {
	for _, tc := range []struct {
		name  string
		image []oci.SpecOpts
	}{
		{"root image", nil},
		{"non-root image", []oci.SpecOpts{withImageUser(1000, 1000)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, dev := range []struct {
				name string
				s    Spec
			}{
				{"fakeMIG", Spec{ID: "lease-1", LeaseID: "lease-1", Image: "img", Args: []string{"sh"}, Env: []string{"A=1"}, Device: fakeMIG()}},
				{"tenantPartition", Spec{ID: "lease-2", LeaseID: "lease-2", Image: "img", Device: tenantPartition()}},
			} {
				direct := generate(t, dev.s, tc.image...)

				dir := t.TempDir()
				name, err := WriteCDISpec(dir, dev.s.Device)
				if err != nil {
					t.Fatal(err)
				}
				cache, err := newCDICache(dir)
				if err != nil {
					t.Fatal(err)
				}
				viaCDI := generateWith(t, dev.s, withCDIDevices(cache, name), tc.image...)

				if !reflect.DeepEqual(direct.Linux.Devices, viaCDI.Linux.Devices) {
					t.Errorf("%s: linux.devices:\ndirect %s\nCDI    %s", dev.name, dump(direct.Linux.Devices), dump(viaCDI.Linux.Devices))
				}
				if !reflect.DeepEqual(direct.Linux.Resources.Devices, viaCDI.Linux.Resources.Devices) {
					t.Errorf("%s: linux.resources.devices:\ndirect %s\nCDI    %s", dev.name, dump(direct.Linux.Resources.Devices), dump(viaCDI.Linux.Resources.Devices))
				}
				if !slices.Equal(direct.Process.Env, viaCDI.Process.Env) {
					t.Errorf("%s: env:\ndirect %q\nCDI    %q", dev.name, direct.Process.Env, viaCDI.Process.Env)
				}
				if !reflect.DeepEqual(direct, viaCDI) {
					t.Errorf("%s: specs differ elsewhere:\ndirect %s\nCDI    %s", dev.name, dump(direct), dump(viaCDI))
				}
				// The rules added to those of a spec without the device
				// allow exactly the partition's nodes.
				none := generateWith(t, dev.s, func(context.Context, oci.Client, *containers.Container, *specs.Spec) error { return nil }, tc.image...)
				base := len(none.Linux.Resources.Devices)
				if len(viaCDI.Linux.Resources.Devices) < base || !reflect.DeepEqual(viaCDI.Linux.Resources.Devices[:base], none.Linux.Resources.Devices) {
					t.Fatalf("%s: CDI changed the existing device rules: %s", dev.name, dump(viaCDI.Linux.Resources.Devices))
				}
				var allowed []string
				for _, r := range viaCDI.Linux.Resources.Devices[base:] {
					if !r.Allow || r.Major == nil || r.Minor == nil {
						t.Errorf("%s: added rule %s is not an allow rule for one major:minor", dev.name, dump(r))
						continue
					}
					allowed = append(allowed, r.Type+" "+itoa(*r.Major)+":"+itoa(*r.Minor)+" "+r.Access)
				}
				var want []string
				seen := map[string]bool{}
				for _, n := range dev.s.Device.DeviceNodes {
					if !seen[n.Path] {
						seen[n.Path] = true
						want = append(want, "c "+itoa(int64(n.Major))+":"+itoa(int64(n.Minor))+" rw")
					}
				}
				if !slices.Equal(allowed, want) {
					t.Errorf("%s: allow rules %q, want %q", dev.name, allowed, want)
				}
			}
		})
	}
}

func withImageUser(uid, gid uint32) oci.SpecOpts {
	return func(_ context.Context, _ oci.Client, _ *containers.Container, s *specs.Spec) error {
		s.Process.User.UID, s.Process.User.GID = uid, gid
		return nil
	}
}

// generateWith is generate with devices in place of withDeviceNodes.
func generateWith(t *testing.T, s Spec, devices oci.SpecOpts, imageOpts ...oci.SpecOpts) *specs.Spec {
	t.Helper()
	ctx := namespaces.WithNamespace(context.Background(), "gpuaas")
	opts := append([]oci.SpecOpts{oci.WithDefaultSpec()}, imageOpts...)
	opts = append(opts, hardenedSpecWith("gpuaas", s, devices)...)
	sp, err := oci.GenerateSpec(ctx, nil, &containers.Container{ID: s.ID}, opts...)
	if err != nil {
		t.Fatalf("generate spec: %v", err)
	}
	return sp
}

func dump(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		return err.Error()
	}
	return string(b)
}

// TestCDIContainerSeesExactlyItsPartition: with CDISpecDir set, Create
// writes the partition's CDI spec, the container's /dev holds exactly the
// standard nodes and the partition's (injected through CDI), the
// partition's node passes the device cgroup, and Stop removes the spec.
func TestCDIContainerSeesExactlyItsPartition(t *testing.T) {
	e := newEnv(t)
	dir := filepath.Join(t.TempDir(), "cdi")
	rt, err := NewContainerd(context.Background(), Config{Address: e.ctrd.Address(), Namespace: testNamespace, CDISpecDir: dir})
	if err != nil {
		t.Fatalf("new runtime with CDI: %v", err)
	}
	t.Cleanup(func() { rt.Close() })
	e.rt = rt

	specFile := filepath.Join(dir, "gpuaas.dev-mig-"+tenantPartition().UUID+".json")
	var id string
	r := e.runTenant(`
find /dev | sort | while read f; do
	if [ -L "$f" ]; then echo "dev=$f -> $(readlink "$f")"
	elif [ -c "$f" ]; then echo "dev=$f c $((0x$(stat -c %t "$f"))):$((0x$(stat -c %T "$f")))"
	elif [ -b "$f" ]; then echo "dev=$f b $((0x$(stat -c %t "$f"))):$((0x$(stat -c %T "$f")))"
	elif [ -d "$f" ]; then echo "dev=$f/"
	else echo "dev=$f $(stat -c %F "$f")"
	fi
done
check open-partition head -c 1 /dev/nvidia0
check open-other-gpu head -c 1 /dev/nvidia1
echo "visible=$NVIDIA_VISIBLE_DEVICES"
`, nil, tenantHooks{
		created: func(string) {
			if _, err := cdi.ReadSpec(specFile, 0); err != nil {
				t.Errorf("CDI spec of the running container: %v", err)
			}
		},
		started: func(cid string) func() { id = cid; return nil },
	})

	assertTenantDev(t, r["dev"])
	if p := r.one("open-partition"); p != "ENXIO" && p != "OK" {
		t.Errorf("open-partition = %q, want ENXIO (no driver) or OK: the device cgroup must allow the lease's node", p)
	}
	r.expect(t, map[string]string{
		"open-other-gpu": "ENOENT",
		"visible":        tenantPartition().UUID,
	})

	if _, err := os.Stat(specFile); err != nil {
		t.Fatalf("CDI spec before Stop: %v", err)
	}
	if err := rt.Stop(context.Background(), id, 0); err != nil {
		t.Fatalf("stop: %v", err)
	}
	if _, err := os.Stat(specFile); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("CDI spec after Stop: %v, want removed", err)
	}
}
