package isolation

// Pin layout, under Config.PinRoot (default /sys/fs/bpf/gpuaas). Kernel
// objects pinned here outlive the agent; a restarted agent finds every
// fence here and nowhere else.
//
//	_events_v1                 ring buffer of deny events (layout v1, see
//	                           eventSize), shared by all leases
//	_staging-<lease>-<random>/ a fence being built; renamed to <lease>/ once
//	                           complete, removed by Sweep if an agent died
//	                           while building it
//	<lease>/                   one fenced lease (lease ids never start with '_')
//	    map-meta               ARRAY[1] of metaValueSize bytes: u32 length,
//	                           then leaseMeta as JSON (schema version "v")
//	    map-deny4 map-allow4   LPM_TRIE key {u32 prefixlen; u8 addr[4]}
//	    map-deny6 map-allow6   LPM_TRIE key {u32 prefixlen; u8 addr[16]};
//	                           value u32: the entry's own prefix length
//	    link-device            bpf_link, cgroup_device program
//	    link-connect4          bpf_link, cgroup/connect4
//	    link-connect6          bpf_link, cgroup/connect6
//	    link-sendmsg4          bpf_link, cgroup/sendmsg4
//	    link-sendmsg6          bpf_link, cgroup/sendmsg6
//
// A lease directory is complete or absent: Fence pins into a staging
// directory and renames it into place. bpffs refuses names with a dot
// (EPERM; dots are reserved for the kernel), hence no dots anywhere.

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

const (
	eventsPin     = "_events_v1"
	stagingPrefix = "_staging-"
	metaPin       = "map-meta"
	metaVersion   = 1
	metaValueSize = 8192
)

// lpmRoles are the four tries, by pin suffix.
var lpmRoles = []string{"deny4", "deny6", "allow4", "allow6"}

func mapPin(role string) string  { return "map-" + role }
func linkPin(role string) string { return "link-" + role }

// leaseIDPattern admits the control plane's lease ids (l-[a-z0-9]{20}) and
// any id of letters, digits, '_' and '-' starting alphanumeric, so that a
// lease directory never collides with _events or a staging directory. No
// '.': bpffs refuses it in names.
var leaseIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$`)

// ValidateLeaseID checks that id can name a fence (a pin directory).
// Errors wrap ErrInvalidPolicy.
func ValidateLeaseID(id string) error { return checkLeaseID(id) }

func checkLeaseID(id string) error {
	if !leaseIDPattern.MatchString(id) {
		return fmt.Errorf("%w: lease id %q: want 1-128 of [A-Za-z0-9_-], starting alphanumeric", ErrInvalidPolicy, id)
	}
	return nil
}

// cookieOf is the 64-bit id a lease's programs put in their deny events.
// It is derived from the lease id, so a restarted agent attributes events
// of fences it has not adopted yet by hashing the directory names.
func cookieOf(leaseID string) uint64 {
	sum := sha256.Sum256([]byte("gpuaas/isolation/cookie/v1\x00" + leaseID))
	return binary.LittleEndian.Uint64(sum[:8])
}

// leaseMeta is what a fence records about itself in map-meta, so that
// Describe can rebuild its programs and check them against the kernel's
// tags after an agent restart.
type leaseMeta struct {
	Version  int          `json:"v"`
	LeaseID  string       `json:"lease"`
	Cookie   uint64       `json:"cookie"`
	Cgroup   string       `json:"cgroup"`
	CgroupID uint64       `json:"cgroup_id"`
	Devices  []string     `json:"devices"` // compiled rules, DeviceRule.String
	Features progFeatures `json:"features"`
	Created  time.Time    `json:"created"`
}

func (m leaseMeta) rules() ([]DeviceRule, error) {
	out := make([]DeviceRule, 0, len(m.Devices))
	for _, s := range m.Devices {
		r, err := ParseDeviceRule(s)
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, nil
}

func ruleStrings(rules []DeviceRule) []string {
	out := make([]string, len(rules))
	for i, r := range rules {
		out[i] = r.String()
	}
	return out
}

func encodeMeta(m leaseMeta) ([]byte, error) {
	js, err := json.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("encode lease meta: %w", err)
	}
	if len(js) > metaValueSize-4 {
		return nil, fmt.Errorf("%w: lease meta is %d bytes, at most %d", ErrInvalidPolicy, len(js), metaValueSize-4)
	}
	buf := make([]byte, metaValueSize)
	binary.NativeEndian.PutUint32(buf, uint32(len(js)))
	copy(buf[4:], js)
	return buf, nil
}

func decodeMeta(buf []byte) (leaseMeta, error) {
	var m leaseMeta
	if len(buf) < 4 {
		return m, fmt.Errorf("%w: lease meta of %d bytes", ErrCorrupt, len(buf))
	}
	n := binary.NativeEndian.Uint32(buf)
	if uint64(n) > uint64(len(buf)-4) {
		return m, fmt.Errorf("%w: lease meta length %d exceeds %d", ErrCorrupt, n, len(buf)-4)
	}
	if err := json.Unmarshal(buf[4:4+n], &m); err != nil {
		return m, fmt.Errorf("%w: lease meta: %w", ErrCorrupt, err)
	}
	if m.Version != metaVersion {
		return m, fmt.Errorf("%w: lease meta version %d, this agent reads %d", ErrCorrupt, m.Version, metaVersion)
	}
	if _, err := m.rules(); err != nil {
		return m, fmt.Errorf("%w: lease meta: %w", ErrCorrupt, err)
	}
	return m, nil
}

func lpmSpec(role string, maxEntries int) *ebpf.MapSpec {
	keySize := uint32(4 + 4)
	if strings.HasSuffix(role, "6") {
		keySize = 4 + 16
	}
	return &ebpf.MapSpec{
		Name:       "gpuaas_" + role,
		Type:       ebpf.LPMTrie,
		KeySize:    keySize,
		ValueSize:  4,
		MaxEntries: uint32(maxEntries),
		Flags:      unix.BPF_F_NO_PREALLOC,
	}
}

func metaSpec() *ebpf.MapSpec {
	return &ebpf.MapSpec{Name: "gpuaas_meta", Type: ebpf.Array, KeySize: 4, ValueSize: metaValueSize, MaxEntries: 1}
}

// lpmKey is the trie key for p: host-order prefix length, then the address
// in network order.
func lpmKey(p netip.Prefix) []byte {
	a := p.Addr().AsSlice()
	key := make([]byte, 4+len(a))
	binary.NativeEndian.PutUint32(key, uint32(p.Bits()))
	copy(key[4:], a)
	return key
}

func lpmValue(p netip.Prefix) []byte {
	v := make([]byte, 4)
	binary.NativeEndian.PutUint32(v, uint32(p.Bits()))
	return v
}

// readPrefixes lists a trie's entries.
func readPrefixes(m *ebpf.Map) ([]netip.Prefix, error) {
	key := make([]byte, m.KeySize())
	val := make([]byte, m.ValueSize())
	var out []netip.Prefix
	it := m.Iterate()
	for it.Next(&key, &val) {
		if len(key) < 4 {
			return nil, fmt.Errorf("%w: trie key of %d bytes", ErrCorrupt, len(key))
		}
		addr, ok := netip.AddrFromSlice(key[4:])
		bits := int(binary.NativeEndian.Uint32(key))
		if !ok || bits > addr.BitLen() {
			return nil, fmt.Errorf("%w: trie key %x", ErrCorrupt, key)
		}
		out = append(out, netip.PrefixFrom(addr, bits))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", m, err)
	}
	slices.SortFunc(out, comparePrefix)
	return out, nil
}

// syncPrefixes makes a trie hold exactly want. Additions (phase add) and
// removals (phase remove) are separate so that UpdatePolicy can order them
// across the deny and allow tries.
func syncPrefixes(m *ebpf.Map, have, want []netip.Prefix, add bool) error {
	set := func(ps []netip.Prefix) map[netip.Prefix]bool {
		out := make(map[netip.Prefix]bool, len(ps))
		for _, p := range ps {
			out[p] = true
		}
		return out
	}
	if add {
		exists := set(have)
		for _, p := range want {
			if !exists[p] {
				if err := m.Put(lpmKey(p), lpmValue(p)); err != nil {
					return fmt.Errorf("add %s to %s: %w", p, m, err)
				}
			}
		}
		return nil
	}
	keep := set(want)
	for _, p := range have {
		if !keep[p] {
			if err := m.Delete(lpmKey(p)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return fmt.Errorf("remove %s from %s: %w", p, m, err)
			}
		}
	}
	return nil
}

// openFence holds a pinned fence's objects open.
type openFence struct {
	dir   string
	meta  leaseMeta
	maps  map[string]*ebpf.Map // lpmRoles and "meta"
	links map[string]link.Link // attachPoints' roles
}

func (f *openFence) Close() {
	for _, m := range f.maps {
		m.Close()
	}
	for _, l := range f.links {
		l.Close()
	}
}

// loadFence opens every pin of a lease directory. A missing directory is
// ErrNotFenced; a missing or foreign pin is ErrCorrupt.
func loadFence(dir, leaseID string) (_ *openFence, err error) {
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s (no %s)", ErrNotFenced, leaseID, dir)
	} else if err != nil {
		return nil, fmt.Errorf("open fence of %s: %w", leaseID, err)
	}
	f := &openFence{dir: dir, maps: map[string]*ebpf.Map{}, links: map[string]link.Link{}}
	defer func() {
		if err != nil {
			f.Close()
		}
	}()
	corrupt := func(format string, args ...any) error {
		return fmt.Errorf("%w: lease %s: %s", ErrCorrupt, leaseID, fmt.Sprintf(format, args...))
	}
	for _, role := range append([]string{"meta"}, lpmRoles...) {
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, mapPin(role)), nil)
		if err != nil {
			return nil, corrupt("map %s: %v", role, err)
		}
		f.maps[role] = m
		want := metaSpec()
		if role != "meta" {
			want = lpmSpec(role, int(m.MaxEntries()))
		}
		if m.Type() != want.Type || m.KeySize() != want.KeySize || m.ValueSize() != want.ValueSize {
			return nil, corrupt("map %s is %s, want %s", role, m, want)
		}
	}
	for _, ap := range attachPoints {
		l, err := link.LoadPinnedLink(filepath.Join(dir, linkPin(ap.role)), nil)
		if err != nil {
			return nil, corrupt("link %s: %v", ap.role, err)
		}
		f.links[ap.role] = l
	}
	buf, err := f.maps["meta"].LookupBytes(uint32(0))
	if err != nil {
		return nil, corrupt("read meta: %v", err)
	}
	if f.meta, err = decodeMeta(buf); err != nil {
		return nil, fmt.Errorf("lease %s: %w", leaseID, err)
	}
	if f.meta.LeaseID != leaseID {
		return nil, corrupt("meta names lease %q", f.meta.LeaseID)
	}
	return f, nil
}

// removePinDir detaches every link pinned in dir and removes the directory
// with its pins (maps and programs go when their last reference does).
// Detaching explicitly, rather than only unpinning, takes the programs off
// the cgroup even if another process holds a link descriptor.
func removePinDir(dir string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("list pins in %s: %w", dir, err)
	}
	var errs []error
	for _, ent := range entries {
		if !strings.HasPrefix(ent.Name(), "link-") {
			continue
		}
		path := filepath.Join(dir, ent.Name())
		l, err := link.LoadPinnedLink(path, nil)
		if err != nil {
			errs = append(errs, fmt.Errorf("load link %s: %w", path, err))
			continue
		}
		if err := l.Detach(); err != nil && !errors.Is(err, link.ErrNotSupported) {
			errs = append(errs, fmt.Errorf("detach link %s: %w", path, err))
		}
		l.Close()
	}
	if err := os.RemoveAll(dir); err != nil {
		errs = append(errs, fmt.Errorf("remove pins in %s: %w", dir, err))
	}
	return errors.Join(errs...)
}
