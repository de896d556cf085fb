// Package isolationtest holds the contract of isolation.Fencer as a
// conformance suite (Run) and Fake, an in-memory Fencer that keeps that
// contract without a kernel, for tests of the lease executor that need to
// inject isolation failures. The suite checks behaviour through the
// interface only; it must never assume kernel ids or Fake internals.
package isolationtest

import (
	"cmp"
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"

	"github.com/gpuaas/gpuaas/agent/isolation"
)

// roles are the five programs of a fence, in Description order, with the
// kernel's attach type names.
var roles = []struct{ attach, attachType string }{
	{"device", "CGroupDevice"},
	{"connect4", "CGroupInet4Connect"},
	{"connect6", "CGroupInet6Connect"},
	{"sendmsg4", "CGroupUDP4Sendmsg"},
	{"sendmsg6", "CGroupUDP6Sendmsg"},
}

// Fake is an in-memory isolation.Fencer. It validates like the Enforcer,
// fails closed like it (a failed Fence records nothing), keeps link and
// program ids across UpdatePolicy and a new device program id across
// UpdateDevices, and accepts any existing directory as a cgroup (its
// identity is the directory's inode).
type Fake struct {
	// Fail, when set, is asked before each operation (fence,
	// update-policy, update-devices, adopt, describe, detach, sweep) and
	// fails it with the error it returns.
	Fail func(op, leaseID string) error

	mu      sync.Mutex
	fences  map[string]*fakeFence
	nextID  uint32
	events  chan isolation.DenyEvent
	stop    chan struct{}
	wg      sync.WaitGroup
	closed  bool
	reading bool
}

type fakeFence struct {
	cgroup      string
	ino         uint64
	devices     []isolation.DeviceRule
	deny, allow []netip.Prefix
	links       [5]uint32
	progs       [5]uint32
}

// NewFake returns an empty Fake.
func NewFake() *Fake {
	return &Fake{fences: map[string]*fakeFence{}, stop: make(chan struct{})}
}

var _ isolation.Fencer = (*Fake)(nil)

func (f *Fake) check(op, leaseID string) error {
	if f.closed {
		return isolation.ErrClosed
	}
	if leaseID != "" {
		if err := isolation.ValidateLeaseID(leaseID); err != nil {
			return err
		}
	}
	if f.Fail != nil {
		return f.Fail(op, leaseID)
	}
	return nil
}

func (f *Fake) id() uint32 {
	f.nextID++
	return f.nextID
}

// normalize orders prefixes as Describe reads them back: IPv4 (including
// IPv4-mapped IPv6 prefixes of /96 and longer) then IPv6, masked, unique.
func normalize(in []netip.Prefix) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(in))
	for _, p := range in {
		p = p.Masked()
		if p.Addr().Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int {
		return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
	})
	return slices.Compact(out)
}

// Fence implements isolation.Fencer.
func (f *Fake) Fence(leaseID, cgroupDir string, p isolation.Policy) (isolation.Description, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.check("fence", leaseID); err != nil {
		return isolation.Description{}, err
	}
	if err := p.Validate(); err != nil {
		return isolation.Description{}, err
	}
	devices, _ := isolation.CompileDevices(p.Devices)
	if !filepath.IsAbs(cgroupDir) {
		return isolation.Description{}, fmt.Errorf("%w: cgroup %q: not an absolute path", isolation.ErrAttach, cgroupDir)
	}
	fi, err := os.Stat(cgroupDir)
	if err != nil || !fi.IsDir() {
		return isolation.Description{}, fmt.Errorf("%w: open cgroup %s: %v", isolation.ErrAttach, cgroupDir, err)
	}
	ino := fi.Sys().(*syscall.Stat_t).Ino
	fc := f.fences[leaseID]
	switch {
	case fc == nil:
		fc = &fakeFence{cgroup: cgroupDir, ino: ino}
		for i := range roles {
			fc.links[i], fc.progs[i] = f.id(), f.id()
		}
		f.fences[leaseID] = fc
	case fc.ino != ino:
		return isolation.Description{}, fmt.Errorf("%w: lease %s is fenced on cgroup %s, not %s", isolation.ErrConflict, leaseID, fc.cgroup, cgroupDir)
	case !slices.Equal(fc.devices, devices):
		fc.progs[0] = f.id()
	}
	fc.devices, fc.deny, fc.allow = devices, normalize(p.DenyPrefixes), normalize(p.AllowPrefixes)
	return f.describe(leaseID, fc), nil
}

func (f *Fake) describe(leaseID string, fc *fakeFence) isolation.Description {
	d := isolation.Description{
		LeaseID: leaseID, Cgroup: fc.cgroup, CgroupID: fc.ino,
		Devices:      slices.Clone(fc.devices),
		DenyPrefixes: slices.Clone(fc.deny), AllowPrefixes: slices.Clone(fc.allow),
		Verified: true,
	}
	for i, r := range roles {
		d.Programs = append(d.Programs, isolation.ProgramDescription{
			Attach: r.attach, AttachType: r.attachType, LinkID: fc.links[i], ProgramID: fc.progs[i],
			Name: "gpuaas_" + r.attach, Attached: true, TagVerified: true,
		})
	}
	return d
}

func (f *Fake) fence(op, leaseID string) (*fakeFence, error) {
	if err := f.check(op, leaseID); err != nil {
		return nil, err
	}
	fc := f.fences[leaseID]
	if fc == nil {
		return nil, fmt.Errorf("%w: %s", isolation.ErrNotFenced, leaseID)
	}
	return fc, nil
}

// UpdatePolicy implements isolation.Fencer.
func (f *Fake) UpdatePolicy(leaseID string, p isolation.Policy) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := (isolation.Policy{DenyPrefixes: p.DenyPrefixes, AllowPrefixes: p.AllowPrefixes}).Validate(); err != nil {
		return err
	}
	fc, err := f.fence("update-policy", leaseID)
	if err != nil {
		return err
	}
	if p.Devices != nil {
		devices, err := isolation.CompileDevices(p.Devices)
		if err != nil {
			return err
		}
		if !slices.Equal(devices, fc.devices) {
			return fmt.Errorf("%w: device rules of %s differ from the fenced ones: use UpdateDevices", isolation.ErrInvalidPolicy, leaseID)
		}
	}
	fc.deny, fc.allow = normalize(p.DenyPrefixes), normalize(p.AllowPrefixes)
	return nil
}

// UpdateDevices implements isolation.Fencer.
func (f *Fake) UpdateDevices(leaseID string, devices []isolation.DeviceRule) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	compiled, err := isolation.CompileDevices(devices)
	if err != nil {
		return err
	}
	fc, err := f.fence("update-devices", leaseID)
	if err != nil {
		return err
	}
	if !slices.Equal(compiled, fc.devices) {
		fc.devices, fc.progs[0] = compiled, f.id()
	}
	return nil
}

// Adopt implements isolation.Fencer.
func (f *Fake) Adopt(leaseID string) (isolation.Description, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fc, err := f.fence("adopt", leaseID)
	if err != nil {
		return isolation.Description{}, err
	}
	return f.describe(leaseID, fc), nil
}

// Describe implements isolation.Fencer.
func (f *Fake) Describe(leaseID string) (isolation.Description, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fc, err := f.fence("describe", leaseID)
	if err != nil {
		return isolation.Description{}, err
	}
	return f.describe(leaseID, fc), nil
}

// Detach implements isolation.Fencer.
func (f *Fake) Detach(leaseID string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.check("detach", leaseID); err != nil {
		return err
	}
	delete(f.fences, leaseID)
	return nil
}

// Sweep implements isolation.Fencer.
func (f *Fake) Sweep(keep func(string) bool) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.check("sweep", ""); err != nil {
		return nil, err
	}
	var removed []string
	for id := range f.fences {
		if !keep(id) {
			removed = append(removed, id)
			delete(f.fences, id)
		}
	}
	slices.Sort(removed)
	return removed, nil
}

// Leases implements isolation.Fencer.
func (f *Fake) Leases() ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil, isolation.ErrClosed
	}
	var ids []string
	for id := range f.fences {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids, nil
}

// Events implements isolation.Fencer: it streams what Deny delivers.
func (f *Fake) Events(ctx context.Context) (<-chan isolation.DenyEvent, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil, isolation.ErrClosed
	}
	if f.reading {
		return nil, fmt.Errorf("read deny events: a reader is already running")
	}
	f.reading = true
	ch := make(chan isolation.DenyEvent, 256)
	f.events = ch
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		select {
		case <-ctx.Done():
		case <-f.stop:
		}
		f.mu.Lock()
		defer f.mu.Unlock()
		f.reading, f.events = false, nil
		close(ch)
	}()
	return ch, nil
}

// Deny delivers a deny event to the Events reader, attributed to its
// lease, or drops it when no one reads or the reader is behind (as the
// kernel's ring does when full).
func (f *Fake) Deny(ev isolation.DenyEvent) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.events == nil {
		return
	}
	select {
	case f.events <- ev:
	default:
	}
}

// Close implements isolation.Fencer. The fences stay, as the kernel's do;
// the Fake refuses further operations.
func (f *Fake) Close() error {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return nil
	}
	f.closed = true
	close(f.stop)
	f.mu.Unlock()
	f.wg.Wait()
	return nil
}
