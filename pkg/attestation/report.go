package attestation

import (
	"bytes"
	"cmp"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"
)

// Format identifies version 1 of the report encoding. It is the first field
// of every report, so a signature over a report can never be taken for a
// signature over any other kind of document signed with the same key.
const Format = "gpuaas.attestation.report/v1"

// MaxReportSize bounds the encoded report a verifier will decode.
const MaxReportSize = 1 << 20

// Explicit statuses for evidence that is absent. Absent evidence is always
// stated, never an empty field.
const (
	CCNotAvailable     = "not available (CC mode off)"
	TPMNotAvailable    = "not available (no TPM)"
	SecureBootNoEFI    = "unknown (no EFI)"
	SecureBootEnabled  = "enabled"
	SecureBootDisabled = "disabled"
	TPMPresent         = "present"
	CCAttested         = "attested"
	MIGDisabled        = "disabled"
	MIGEnabled         = "enabled"
)

// Report is the evidence one agent gives for one challenge.
type Report struct {
	Format  string    `json:"format"`
	Node    string    `json:"node"`
	AgentID string    `json:"agent_id"` // spiffe://TD/gpuaas/agent/NODE
	Time    time.Time `json:"time"`
	Nonce   []byte    `json:"nonce"`

	Agent   AgentEvidence   `json:"agent"`
	Host    HostEvidence    `json:"host"`
	Runtime RuntimeEvidence `json:"runtime"`
	GPU     GPUEvidence     `json:"gpu"`
	Leases  []LeaseEvidence `json:"leases"`
	TPM     TPMEvidence     `json:"tpm"`
}

// AgentEvidence identifies the running agent.
type AgentEvidence struct {
	Version      string `json:"version"`
	BinarySHA256 string `json:"binary_sha256"` // lower-case hex of /proc/self/exe
	ConfigSHA256 string `json:"config_sha256"` // lower-case hex of the config file
	// TelemetryKey is the Ed25519 public key (32 bytes) that signs this
	// agent's telemetry reports until its next report: the report's SVID
	// signature vouches for it. Empty when the agent sends no telemetry.
	TelemetryKey []byte `json:"telemetry_key"`
}

// HostEvidence is the kernel and boot state.
type HostEvidence struct {
	KernelRelease string `json:"kernel_release"`
	KernelCmdline string `json:"kernel_cmdline"`
	BootID        string `json:"boot_id"`
	SecureBoot    string `json:"secure_boot"` // enabled, disabled or "unknown (...)"
}

// RuntimeEvidence is the container runtime stack.
type RuntimeEvidence struct {
	ContainerdVersion string `json:"containerd_version"`
	RuncVersion       string `json:"runc_version"`
}

// GPUEvidence is the driver and every GPU.
type GPUEvidence struct {
	DriverVersion string      `json:"driver_version"`
	Devices       []GPUDevice `json:"devices"`
}

// GPUDevice is one physical GPU.
type GPUDevice struct {
	Index        int    `json:"index"`
	UUID         string `json:"uuid"`
	Name         string `json:"name"`
	Serial       string `json:"serial"`
	VBIOSVersion string `json:"vbios_version"`
	// MIGMode is "enabled", "disabled" or "unknown (...)".
	MIGMode   string        `json:"mig_mode"`
	MIGLayout []MIGInstance `json:"mig_layout"`
	// CC is the GPU's confidential-computing attestation; its Status says
	// CCNotAvailable when the GPU is not in CC mode.
	CC CCAttestation `json:"cc"`
}

// MIGInstance is one GPU instance (and its compute instance's device).
type MIGInstance struct {
	GPUInstanceID int    `json:"gpu_instance_id"`
	ProfileID     int    `json:"profile_id"`
	Start         int    `json:"start"`
	Size          int    `json:"size"`
	MIGUUID       string `json:"mig_uuid"`
}

// CCAttestation is a GPU's confidential-computing evidence from NVML.
type CCAttestation struct {
	Status       string `json:"status"`
	Report       []byte `json:"report"`
	Certificates []byte `json:"certificates"`
}

// LeaseEvidence is one running lease on the node.
type LeaseEvidence struct {
	LeaseID     string  `json:"lease_id"`
	GPUUUID     string  `json:"gpu_uuid"`
	MIGUUID     string  `json:"mig_uuid"` // empty for a whole GPU
	ImageDigest string  `json:"image_digest"`
	Fences      []Fence `json:"fences"`
}

// Fence is one eBPF program enforcing isolation for a lease.
type Fence struct {
	Kind      string `json:"kind"`   // e.g. "device", "egress"
	Attach    string `json:"attach"` // e.g. "cgroup_device", "cgroup_inet4_connect"
	ProgramID uint32 `json:"program_id"`
	Tag       string `json:"tag"` // the kernel's program tag, hex
}

// TPMEvidence is the node's TPM quote, or why there is none.
type TPMEvidence struct {
	Status string    `json:"status"` // TPMPresent or "not available (...)"
	Quote  *TPMQuote `json:"quote"`
}

// TPMQuote is a TPM2_Quote over SHA-256 PCRs.
type TPMQuote struct {
	PCRs []PCRValue `json:"pcrs"`
	// Attest is the marshalled TPMS_ATTEST the TPM signed.
	Attest []byte `json:"attest"`
	// Signature is the marshalled TPMT_SIGNATURE over Attest.
	Signature []byte `json:"signature"`
	// AKPublic is the marshalled TPMT_PUBLIC of the attestation key.
	AKPublic []byte `json:"ak_public"`
}

// PCRValue is one SHA-256 PCR.
type PCRValue struct {
	Index  int    `json:"index"`
	SHA256 string `json:"sha256"` // lower-case hex
}

// ErrMalformed is the class of every decoding error.
var ErrMalformed = errors.New("malformed attestation report")

// normalize sorts every slice so that equal evidence encodes equally.
func (r *Report) normalize() {
	r.Time = r.Time.UTC()
	r.Nonce = nonNil(r.Nonce)
	r.Agent.TelemetryKey = nonNil(r.Agent.TelemetryKey)
	r.GPU.Devices = nonNil(r.GPU.Devices)
	r.Leases = nonNil(r.Leases)
	for i := range r.GPU.Devices {
		d := &r.GPU.Devices[i]
		d.MIGLayout = nonNil(d.MIGLayout)
		d.CC.Report = nonNil(d.CC.Report)
		d.CC.Certificates = nonNil(d.CC.Certificates)
	}
	for i := range r.Leases {
		r.Leases[i].Fences = nonNil(r.Leases[i].Fences)
	}
	if q := r.TPM.Quote; q != nil {
		q.PCRs = nonNil(q.PCRs)
		q.Attest = nonNil(q.Attest)
		q.Signature = nonNil(q.Signature)
		q.AKPublic = nonNil(q.AKPublic)
	}
	slices.SortFunc(r.GPU.Devices, func(a, b GPUDevice) int {
		return cmp.Or(cmp.Compare(a.Index, b.Index), cmp.Compare(a.UUID, b.UUID))
	})
	for i := range r.GPU.Devices {
		slices.SortFunc(r.GPU.Devices[i].MIGLayout, func(a, b MIGInstance) int {
			return cmp.Or(cmp.Compare(a.Start, b.Start), cmp.Compare(a.GPUInstanceID, b.GPUInstanceID), cmp.Compare(a.MIGUUID, b.MIGUUID))
		})
	}
	slices.SortFunc(r.Leases, func(a, b LeaseEvidence) int { return cmp.Compare(a.LeaseID, b.LeaseID) })
	for i := range r.Leases {
		slices.SortFunc(r.Leases[i].Fences, func(a, b Fence) int {
			return cmp.Or(cmp.Compare(a.Kind, b.Kind), cmp.Compare(a.Attach, b.Attach), cmp.Compare(a.ProgramID, b.ProgramID))
		})
	}
	if r.TPM.Quote != nil {
		slices.SortFunc(r.TPM.Quote.PCRs, func(a, b PCRValue) int { return cmp.Compare(a.Index, b.Index) })
	}
}

// Encode returns the canonical encoding of the report. It sorts the
// report's slices in place and sets Format when empty.
func Encode(r *Report) ([]byte, error) {
	if r.Format == "" {
		r.Format = Format
	}
	r.normalize()
	b, err := json.Marshal(r)
	if err != nil {
		return nil, fmt.Errorf("encode attestation report: %w", err)
	}
	if _, err := Decode(b); err == nil {
		return b, nil
	}
	// encoding/json rewrites invalid UTF-8 as \ufffd, which decodes to a
	// rune that re-encodes unescaped: one more pass reaches the fixpoint.
	var again Report
	if err := json.Unmarshal(b, &again); err != nil {
		return nil, fmt.Errorf("encode attestation report: %w", err)
	}
	again.normalize()
	b, err = json.Marshal(&again)
	if err != nil {
		return nil, fmt.Errorf("encode attestation report: %w", err)
	}
	if _, err := Decode(b); err != nil {
		return nil, fmt.Errorf("encode attestation report: %w", err)
	}
	*r = again
	return b, nil
}

// Decode parses canonical report bytes. Anything that is not exactly the
// canonical encoding of a version 1 report is ErrMalformed.
func Decode(b []byte) (*Report, error) {
	if len(b) > MaxReportSize {
		return nil, fmt.Errorf("%w: %d bytes, limit %d", ErrMalformed, len(b), MaxReportSize)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var r Report
	if err := dec.Decode(&r); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("%w: trailing data", ErrMalformed)
	}
	if r.Format != Format {
		return nil, fmt.Errorf("%w: format %q, want %q", ErrMalformed, r.Format, Format)
	}
	c := r
	c.normalize()
	again, err := json.Marshal(&c)
	if err != nil || !bytes.Equal(again, b) {
		return nil, fmt.Errorf("%w: not in canonical form", ErrMalformed)
	}
	return &r, nil
}

// Hash is SHA-256 of the canonical encoding.
func Hash(encoded []byte) [32]byte { return sha256.Sum256(encoded) }

// HashWithoutQuote is SHA-256 of the canonical encoding of the report with
// its TPM quote removed: the report hash that a quote's qualifying data
// binds. The report is not modified.
func HashWithoutQuote(r *Report) ([32]byte, error) {
	c := *r
	c.TPM.Quote = nil
	c.Leases = slices.Clone(r.Leases)
	c.GPU.Devices = slices.Clone(r.GPU.Devices)
	b, err := Encode(&c)
	if err != nil {
		return [32]byte{}, err
	}
	return sha256.Sum256(b), nil
}

// QualifyingData is the TPM quote's qualifying data for a challenge:
// SHA-256(nonce || reportHash).
func QualifyingData(nonce []byte, reportHash [32]byte) []byte {
	h := sha256.New()
	h.Write(nonce)
	h.Write(reportHash[:])
	return h.Sum(nil)
}

// nonNil gives the empty slice for nil, so that a report has one encoding
// ("[]" or "", never also "null").
func nonNil[S ~[]E, E any](s S) S {
	if s == nil {
		return S{}
	}
	return s
}
