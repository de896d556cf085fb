package attest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/pkg/attestation"
	"github.com/gpuaas/gpuaas/pkg/identity"
)

// Defaults of Config.
const (
	DefaultProcRoot   = "/proc"
	DefaultEFIVarsDir = "/sys/firmware/efi/efivars"
	// SecureBootVar is the EFI global variable holding the secure boot
	// state: 4 bytes of attributes, then one byte, 1 when enabled.
	SecureBootVar = "SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"
	// maxEvidenceFile bounds what is read of a procfs or efivars file.
	maxEvidenceFile = 64 << 10
)

// DefaultPCRs are the PCRs quoted when Config.PCRs is empty: the firmware,
// boot loader and secure boot policy measurements (PC Client 0-7).
var DefaultPCRs = []int{0, 1, 2, 3, 4, 5, 6, 7}

// Config says where evidence comes from. Every source is injectable so the
// collector runs against fakes in tests.
type Config struct {
	// Node is this agent's node name; reports are refused for an SVID of
	// another node.
	Node string
	// Version is the agent's version string.
	Version string
	// Backend is the GPU driver seam (nvml or sim). Required.
	Backend gpu.Backend
	// ConfigPath is the agent's configuration file, hashed into the report.
	ConfigPath string
	// ExePath is the agent binary; default ProcRoot/self/exe.
	ExePath string
	// ProcRoot is procfs; default DefaultProcRoot.
	ProcRoot string
	// EFIVarsDir is efivarfs; default DefaultEFIVarsDir.
	EFIVarsDir string
	// ContainerdVersion and RuncVersion report the runtime's versions;
	// nil reports "unknown (not configured)".
	ContainerdVersion func(context.Context) (string, error)
	RuncVersion       func(context.Context) (string, error)
	// Leases lists the running leases with their fences (see
	// FencesFromDescription); nil means the node runs none.
	Leases func(context.Context) ([]attestation.LeaseEvidence, error)
	// GPUCC returns a GPU's confidential-computing attestation report and
	// certificates through NVML; nil, or ok false without a Status,
	// reports attestation.CCNotAvailable; ok false with a Status reports
	// that status (why there is none).
	GPUCC func(ctx context.Context, gpuUUID string, nonce []byte) (cc attestation.CCAttestation, ok bool, err error)
	// TPM is the TPM transport (e.g. transport.OpenTPM("/dev/tpmrm0"));
	// nil reports attestation.TPMNotAvailable. Its user must not share it
	// with other goroutines while Collect runs.
	TPM transport.TPM
	// PCRs to quote; default DefaultPCRs.
	PCRs []int
	// Now is the report clock; default time.Now.
	Now func() time.Time
	// TelemetryKey is the public key of the agent's telemetry signer,
	// vouched for by each report; nil when the agent sends no telemetry.
	TelemetryKey []byte
}

// Collector gathers reports. It is safe for sequential use; the session
// answers one challenge at a time.
type Collector struct {
	cfg Config
}

// New checks the configuration and returns a collector.
func New(cfg Config) (*Collector, error) {
	if cfg.Backend == nil {
		return nil, errors.New("new attestation collector: no gpu backend")
	}
	if err := identity.ValidateNodeName(cfg.Node); err != nil {
		return nil, fmt.Errorf("new attestation collector: %w", err)
	}
	if cfg.ProcRoot == "" {
		cfg.ProcRoot = DefaultProcRoot
	}
	if cfg.ExePath == "" {
		cfg.ExePath = filepath.Join(cfg.ProcRoot, "self", "exe")
	}
	if cfg.EFIVarsDir == "" {
		cfg.EFIVarsDir = DefaultEFIVarsDir
	}
	if len(cfg.PCRs) == 0 {
		cfg.PCRs = DefaultPCRs
	}
	for _, p := range cfg.PCRs {
		if p < 0 || p > attestation.MaxPCR {
			return nil, fmt.Errorf("new attestation collector: pcr %d out of range 0..%d", p, attestation.MaxPCR)
		}
	}
	cfg.PCRs = slices.Compact(slices.Sorted(slices.Values(cfg.PCRs)))
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Collector{cfg: cfg}, nil
}

// Respond answers a challenge: it collects a report for nonce and signs it
// with the SVID, which must be this node's agent SVID. The result's fields
// are the ChallengeResponse's.
func (c *Collector) Respond(ctx context.Context, nonce []byte, svid *x509svid.SVID) (attestation.Signed, error) {
	if svid == nil {
		return attestation.Signed{}, errors.New("answer attestation challenge: no svid")
	}
	if node, ok := identity.ParseAgentNode(svid.ID); !ok || node != c.cfg.Node {
		return attestation.Signed{}, fmt.Errorf("answer attestation challenge: svid %s is not the agent of node %s", svid.ID, c.cfg.Node)
	}
	r, err := c.Collect(ctx, svid.ID, nonce)
	if err != nil {
		return attestation.Signed{}, err
	}
	return attestation.Sign(r, svid)
}

// Collect gathers the evidence for a challenge nonce, quoting the TPM when
// there is one. Unreadable host evidence is reported as "unknown (why)";
// a GPU backend, lease source or TPM failure is an error (the challenge
// then goes unanswered and the verifier marks the node STALE).
func (c *Collector) Collect(ctx context.Context, agentID spiffeid.ID, nonce []byte) (*attestation.Report, error) {
	r := &attestation.Report{
		Format:  attestation.Format,
		Node:    c.cfg.Node,
		AgentID: agentID.String(),
		Time:    c.cfg.Now().UTC(),
		Nonce:   slices.Clone(nonce),
	}
	r.Agent = attestation.AgentEvidence{
		Version:      orUnknown(c.cfg.Version, nil),
		BinarySHA256: orUnknown(fileSHA256(c.cfg.ExePath)),
		ConfigSHA256: "unknown (no config file)",
		TelemetryKey: slices.Clone(c.cfg.TelemetryKey),
	}
	if c.cfg.ConfigPath != "" {
		r.Agent.ConfigSHA256 = orUnknown(fileSHA256(c.cfg.ConfigPath))
	}
	r.Host = attestation.HostEvidence{
		KernelRelease: orUnknown(readTrimmed(filepath.Join(c.cfg.ProcRoot, "sys", "kernel", "osrelease"))),
		KernelCmdline: orUnknown(readTrimmed(filepath.Join(c.cfg.ProcRoot, "cmdline"))),
		BootID:        orUnknown(readTrimmed(filepath.Join(c.cfg.ProcRoot, "sys", "kernel", "random", "boot_id"))),
		SecureBoot:    secureBoot(c.cfg.EFIVarsDir),
	}
	r.Runtime = attestation.RuntimeEvidence{
		ContainerdVersion: version(ctx, c.cfg.ContainerdVersion),
		RuncVersion:       version(ctx, c.cfg.RuncVersion),
	}
	var err error
	if r.GPU, err = c.gpus(ctx, nonce); err != nil {
		return nil, err
	}
	r.Leases = []attestation.LeaseEvidence{}
	if c.cfg.Leases != nil {
		if r.Leases, err = c.cfg.Leases(ctx); err != nil {
			return nil, fmt.Errorf("collect attestation evidence: leases: %w", err)
		}
	}
	r.TPM = attestation.TPMEvidence{Status: attestation.TPMNotAvailable}
	if c.cfg.TPM != nil {
		r.TPM.Status = attestation.TPMPresent
		reportHash, err := attestation.HashWithoutQuote(r)
		if err != nil {
			return nil, err
		}
		q, err := Quote(c.cfg.TPM, c.cfg.PCRs, attestation.QualifyingData(nonce, reportHash))
		if err != nil {
			return nil, fmt.Errorf("collect attestation evidence: %w", err)
		}
		r.TPM.Quote = q
	}
	return r, nil
}

func (c *Collector) gpus(ctx context.Context, nonce []byte) (attestation.GPUEvidence, error) {
	var ev attestation.GPUEvidence
	drv, err := c.cfg.Backend.DriverVersion(ctx)
	if err != nil {
		return ev, fmt.Errorf("collect attestation evidence: driver version: %w", err)
	}
	ev.DriverVersion = drv
	devs, err := c.cfg.Backend.Devices(ctx)
	if err != nil {
		return ev, fmt.Errorf("collect attestation evidence: gpus: %w", err)
	}
	ev.Devices = make([]attestation.GPUDevice, 0, len(devs))
	for _, d := range devs {
		gd := attestation.GPUDevice{
			Index: d.Index, UUID: d.UUID, Name: d.Name, Serial: d.Serial, VBIOSVersion: d.VBIOSVersion,
			MIGMode: attestation.MIGDisabled, MIGLayout: []attestation.MIGInstance{},
			CC: attestation.CCAttestation{Status: attestation.CCNotAvailable},
		}
		if !d.MIGCapable {
			gd.MIGMode = "not supported"
		} else if err := c.migLayout(ctx, &gd); err != nil {
			return ev, err
		}
		if c.cfg.GPUCC != nil {
			cc, ok, err := c.cfg.GPUCC(ctx, d.UUID, nonce)
			switch {
			case err != nil:
				gd.CC = attestation.CCAttestation{Status: "unknown (" + err.Error() + ")"}
			case ok:
				gd.CC = cc
			case cc.Status != "":
				// Why there is none, in the backend's words (CC mode off,
				// a driver without CC support...).
				gd.CC = attestation.CCAttestation{Status: cc.Status}
			}
		}
		ev.Devices = append(ev.Devices, gd)
	}
	return ev, nil
}

func (c *Collector) migLayout(ctx context.Context, gd *attestation.GPUDevice) error {
	mode, err := c.cfg.Backend.MIGMode(ctx, gd.UUID)
	if err != nil {
		return fmt.Errorf("collect attestation evidence: mig mode of %s: %w", gd.UUID, err)
	}
	if !mode.Current {
		if mode.Pending {
			gd.MIGMode = attestation.MIGDisabled + " (enable pending)"
		}
		return nil
	}
	gd.MIGMode = attestation.MIGEnabled
	if !mode.Pending {
		gd.MIGMode += " (disable pending)"
	}
	gis, err := c.cfg.Backend.GPUInstances(ctx, gd.UUID)
	if err != nil {
		return fmt.Errorf("collect attestation evidence: gpu instances of %s: %w", gd.UUID, err)
	}
	mdevs, err := c.cfg.Backend.MIGDevices(ctx, gd.UUID)
	if err != nil {
		return fmt.Errorf("collect attestation evidence: mig devices of %s: %w", gd.UUID, err)
	}
	byGI := map[int]string{}
	for _, m := range mdevs {
		if _, ok := byGI[m.GPUInstanceID]; !ok {
			byGI[m.GPUInstanceID] = m.UUID
		}
	}
	for _, gi := range gis {
		gd.MIGLayout = append(gd.MIGLayout, attestation.MIGInstance{
			GPUInstanceID: gi.ID, ProfileID: int(gi.ProfileID), Start: gi.Placement.Start, Size: gi.Placement.Size, MIGUUID: byGI[gi.ID],
		})
	}
	return nil
}

func secureBoot(efivars string) string {
	if _, err := os.Stat(efivars); err != nil {
		return attestation.SecureBootNoEFI
	}
	b, err := readLimited(filepath.Join(efivars, SecureBootVar))
	switch {
	case errors.Is(err, os.ErrNotExist):
		return "unknown (no SecureBoot variable)"
	case err != nil:
		return "unknown (" + err.Error() + ")"
	case len(b) != 5:
		return fmt.Sprintf("unknown (SecureBoot variable of %d bytes)", len(b))
	case b[4] == 1:
		return attestation.SecureBootEnabled
	case b[4] == 0:
		return attestation.SecureBootDisabled
	}
	return fmt.Sprintf("unknown (SecureBoot value %d)", b[4])
}

func version(ctx context.Context, fn func(context.Context) (string, error)) string {
	if fn == nil {
		return "unknown (not configured)"
	}
	return orUnknown(fn(ctx))
}

func orUnknown(v string, err error) string {
	switch {
	case err != nil:
		return "unknown (" + err.Error() + ")"
	case v == "":
		return "unknown (empty)"
	}
	return v
}

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("hash %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func readLimited(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, maxEvidenceFile))
}

// readTrimmed reads a procfs value; NULs (as in a cmdline) become spaces.
func readTrimmed(path string) (string, error) {
	b, err := readLimited(path)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(bytes.ReplaceAll(b, []byte{0}, []byte{' '}))), nil
}
