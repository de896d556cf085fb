// Package attestationtest provides fixtures for tests of attestation
// reports: a development CA that issues agent SVIDs, and a complete sample
// report. It is for tests only and must never back a production verifier.
package attestationtest

import (
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/gpuaas/gpuaas/pkg/attestation"
	"github.com/gpuaas/gpuaas/pkg/identity"
)

// TrustDomain is the fixtures' trust domain.
var TrustDomain = spiffeid.RequireTrustDomainFromString("gpuaas.test")

// AgentSHA256 is the sample report's agent binary digest.
var AgentSHA256 = strings.Repeat("ab", 32)

// CA is a development CA for one trust domain.
type CA struct {
	ca *identity.CA
}

// NewCA returns a fresh CA in TrustDomain.
func NewCA(tb testing.TB) *CA {
	tb.Helper()
	ca, err := identity.NewCA(TrustDomain, 24*time.Hour)
	if err != nil {
		tb.Fatal(err)
	}
	return &CA{ca: ca}
}

// Bundle is the CA's trust bundle.
func (c *CA) Bundle() *x509bundle.Bundle { return c.ca.Bundle() }

// AgentSVID issues the agent SVID of node, valid for an hour around now.
func (c *CA) AgentSVID(tb testing.TB, node string) *x509svid.SVID {
	tb.Helper()
	id, err := identity.AgentID(TrustDomain, node)
	if err != nil {
		tb.Fatal(err)
	}
	now := time.Now()
	svid, err := c.ca.IssueSVID(id, now.Add(-time.Hour), now.Add(time.Hour))
	if err != nil {
		tb.Fatal(err)
	}
	return svid
}

// Report is a complete report of node answering nonce at t: two H200s, one
// partitioned, one lease with device and egress fences, no TPM.
func Report(node string, nonce []byte, t time.Time) *attestation.Report {
	id, _ := identity.AgentID(TrustDomain, node)
	return &attestation.Report{
		Node:    node,
		AgentID: id.String(),
		Time:    t,
		Nonce:   nonce,
		Agent:   attestation.AgentEvidence{Version: "test", BinarySHA256: AgentSHA256, ConfigSHA256: strings.Repeat("cd", 32)},
		Host: attestation.HostEvidence{
			KernelRelease: "6.18.0", KernelCmdline: "BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro",
			BootID: "2f7d0e51-7e8b-4c3a-9b0e-0c7a4f1d2e3b", SecureBoot: attestation.SecureBootEnabled,
		},
		Runtime: attestation.RuntimeEvidence{ContainerdVersion: "1.6.20", RuncVersion: "1.1.5"},
		GPU: attestation.GPUEvidence{
			DriverVersion: "570.86.15",
			Devices: []attestation.GPUDevice{
				{Index: 0, UUID: "GPU-0", Name: "NVIDIA H200", Serial: "1650924060001", VBIOSVersion: "96.00.9F.00.01", MIGMode: attestation.MIGEnabled,
					MIGLayout: []attestation.MIGInstance{
						{GPUInstanceID: 1, ProfileID: 9, Start: 0, Size: 4, MIGUUID: "MIG-a"},
						{GPUInstanceID: 2, ProfileID: 9, Start: 4, Size: 4, MIGUUID: "MIG-b"},
					},
					CC: attestation.CCAttestation{Status: attestation.CCNotAvailable}},
				{Index: 1, UUID: "GPU-1", Name: "NVIDIA H200", Serial: "1650924060002", VBIOSVersion: "96.00.9F.00.01", MIGMode: attestation.MIGDisabled,
					CC: attestation.CCAttestation{Status: attestation.CCNotAvailable}},
			},
		},
		Leases: []attestation.LeaseEvidence{{
			LeaseID: "lease-1", GPUUUID: "GPU-0", MIGUUID: "MIG-a",
			ImageDigest: "sha256:" + strings.Repeat("0e", 32),
			Fences: []attestation.Fence{
				{Kind: "device", Attach: "cgroup_device", ProgramID: 41, Tag: "a1b2c3d4e5f60718"},
				{Kind: "egress", Attach: "cgroup_inet4_connect", ProgramID: 42, Tag: "0807060504030201"},
			},
		}},
		TPM: attestation.TPMEvidence{Status: attestation.TPMNotAvailable},
	}
}

// Policy is a policy the sample report passes.
func Policy() *attestation.Policy {
	return &attestation.Policy{
		AllowedAgentSHA256:    []string{AgentSHA256},
		AllowedDriverVersions: []string{"570.86.15"},
		RequiredFences:        []string{"device", "egress"},
		RequireSecureBoot:     true,
		MaxAge:                attestation.Duration(5 * time.Minute),
	}
}

// Expected is what a control plane expects of the sample report.
func Expected(node string, nonce []byte, now time.Time) attestation.Expected {
	return attestation.Expected{
		Node: node, Nonce: nonce, Now: now, CheckLeases: true,
		Leases: []attestation.ExpectedLease{{LeaseID: "lease-1", GPUUUID: "GPU-0", MIGUUID: "MIG-a", ImageDigest: "sha256:" + strings.Repeat("0e", 32)}},
		MIGLayout: map[string][]attestation.MIGInstance{
			"GPU-0": {{ProfileID: 9, Start: 0, Size: 4}, {ProfileID: 9, Start: 4, Size: 4}},
		},
	}
}

// AgentSVIDID is node's agent SPIFFE ID.
func AgentSVIDID(tb testing.TB, node string) spiffeid.ID {
	tb.Helper()
	id, err := identity.AgentID(TrustDomain, node)
	if err != nil {
		tb.Fatal(err)
	}
	return id
}
