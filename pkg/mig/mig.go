// Package mig is the MIG model, pure: profiles, placements, GPU models and
// the placement planners. It is shared by the agent and the control plane's
// scheduler and touches no hardware.
//
// A MIG-capable GPU has 8 memory slots and 7 compute slices. A GPU instance
// of a profile occupies a contiguous run of memory slots (its Placement) that
// must start at one of the profile's allowed start slots, and it consumes the
// profile's compute slices. Two instances never share a memory slot, the
// slices of all instances never exceed the GPU's compute slices, and some
// profiles are limited in number (one 1g+me per GPU). Model.Check is the one
// source of truth for these rules; Free, Place and Remaining are built on it.
//
// The parts:
//
//   - models.go: the built-in table of known models (A100, H100, H200).
//   - catalog.go: ModelFromProfiles builds a Model from what a driver
//     reports, so planning never depends on compiled-in names or sizes; the
//     table validates known models and stands in while MIG is disabled.
//   - planner.go: Check, Free, Place and Remaining on one GPU.
//   - fleet.go: PlanAcross chooses a GPU and placement across a fleet and
//     explains fragmentation (ErrFragmented).
//   - layout.go: PlanLayout packs a static layout exhaustively.
//   - migparted.go: ParseMigParted and Layout read NVIDIA mig-parted's v1
//     config format into per-GPU layouts.
//
// The package never imports agent or controlplane code, never reads files
// or the driver, and never moves or destroys an instance: it only decides.
// Profile sizes in the table are the published values of each model; a
// caller that talks to a real driver should build its model from what the
// driver reports (ModelFromProfiles).
package mig

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// ProfileID is a GPU instance profile id as NVML numbers it.
type ProfileID int

// GPU instance profile ids, stable across drivers and models (names are not:
// key profiles by id).
const (
	Profile1g       ProfileID = 19 // 1 slice, 1 memory slot
	Profile1gME     ProfileID = 20 // 1 slice, 1 memory slot, all media engines
	Profile1gDouble ProfileID = 15 // 1 slice, 2 memory slots
	Profile2g       ProfileID = 14 // 2 slices, 2 memory slots
	Profile3g       ProfileID = 9  // 3 slices, 4 memory slots
	Profile4g       ProfileID = 5  // 4 slices, 4 memory slots
	Profile7g       ProfileID = 0  // 7 slices, 8 memory slots: the whole GPU
)

// Geometry shared by every MIG-capable model in the table.
const (
	// ComputeSlices is the number of compute slices of a MIG GPU.
	ComputeSlices = 7
	// MemorySlots is the number of memory slots of a MIG GPU.
	MemorySlots = 8
)

// Error classes returned (wrapped, with context) by Check, Place and
// ParsePlacement. Test them with errors.Is.
var (
	// ErrUnknownProfile: the model has no profile with that id (or name).
	ErrUnknownProfile = errors.New("unknown mig profile")
	// ErrPlacementNotAllowed: the profile cannot start at that slot, or the
	// placement's size is not the profile's memory slot count.
	ErrPlacementNotAllowed = errors.New("placement not allowed for profile")
	// ErrOverlap: the placement shares memory slots with an existing
	// instance.
	ErrOverlap = errors.New("placement overlaps an existing instance")
	// ErrNoCapacity: the GPU has no room for the profile: compute slices
	// exhausted, the profile's instance limit reached, or no free placement.
	ErrNoCapacity = errors.New("no capacity for profile")
)

// Placement is a range of memory slots [Start, Start+Size).
type Placement struct {
	Start int
	Size  int
}

// String renders the placement as "start:size", e.g. "4:4", the form
// nvidia-smi prints in its placement lists.
func (p Placement) String() string {
	return strconv.Itoa(p.Start) + ":" + strconv.Itoa(p.Size)
}

// End is the first memory slot after the placement.
func (p Placement) End() int { return p.Start + p.Size }

// Overlaps reports whether the two placements share a memory slot. Empty
// placements overlap nothing.
func (p Placement) Overlaps(q Placement) bool {
	if p.Size <= 0 || q.Size <= 0 {
		return false
	}
	return p.Start < q.End() && q.Start < p.End()
}

// ParsePlacement parses the "start:size" form String produces. It checks
// syntax and that both numbers are small non-negative integers (size > 0),
// not whether any profile allows the placement.
func ParsePlacement(s string) (Placement, error) {
	start, size, ok := strings.Cut(s, ":")
	if !ok {
		return Placement{}, fmt.Errorf("parse placement %q: want start:size", s)
	}
	st, err := parseSlot(start)
	if err != nil {
		return Placement{}, fmt.Errorf("parse placement %q: start: %w", s, err)
	}
	sz, err := parseSlot(size)
	if err != nil {
		return Placement{}, fmt.Errorf("parse placement %q: size: %w", s, err)
	}
	if sz == 0 {
		return Placement{}, fmt.Errorf("parse placement %q: size must be positive", s)
	}
	return Placement{Start: st, Size: sz}, nil
}

// parseSlot accepts a decimal number in [0, 64]: more than any GPU has
// slots, small enough that Start+Size never overflows.
func parseSlot(s string) (int, error) {
	if s == "" || len(s) > 2 {
		return 0, fmt.Errorf("%q is not a slot number", s)
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return 0, fmt.Errorf("%q is not a slot number", s)
		}
	}
	n, err := strconv.Atoi(s)
	if err != nil || n > 64 {
		return 0, fmt.Errorf("%q is not a slot number", s)
	}
	return n, nil
}

// Instance is an existing (or planned) GPU instance: a profile at a
// placement.
type Instance struct {
	Profile   ProfileID
	Placement Placement
}

// Profile is one GPU instance profile of one GPU model.
type Profile struct {
	ID ProfileID
	// Name as nvidia-smi shows it without the "MIG " prefix, e.g. "1g.18gb".
	// Names drift between drivers; the id does not.
	Name string
	// Slices is the number of compute slices the profile uses.
	Slices int
	// MemorySlots is the number of memory slots (the placement size).
	MemorySlots int
	// Starts are the memory slots a placement of this profile may start at,
	// ascending.
	Starts []int
	// MaxCount is how many instances of the profile fit on an empty GPU and
	// the most that may exist at once.
	MaxCount int
	// MemoryMiB is the instance's memory as the driver reports it.
	MemoryMiB uint64
	// SMs is the instance's streaming multiprocessor count.
	SMs int
	// MediaExtensions: the instance owns the GPU's media engines (the +me
	// profiles).
	MediaExtensions bool
}

// Allows reports whether the profile may be placed at `at`: an allowed
// start and exactly the profile's memory slots (never an empty placement).
func (p Profile) Allows(at Placement) bool {
	if at.Size <= 0 || at.Size != p.MemorySlots {
		return false
	}
	for _, s := range p.Starts {
		if s == at.Start {
			return true
		}
	}
	return false
}

// Placements lists every placement the profile allows on an empty GPU,
// ascending by start.
func (p Profile) Placements() []Placement {
	out := make([]Placement, 0, len(p.Starts))
	for _, s := range p.Starts {
		out = append(out, Placement{Start: s, Size: p.MemorySlots})
	}
	return out
}

func (p Profile) clone() Profile {
	p.Starts = append([]int(nil), p.Starts...)
	return p
}
