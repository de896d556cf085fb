package isolationtest

import (
	"errors"
	"net/netip"
	"slices"
	"testing"

	"github.com/gpuaas/gpuaas/agent/isolation"
)

// Run checks a Fencer against the isolation contract. newFencer returns a
// fresh Fencer (cleaned up by the test); newCgroup a fresh cgroup
// directory it can fence (a cgroup v2 directory for the Enforcer).
func Run(t *testing.T, newFencer func(t *testing.T) isolation.Fencer, newCgroup func(t *testing.T) string) {
	devices := []isolation.DeviceRule{isolation.CharDevice(195, 0, "rw"), isolation.CharDevice(195, 255, "rw")}
	policy := isolation.Policy{
		Devices:       devices,
		DenyPrefixes:  append(isolation.DefaultDenyPrefixes(), netip.MustParsePrefix("198.51.100.7/32")),
		AllowPrefixes: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")},
	}
	ids := func(d isolation.Description) (links, progs []uint32) {
		for _, p := range d.Programs {
			links, progs = append(links, p.LinkID), append(progs, p.ProgramID)
		}
		return links, progs
	}

	t.Run("fence, describe, detach", func(t *testing.T) {
		f, cg := newFencer(t), newCgroup(t)
		d, err := f.Fence("lease-1", cg, policy)
		if err != nil {
			t.Fatal(err)
		}
		if d.LeaseID != "lease-1" || len(d.Programs) != 5 || !d.Verified {
			t.Errorf("Fence described %+v", d)
		}
		want, _ := isolation.CompileDevices(devices)
		if !slices.Equal(d.Devices, want) {
			t.Errorf("devices %v, want %v", d.Devices, want)
		}
		if !slices.Contains(d.DenyPrefixes, netip.MustParsePrefix("198.51.100.7/32")) || !slices.Equal(d.AllowPrefixes, policy.AllowPrefixes) {
			t.Errorf("prefixes: deny %v allow %v", d.DenyPrefixes, d.AllowPrefixes)
		}
		if ls, err := f.Leases(); err != nil || !slices.Equal(ls, []string{"lease-1"}) {
			t.Errorf("Leases = %v, %v", ls, err)
		}
		if err := f.Detach("lease-1"); err != nil {
			t.Fatal(err)
		}
		if ls, err := f.Leases(); err != nil || len(ls) != 0 {
			t.Errorf("Leases after Detach = %v, %v", ls, err)
		}
		if _, err := f.Describe("lease-1"); !errors.Is(err, isolation.ErrNotFenced) {
			t.Errorf("Describe after Detach: %v, want ErrNotFenced", err)
		}
		if err := f.Detach("lease-1"); err != nil {
			t.Errorf("second Detach: %v", err)
		}
	})

	t.Run("fence is idempotent", func(t *testing.T) {
		f, cg := newFencer(t), newCgroup(t)
		d1, err := f.Fence("lease-1", cg, policy)
		if err != nil {
			t.Fatal(err)
		}
		d2, err := f.Fence("lease-1", cg, policy)
		if err != nil {
			t.Fatal(err)
		}
		l1, p1 := ids(d1)
		l2, p2 := ids(d2)
		if !slices.Equal(l1, l2) || !slices.Equal(p1, p2) {
			t.Errorf("second Fence changed links %v -> %v or programs %v -> %v", l1, l2, p1, p2)
		}
		a, err := f.Adopt("lease-1")
		if err != nil {
			t.Fatal(err)
		}
		if la, pa := ids(a); !slices.Equal(l1, la) || !slices.Equal(p1, pa) {
			t.Errorf("Adopt changed links %v -> %v or programs %v -> %v", l1, la, p1, pa)
		}
	})

	t.Run("fail closed", func(t *testing.T) {
		f, cg := newFencer(t), newCgroup(t)
		if _, err := f.Fence("lease-1", cg+"-missing", policy); !errors.Is(err, isolation.ErrAttach) {
			t.Errorf("missing cgroup: %v, want ErrAttach", err)
		}
		if _, err := f.Fence("lease-1", "relative/cg", policy); !errors.Is(err, isolation.ErrAttach) {
			t.Errorf("relative cgroup: %v, want ErrAttach", err)
		}
		bad := policy
		bad.Devices = []isolation.DeviceRule{{Type: 'c', Major: 195, Minor: isolation.Wildcard, Access: "rw"}}
		if _, err := f.Fence("lease-1", cg, bad); !errors.Is(err, isolation.ErrInvalidPolicy) {
			t.Errorf("wildcard lease rule: %v, want ErrInvalidPolicy", err)
		}
		if _, err := f.Fence("../lease", cg, policy); !errors.Is(err, isolation.ErrInvalidPolicy) {
			t.Errorf("bad lease id: %v, want ErrInvalidPolicy", err)
		}
		if ls, _ := f.Leases(); len(ls) != 0 {
			t.Errorf("failed Fences left %v", ls)
		}
		for _, err := range []error{
			f.UpdatePolicy("lease-1", policy), f.UpdateDevices("lease-1", devices),
			func() error { _, err := f.Adopt("lease-1"); return err }(),
		} {
			if !errors.Is(err, isolation.ErrNotFenced) {
				t.Errorf("on an unfenced lease: %v, want ErrNotFenced", err)
			}
		}
	})

	t.Run("one cgroup per lease", func(t *testing.T) {
		f, cg1, cg2 := newFencer(t), newCgroup(t), newCgroup(t)
		if _, err := f.Fence("lease-1", cg1, policy); err != nil {
			t.Fatal(err)
		}
		if _, err := f.Fence("lease-1", cg2, policy); !errors.Is(err, isolation.ErrConflict) {
			t.Errorf("second cgroup: %v, want ErrConflict", err)
		}
	})

	t.Run("updates keep the attachment", func(t *testing.T) {
		f, cg := newFencer(t), newCgroup(t)
		d1, err := f.Fence("lease-1", cg, policy)
		if err != nil {
			t.Fatal(err)
		}
		p := policy
		p.AllowPrefixes = []netip.Prefix{netip.MustParsePrefix("10.2.0.0/16")}
		if err := f.UpdatePolicy("lease-1", p); err != nil {
			t.Fatal(err)
		}
		d2, _ := f.Describe("lease-1")
		l1, p1 := ids(d1)
		l2, p2 := ids(d2)
		if !slices.Equal(l1, l2) || !slices.Equal(p1, p2) || !slices.Equal(d2.AllowPrefixes, p.AllowPrefixes) {
			t.Errorf("UpdatePolicy: links %v -> %v, programs %v -> %v, allow %v", l1, l2, p1, p2, d2.AllowPrefixes)
		}
		p.Devices = append(slices.Clone(devices), isolation.CharDevice(195, 1, "rw"))
		if err := f.UpdatePolicy("lease-1", p); !errors.Is(err, isolation.ErrInvalidPolicy) {
			t.Errorf("UpdatePolicy with other devices: %v, want ErrInvalidPolicy", err)
		}
		if err := f.UpdateDevices("lease-1", p.Devices); err != nil {
			t.Fatal(err)
		}
		d3, _ := f.Describe("lease-1")
		l3, p3 := ids(d3)
		if !slices.Equal(l1, l3) || p3[0] == p1[0] || !slices.Equal(p1[1:], p3[1:]) {
			t.Errorf("UpdateDevices: links %v -> %v, programs %v -> %v", l1, l3, p1, p3)
		}
	})

	t.Run("sweep", func(t *testing.T) {
		f := newFencer(t)
		for _, id := range []string{"keep", "gone-1", "gone-2"} {
			if _, err := f.Fence(id, newCgroup(t), policy); err != nil {
				t.Fatal(err)
			}
		}
		removed, err := f.Sweep(func(id string) bool { return id == "keep" })
		if err != nil || !slices.Equal(removed, []string{"gone-1", "gone-2"}) {
			t.Errorf("Sweep = %v, %v", removed, err)
		}
		if ls, _ := f.Leases(); !slices.Equal(ls, []string{"keep"}) {
			t.Errorf("Leases after Sweep = %v", ls)
		}
	})
}
