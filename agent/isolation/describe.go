package isolation

import (
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// Description is what the kernel enforces for a lease, read back from the
// kernel objects rather than from the agent's memory: the attestation
// report's evidence for the lease's isolation.
type Description struct {
	LeaseID string
	// Cookie is the lease's id in deny events.
	Cookie uint64
	// Cgroup is the directory the fence was attached to and CgroupID the
	// kernel's id for it.
	Cgroup   string
	CgroupID uint64
	// PinDir holds the fence's pins.
	PinDir string
	// Programs are the five attached programs, in the order device,
	// connect4, connect6, sendmsg4, sendmsg6.
	Programs []ProgramDescription
	// Maps are the lease's maps: meta, deny4, deny6, allow4, allow6.
	Maps []MapDescription
	// EventsMapID is the shared deny event ring's id.
	EventsMapID uint32
	// Devices is the compiled device rule list (StandardDevices, then the
	// lease's rules) the device program was built from.
	Devices []DeviceRule
	// DenyPrefixes and AllowPrefixes are the egress tries' contents.
	DenyPrefixes, AllowPrefixes []netip.Prefix
	// Verified is true when every program is attached to the lease's live
	// cgroup through its pinned link, its kernel tag equals the tag of the
	// program this package builds from Devices and the lease's cookie, and
	// it reports to EventsMapID. Problems says what failed otherwise.
	Verified bool
	Problems []string
}

// ProgramDescription is one attached program.
type ProgramDescription struct {
	// Attach is the hook: device, connect4, connect6, sendmsg4, sendmsg6.
	Attach string
	// AttachType is the kernel's name for it, e.g. "CGroupInet4Connect".
	AttachType string
	LinkID     uint32
	ProgramID  uint32
	Name       string
	// Tag is the kernel's hash of the program's instructions.
	Tag    string
	MapIDs []uint32
	// Attached: the kernel lists the program on the lease's cgroup.
	Attached bool
	// TagVerified: Tag is the tag of the program rebuilt from the policy.
	TagVerified bool
}

// MapDescription is one of a lease's maps.
type MapDescription struct {
	Role    string
	ID      uint32
	Name    string
	Type    string
	Entries int
}

// Describe returns what the kernel enforces for a fenced lease, for the
// attestation report. ErrNotFenced when the lease has no pins.
func (e *Enforcer) Describe(leaseID string) (Description, error) {
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
	return d, nil
}

func (e *Enforcer) describe(f *openFence) (Description, error) {
	rules, err := f.meta.rules()
	if err != nil {
		return Description{}, err
	}
	d := Description{
		LeaseID: f.meta.LeaseID, Cookie: f.meta.Cookie,
		Cgroup: f.meta.Cgroup, CgroupID: f.meta.CgroupID, PinDir: f.dir,
		Devices: rules,
	}
	problem := func(format string, args ...any) { d.Problems = append(d.Problems, fmt.Sprintf(format, args...)) }
	if info, err := e.events.Info(); err == nil {
		id, _ := info.ID()
		d.EventsMapID = uint32(id)
	}

	// What the kernel lists on the cgroup, per attach type. The cgroup may
	// be gone (the task exited): then nothing is attached.
	onCgroup := map[ebpf.AttachType][]ebpf.ProgramID{}
	if cg, err := os.Open(f.meta.Cgroup); err == nil {
		for _, ap := range attachPoints {
			res, err := link.QueryPrograms(link.QueryOptions{Target: int(cg.Fd()), Attach: ap.attach})
			if err != nil {
				problem("query %s programs on %s: %v", ap.role, f.meta.Cgroup, err)
				continue
			}
			for _, p := range res.Programs {
				onCgroup[ap.attach] = append(onCgroup[ap.attach], p.ID)
			}
		}
		cg.Close()
	} else {
		problem("open cgroup %s: %v", f.meta.Cgroup, err)
	}

	for _, ap := range attachPoints {
		pd := ProgramDescription{Attach: ap.role, AttachType: ap.attach.String()}
		info, err := f.links[ap.role].Info()
		if err != nil {
			problem("%s link info: %v", ap.role, err)
			d.Programs = append(d.Programs, pd)
			continue
		}
		pd.LinkID, pd.ProgramID = uint32(info.ID), uint32(info.Program)
		if cg := info.Cgroup(); cg == nil || cg.CgroupId != f.meta.CgroupID {
			problem("%s link is not attached to cgroup id %d (the cgroup is gone or the link is defunct)", ap.role, f.meta.CgroupID)
		}
		pd.Attached = slices.Contains(onCgroup[ap.attach], info.Program)
		if !pd.Attached {
			problem("%s program %d is not listed on %s", ap.role, info.Program, f.meta.Cgroup)
		}
		if err := describeProgram(&pd, ap, rules, f.meta); err != nil {
			problem("%s program: %v", ap.role, err)
		} else if !pd.TagVerified {
			problem("%s program tag %s is not the tag of the program built from this policy", ap.role, pd.Tag)
		}
		if d.EventsMapID != 0 && !slices.Contains(pd.MapIDs, d.EventsMapID) {
			problem("%s program does not report to event ring %d", ap.role, d.EventsMapID)
		}
		d.Programs = append(d.Programs, pd)
	}

	for _, role := range append([]string{"meta"}, lpmRoles...) {
		m := f.maps[role]
		md := MapDescription{Role: role, Type: m.Type().String()}
		if info, err := m.Info(); err == nil {
			id, _ := info.ID()
			md.ID, md.Name = uint32(id), info.Name
		}
		if role == "meta" {
			md.Entries = 1
		} else {
			ps, err := readPrefixes(m)
			if err != nil {
				return Description{}, err
			}
			md.Entries = len(ps)
			if strings.HasPrefix(role, "deny") {
				d.DenyPrefixes = append(d.DenyPrefixes, ps...)
			} else {
				d.AllowPrefixes = append(d.AllowPrefixes, ps...)
			}
		}
		d.Maps = append(d.Maps, md)
	}
	d.Verified = len(d.Problems) == 0
	return d, nil
}

// describeProgram fills the kernel's view of a program and checks its tag.
func describeProgram(pd *ProgramDescription, ap attachPoint, rules []DeviceRule, meta leaseMeta) error {
	prog, err := ebpf.NewProgramFromID(ebpf.ProgramID(pd.ProgramID))
	if err != nil {
		return fmt.Errorf("open program %d: %w", pd.ProgramID, err)
	}
	defer prog.Close()
	info, err := prog.Info()
	if err != nil {
		return fmt.Errorf("program %d info: %w", pd.ProgramID, err)
	}
	pd.Name, pd.Tag = info.Name, info.Tag
	if ids, ok := info.MapIDs(); ok {
		for _, id := range ids {
			pd.MapIDs = append(pd.MapIDs, uint32(id))
		}
	}
	spec, err := buildProgram(ap, rules, meta.Cookie, mapFDs{}, meta.Features)
	if err != nil {
		return err
	}
	pd.TagVerified, err = programMatches(spec, info.Tag)
	return err
}
