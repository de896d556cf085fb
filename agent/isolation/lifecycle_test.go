package isolation

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// progIDs are a description's link and program ids, by attach point.
func progIDs(d Description) map[string][2]uint32 {
	out := map[string][2]uint32{}
	for _, p := range d.Programs {
		out[p.Attach] = [2]uint32{p.LinkID, p.ProgramID}
	}
	return out
}

// TestUpdatePolicyChangesDecisionWithoutReattach proves that an egress
// change is a map update: the decision flips for a new connection while
// every link and program keeps its id; that UpdatePolicy refuses to touch
// device rules; and that UpdateDevices swaps the device program inside the
// same link.
func TestUpdatePolicyChangesDecisionWithoutReattach(t *testing.T) {
	requireRoot(t)
	e := newEnforcer(t)
	a, b := twoLeaseNodes(t)
	cg := newCgroup(t)
	p := testPolicy()
	p.Devices = a.rules
	before, err := e.Fence("lease-upd", cg, p)
	if err != nil {
		t.Fatal(err)
	}
	lp := port(childPort)
	ops := []childOp{netOp("tcp", "127.0.0.2:"+lp), netOp("tcp", "127.0.0.1:"+lp), openOp(b.gpu, unix.O_RDWR)}
	if got := runChild(t, cg, ops...); !slices.Equal(got, []string{"EPERM", "ok", "EPERM"}) {
		t.Fatalf("before the update: %v", got)
	}

	p.AllowPrefixes = mustPrefixes("127.0.0.2/32", "::1/128") // 127.0.0.1 loses its exception
	if err := e.UpdatePolicy("lease-upd", p); err != nil {
		t.Fatal(err)
	}
	if got := runChild(t, cg, ops...); !slices.Equal(got, []string{"ok", "EPERM", "EPERM"}) {
		t.Fatalf("after the egress update: %v", got)
	}
	after, err := e.Describe("lease-upd")
	if err != nil {
		t.Fatal(err)
	}
	if !maps_equal(progIDs(before), progIDs(after)) {
		t.Errorf("egress update changed links or programs: %v -> %v", progIDs(before), progIDs(after))
	}
	if want := mustPrefixes("127.0.0.2/32", "::1/128"); !slices.Equal(after.AllowPrefixes, want) {
		t.Errorf("allow prefixes read back %v, want %v", after.AllowPrefixes, want)
	}
	if !after.Verified {
		t.Errorf("not verified after update: %v", after.Problems)
	}

	p.Devices = append(p.Devices, CharDevice(195, 1, "rw"))
	if err := e.UpdatePolicy("lease-upd", p); !errors.Is(err, ErrInvalidPolicy) {
		t.Errorf("UpdatePolicy with other device rules: %v, want ErrInvalidPolicy", err)
	}
	if err := e.UpdateDevices("lease-upd", p.Devices); err != nil {
		t.Fatal(err)
	}
	if got := runChild(t, cg, ops...); !slices.Equal(got, []string{"ok", "EPERM", "passed"}) {
		t.Fatalf("after the device update: %v", got)
	}
	swapped, err := e.Describe("lease-upd")
	if err != nil {
		t.Fatal(err)
	}
	for role, ids := range progIDs(swapped) {
		old := progIDs(before)[role]
		switch {
		case ids[0] != old[0]:
			t.Errorf("%s: link %d replaced by %d", role, old[0], ids[0])
		case role == "device" && ids[1] == old[1]:
			t.Errorf("device program %d not swapped", ids[1])
		case role != "device" && ids[1] != old[1]:
			t.Errorf("%s: program %d replaced by %d", role, old[1], ids[1])
		}
	}
	if !swapped.Verified {
		t.Errorf("not verified after device swap: %v", swapped.Problems)
	}
	if got := cgroupPrograms(t, cg); len(got["device"]) != 1 {
		t.Errorf("device programs on the cgroup after the swap: %v", got["device"])
	}
}

func maps_equal(a, b map[string][2]uint32) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// collectEvents reads n events or fails after a timeout.
func collectEvents(t *testing.T, ch <-chan DenyEvent, n int) []DenyEvent {
	t.Helper()
	var out []DenyEvent
	timeout := time.After(5 * time.Second)
	for len(out) < n {
		select {
		case ev, ok := <-ch:
			if !ok {
				t.Fatalf("event channel closed after %d of %d events", len(out), n)
			}
			out = append(out, ev)
		case <-timeout:
			t.Fatalf("got %d of %d events: %+v", len(out), n, out)
		}
	}
	return out
}

// TestDenyEventsAttributedToLease proves that each program reports its
// denials on the shared ring with the lease's cookie, that Events
// attributes them to the right lease with the right target, pid and comm,
// and that the Aggregator rate-limits them per lease and kind.
func TestDenyEventsAttributedToLease(t *testing.T) {
	requireRoot(t)
	e := newEnforcer(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events, err := e.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.Events(ctx); err == nil {
		t.Error("a second concurrent reader was allowed")
	}
	a, b := twoLeaseNodes(t)
	cgA, cgB := newCgroup(t), newCgroup(t)
	pa, pb := testPolicy(), testPolicy()
	pa.Devices, pb.Devices = a.rules, b.rules
	if _, err := e.Fence("lease-a", cgA, pa); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Fence("lease-b", cgB, pb); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	runChild(t, cgA, openOp(b.gpu, unix.O_RDWR), netOp("tcp", "169.254.169.254:80"),
		netOp("udp-sendto", "[::ffff:10.1.2.3]:53"), netOp("udp-connect", "[fd00:ec2::254]:53"))
	runChild(t, cgB, openOp(a.giCap, unix.O_RDONLY))
	got := collectEvents(t, events, 5)
	type key struct {
		lease  string
		kind   EventKind
		target string
	}
	want := []key{
		{"lease-a", KindDevice, "c 195:1 rw"},
		{"lease-a", KindConnect, "tcp 169.254.169.254:80"},
		// udpv6_sendmsg hands a v4-mapped destination to the sendmsg4 hook
		// in its IPv4 form.
		{"lease-a", KindSendmsg, "udp 10.1.2.3:53"},
		{"lease-a", KindConnect, "udp [fd00:ec2::254]:53"},
		{"lease-b", KindDevice, fmt.Sprintf("c %d:1 r", mustMajor(t, a.giCap))},
	}
	for i, ev := range got {
		if k := (key{ev.LeaseID, ev.Kind, ev.Target()}); k != want[i] {
			t.Errorf("event %d: %+v, want %+v", i, k, want[i])
		}
		if ev.Cookie != cookieOf(ev.LeaseID) {
			t.Errorf("event %d: cookie %x, want %x", i, ev.Cookie, cookieOf(ev.LeaseID))
		}
		if ev.Time.Before(start.Add(-time.Second)) || ev.Time.After(time.Now().Add(time.Second)) {
			t.Errorf("event %d: time %v not within the test (started %v)", i, ev.Time, start)
		}
		if e.feat&featPID != 0 && ev.PID == 0 {
			t.Errorf("event %d: no pid", i)
		}
		if e.feat&featComm != 0 && !strings.HasPrefix(filepath.Base(os.Args[0]), ev.Comm) {
			t.Errorf("event %d: comm %q, want a prefix of %q", i, ev.Comm, filepath.Base(os.Args[0]))
		}
	}
	// The summaries the lead audits: one at once per lease and kind, the
	// second connect of lease-a held back until the interval has passed.
	agg := NewAggregator(time.Minute)
	var due []string
	for _, ev := range got {
		if s, ok := agg.Add(ev, start); ok {
			due = append(due, s.LeaseID+"/"+s.Kind.String())
		}
	}
	if want := []string{"lease-a/device", "lease-a/connect", "lease-a/sendmsg", "lease-b/device"}; !slices.Equal(due, want) {
		t.Errorf("summaries due at once: %v, want %v", due, want)
	}
	if later := agg.Flush(start.Add(time.Minute)); len(later) != 1 || later[0].Count != 1 || later[0].Targets[0].Target != "udp [fd00:ec2::254]:53" {
		t.Errorf("summaries after the interval: %+v", later)
	}
	cancel()
	for range events {
	}
}

func mustMajor(t *testing.T, path string) uint32 {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return unix.Major(st.Rdev)
}

// TestFenceOutlivesTheEnforcerAndIsAdopted proves recovery: with the
// Enforcer closed (the agent exited) the fence still holds and its
// denials wait in the pinned ring; a new Enforcer attributes them before
// adopting, Adopt attaches nothing, Fence on the same lease is idempotent,
// and Detach removes every program and pin.
func TestFenceOutlivesTheEnforcerAndIsAdopted(t *testing.T) {
	requireRoot(t)
	root := newPinRoot(t)
	e1 := newEnforcerAt(t, root)
	a, b := twoLeaseNodes(t)
	cg := newCgroup(t)
	p := testPolicy()
	p.Devices = a.rules
	fenced, err := e1.Fence("lease-a", cg, p)
	if err != nil {
		t.Fatal(err)
	}
	if err := e1.Close(); err != nil {
		t.Fatal(err)
	}

	lp := port(childPort)
	ops := []childOp{openOp(b.gpu, unix.O_RDWR), netOp("tcp", "127.0.0.2:"+lp), openOp(a.gpu, unix.O_RDWR)}
	if got := runChild(t, cg, ops...); !slices.Equal(got, []string{"EPERM", "EPERM", "passed"}) {
		t.Fatalf("with no enforcer running: %v", got)
	}

	e2 := newEnforcerAt(t, root)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events, err := e2.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, ev := range collectEvents(t, events, 2) {
		if ev.LeaseID != "lease-a" {
			t.Errorf("event denied while no agent ran: lease %q, want lease-a", ev.LeaseID)
		}
	}
	cancel()
	for range events {
	}

	onCgroup := cgroupPrograms(t, cg)
	adopted, err := e2.Adopt("lease-a")
	if err != nil {
		t.Fatal(err)
	}
	if !adopted.Verified {
		t.Errorf("adopted fence not verified: %v", adopted.Problems)
	}
	if !maps_equal(progIDs(fenced), progIDs(adopted)) {
		t.Errorf("adopt changed programs: %v -> %v", progIDs(fenced), progIDs(adopted))
	}
	if _, err := e2.Fence("lease-a", cg, p); err != nil {
		t.Fatal(err)
	}
	after := cgroupPrograms(t, cg)
	for _, ap := range attachPoints {
		if len(after[ap.role]) != 1 || !slices.Equal(after[ap.role], onCgroup[ap.role]) {
			t.Errorf("%s programs on the cgroup: %v before adopt and re-fence, %v after", ap.role, onCgroup[ap.role], after[ap.role])
		}
	}
	if ls, err := e2.Leases(); err != nil || !slices.Equal(ls, []string{"lease-a"}) {
		t.Errorf("Leases() = %v, %v", ls, err)
	}

	if err := e2.Detach("lease-a"); err != nil {
		t.Fatal(err)
	}
	if got := cgroupPrograms(t, cg); len(got) != 0 {
		t.Errorf("programs left on the cgroup after Detach: %v", got)
	}
	if got := pinEntries(t, root); len(got) != 0 {
		t.Errorf("pins left after Detach: %v", got)
	}
	if got := runChild(t, cg, ops...); !slices.Equal(got, []string{"passed", "ok", "passed"}) {
		t.Errorf("after Detach: %v", got)
	}
	if err := e2.Detach("lease-a"); err != nil {
		t.Errorf("second Detach: %v", err)
	}
	if _, err := e2.Adopt("lease-a"); !errors.Is(err, ErrNotFenced) {
		t.Errorf("Adopt after Detach: %v, want ErrNotFenced", err)
	}
}

// TestSweepRemovesOrphans proves Sweep removes the fences of leases the
// agent no longer has, and a staging directory a crashed Fence left with a
// link attached, and keeps the rest.
func TestSweepRemovesOrphans(t *testing.T) {
	requireRoot(t)
	e := newEnforcer(t)
	cgs := map[string]string{}
	for _, id := range []string{"keep-1", "gone-1", "gone-2"} {
		cgs[id] = newCgroup(t)
		if _, err := e.Fence(id, cgs[id], testPolicy()); err != nil {
			t.Fatal(err)
		}
	}
	// A staging directory as a Fence that died after attaching leaves it.
	crashed := newCgroup(t)
	staging := filepath.Join(e.PinRoot(), stagingPrefix+"crashed-123")
	if err := os.Mkdir(staging, 0o700); err != nil {
		t.Fatal(err)
	}
	rules, _ := compileDeviceRules(nil)
	spec, err := buildProgram(attachPoints[0], rules, 1, mapFDs{events: e.events.FD()}, e.feat)
	if err != nil {
		t.Fatal(err)
	}
	prog, err := ebpf.NewProgram(spec)
	if err != nil {
		t.Fatal(err)
	}
	cgf, err := os.Open(crashed)
	if err != nil {
		t.Fatal(err)
	}
	l, err := link.AttachRawLink(link.RawLinkOptions{Target: int(cgf.Fd()), Program: prog, Attach: ebpf.AttachCGroupDevice})
	cgf.Close()
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Pin(filepath.Join(staging, linkPin("device"))); err != nil {
		t.Fatal(err)
	}
	l.Close()
	prog.Close()

	removed, err := e.Sweep(func(id string) bool { return id == "keep-1" })
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(removed, []string{"gone-1", "gone-2"}) {
		t.Errorf("Sweep removed %v, want [gone-1 gone-2]", removed)
	}
	if got := pinEntries(t, e.PinRoot()); !slices.Equal(got, []string{"keep-1"}) {
		t.Errorf("pins after Sweep: %v, want [keep-1]", got)
	}
	for id, cg := range cgs {
		n := len(cgroupPrograms(t, cg))
		if id == "keep-1" && n != len(attachPoints) || id != "keep-1" && n != 0 {
			t.Errorf("%s: programs on its cgroup for %d attach points after Sweep", id, n)
		}
	}
	if got := cgroupPrograms(t, crashed); len(got) != 0 {
		t.Errorf("crashed fence's program still attached: %v", got)
	}
}

// TestFenceFailsClosed proves that a Fence that fails at any step returns
// a classified error and leaves nothing attached to the cgroup and nothing
// pinned, and that bad input is refused before anything is made.
func TestFenceFailsClosed(t *testing.T) {
	requireRoot(t)
	e := newEnforcer(t)
	for _, c := range []struct {
		name, cgroup string
	}{
		{"missing cgroup", "/sys/fs/cgroup/no-such-cgroup-gpuaas"},
		{"relative path", "gpuaas/cg"},
		{"not cgroup v2", t.TempDir()},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := e.Fence("lease-x", c.cgroup, testPolicy())
			if !errors.Is(err, ErrAttach) {
				t.Errorf("Fence: %v, want ErrAttach", err)
			}
			if got := pinEntries(t, e.PinRoot()); len(got) != 0 {
				t.Errorf("pins left: %v", got)
			}
		})
	}

	cg := newCgroup(t)
	t.Run("wildcard lease rule", func(t *testing.T) {
		_, err := e.Fence("lease-x", cg, Policy{Devices: []DeviceRule{{Type: 'c', Major: 195, Minor: Wildcard, Access: "rw"}}})
		if !errors.Is(err, ErrInvalidPolicy) {
			t.Errorf("Fence: %v, want ErrInvalidPolicy", err)
		}
	})
	steps := []string{"maps", "programs"}
	for _, ap := range attachPoints {
		steps = append(steps, "attach "+ap.role)
	}
	steps = append(steps, "commit")
	for _, step := range steps {
		t.Run("failure at "+step, func(t *testing.T) {
			testHook = func(s string) error {
				if s == step {
					return fmt.Errorf("%w: injected failure at %s", ErrAttach, s)
				}
				return nil
			}
			defer func() { testHook = nil }()
			_, err := e.Fence("lease-x", cg, testPolicy())
			if !errors.Is(err, ErrAttach) {
				t.Errorf("Fence: %v, want ErrAttach", err)
			}
			if got := cgroupPrograms(t, cg); len(got) != 0 {
				t.Errorf("programs left on the cgroup: %v", got)
			}
			if got := pinEntries(t, e.PinRoot()); len(got) != 0 {
				t.Errorf("pins left: %v", got)
			}
		})
	}
	if got := pinEntries(t, e.PinRoot()); len(got) != 0 {
		t.Errorf("pins left: %v", got)
	}
}

// TestFenceOnAnotherCgroupConflicts proves one lease cannot be fenced on
// two cgroups: the second Fence fails and attaches nothing.
func TestFenceOnAnotherCgroupConflicts(t *testing.T) {
	requireRoot(t)
	e := newEnforcer(t)
	cg1, cg2 := newCgroup(t), newCgroup(t)
	if _, err := e.Fence("lease-c", cg1, testPolicy()); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Fence("lease-c", cg2, testPolicy()); !errors.Is(err, ErrConflict) {
		t.Errorf("Fence on a second cgroup: %v, want ErrConflict", err)
	}
	if got := cgroupPrograms(t, cg2); len(got) != 0 {
		t.Errorf("programs attached to the second cgroup: %v", got)
	}
}

// TestFenceRepairsCorruptPins proves that a lease directory missing a pin
// (its program gone with it) is reported by Adopt and replaced by Fence,
// with one program per hook afterwards.
func TestFenceRepairsCorruptPins(t *testing.T) {
	requireRoot(t)
	e := newEnforcer(t)
	cg := newCgroup(t)
	if _, err := e.Fence("lease-r", cg, testPolicy()); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(e.PinRoot(), "lease-r", linkPin("connect6"))); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the unpinned connect6 link to go", 5*time.Second, func() bool {
		return len(cgroupPrograms(t, cg)["connect6"]) == 0
	})
	if got := runChild(t, cg, netOp("tcp", "[fd00:ec2::254]:80")); got[0] != "ENETUNREACH" {
		t.Fatalf("with connect6 unpinned: %v", got)
	}
	if _, err := e.Adopt("lease-r"); !errors.Is(err, ErrCorrupt) {
		t.Errorf("Adopt: %v, want ErrCorrupt", err)
	}
	d, err := e.Fence("lease-r", cg, testPolicy())
	if err != nil {
		t.Fatal(err)
	}
	if !d.Verified {
		t.Errorf("repaired fence not verified: %v", d.Problems)
	}
	for role, ids := range cgroupPrograms(t, cg) {
		if len(ids) != 1 {
			t.Errorf("%s: %d programs on the cgroup after repair", role, len(ids))
		}
	}
	if got := runChild(t, cg, netOp("tcp", "[fd00:ec2::254]:80")); got[0] != "EPERM" {
		t.Errorf("after repair: %v", got)
	}
	if got := pinEntries(t, e.PinRoot()); !slices.Equal(got, []string{"lease-r"}) {
		t.Errorf("pins after repair: %v", got)
	}
}

// TestDescribeIsTheKernelsView proves Describe reads the policy back from
// the kernel and checks each program's tag: it matches after Fence, and a
// tampered record of the device rules no longer verifies.
func TestDescribeIsTheKernelsView(t *testing.T) {
	requireRoot(t)
	e := newEnforcer(t)
	a, _ := twoLeaseNodes(t)
	cg := newCgroup(t)
	p := testPolicy()
	p.Devices = a.rules
	p.DenyPrefixes = append(p.DenyPrefixes, netip.MustParsePrefix("::ffff:203.0.113.0/120"))
	d, err := e.Describe("lease-d")
	if !errors.Is(err, ErrNotFenced) {
		t.Errorf("Describe before Fence: %v, want ErrNotFenced", err)
	}
	if d, err = e.Fence("lease-d", cg, p); err != nil {
		t.Fatal(err)
	}
	if !d.Verified {
		t.Fatalf("not verified: %v", d.Problems)
	}
	if len(d.Programs) != len(attachPoints) || len(d.Maps) != 5 {
		t.Fatalf("%d programs, %d maps", len(d.Programs), len(d.Maps))
	}
	for i, pd := range d.Programs {
		ap := attachPoints[i]
		if pd.Attach != ap.role || pd.Name != ap.name || pd.Tag == "" || pd.ProgramID == 0 || pd.LinkID == 0 || !pd.Attached || !pd.TagVerified {
			t.Errorf("program %d: %+v", i, pd)
		}
	}
	rules, _ := compileDeviceRules(a.rules)
	if !slices.Equal(d.Devices, rules) {
		t.Errorf("devices %v, want %v", d.Devices, rules)
	}
	eg, _ := p.egress(DefaultMaxPrefixes)
	if want := slices.Concat(eg.deny4, eg.deny6); !slices.Equal(d.DenyPrefixes, want) {
		t.Errorf("deny prefixes %v, want %v", d.DenyPrefixes, want)
	}
	if !slices.Contains(d.DenyPrefixes, netip.MustParsePrefix("203.0.113.0/24")) {
		t.Errorf("v4-mapped deny prefix not stored as IPv4: %v", d.DenyPrefixes)
	}
	if d.Cookie != cookieOf("lease-d") || d.Cgroup != cg || d.CgroupID == 0 {
		t.Errorf("identity: cookie %x cgroup %s id %d", d.Cookie, d.Cgroup, d.CgroupID)
	}

	// Claim a rule the program does not have.
	m, err := ebpf.LoadPinnedMap(filepath.Join(d.PinDir, metaPin), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	buf, _ := m.LookupBytes(uint32(0))
	meta, err := decodeMeta(buf)
	if err != nil {
		t.Fatal(err)
	}
	meta.Devices = append(meta.Devices, "c 195:7 rw")
	buf, _ = encodeMeta(meta)
	if err := m.Put(uint32(0), buf); err != nil {
		t.Fatal(err)
	}
	tampered, err := e.Describe("lease-d")
	if err != nil {
		t.Fatal(err)
	}
	if tampered.Verified || tampered.Programs[0].TagVerified || !tampered.Programs[1].TagVerified {
		t.Errorf("tampered record: verified %v, device tag verified %v, problems %v", tampered.Verified, tampered.Programs[0].TagVerified, tampered.Problems)
	}
}

// ourObjects lists the ids of this package's programs and maps (by the
// names it gives them) and of all cgroup links in the kernel.
func ourObjects(t testing.TB) (progs, maps, links []uint32) {
	t.Helper()
	for id := ebpf.ProgramID(0); ; {
		next, err := ebpf.ProgramGetNextID(id)
		if errors.Is(err, os.ErrNotExist) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		id = next
		p, err := ebpf.NewProgramFromID(id)
		if err != nil {
			continue // freed meanwhile
		}
		if info, err := p.Info(); err == nil && strings.HasPrefix(info.Name, "gpuaas_") {
			progs = append(progs, uint32(id))
		}
		p.Close()
	}
	for id := ebpf.MapID(0); ; {
		next, err := ebpf.MapGetNextID(id)
		if errors.Is(err, os.ErrNotExist) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		id = next
		m, err := ebpf.NewMapFromID(id)
		if err != nil {
			continue
		}
		if info, err := m.Info(); err == nil && strings.HasPrefix(info.Name, "gpuaas_") {
			maps = append(maps, uint32(id))
		}
		m.Close()
	}
	it := new(link.Iterator)
	defer it.Close()
	for it.Next() {
		if info, err := it.Link.Info(); err == nil && info.Type == link.CgroupType {
			links = append(links, uint32(it.ID))
		}
	}
	return progs, maps, links
}

// above returns the ids greater than limit (kernel ids only grow, so these
// are objects made after limit was read).
func above(ids []uint32, limit uint32) []uint32 {
	var out []uint32
	for _, id := range ids {
		if id > limit {
			out = append(out, id)
		}
	}
	return out
}

// TestFenceDetachCyclesLeaveNothing runs 500 Fence/Detach cycles on fresh
// cgroups and checks that no pin is left and that none of the programs,
// maps and cgroup links the cycles made survives them.
func TestFenceDetachCyclesLeaveNothing(t *testing.T) {
	requireRoot(t)
	e := newEnforcer(t)
	cycles := 500
	if testing.Short() {
		cycles = 50
	}
	a, _ := twoLeaseNodes(t)
	p := testPolicy()
	p.Devices = a.rules
	// Ids of objects made from now on are above these.
	mark := func() uint32 {
		m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		info, _ := m.Info()
		id, _ := info.ID()
		return uint32(id)
	}
	mapMark := mark()
	progs0, _, links0 := ourObjects(t)
	progMark, linkMark := slices.Max(append(progs0, 0)), slices.Max(append(links0, 0))
	start := time.Now()
	made := 0
	for i := range cycles {
		cg := newCgroupNoCleanup(t)
		id := fmt.Sprintf("cycle-%d", i)
		d, err := e.Fence(id, cg, p)
		if err != nil {
			removeCgroup(t, cg)
			t.Fatalf("cycle %d: %v", i, err)
		}
		made += len(d.Programs)
		err = e.Detach(id)
		removeCgroup(t, cg)
		if err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
	}
	t.Logf("%d cycles (%d programs attached and detached) in %v", cycles, made, time.Since(start))
	if got := pinEntries(t, e.PinRoot()); len(got) != 0 {
		t.Errorf("pins left: %v", got)
	}
	// The kernel frees programs and maps after an RCU grace period.
	var progs, maps, links []uint32
	waitFor(t, "the cycles' kernel objects to be freed", 10*time.Second, func() bool {
		p, m, l := ourObjects(t)
		progs, maps, links = above(p, progMark), above(m, mapMark), above(l, linkMark)
		return len(progs)+len(maps)+len(links) == 0
	})
}

func newCgroupNoCleanup(t testing.TB) string {
	t.Helper()
	root, err := CgroupV2Root()
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp(root, "gpuaas-isolation-cycle-")
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestNewEnforcerFailsClosed proves NewEnforcer refuses to run without the
// kernel features (ErrUnsupported), on a pin root that is not a bpf
// filesystem, and next to another Enforcer on the same pin root
// (ErrConflict).
func TestNewEnforcerFailsClosed(t *testing.T) {
	requireRoot(t)
	t.Run("kernel without cgroup BPF", func(t *testing.T) {
		probe = func() (progFeatures, error) {
			return 0, fmt.Errorf("%w: kernel lacks CGroupDevice programs", ErrUnsupported)
		}
		defer func() { probe = probeKernel }()
		_, err := NewEnforcer(Config{PinRoot: filepath.Join(DefaultBPFFS, "gpuaas-never-created")})
		if !errors.Is(err, ErrUnsupported) {
			t.Errorf("NewEnforcer: %v, want ErrUnsupported", err)
		}
		if _, err := os.Stat(filepath.Join(DefaultBPFFS, "gpuaas-never-created")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("pin root created: %v", err)
		}
	})
	t.Run("pin root off bpffs", func(t *testing.T) {
		_, err := NewEnforcer(Config{PinRoot: t.TempDir()})
		if !errors.Is(err, ErrUnsupported) {
			t.Errorf("NewEnforcer: %v, want ErrUnsupported", err)
		}
	})
	t.Run("second enforcer", func(t *testing.T) {
		e := newEnforcer(t)
		_, err := NewEnforcer(Config{PinRoot: e.PinRoot()})
		if !errors.Is(err, ErrConflict) {
			t.Errorf("NewEnforcer: %v, want ErrConflict", err)
		}
		e.Close()
		if _, err := e.Fence("lease-z", "/", Policy{}); !errors.Is(err, ErrClosed) {
			t.Errorf("Fence after Close: %v, want ErrClosed", err)
		}
		e2 := newEnforcerAt(t, e.PinRoot())
		e2.Close()
	})
}

// TestEnsureBPFFSMounts proves EnsureBPFFS mounts a bpf filesystem where
// there is none and leaves a mounted one alone.
func TestEnsureBPFFSMounts(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	if isBPFFS(dir) {
		t.Fatal("a temp dir is already bpffs")
	}
	if err := EnsureBPFFS(dir); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, 0); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	if !isBPFFS(dir) {
		t.Fatal("not bpffs after EnsureBPFFS")
	}
	if err := EnsureBPFFS(dir); err != nil {
		t.Errorf("second EnsureBPFFS: %v", err)
	}
}

// TestCgroupDirOfPID proves the helper finds a process's cgroup2
// directory, e.g. a task moved into a lease's cgroup.
func TestCgroupDirOfPID(t *testing.T) {
	requireRoot(t)
	cg := newCgroup(t)
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		cmd.Process.Kill()
		cmd.Wait()
	}()
	if err := os.WriteFile(filepath.Join(cg, "cgroup.procs"), []byte(fmt.Sprint(cmd.Process.Pid)), 0); err != nil {
		t.Fatal(err)
	}
	got, err := CgroupDirOfPID(cmd.Process.Pid)
	if err != nil || got != cg {
		t.Errorf("CgroupDirOfPID = %q, %v; want %q", got, err, cg)
	}
	self, err := CgroupDirOfPID(os.Getpid())
	if err != nil || !isCgroup2(self) {
		t.Errorf("CgroupDirOfPID(self) = %q, %v", self, err)
	}
}

// TestFenceCoversSubCgroupsAndResistsLegacyDetach proves two properties a
// container cannot undo: a process in a cgroup the container creates below
// its own is still fenced (the programs are effective for descendants),
// and BPF_PROG_DETACH, which runc and systemd use to clear programs they
// did not attach, cannot remove a link-attached program.
func TestFenceCoversSubCgroupsAndResistsLegacyDetach(t *testing.T) {
	requireRoot(t)
	e := newEnforcer(t)
	a, b := twoLeaseNodes(t)
	cg := newCgroup(t)
	p := testPolicy()
	p.Devices = a.rules
	d, err := e.Fence("lease-s", cg, p)
	if err != nil {
		t.Fatal(err)
	}
	sub := filepath.Join(cg, "escape")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeCgroup(t, sub) })
	ops := []childOp{openOp(b.gpu, unix.O_RDWR), netOp("tcp", "169.254.169.254:80"), netOp("udp-sendto", "10.0.0.1:53")}
	if got := runChild(t, sub, ops...); !slices.Equal(got, []string{"EPERM", "EPERM", "EPERM"}) {
		t.Errorf("in a sub-cgroup: %v", got)
	}

	cgf, err := os.Open(cg)
	if err != nil {
		t.Fatal(err)
	}
	defer cgf.Close()
	for i, pd := range d.Programs {
		prog, err := ebpf.NewProgramFromID(ebpf.ProgramID(pd.ProgramID))
		if err != nil {
			t.Fatal(err)
		}
		err = link.RawDetachProgram(link.RawDetachProgramOptions{Target: int(cgf.Fd()), Program: prog, Attach: attachPoints[i].attach})
		prog.Close()
		if err == nil {
			t.Errorf("BPF_PROG_DETACH removed the %s program", pd.Attach)
		}
	}
	after, err := e.Describe("lease-s")
	if err != nil {
		t.Fatal(err)
	}
	if !after.Verified {
		t.Errorf("fence after detach attempts: %v", after.Problems)
	}
}
