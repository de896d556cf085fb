// Package status serves the running agent's state to operators on the host
// (`gpuaas-agent status`): the control-plane link, the journaled leases,
// the GPUs' MIG partitions, the leases' eBPF fences, and the last
// attestation challenge and telemetry report. It is a small HTTP/JSON API
// on a unix socket that only root (or a uid/gid the configuration names)
// may use: the socket is 0600 in a directory nobody else may write, and
// every connection's SO_PEERCRED is checked.
//
// It only reads: nothing here changes a lease, a partition or a fence, and
// a failure to serve never stops the agent.
//
// HTTP rather than gRPC: the document is read by a CLI and by operators
// with curl --unix-socket, it needs no streaming, and keeping it out of
// proto/ keeps a host-local diagnostic out of the control plane's
// compatibility contract.
package status

import (
	"context"
	"sort"
	"time"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/agent/isolation"
	"github.com/gpuaas/gpuaas/agent/lease"
	"github.com/gpuaas/gpuaas/agent/session"
)

// Path is the API's one resource.
const Path = "/v1/status"

// Snapshot is the agent's state as `gpuaas-agent status -json` prints it.
type Snapshot struct {
	Node    string    `json:"node"`
	Version string    `json:"version"`
	Time    time.Time `json:"time"`
	// ControlPlane is the session's link; Attestation and Telemetry come
	// from it too, and are repeated here for the reader.
	ControlPlane session.Status          `json:"control_plane"`
	Leases       []Lease                 `json:"leases"`
	Partitions   []Partition             `json:"partitions"`
	Fences       []Fence                 `json:"fences"`
	Attestation  session.ChallengeStatus `json:"attestation"`
	Telemetry    session.TelemetryStatus `json:"telemetry"`
	// Errors says which part could not be read (and why); that part is
	// then empty. Each is "part: error".
	Errors []string `json:"errors,omitempty"`
}

// Lease is one journaled lease.
type Lease struct {
	ID          string    `json:"id"`
	Phase       string    `json:"phase"`
	Reason      string    `json:"reason,omitempty"`
	GPU         string    `json:"gpu,omitempty"`
	MIGDevice   string    `json:"mig_device,omitempty"`
	GI          int       `json:"gi,omitempty"`
	CI          int       `json:"ci,omitempty"`
	Container   string    `json:"container,omitempty"`
	Fenced      bool      `json:"fenced"`
	StartTime   time.Time `json:"start_time,omitzero"`
	NotAfter    time.Time `json:"not_after,omitzero"`
	UpdateTime  time.Time `json:"update_time,omitzero"`
	ImageDigest string    `json:"image_digest,omitempty"`
}

// Partition is one MIG device of a GPU.
type Partition struct {
	GPU       string `json:"gpu"`
	UUID      string `json:"uuid"`
	GI        int    `json:"gi"`
	CI        int    `json:"ci"`
	Profile   int    `json:"profile"`
	Placement string `json:"placement"`
	MemoryMiB uint64 `json:"memory_mib"`
}

// Fence is what the kernel enforces for one lease.
type Fence struct {
	LeaseID  string         `json:"lease_id"`
	Cgroup   string         `json:"cgroup,omitempty"`
	Programs []FenceProgram `json:"programs"`
	// Verified: every program is attached to the lease's cgroup and its
	// tag is the tag of the program rebuilt from the lease's policy.
	Verified bool     `json:"verified"`
	Problems []string `json:"problems,omitempty"`
}

// FenceProgram is one attached program.
type FenceProgram struct {
	Attach      string `json:"attach"`
	ProgramID   uint32 `json:"program_id"`
	Tag         string `json:"tag"`
	Attached    bool   `json:"attached"`
	TagVerified bool   `json:"tag_verified"`
}

// Sources are where a snapshot is read from; each may be nil (that part
// is then reported as unavailable, except Fences: nil means isolation is
// off or unavailable, and Errors says so).
type Sources struct {
	Node, Version string
	Session       func() session.Status
	Journal       func() (map[string]lease.Record, error)
	// GPU lists the partitions.
	GPU gpu.Backend
	// Fences returns the fence enforcer, nil while there is none.
	Fences func() Fencer
}

// Fencer is the part of isolation.Enforcer a snapshot reads.
type Fencer interface {
	Leases() ([]string, error)
	Describe(leaseID string) (isolation.Description, error)
}

// Collect reads a snapshot. A part that cannot be read is named in
// Errors; the rest is still filled in.
func Collect(ctx context.Context, src Sources) *Snapshot {
	s := &Snapshot{Node: src.Node, Version: src.Version, Time: time.Now().UTC(), Leases: []Lease{}, Partitions: []Partition{}, Fences: []Fence{}}
	if src.Session != nil {
		s.ControlPlane = src.Session()
		s.Attestation, s.Telemetry = s.ControlPlane.Challenge, s.ControlPlane.Telemetry
	} else {
		s.Errors = append(s.Errors, "control_plane: no session")
	}
	if src.Journal != nil {
		recs, err := src.Journal()
		if err != nil {
			s.Errors = append(s.Errors, "leases: "+err.Error())
		}
		for _, r := range recs {
			s.Leases = append(s.Leases, leaseOf(r))
		}
		sort.Slice(s.Leases, func(i, j int) bool { return s.Leases[i].ID < s.Leases[j].ID })
	} else {
		s.Errors = append(s.Errors, "leases: no journal")
	}
	if src.GPU != nil {
		parts, err := partitions(ctx, src.GPU)
		if err != nil {
			s.Errors = append(s.Errors, "partitions: "+err.Error())
		}
		s.Partitions = append(s.Partitions, parts...)
	} else {
		s.Errors = append(s.Errors, "partitions: no GPU backend")
	}
	var enf Fencer
	if src.Fences != nil {
		enf = src.Fences()
	}
	if enf == nil {
		s.Errors = append(s.Errors, "fences: eBPF isolation is off or unavailable")
	} else {
		fences, err := fencesOf(enf)
		if err != nil {
			s.Errors = append(s.Errors, "fences: "+err.Error())
		}
		s.Fences = append(s.Fences, fences...)
	}
	return s
}

func leaseOf(r lease.Record) Lease {
	l := Lease{ID: r.LeaseID, Phase: r.Phase.String(), Reason: r.Reason, GPU: r.GPUUUID, MIGDevice: r.MIGUUID, Container: r.ContainerID,
		Fenced: r.Fenced, StartTime: r.StartTime, NotAfter: r.NotAfter, UpdateTime: r.UpdateTime, ImageDigest: r.ImageDigest}
	if r.HasGI {
		l.GI = r.GIID
	}
	if r.HasCI {
		l.CI = r.CIID
	}
	return l
}

// partitions lists every GPU's MIG devices, in GPU order. A GPU without
// MIG enabled has none.
func partitions(ctx context.Context, b gpu.Backend) ([]Partition, error) {
	devs, err := b.Devices(ctx)
	if err != nil {
		return nil, err
	}
	var out []Partition
	for _, d := range devs {
		mode, err := b.MIGMode(ctx, d.UUID)
		if err != nil || !mode.Current {
			continue
		}
		migs, err := b.MIGDevices(ctx, d.UUID)
		if err != nil {
			return out, err
		}
		for _, m := range migs {
			out = append(out, Partition{GPU: m.GPUUUID, UUID: m.UUID, GI: m.GPUInstanceID, CI: m.ComputeInstanceID,
				Profile: int(m.ProfileID), Placement: m.Placement.String(), MemoryMiB: m.MemoryMiB})
		}
	}
	return out, nil
}

// fencesOf describes every fenced lease; a lease that cannot be described
// is listed with the reason as its problem.
func fencesOf(enf Fencer) ([]Fence, error) {
	ids, err := enf.Leases()
	if err != nil {
		return nil, err
	}
	var out []Fence
	for _, id := range ids {
		d, err := enf.Describe(id)
		if err != nil {
			out = append(out, Fence{LeaseID: id, Programs: []FenceProgram{}, Problems: []string{err.Error()}})
			continue
		}
		out = append(out, fenceOf(d))
	}
	return out, nil
}

func fenceOf(d isolation.Description) Fence {
	f := Fence{LeaseID: d.LeaseID, Cgroup: d.Cgroup, Verified: d.Verified, Problems: d.Problems, Programs: []FenceProgram{}}
	for _, p := range d.Programs {
		f.Programs = append(f.Programs, FenceProgram{Attach: p.Attach, ProgramID: p.ProgramID, Tag: p.Tag, Attached: p.Attached, TagVerified: p.TagVerified})
	}
	return f
}
