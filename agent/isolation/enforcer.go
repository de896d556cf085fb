package isolation

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// Config configures an Enforcer. The zero value is the production setup.
type Config struct {
	// PinRoot is the directory on a bpf filesystem the fences are pinned
	// under (default /sys/fs/bpf/gpuaas). One Enforcer at a time may use
	// it.
	PinRoot string
	// BPFFS is the bpf filesystem PinRoot lives on (default /sys/fs/bpf);
	// NewEnforcer mounts it when it is not mounted and PinRoot is under it.
	BPFFS string
	// Logger receives the Enforcer's structured logs (default
	// slog.Default()).
	Logger *slog.Logger
	// RingBufferSize is the size in bytes of the deny event ring, a power
	// of two and a multiple of the page size (default 256 KiB, about 3000
	// events). An existing pinned ring keeps its size.
	RingBufferSize int
	// MaxPrefixes is the capacity of each of a lease's four LPM tries
	// (default DefaultMaxPrefixes).
	MaxPrefixes int
}

const defaultPinRoot = DefaultBPFFS + "/gpuaas"

// Enforcer fences leases: it loads, attaches and pins each lease's device
// and egress programs, adopts them after a restart, changes their policy,
// removes them, and reports what they deny. Its methods are safe for
// concurrent use; fence operations are serialized.
//
// The Enforcer keeps no lease state of its own: every operation reads the
// pins, so what the kernel enforces and what the Enforcer reports cannot
// drift apart, and closing the Enforcer (or the agent exiting) leaves every
// fence in force.
type Enforcer struct {
	cfg    Config
	log    *slog.Logger
	feat   progFeatures
	lock   *os.File // flock on PinRoot
	events *ebpf.Map

	mu     sync.Mutex // serializes operations on pins
	closed bool
	done   chan struct{}
	wg     sync.WaitGroup // event readers

	cmu     sync.Mutex
	cookies map[uint64]string
	reading bool
}

// NewEnforcer probes the kernel, mounts the bpf filesystem if needed,
// takes the pin root and opens (or creates and pins) the shared deny event
// ring. It fails with ErrUnsupported when the kernel cannot enforce a
// fence, and with ErrConflict when another Enforcer holds the pin root.
func NewEnforcer(cfg Config) (_ *Enforcer, err error) {
	if cfg.PinRoot == "" {
		cfg.PinRoot = defaultPinRoot
	}
	if cfg.BPFFS == "" {
		cfg.BPFFS = DefaultBPFFS
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.RingBufferSize == 0 {
		cfg.RingBufferSize = 256 << 10
	}
	if cfg.MaxPrefixes == 0 {
		cfg.MaxPrefixes = DefaultMaxPrefixes
	}
	page := os.Getpagesize()
	if n := cfg.RingBufferSize; n < page || n&(n-1) != 0 {
		return nil, fmt.Errorf("%w: ring buffer size %d is not a power of two of at least %d", ErrInvalidPolicy, n, page)
	}
	if cfg.MaxPrefixes < 1 {
		return nil, fmt.Errorf("%w: max prefixes %d", ErrInvalidPolicy, cfg.MaxPrefixes)
	}
	cfg.PinRoot = filepath.Clean(cfg.PinRoot)
	if !filepath.IsAbs(cfg.PinRoot) {
		return nil, fmt.Errorf("%w: pin root %q is not absolute", ErrInvalidPolicy, cfg.PinRoot)
	}
	feat, err := probe()
	if err != nil {
		return nil, err
	}
	if rel, err := filepath.Rel(cfg.BPFFS, cfg.PinRoot); err == nil && !strings.HasPrefix(rel, "..") {
		if err := EnsureBPFFS(cfg.BPFFS); err != nil {
			return nil, err
		}
	}
	if err := os.MkdirAll(cfg.PinRoot, 0o700); err != nil {
		return nil, fmt.Errorf("%w: create pin root: %w", ErrUnsupported, err)
	}
	if !isBPFFS(cfg.PinRoot) {
		return nil, fmt.Errorf("%w: pin root %s is not on a bpf filesystem", ErrUnsupported, cfg.PinRoot)
	}
	lock, err := os.Open(cfg.PinRoot)
	if err != nil {
		return nil, fmt.Errorf("open pin root: %w", err)
	}
	defer func() {
		if err != nil {
			lock.Close()
		}
	}()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return nil, fmt.Errorf("%w: pin root %s is held by another enforcer: %w", ErrConflict, cfg.PinRoot, err)
	}
	e := &Enforcer{
		cfg: cfg, log: cfg.Logger, feat: feat, lock: lock,
		done: make(chan struct{}), cookies: map[uint64]string{},
	}
	if e.events, err = openEventRing(filepath.Join(cfg.PinRoot, eventsPin), cfg.RingBufferSize); err != nil {
		return nil, err
	}
	return e, nil
}

// openEventRing loads the pinned deny event ring or creates and pins one.
func openEventRing(path string, size int) (*ebpf.Map, error) {
	m, err := ebpf.LoadPinnedMap(path, nil)
	if err == nil {
		if m.Type() != ebpf.RingBuf {
			m.Close()
			return nil, fmt.Errorf("%w: %s is a %s, not a ring buffer", ErrCorrupt, path, m.Type())
		}
		return m, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("load event ring %s: %w", path, err)
	}
	m, err = ebpf.NewMap(&ebpf.MapSpec{Name: "gpuaas_events", Type: ebpf.RingBuf, MaxEntries: uint32(size)})
	if err != nil {
		return nil, fmt.Errorf("%w: create event ring: %w", ErrUnsupported, err)
	}
	if err := m.Pin(path); err != nil {
		m.Close()
		return nil, fmt.Errorf("pin event ring at %s: %w", path, err)
	}
	return m, nil
}

// Close stops the event readers and releases the Enforcer's descriptors
// and the pin root. It detaches nothing: every fence stays in force, as it
// does when the agent exits.
func (e *Enforcer) Close() error {
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return nil
	}
	e.closed = true
	close(e.done)
	e.mu.Unlock()
	e.wg.Wait()
	err := e.events.Close()
	return errors.Join(err, e.lock.Close())
}

// PinRoot is the directory the fences are pinned under.
func (e *Enforcer) PinRoot() string { return e.cfg.PinRoot }

func (e *Enforcer) leaseDir(leaseID string) string { return filepath.Join(e.cfg.PinRoot, leaseID) }

// lockOpen takes the operation lock unless the Enforcer is closed.
func (e *Enforcer) lockOpen() error {
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return ErrClosed
	}
	return nil
}

// testHook, when set by a test, runs before each step of building a fence
// and fails it with the error it returns.
var testHook func(step string) error

func hook(step string) error {
	if testHook == nil {
		return nil
	}
	return testHook(step)
}

// Fence attaches the lease's device and egress programs to cgroupDir (an
// absolute cgroup v2 directory, e.g. from CgroupDirOfPID or the runtime)
// and pins them, then returns what the kernel now enforces.
//
// Fence is idempotent and level-triggered: when the lease is already
// fenced on the same cgroup it adopts the pins and converges them to p (as
// UpdatePolicy and UpdateDevices do) without attaching anything twice. A
// lease fenced on another cgroup is ErrConflict (Detach it first).
// Corrupt pins are replaced by a fresh fence that is attached before the
// old objects are removed, so a running task is never unfenced.
//
// Fence fails closed: when any step fails it returns an error wrapping
// ErrAttach (or ErrInvalidPolicy, ErrUnsupported) and leaves nothing of
// the new fence attached or pinned.
func (e *Enforcer) Fence(leaseID, cgroupDir string, p Policy) (Description, error) {
	if err := checkLeaseID(leaseID); err != nil {
		return Description{}, err
	}
	rules, eg, err := e.compile(p)
	if err != nil {
		return Description{}, err
	}
	if err := e.lockOpen(); err != nil {
		return Description{}, err
	}
	defer e.mu.Unlock()
	dir := e.leaseDir(leaseID)
	f, err := loadFence(dir, leaseID)
	switch {
	case err == nil:
		defer f.Close()
		return e.refence(f, leaseID, cgroupDir, rules, eg)
	case errors.Is(err, ErrCorrupt):
		e.log.Warn("replacing corrupt fence", "lease", leaseID, "err", err)
	case !errors.Is(err, ErrNotFenced):
		return Description{}, err
	}
	if err := e.build(leaseID, cgroupDir, rules, eg); err != nil {
		return Description{}, err
	}
	d, err := e.readBack(dir, leaseID)
	if err != nil {
		// Not knowing what is enforced is a failed Fence: take it off.
		if rerr := removePinDir(dir); rerr != nil {
			e.log.Error("roll back fence", "lease", leaseID, "err", rerr)
		}
		return Description{}, fmt.Errorf("%w: read back the fence of %s: %w", ErrAttach, leaseID, err)
	}
	e.remember(leaseID)
	e.log.Info("lease fenced", "lease", leaseID, "cgroup", cgroupDir, "devices", len(rules),
		"deny_prefixes", len(d.DenyPrefixes), "allow_prefixes", len(d.AllowPrefixes), "verified", d.Verified)
	return d, nil
}

func (e *Enforcer) readBack(dir, leaseID string) (Description, error) {
	f, err := loadFence(dir, leaseID)
	if err != nil {
		return Description{}, err
	}
	defer f.Close()
	return e.describe(f)
}

// refence handles Fence for a lease that is already pinned.
func (e *Enforcer) refence(f *openFence, leaseID, cgroupDir string, rules []DeviceRule, eg egress) (Description, error) {
	cg, id, err := openCgroup(cgroupDir)
	if err != nil {
		return Description{}, err
	}
	cg.Close()
	if id != f.meta.CgroupID {
		return Description{}, fmt.Errorf("%w: lease %s is fenced on cgroup %s (id %d), not %s (id %d): detach it first",
			ErrConflict, leaseID, f.meta.Cgroup, f.meta.CgroupID, cgroupDir, id)
	}
	if err := e.apply(f, rules, eg); err != nil {
		return Description{}, err
	}
	e.remember(leaseID)
	return e.describe(f)
}

func (e *Enforcer) compile(p Policy) ([]DeviceRule, egress, error) {
	rules, err := compileDeviceRules(p.Devices)
	if err != nil {
		return nil, egress{}, err
	}
	eg, err := p.egress(e.cfg.MaxPrefixes)
	if err != nil {
		return nil, egress{}, err
	}
	return rules, eg, nil
}

// fenceObjects are the Go handles of a fence being built.
type fenceObjects struct {
	maps  map[string]*ebpf.Map
	progs []*ebpf.Program
	links []link.Link
}

func (o *fenceObjects) close() {
	for _, l := range o.links {
		l.Close()
	}
	for _, p := range o.progs {
		p.Close()
	}
	for _, m := range o.maps {
		m.Close()
	}
}

// build creates, fills, loads, attaches and pins a new fence. On failure
// it detaches what it attached and removes its staging directory.
func (e *Enforcer) build(leaseID, cgroupDir string, rules []DeviceRule, eg egress) (err error) {
	cg, cgID, err := openCgroup(cgroupDir)
	if err != nil {
		return err
	}
	defer cg.Close()
	o := &fenceObjects{maps: map[string]*ebpf.Map{}}
	defer o.close()
	var staging string
	defer func() {
		if err == nil {
			return
		}
		for _, l := range o.links {
			if derr := l.Detach(); derr != nil && !errors.Is(derr, link.ErrNotSupported) {
				e.log.Error("roll back attach", "lease", leaseID, "err", derr)
			}
		}
		if staging != "" {
			if rerr := os.RemoveAll(staging); rerr != nil {
				e.log.Error("roll back pins", "lease", leaseID, "dir", staging, "err", rerr)
			}
		}
	}()

	cookie := cookieOf(leaseID)
	meta := leaseMeta{
		Version: metaVersion, LeaseID: leaseID, Cookie: cookie, Cgroup: cgroupDir, CgroupID: cgID,
		Devices: ruleStrings(rules), Features: e.feat, Created: time.Now().UTC(),
	}
	metaBuf, err := encodeMeta(meta)
	if err != nil {
		return err
	}
	if err := hook("maps"); err != nil {
		return err
	}
	for _, role := range lpmRoles {
		m, err := ebpf.NewMap(lpmSpec(role, e.cfg.MaxPrefixes))
		if err != nil {
			return fmt.Errorf("%w: create %s trie: %w", ErrUnsupported, role, err)
		}
		o.maps[role] = m
	}
	m, err := ebpf.NewMap(metaSpec())
	if err != nil {
		return fmt.Errorf("create meta map: %w", err)
	}
	o.maps["meta"] = m
	if err := m.Put(uint32(0), metaBuf); err != nil {
		return fmt.Errorf("write meta: %w", err)
	}
	if err := writeEgress(o.maps, eg); err != nil {
		return err
	}

	fds := mapFDs{
		events: e.events.FD(),
		deny4:  o.maps["deny4"].FD(), deny6: o.maps["deny6"].FD(),
		allow4: o.maps["allow4"].FD(), allow6: o.maps["allow6"].FD(),
	}
	if err := hook("programs"); err != nil {
		return err
	}
	for _, ap := range attachPoints {
		spec, err := buildProgram(ap, rules, cookie, fds, e.feat)
		if err != nil {
			return err
		}
		prog, err := ebpf.NewProgram(spec)
		if err != nil {
			return fmt.Errorf("%w: load %s program: %w", ErrAttach, ap.role, err)
		}
		o.progs = append(o.progs, prog)
	}

	staging, err = os.MkdirTemp(e.cfg.PinRoot, stagingPrefix+leaseID+"-")
	if err != nil {
		return fmt.Errorf("create staging pin directory: %w", err)
	}
	for role, m := range o.maps {
		if err := m.Pin(filepath.Join(staging, mapPin(role))); err != nil {
			return fmt.Errorf("pin %s map: %w", role, err)
		}
	}
	for i, ap := range attachPoints {
		if err := hook("attach " + ap.role); err != nil {
			return err
		}
		l, err := link.AttachRawLink(link.RawLinkOptions{Target: int(cg.Fd()), Program: o.progs[i], Attach: ap.attach})
		if err != nil {
			if errors.Is(err, link.ErrNotSupported) {
				return fmt.Errorf("%w: kernel cannot link programs to cgroups (bpf_link, Linux 5.7): %w", ErrUnsupported, err)
			}
			return fmt.Errorf("%w: %s program to %s: %w", ErrAttach, ap.role, cgroupDir, err)
		}
		o.links = append(o.links, l)
		if err := l.Pin(filepath.Join(staging, linkPin(ap.role))); err != nil {
			return fmt.Errorf("pin %s link: %w", ap.role, err)
		}
	}
	if err := hook("commit"); err != nil {
		return err
	}
	dir := e.leaseDir(leaseID)
	// A corrupt fence is removed only now, with the new one in force.
	if err := removePinDir(dir); err != nil {
		return fmt.Errorf("remove corrupt fence: %w", err)
	}
	if err := os.Rename(staging, dir); err != nil {
		return fmt.Errorf("commit pins of %s: %w", leaseID, err)
	}
	return nil
}

func writeEgress(maps map[string]*ebpf.Map, eg egress) error {
	for role, ps := range map[string][]netip.Prefix{"deny4": eg.deny4, "deny6": eg.deny6, "allow4": eg.allow4, "allow6": eg.allow6} {
		if err := syncPrefixes(maps[role], nil, ps, true); err != nil {
			return err
		}
	}
	return nil
}

// UpdatePolicy changes a fenced lease's egress policy to p's prefixes
// (the whole egress policy, not a delta). The changes are map updates on
// the live tries, never a reattach: links and programs keep their ids, and
// the next connect or sendmsg is decided by the new policy.
//
// The tries are updated in the order add deny, remove allow, add allow,
// remove deny, so that at no instant is an address allowed that both the
// old and the new policy deny.
//
// Device rules are compiled into the device program, not kept in a map:
// p.Devices must be nil (unchanged) or equal to the fenced rules, else
// ErrInvalidPolicy; UpdateDevices changes them.
func (e *Enforcer) UpdatePolicy(leaseID string, p Policy) error {
	if err := checkLeaseID(leaseID); err != nil {
		return err
	}
	eg, err := p.egress(e.cfg.MaxPrefixes)
	if err != nil {
		return err
	}
	return e.withFence(leaseID, func(f *openFence) error {
		if p.Devices != nil {
			rules, err := compileDeviceRules(p.Devices)
			if err != nil {
				return err
			}
			if !slices.Equal(ruleStrings(rules), f.meta.Devices) {
				return fmt.Errorf("%w: device rules of %s differ from the fenced ones: UpdatePolicy changes egress only, use UpdateDevices", ErrInvalidPolicy, leaseID)
			}
		}
		return e.applyEgress(f, eg)
	})
}

// UpdateDevices changes a fenced lease's device rules (p.Devices of
// Fence). It loads a new device program and swaps it into the existing
// link atomically (BPF_LINK_UPDATE): there is no instant without a device
// fence; the link keeps its id, the device program gets a new one.
func (e *Enforcer) UpdateDevices(leaseID string, devices []DeviceRule) error {
	if err := checkLeaseID(leaseID); err != nil {
		return err
	}
	rules, err := compileDeviceRules(devices)
	if err != nil {
		return err
	}
	return e.withFence(leaseID, func(f *openFence) error { return e.applyDevices(f, rules) })
}

// withFence runs fn on the lease's loaded pins under the enforcer's lock.
// ErrNotFenced when the lease has no pins.
func (e *Enforcer) withFence(leaseID string, fn func(*openFence) error) error {
	if err := e.lockOpen(); err != nil {
		return err
	}
	defer e.mu.Unlock()
	f, err := loadFence(e.leaseDir(leaseID), leaseID)
	if err != nil {
		return err
	}
	defer f.Close()
	return fn(f)
}

// apply converges a fence to a whole policy (Fence on a fenced lease).
func (e *Enforcer) apply(f *openFence, rules []DeviceRule, eg egress) error {
	if err := e.applyEgress(f, eg); err != nil {
		return err
	}
	return e.applyDevices(f, rules)
}

func (e *Enforcer) applyEgress(f *openFence, eg egress) error {
	have := map[string][]netip.Prefix{}
	for _, role := range lpmRoles {
		ps, err := readPrefixes(f.maps[role])
		if err != nil {
			return err
		}
		have[role] = ps
	}
	want := map[string][]netip.Prefix{"deny4": eg.deny4, "deny6": eg.deny6, "allow4": eg.allow4, "allow6": eg.allow6}
	for _, step := range []struct {
		roles []string
		add   bool
	}{
		{[]string{"deny4", "deny6"}, true},
		{[]string{"allow4", "allow6"}, false},
		{[]string{"allow4", "allow6"}, true},
		{[]string{"deny4", "deny6"}, false},
	} {
		for _, role := range step.roles {
			if err := syncPrefixes(f.maps[role], have[role], want[role], step.add); err != nil {
				return fmt.Errorf("update policy of %s: %w", f.meta.LeaseID, err)
			}
		}
	}
	return nil
}

func (e *Enforcer) applyDevices(f *openFence, rules []DeviceRule) error {
	if slices.Equal(ruleStrings(rules), f.meta.Devices) {
		return nil
	}
	spec, err := buildProgram(attachPoints[0], rules, f.meta.Cookie, mapFDs{events: e.events.FD()}, f.meta.Features)
	if err != nil {
		return err
	}
	prog, err := ebpf.NewProgram(spec)
	if err != nil {
		return fmt.Errorf("load device program for %s: %w", f.meta.LeaseID, err)
	}
	defer prog.Close()
	meta := f.meta
	meta.Devices = ruleStrings(rules)
	buf, err := encodeMeta(meta)
	if err != nil {
		return err
	}
	if err := f.links["device"].Update(prog); err != nil {
		return fmt.Errorf("swap device program of %s: %w", f.meta.LeaseID, err)
	}
	if err := f.maps["meta"].Put(uint32(0), buf); err != nil {
		return fmt.Errorf("record device rules of %s: %w", f.meta.LeaseID, err)
	}
	f.meta = meta
	e.log.Info("lease device rules changed", "lease", f.meta.LeaseID, "devices", len(rules))
	return nil
}

// Adopt takes over a lease fenced by an earlier agent: it checks that the
// pins are complete and still attached, registers the lease for event
// attribution and returns what the kernel enforces. It attaches nothing.
// ErrNotFenced when the lease has no pins, ErrCorrupt when they are
// incomplete.
func (e *Enforcer) Adopt(leaseID string) (Description, error) {
	if err := checkLeaseID(leaseID); err != nil {
		return Description{}, err
	}
	var d Description
	err := e.withFence(leaseID, func(f *openFence) (err error) {
		d, err = e.describe(f)
		return err
	})
	if err != nil {
		return Description{}, err
	}
	e.remember(leaseID)
	if !d.Verified {
		e.log.Warn("adopted fence does not verify", "lease", leaseID, "cgroup", d.Cgroup, "problems", strings.Join(d.Problems, "; "))
	} else {
		e.log.Info("lease fence adopted", "lease", leaseID, "cgroup", d.Cgroup)
	}
	return d, nil
}

// Detach removes a lease's fence: it detaches the links, then removes the
// maps and the pin directory. Detaching a lease without a fence is not an
// error.
func (e *Enforcer) Detach(leaseID string) error {
	if err := checkLeaseID(leaseID); err != nil {
		return err
	}
	if err := e.lockOpen(); err != nil {
		return err
	}
	defer e.mu.Unlock()
	dir := e.leaseDir(leaseID)
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err := removePinDir(dir); err != nil {
		return fmt.Errorf("detach %s: %w", leaseID, err)
	}
	e.log.Info("lease fence removed", "lease", leaseID)
	return nil
}

// Leases lists the fenced leases (pin directories), sorted.
func (e *Enforcer) Leases() ([]string, error) {
	if err := e.lockOpen(); err != nil {
		return nil, err
	}
	defer e.mu.Unlock()
	return e.leases()
}

func (e *Enforcer) leases() ([]string, error) {
	entries, err := os.ReadDir(e.cfg.PinRoot)
	if err != nil {
		return nil, fmt.Errorf("list fences: %w", err)
	}
	var out []string
	for _, ent := range entries {
		if ent.IsDir() && checkLeaseID(ent.Name()) == nil {
			out = append(out, ent.Name())
		}
	}
	return out, nil
}

// Sweep removes the fences of leases keep rejects (orphans: the lease ended
// while the agent was down) and any staging directory a crashed Fence left,
// and returns the lease ids it removed. It goes on past a failure and
// returns every error. keep runs with the Enforcer locked and must not call
// it.
func (e *Enforcer) Sweep(keep func(leaseID string) bool) ([]string, error) {
	if err := e.lockOpen(); err != nil {
		return nil, err
	}
	defer e.mu.Unlock()
	entries, err := os.ReadDir(e.cfg.PinRoot)
	if err != nil {
		return nil, fmt.Errorf("list fences: %w", err)
	}
	var removed []string
	var errs []error
	for _, ent := range entries {
		name := ent.Name()
		switch {
		case !ent.IsDir():
		case strings.HasPrefix(name, stagingPrefix):
			if err := removePinDir(filepath.Join(e.cfg.PinRoot, name)); err != nil {
				errs = append(errs, err)
			}
		case checkLeaseID(name) == nil && !keep(name):
			if err := removePinDir(filepath.Join(e.cfg.PinRoot, name)); err != nil {
				errs = append(errs, fmt.Errorf("sweep %s: %w", name, err))
				continue
			}
			e.log.Info("orphan lease fence removed", "lease", name)
			removed = append(removed, name)
		}
	}
	return removed, errors.Join(errs...)
}

// remember registers a lease's cookie for event attribution.
func (e *Enforcer) remember(leaseID string) {
	e.cmu.Lock()
	defer e.cmu.Unlock()
	e.cookies[cookieOf(leaseID)] = leaseID
}

// leaseOf attributes an event's cookie: a registered lease, else one of
// the pinned fences (a restarted agent before Adopt), else "". A miss is
// remembered too, so a flood of late events from a detached fence does
// not rescan the pin root; Fence and Adopt overwrite it.
func (e *Enforcer) leaseOf(cookie uint64) string {
	e.cmu.Lock()
	id, ok := e.cookies[cookie]
	e.cmu.Unlock()
	if ok {
		return id
	}
	entries, _ := os.ReadDir(e.cfg.PinRoot)
	for _, ent := range entries {
		if ent.IsDir() && checkLeaseID(ent.Name()) == nil && cookieOf(ent.Name()) == cookie {
			id = ent.Name()
			break
		}
	}
	e.cmu.Lock()
	defer e.cmu.Unlock()
	if _, ok := e.cookies[cookie]; !ok {
		e.cookies[cookie] = id
	}
	return e.cookies[cookie]
}
