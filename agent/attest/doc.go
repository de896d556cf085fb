// Package attest collects the evidence of an attestation report on the
// agent's host: the agent binary and configuration digests, kernel and boot
// state, secure boot, the GPUs through the gpu.Backend seam (driver, UUID,
// serial, VBIOS, MIG layout, confidential-computing evidence), the running
// leases with the eBPF programs fencing them, the container runtime
// versions, and, where the host has a TPM, a TPM2_Quote whose qualifying
// data binds the challenge nonce and the rest of the report.
//
// Report format, signing and verification are pkg/attestation's; this
// package only gathers and signs with the agent's SVID.
//
// What it must never do: omit evidence it could not read (an unreadable
// item is reported as "unknown (why)", a missing TPM or CC mode as "not
// available (why)"); answer for another node than its SVID names; log or
// return key material.
package attest
