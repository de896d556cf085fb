package runtime

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/pkg/oci"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"tags.cncf.io/container-device-interface/pkg/cdi"
	cdispec "tags.cncf.io/container-device-interface/specs-go"

	"github.com/gpuaas/gpuaas/agent/gpu"
)

// CDIKind is the CDI kind (vendor/class) of the partitions the agent
// publishes: one device per MIG partition, named by its MIG UUID, so a
// partition's qualified name is "gpuaas.dev/mig=MIG-...".
const CDIKind = "gpuaas.dev/mig"

// cdiFilePrefix starts the name of every spec file the agent writes, so
// RemoveCDISpec touches nothing written by another vendor (the NVIDIA
// container toolkit writes nvidia.yaml / nvidia.json into the same
// directories).
const cdiFilePrefix = "gpuaas.dev-mig-"

// CDIQualifiedName is the fully qualified CDI device name of a partition.
func CDIQualifiedName(migUUID string) string {
	return CDIKind + "=" + migUUID
}

// cdiSpecPath is the spec file of a partition in dir.
func cdiSpecPath(dir, migUUID string) (string, error) {
	if dir == "" {
		return "", errors.New("empty CDI spec directory")
	}
	if migUUID == "" || !deviceUUIDSafe(migUUID) {
		return "", fmt.Errorf("%w: MIG device uuid %q: want letters, digits and '-'", ErrInvalidSpec, migUUID)
	}
	return filepath.Join(dir, cdiFilePrefix+migUUID+".json"), nil
}

// cdiSpecFor is the CDI spec of one partition. Its container edits are
// what withDeviceNodes and withEnv give the partition directly: each node
// as a character device created in the container (mode 0666, owned by
// root, as the driver creates it; the device cgroup rule is the fence)
// with a cgroup rule allowing read/write of its major:minor only, and the
// NVIDIA variables. Duplicate paths are listed once.
func cdiSpecFor(dev gpu.MIGDevice) *cdispec.Spec {
	var nodes []*cdispec.DeviceNode
	seen := map[string]bool{}
	for _, n := range dev.DeviceNodes {
		if seen[n.Path] {
			continue
		}
		seen[n.Path] = true
		mode := os.FileMode(0o666)
		uid, gid := uint32(0), uint32(0)
		nodes = append(nodes, &cdispec.DeviceNode{
			Path:        n.Path,
			Type:        "c",
			Major:       int64(n.Major),
			Minor:       int64(n.Minor),
			FileMode:    &mode,
			Permissions: "rw",
			UID:         &uid,
			GID:         &gid,
		})
	}
	return &cdispec.Spec{
		Version: cdispec.CurrentVersion,
		Kind:    CDIKind,
		Devices: []cdispec.Device{{
			Name: dev.UUID,
			ContainerEdits: cdispec.ContainerEdits{
				Env: []string{
					EnvVisibleDevices + "=" + visibleDevices(dev.UUID),
					EnvDriverCapabilities + "=" + DriverCapabilities,
				},
				DeviceNodes: nodes,
			},
		}},
	}
}

// WriteCDISpec writes the CDI spec of a partition into dir (created if
// missing) and returns the device's qualified name. The file, named after
// the MIG UUID, is replaced atomically (written aside, synced, renamed), so
// a CDI cache scanning dir never reads a partial spec; it is 0644.
func WriteCDISpec(dir string, dev gpu.MIGDevice) (qualifiedName string, err error) {
	path, err := cdiSpecPath(dir, dev.UUID)
	if err != nil {
		return "", fmt.Errorf("write CDI spec: %w", err)
	}
	raw := cdiSpecFor(dev)
	if err := cdispec.ValidateVersion(raw); err != nil {
		return "", fmt.Errorf("write CDI spec for %s: %w", dev.UUID, err)
	}
	data, err := json.MarshalIndent(raw, "", "  ")
	if err != nil {
		return "", fmt.Errorf("write CDI spec for %s: %w", dev.UUID, err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("write CDI spec for %s: %w", dev.UUID, err)
	}
	// The temporary name does not end in .json or .yaml: a cache scanning
	// the directory meanwhile ignores it.
	tmp, err := os.CreateTemp(dir, "."+cdiFilePrefix+"*.tmp")
	if err != nil {
		return "", fmt.Errorf("write CDI spec for %s: %w", dev.UUID, err)
	}
	defer func() {
		if err != nil {
			_ = os.Remove(tmp.Name())
		}
	}()
	if _, err = tmp.Write(append(data, '\n')); err == nil {
		if err = tmp.Chmod(0o644); err == nil {
			err = tmp.Sync()
		}
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		return "", fmt.Errorf("write CDI spec for %s: %w", dev.UUID, err)
	}
	if d, derr := os.Open(dir); derr == nil {
		_ = d.Sync() // make the rename durable; best effort
		d.Close()
	}
	return CDIQualifiedName(dev.UUID), nil
}

// RemoveCDISpec removes the spec WriteCDISpec wrote for the partition. A
// missing file is not an error.
func RemoveCDISpec(dir, migUUID string) error {
	path, err := cdiSpecPath(dir, migUUID)
	if err != nil {
		return fmt.Errorf("remove CDI spec: %w", err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove CDI spec for %s: %w", migUUID, err)
	}
	return nil
}

// newCDICache is a CDI cache over dir alone, refreshed on demand (no
// directory watch, so no goroutine outlives the runtime).
func newCDICache(dir string) (*cdi.Cache, error) {
	return cdi.NewCache(cdi.WithSpecDirs(dir), cdi.WithAutoRefresh(false))
}

// withCDIDevices injects the qualified devices through the CDI cache, in
// place of withDeviceNodes. The cache is rescanned first, so a spec
// written just before is seen; a broken spec of another device is not
// fatal (as in containerd's own CDI option), an unresolvable device is.
func withCDIDevices(cache *cdi.Cache, devices ...string) oci.SpecOpts {
	return func(_ context.Context, _ oci.Client, _ *containers.Container, sp *specs.Spec) error {
		_ = cache.Refresh()
		if _, err := cache.InjectDevices(sp, devices...); err != nil {
			return fmt.Errorf("inject CDI devices: %w", err)
		}
		return nil
	}
}
