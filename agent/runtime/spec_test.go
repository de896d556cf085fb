package runtime

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/gpuaas/gpuaas/agent/gpu"
)

// fakeMIG is a MIG partition with NVIDIA's device numbers; the nodes do not
// exist on a host without a GPU, which the runtime must accept.
func fakeMIG() gpu.MIGDevice {
	return gpu.MIGDevice{
		UUID:    "MIG-5c7b1e3a-0d9f-5e39-9a3b-2b6f7f1d0c11",
		GPUUUID: "GPU-8a2f0c4e-1111-2222-3333-444455556666",
		DeviceNodes: []gpu.DeviceNode{
			{Path: "/dev/nvidia0", Major: 195, Minor: 0},
			{Path: "/dev/nvidiactl", Major: 195, Minor: 255},
			{Path: "/dev/nvidia-caps/nvidia-cap21", Major: 237, Minor: 21},
			{Path: "/dev/nvidia0", Major: 195, Minor: 0}, // duplicates are harmless
		},
	}
}

// generate builds the spec Create would, with imageOpts standing in for the
// image's config.
func generate(t *testing.T, s Spec, imageOpts ...oci.SpecOpts) *specs.Spec {
	t.Helper()
	ctx := namespaces.WithNamespace(context.Background(), "gpuaas")
	opts := append([]oci.SpecOpts{oci.WithDefaultSpec()}, imageOpts...)
	opts = append(opts, hardenedSpec("gpuaas", s)...)
	sp, err := oci.GenerateSpec(ctx, nil, &containers.Container{ID: s.ID}, opts...)
	if err != nil {
		t.Fatalf("generate spec: %v", err)
	}
	return sp
}

func TestHardenedSpec(t *testing.T) {
	s := Spec{
		ID: "lease-1", LeaseID: "lease-1", Image: "img", Args: []string{"train", "--epochs=1"},
		Env:    []string{"A=tenant", "PATH=/opt/bin"},
		Device: fakeMIG(),
	}
	sp := generate(t, s,
		oci.WithUIDGID(0, 0),
		oci.WithEnv([]string{"PATH=/bin", "A=image", "NVIDIA_MIG_CONFIG_DEVICES=all", "NVIDIA_VISIBLE_DEVICES=all"}),
		oci.WithProcessArgs("sh"))

	t.Run("args replace the image's", func(t *testing.T) {
		if !slices.Equal(sp.Process.Args, s.Args) {
			t.Errorf("args = %q", sp.Process.Args)
		}
	})
	t.Run("env layers image, tenant, runtime", func(t *testing.T) {
		want := []string{
			"PATH=/opt/bin", "A=tenant",
			"NVIDIA_VISIBLE_DEVICES=MIG-5c7b1e3a-0d9f-5e39-9a3b-2b6f7f1d0c11",
			"NVIDIA_DRIVER_CAPABILITIES=compute,utility",
			"GPUAAS_LEASE_ID=lease-1",
		}
		if !slices.Equal(sp.Process.Env, want) {
			t.Errorf("env = %q\nwant  %q", sp.Process.Env, want)
		}
	})
	t.Run("root becomes nobody", func(t *testing.T) {
		u := sp.Process.User
		if u.UID != NobodyID || u.GID != NobodyID || slices.Contains(u.AdditionalGids, 0) {
			t.Errorf("user = %+v", u)
		}
	})
	t.Run("no privileges", func(t *testing.T) {
		c := sp.Process.Capabilities
		if !sp.Process.NoNewPrivileges {
			t.Error("no_new_privileges not set")
		}
		for name, set := range map[string][]string{"bounding": c.Bounding, "effective": c.Effective, "permitted": c.Permitted, "inheritable": c.Inheritable, "ambient": c.Ambient} {
			if len(set) != 0 {
				t.Errorf("%s capabilities = %v", name, set)
			}
		}
		if sp.Linux.Seccomp == nil || sp.Linux.Seccomp.DefaultAction != specs.ActErrno {
			t.Errorf("seccomp = %+v, want containerd's default (deny by default)", sp.Linux.Seccomp)
		}
	})
	t.Run("filesystem", func(t *testing.T) {
		if !sp.Root.Readonly {
			t.Error("rootfs writable")
		}
		var tmp []specs.Mount
		for _, m := range sp.Mounts {
			if m.Destination == "/tmp" {
				tmp = append(tmp, m)
			}
		}
		if len(tmp) != 1 || tmp[0].Type != "tmpfs" || !slices.Contains(tmp[0].Options, "nosuid") ||
			!slices.Contains(tmp[0].Options, "nodev") || !slices.ContainsFunc(tmp[0].Options, func(o string) bool { return strings.HasPrefix(o, "size=") }) {
			t.Errorf("/tmp mounts = %+v", tmp)
		}
		if !slices.Contains(sp.Linux.MaskedPaths, "/proc/kcore") || !slices.Contains(sp.Linux.ReadonlyPaths, "/proc/sys") {
			t.Error("default masked / read-only paths missing")
		}
	})
	t.Run("namespaces are new", func(t *testing.T) {
		var types []string
		for _, ns := range sp.Linux.Namespaces {
			if ns.Path != "" {
				t.Errorf("namespace %s joins %s", ns.Type, ns.Path)
			}
			types = append(types, string(ns.Type))
		}
		for _, want := range []string{"pid", "ipc", "uts", "mount", "network", "cgroup"} {
			if !slices.Contains(types, want) {
				t.Errorf("no new %s namespace (have %v)", want, types)
			}
		}
		if slices.Contains(types, "user") {
			t.Error("unexpected user namespace")
		}
		if sp.Hostname != "lease-1" {
			t.Errorf("hostname = %q", sp.Hostname)
		}
	})
	t.Run("default limits", func(t *testing.T) {
		r := sp.Linux.Resources
		if *r.Memory.Limit != DefaultMemoryBytes || *r.Memory.Swap != DefaultMemoryBytes {
			t.Errorf("memory = %d swap %d", *r.Memory.Limit, *r.Memory.Swap)
		}
		if *r.CPU.Quota != DefaultCPUMillis*100 || *r.CPU.Period != 100000 {
			t.Errorf("cpu = %d/%d", *r.CPU.Quota, *r.CPU.Period)
		}
		if *r.Pids.Limit != DefaultPids {
			t.Errorf("pids = %d", *r.Pids.Limit)
		}
	})
	t.Run("only the partition's devices", func(t *testing.T) {
		var nodes []string
		for _, d := range sp.Linux.Devices {
			nodes = append(nodes, d.Path)
		}
		want := []string{"/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-caps/nvidia-cap21"}
		if !slices.Equal(nodes, want) {
			t.Errorf("devices = %v, want %v", nodes, want)
		}
		rules := sp.Linux.Resources.Devices
		if len(rules) == 0 || rules[0].Allow || rules[0].Access != "rwm" || rules[0].Major != nil {
			t.Fatalf("first device rule must deny everything: %+v", rules)
		}
		allowed := map[[2]int64]bool{}
		for _, r := range rules[1:] {
			if r.Allow && r.Major != nil && r.Minor != nil {
				allowed[[2]int64{*r.Major, *r.Minor}] = true
			}
			if r.Allow && r.Major != nil && *r.Major == 195 && r.Access != "rw" {
				t.Errorf("gpu rule %+v grants %q, want rw", r, r.Access)
			}
		}
		for _, n := range [][2]int64{{195, 0}, {195, 255}, {237, 21}} {
			if !allowed[n] {
				t.Errorf("no allow rule for %d:%d", n[0], n[1])
			}
		}
		if allowed[[2]int64{195, 1}] {
			t.Error("another GPU is allowed")
		}
	})
	t.Run("cgroups path", func(t *testing.T) {
		if sp.Linux.CgroupsPath != "/gpuaas/lease-1" {
			t.Errorf("cgroupsPath = %q", sp.Linux.CgroupsPath)
		}
	})
}

func TestHardenedSpecKeepsANonRootImageUser(t *testing.T) {
	tests := []struct {
		name             string
		uid, gid         uint32
		wantUID, wantGID uint32
	}{
		{name: "image user kept", uid: 1000, gid: 1000, wantUID: 1000, wantGID: 1000},
		{name: "root group replaced", uid: 1000, gid: 0, wantUID: 1000, wantGID: NobodyID},
		{name: "root user replaced", uid: 0, gid: 1000, wantUID: NobodyID, wantGID: NobodyID},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sp := generate(t, Spec{ID: "x", LeaseID: "x", Image: "i"}, oci.WithUIDGID(tt.uid, tt.gid))
			if u := sp.Process.User; u.UID != tt.wantUID || u.GID != tt.wantGID {
				t.Errorf("user = %d:%d, want %d:%d", u.UID, u.GID, tt.wantUID, tt.wantGID)
			}
		})
	}
}

func TestHardenedSpecLimits(t *testing.T) {
	sp := generate(t, Spec{ID: "x", LeaseID: "x", Image: "i", Limits: Limits{MemoryBytes: 64 << 20, CPUMillis: 250, Pids: 64}})
	r := sp.Linux.Resources
	if *r.Memory.Limit != 64<<20 || *r.CPU.Quota != 25000 || *r.Pids.Limit != 64 {
		t.Errorf("limits = memory %d, quota %d, pids %d", *r.Memory.Limit, *r.CPU.Quota, *r.Pids.Limit)
	}
	sp = generate(t, Spec{ID: "x", LeaseID: "x", Image: "i"})
	for _, e := range sp.Process.Env {
		if e == EnvVisibleDevices+"=void" {
			return
		}
	}
	t.Errorf("a container without a device must get %s=void: %q", EnvVisibleDevices, sp.Process.Env)
}

func TestValidateSpec(t *testing.T) {
	good := Spec{ID: "lease-1", LeaseID: "lease-1", Image: "localhost/x:1", LogPath: "/var/log/x.log", Device: fakeMIG()}
	if err := validateSpec(good); err != nil {
		t.Fatalf("valid spec rejected: %v", err)
	}
	tests := []struct {
		name   string
		mutate func(*Spec)
	}{
		{"empty id", func(s *Spec) { s.ID = "" }},
		{"id with slash", func(s *Spec) { s.ID = "a/b" }},
		{"id with leading dash", func(s *Spec) { s.ID = "-a" }},
		{"id with dot-dot", func(s *Spec) { s.ID = "a..b" }},
		{"id too long", func(s *Spec) { s.ID = strings.Repeat("a", 77) }},
		{"empty lease", func(s *Spec) { s.LeaseID = "" }},
		{"lease with newline", func(s *Spec) { s.LeaseID = "a\nb" }},
		{"empty image", func(s *Spec) { s.Image = "" }},
		{"image with space", func(s *Spec) { s.Image = "a b" }},
		{"relative log path", func(s *Spec) { s.LogPath = "x.log" }},
		{"unclean log path", func(s *Spec) { s.LogPath = "/var/../x.log" }},
		{"env without =", func(s *Spec) { s.Env = []string{"A"} }},
		{"env with empty key", func(s *Spec) { s.Env = []string{"=x"} }},
		{"env sets the device", func(s *Spec) { s.Env = []string{"NVIDIA_VISIBLE_DEVICES=all"} }},
		{"env asks for MIG config", func(s *Spec) { s.Env = []string{"nvidia_mig_config_devices=all"} }},
		{"env sets the lease", func(s *Spec) { s.Env = []string{"GPUAAS_LEASE_ID=other"} }},
		{"arg with NUL", func(s *Spec) { s.Args = []string{"a\x00b"} }},
		{"negative memory", func(s *Spec) { s.Limits.MemoryBytes = -1 }},
		{"tiny memory", func(s *Spec) { s.Limits.MemoryBytes = 4096 }},
		{"tiny cpu", func(s *Spec) { s.Limits.CPUMillis = 1 }},
		{"negative pids", func(s *Spec) { s.Limits.Pids = -1 }},
		{"device uuid with comma", func(s *Spec) { s.Device.UUID = "MIG-a,MIG-b" }},
		{"device outside /dev", func(s *Spec) { s.Device.DeviceNodes = []gpu.DeviceNode{{Path: "/etc/shadow", Major: 1, Minor: 1}} }},
		{"device escaping /dev", func(s *Spec) { s.Device.DeviceNodes = []gpu.DeviceNode{{Path: "/dev/../etc/x"}} }},
		{"device listed twice differently", func(s *Spec) {
			s.Device.DeviceNodes = []gpu.DeviceNode{{Path: "/dev/nvidia0", Major: 195}, {Path: "/dev/nvidia0", Major: 195, Minor: 1}}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := good
			s.Device.DeviceNodes = slices.Clone(good.Device.DeviceNodes)
			tt.mutate(&s)
			err := validateSpec(s)
			if !errors.Is(err, ErrInvalidSpec) {
				t.Fatalf("err = %v, want ErrInvalidSpec", err)
			}
			if strings.Contains(err.Error(), "=all") || strings.Contains(err.Error(), "=other") {
				t.Errorf("error leaks an env value: %v", err)
			}
		})
	}
}

func FuzzValidateSpec(f *testing.F) {
	f.Add("lease-1", "lease-1", "localhost/x:1", "A=b", "/dev/nvidia0")
	f.Add("a..b", "", "", "=", "/dev/../x")
	f.Fuzz(func(t *testing.T, id, lease, image, env, node string) {
		s := Spec{ID: id, LeaseID: lease, Image: image, Env: []string{env},
			Device: gpu.MIGDevice{DeviceNodes: []gpu.DeviceNode{{Path: node}}}}
		err := validateSpec(s)
		if err != nil && !errors.Is(err, ErrInvalidSpec) {
			t.Fatalf("error of the wrong class: %v", err)
		}
		if err == nil {
			if ValidateID(id) != nil || lease == "" || image == "" || !strings.HasPrefix(node, "/dev/") {
				t.Fatalf("accepted %+v", s)
			}
			// Whatever is accepted must build a spec.
			generate(t, s)
		}
	})
}
