package attest

import (
	"github.com/gpuaas/gpuaas/agent/isolation"
	"github.com/gpuaas/gpuaas/pkg/attestation"
)

// FenceKind maps an isolation program's hook to the fence kind a policy
// requires: the device program is the "device" fence, the connect and
// sendmsg programs together the "egress" fence.
func FenceKind(attach string) string {
	switch attach {
	case "device":
		return "device"
	case "connect4", "connect6", "sendmsg4", "sendmsg6":
		return "egress"
	}
	return attach
}

// FencesFromDescription turns what the kernel enforces for a lease (read
// back by isolation.Enforcer.Describe) into report fences. Only programs
// the kernel lists on the lease's cgroup and whose tag is the tag of the
// program built from the lease's policy count: a detached or altered
// program is no fence, so the verifier reports it missing.
func FencesFromDescription(d isolation.Description) []attestation.Fence {
	out := []attestation.Fence{}
	for _, p := range d.Programs {
		if !p.Attached || !p.TagVerified {
			continue
		}
		out = append(out, attestation.Fence{Kind: FenceKind(p.Attach), Attach: p.AttachType, ProgramID: p.ProgramID, Tag: p.Tag})
	}
	return out
}
