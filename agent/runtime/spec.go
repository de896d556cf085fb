package runtime

import (
	"context"
	"fmt"
	"os"
	"path"
	"strings"

	"github.com/containerd/containerd/v2/contrib/seccomp"
	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/pkg/oci"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// Defaults for a zero Limits field, and the fixed parts of the hardened
// spec.
const (
	DefaultMemoryBytes int64 = 2 << 30
	DefaultCPUMillis   int64 = 2000
	DefaultPids        int64 = 1024
	// TmpSizeBytes bounds the writable tmpfs at /tmp; what is written there
	// is also charged to the container's memory limit.
	TmpSizeBytes int64 = 256 << 20
	// NobodyID is the uid and gid a container runs as when its image asks
	// for root.
	NobodyID uint32 = 65534

	cpuPeriodMicros = 100000
)

// Environment variables the runtime sets in every container.
const (
	EnvVisibleDevices     = "NVIDIA_VISIBLE_DEVICES"
	EnvDriverCapabilities = "NVIDIA_DRIVER_CAPABILITIES"
	EnvLeaseID            = "GPUAAS_LEASE_ID"
	// DriverCapabilities is what a tenant workload gets of the driver:
	// CUDA and nvidia-smi, no graphics, video or display.
	DriverCapabilities = "compute,utility"
)

// strippedEnv are variables removed even when the image sets them: they
// would make a GPU-aware runtime hook expose MIG management devices.
var strippedEnv = []string{"NVIDIA_MIG_CONFIG_DEVICES", "NVIDIA_MIG_MONITOR_DEVICES"}

// CgroupsPath is the cgroup path (relative to each hierarchy's root) the
// runtime sets for a container, the one runc uses with the cgroupfs driver:
// /<namespace>/<id>.
func CgroupsPath(namespace, id string) string {
	return path.Join("/", namespace, id)
}

// hardenedSpec returns the spec options applied after the image's config
// (oci.WithImageConfig): everything that makes a tenant container what the
// design promises, whatever the image asks for.
//
//   - args and env: spec.Args replace the image's entrypoint and command;
//     env is the image's, then spec.Env, then the runtime's GPU and lease
//     variables (tenants cannot set NVIDIA_* or GPUAAS_*; see validateSpec).
//   - user: the image's user unless it is root (uid or gid 0), else
//     nobody (65534:65534); no supplementary group 0.
//   - no new privileges, no capabilities at all (all five sets empty),
//     containerd's default seccomp profile, hostname = container id.
//   - read-only root filesystem, writable tmpfs at /tmp (nosuid, nodev,
//     TmpSizeBytes), containerd's default masked and read-only paths.
//   - new pid, ipc, uts, mount, network and cgroup namespaces, none joined
//     from the host; the network namespace is new and empty (loopback only)
//     until the CNI network exists.
//   - memory (no swap beyond it), CPU quota and pids limits.
//   - devices: the standard /dev nodes, plus exactly the partition's device
//     nodes, each as a node created in the container and a device cgroup
//     rule allowing read/write of that major:minor only. The node is
//     created by runc from the major:minor in the spec, whether or not it
//     exists on the host: on CI hosts without a GPU the nodes are simulated
//     (no driver behind them: opening one gives ENXIO when allowed, EPERM
//     when fenced), so a missing host node is not an error.
//   - cgroupsPath /<namespace>/<id> (CgroupsPath).
func hardenedSpec(namespace string, s Spec) []oci.SpecOpts {
	return hardenedSpecWith(namespace, s, withDeviceNodes(s))
}

// hardenedSpecWith is hardenedSpec with devices injecting the partition's
// nodes: withDeviceNodes, or withCDIDevices with the partition's CDI
// device, which gives the same nodes, cgroup rules and environment.
func hardenedSpecWith(namespace string, s Spec, devices oci.SpecOpts) []oci.SpecOpts {
	opts := []oci.SpecOpts{oci.WithDefaultUnixDevices}
	if len(s.Args) > 0 {
		opts = append(opts, oci.WithProcessArgs(s.Args...))
	}
	return append(opts,
		withEnv(s),
		oci.WithHostname(s.ID),
		withNonRootUser,
		oci.WithNoNewPrivileges,
		withoutCapabilities,
		oci.WithRootFSReadonly(),
		withTmp,
		withPrivateNamespaces,
		withLimits(s.Limits),
		devices,
		oci.WithCgroup(CgroupsPath(namespace, s.ID)),
		// Last: the profile is derived from the capabilities set above.
		seccomp.WithDefaultProfile(),
	)
}

// visibleDevices is the NVIDIA_VISIBLE_DEVICES value for a MIG device:
// its MIG-... uuid, or "void" (no GPU) for a container without a device.
func visibleDevices(uuid string) string {
	switch {
	case uuid == "":
		return "void"
	case strings.HasPrefix(uuid, "MIG-"):
		return uuid
	default:
		return "MIG-" + uuid
	}
}

func withEnv(s Spec) oci.SpecOpts {
	return func(_ context.Context, _ oci.Client, _ *containers.Container, sp *specs.Spec) error {
		env := mergeEnv(sp.Process.Env, s.Env)
		env = mergeEnv(env, []string{
			EnvVisibleDevices + "=" + visibleDevices(s.Device.UUID),
			EnvDriverCapabilities + "=" + DriverCapabilities,
			EnvLeaseID + "=" + s.LeaseID,
		})
		kept := env[:0]
		for _, kv := range env {
			key, _, _ := strings.Cut(kv, "=")
			strip := false
			for _, k := range strippedEnv {
				strip = strip || key == k
			}
			if !strip {
				kept = append(kept, kv)
			}
		}
		sp.Process.Env = kept
		return nil
	}
}

// mergeEnv returns base with each KEY=VALUE of overrides replacing the
// entry with the same key, or appended.
func mergeEnv(base, overrides []string) []string {
	out := append([]string(nil), base...)
	index := make(map[string]int, len(out))
	for i, kv := range out {
		k, _, _ := strings.Cut(kv, "=")
		index[k] = i
	}
	for _, kv := range overrides {
		k, _, _ := strings.Cut(kv, "=")
		if i, ok := index[k]; ok {
			out[i] = kv
			continue
		}
		index[k] = len(out)
		out = append(out, kv)
	}
	return out
}

func withNonRootUser(_ context.Context, _ oci.Client, _ *containers.Container, s *specs.Spec) error {
	u := &s.Process.User
	if u.UID == 0 {
		u.UID, u.GID = NobodyID, NobodyID
	}
	if u.GID == 0 {
		u.GID = NobodyID
	}
	u.Username = ""
	gids := []uint32{u.GID}
	for _, g := range u.AdditionalGids {
		if g != 0 && g != u.GID {
			gids = append(gids, g)
		}
	}
	u.AdditionalGids = gids
	return nil
}

func withoutCapabilities(_ context.Context, _ oci.Client, _ *containers.Container, s *specs.Spec) error {
	s.Process.Capabilities = &specs.LinuxCapabilities{
		Bounding:    []string{},
		Effective:   []string{},
		Inheritable: []string{},
		Permitted:   []string{},
		Ambient:     []string{},
	}
	return nil
}

func withTmp(_ context.Context, _ oci.Client, _ *containers.Container, s *specs.Spec) error {
	mounts := s.Mounts[:0]
	for _, m := range s.Mounts {
		if path.Clean(m.Destination) != "/tmp" {
			mounts = append(mounts, m)
		}
	}
	s.Mounts = append(mounts, specs.Mount{
		Destination: "/tmp",
		Type:        "tmpfs",
		Source:      "tmpfs",
		Options:     []string{"nosuid", "nodev", "mode=1777", fmt.Sprintf("size=%d", TmpSizeBytes)},
	})
	return nil
}

func withPrivateNamespaces(_ context.Context, _ oci.Client, _ *containers.Container, s *specs.Spec) error {
	s.Linux.Namespaces = []specs.LinuxNamespace{
		{Type: specs.PIDNamespace},
		{Type: specs.IPCNamespace},
		{Type: specs.UTSNamespace},
		{Type: specs.MountNamespace},
		{Type: specs.NetworkNamespace},
		{Type: specs.CgroupNamespace},
	}
	return nil
}

func withLimits(l Limits) oci.SpecOpts {
	memory, millis, pids := l.MemoryBytes, l.CPUMillis, l.Pids
	if memory == 0 {
		memory = DefaultMemoryBytes
	}
	if millis == 0 {
		millis = DefaultCPUMillis
	}
	if pids == 0 {
		pids = DefaultPids
	}
	return func(_ context.Context, _ oci.Client, _ *containers.Container, s *specs.Spec) error {
		if s.Linux.Resources == nil {
			s.Linux.Resources = &specs.LinuxResources{}
		}
		r := s.Linux.Resources
		// Swap equal to the limit: memory+swap may not exceed the limit.
		r.Memory = &specs.LinuxMemory{Limit: &memory, Swap: &memory}
		quota, period := millis*cpuPeriodMicros/1000, uint64(cpuPeriodMicros)
		r.CPU = &specs.LinuxCPU{Quota: &quota, Period: &period}
		r.Pids = &specs.LinuxPids{Limit: &pids}
		return nil
	}
}

func withDeviceNodes(s Spec) oci.SpecOpts {
	return func(_ context.Context, _ oci.Client, _ *containers.Container, sp *specs.Spec) error {
		if sp.Linux.Resources == nil {
			sp.Linux.Resources = &specs.LinuxResources{}
		}
		seen := map[string]bool{}
		for _, n := range s.Device.DeviceNodes {
			if seen[n.Path] {
				continue
			}
			seen[n.Path] = true
			major, minor := int64(n.Major), int64(n.Minor)
			mode := os.FileMode(0o666) // as the driver creates them; the cgroup rule is the fence
			uid, gid := uint32(0), uint32(0)
			sp.Linux.Devices = append(sp.Linux.Devices, specs.LinuxDevice{
				Path: n.Path, Type: "c", Major: major, Minor: minor,
				FileMode: &mode, UID: &uid, GID: &gid,
			})
			sp.Linux.Resources.Devices = append(sp.Linux.Resources.Devices, specs.LinuxDeviceCgroup{
				Allow: true, Type: "c", Major: &major, Minor: &minor, Access: "rw",
			})
		}
		return nil
	}
}
