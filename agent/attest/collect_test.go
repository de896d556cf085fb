package attest_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	tpmsim "github.com/google/go-tpm/tpm2/transport/simulator"

	"github.com/gpuaas/gpuaas/agent/attest"
	"github.com/gpuaas/gpuaas/agent/gpu/sim"
	"github.com/gpuaas/gpuaas/agent/isolation"
	"github.com/gpuaas/gpuaas/pkg/attestation"
	"github.com/gpuaas/gpuaas/pkg/attestation/attestationtest"
	"github.com/gpuaas/gpuaas/pkg/mig"
)

var nonce = []byte("challenge-nonce-0123456789abcdef")

// host is a fake host: procfs and efivars under a temp dir, an agent
// binary and config file, and a two-GPU simulator with GPU 0 partitioned.
type host struct {
	cfg          attest.Config
	exeSHA, gpu0 string
	layout0      []attestation.MIGInstance
}

func newHost(t *testing.T, secureBoot []byte) *host {
	t.Helper()
	dir := t.TempDir()
	write := func(rel string, data []byte) string {
		p := filepath.Join(dir, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	exe := write("bin/gpuaas-agent", []byte("agent binary"))
	conf := write("etc/agent.yaml", []byte("node: node-a\n"))
	write("proc/sys/kernel/osrelease", []byte("6.18.0-test\n"))
	write("proc/cmdline", []byte("BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro\n"))
	write("proc/sys/kernel/random/boot_id", []byte("2f7d0e51-7e8b-4c3a-9b0e-0c7a4f1d2e3b\n"))
	efi := filepath.Join(dir, "efivars")
	if secureBoot != nil {
		write("efivars/"+attest.SecureBootVar, secureBoot)
	}
	s, err := sim.New(sim.Config{HostID: "node-a", GPUs: []sim.GPUConfig{{Model: "H200", MIGEnabled: true}, {Model: "H200"}}})
	if err != nil {
		t.Fatal(err)
	}
	devs, err := s.Devices(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	h := &host{gpu0: devs[0].UUID}
	for _, at := range []int{0, 4} {
		gi, err := s.CreateGPUInstance(t.Context(), h.gpu0, mig.Profile3g, mig.Placement{Start: at, Size: 4})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.CreateComputeInstance(t.Context(), h.gpu0, gi.ID); err != nil {
			t.Fatal(err)
		}
		h.layout0 = append(h.layout0, attestation.MIGInstance{ProfileID: int(mig.Profile3g), Start: at, Size: 4})
	}
	sum := sha256.Sum256([]byte("agent binary"))
	h.exeSHA = hex.EncodeToString(sum[:])
	h.cfg = attest.Config{
		Node: "node-a", Version: "test", Backend: s, ConfigPath: conf, ExePath: exe,
		ProcRoot: filepath.Join(dir, "proc"), EFIVarsDir: efi,
		ContainerdVersion: func(context.Context) (string, error) { return "1.6.20", nil },
		RuncVersion:       func(context.Context) (string, error) { return "", errors.New("runc not found") },
		Leases: func(context.Context) ([]attestation.LeaseEvidence, error) {
			return []attestation.LeaseEvidence{{LeaseID: "lease-1", GPUUUID: h.gpu0, ImageDigest: "sha256:00", Fences: attest.FencesFromDescription(isolation.Description{
				LeaseID: "lease-1",
				Programs: []isolation.ProgramDescription{
					{Attach: "device", AttachType: "CGroupDevice", ProgramID: 7, Tag: "0011223344556677", Attached: true, TagVerified: true},
					{Attach: "connect4", AttachType: "CGroupInet4Connect", ProgramID: 8, Tag: "8899aabbccddeeff", Attached: false, TagVerified: true},
				},
			})}}, nil
		},
	}
	return h
}

func TestCollectReportsEveryEvidenceField(t *testing.T) {
	h := newHost(t, []byte{0x06, 0, 0, 0, 1})
	c, err := attest.New(h.cfg)
	if err != nil {
		t.Fatal(err)
	}
	ca := attestationtest.NewCA(t)
	s, err := c.Respond(t.Context(), nonce, ca.AgentSVID(t, "node-a"))
	if err != nil {
		t.Fatal(err)
	}
	r, _, err := attestation.Verify(s, ca.Bundle(), attestationtest.TrustDomain)
	if err != nil {
		t.Fatal(err)
	}
	checks := map[string][2]string{
		"agent binary":   {r.Agent.BinarySHA256, h.exeSHA},
		"kernel release": {r.Host.KernelRelease, "6.18.0-test"},
		"cmdline":        {r.Host.KernelCmdline, "BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro"},
		"boot id":        {r.Host.BootID, "2f7d0e51-7e8b-4c3a-9b0e-0c7a4f1d2e3b"},
		"secure boot":    {r.Host.SecureBoot, attestation.SecureBootEnabled},
		"containerd":     {r.Runtime.ContainerdVersion, "1.6.20"},
		"runc":           {r.Runtime.RuncVersion, "unknown (runc not found)"},
		"driver":         {r.GPU.DriverVersion, sim.DefaultDriverVersion},
		"tpm":            {r.TPM.Status, attestation.TPMNotAvailable},
		"gpu0 cc":        {r.GPU.Devices[0].CC.Status, attestation.CCNotAvailable},
		"gpu1 mig":       {r.GPU.Devices[1].MIGMode, attestation.MIGDisabled},
	}
	for what, c := range checks {
		if c[0] != c[1] {
			t.Errorf("%s: %q, want %q", what, c[0], c[1])
		}
	}
	if len(r.GPU.Devices) != 2 || r.GPU.Devices[0].Serial == "" || r.GPU.Devices[0].VBIOSVersion == "" {
		t.Fatalf("gpus: %+v", r.GPU.Devices)
	}
	if got := r.GPU.Devices[0].MIGLayout; len(got) != 2 || got[1].Start != 4 || got[1].ProfileID != int(mig.Profile3g) || !strings.HasPrefix(got[0].MIGUUID, "MIG-") {
		t.Fatalf("mig layout: %+v", got)
	}
	// The detached connect4 program is not reported as a fence.
	if f := r.Leases[0].Fences; len(f) != 1 || f[0].Kind != "device" || f[0].ProgramID != 7 {
		t.Fatalf("fences: %+v", f)
	}
	// The simulated node passes a policy that allows its binary and
	// expects the layout the control plane placed, except that the egress
	// fence is missing.
	p := &attestation.Policy{AllowedAgentSHA256: []string{h.exeSHA}, RequiredFences: []string{"device", "egress"}, RequireSecureBoot: true}
	v := p.Evaluate(r, attestation.Expected{Node: "node-a", Nonce: nonce, Now: r.Time, MIGLayout: map[string][]attestation.MIGInstance{h.gpu0: h.layout0}})
	if f := v.Failed(); v.Status != attestation.StatusFail || len(f) != 1 || f[0].Name != "fence/lease-1/egress" {
		t.Fatalf("verdict %s, failed %+v", v.Status, f)
	}
}

func TestSecureBootState(t *testing.T) {
	for _, tc := range []struct {
		name string
		v    []byte
		want string
	}{
		{"enabled", []byte{6, 0, 0, 0, 1}, attestation.SecureBootEnabled},
		{"disabled", []byte{6, 0, 0, 0, 0}, attestation.SecureBootDisabled},
		{"truncated", []byte{6, 0}, "unknown (SecureBoot variable of 2 bytes)"},
		{"no efi", nil, attestation.SecureBootNoEFI},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHost(t, tc.v)
			c, err := attest.New(h.cfg)
			if err != nil {
				t.Fatal(err)
			}
			r, err := c.Collect(t.Context(), attestationtest.AgentSVIDID(t, "node-a"), nonce)
			if err != nil {
				t.Fatal(err)
			}
			if r.Host.SecureBoot != tc.want {
				t.Fatalf("secure boot %q, want %q", r.Host.SecureBoot, tc.want)
			}
		})
	}
}

func TestRespondRefusesAnotherNodesSVID(t *testing.T) {
	h := newHost(t, nil)
	c, err := attest.New(h.cfg)
	if err != nil {
		t.Fatal(err)
	}
	ca := attestationtest.NewCA(t)
	if _, err := c.Respond(t.Context(), nonce, ca.AgentSVID(t, "node-b")); err == nil {
		t.Fatal("answered with another node's svid")
	}
}

func TestGPUCCEvidence(t *testing.T) {
	h := newHost(t, nil)
	h.cfg.GPUCC = func(_ context.Context, uuid string, n []byte) (attestation.CCAttestation, bool, error) {
		if uuid == h.gpu0 {
			return attestation.CCAttestation{Status: attestation.CCAttested, Report: append([]byte("report:"), n...), Certificates: []byte("certs")}, true, nil
		}
		// Why there is none, in the backend's words.
		return attestation.CCAttestation{Status: "not available (driver without confidential-computing support)"}, false, nil
	}
	c, err := attest.New(h.cfg)
	if err != nil {
		t.Fatal(err)
	}
	r, err := c.Collect(t.Context(), attestationtest.AgentSVIDID(t, "node-a"), nonce)
	if err != nil {
		t.Fatal(err)
	}
	if r.GPU.Devices[0].CC.Status != attestation.CCAttested || r.GPU.Devices[1].CC.Status != "not available (driver without confidential-computing support)" {
		t.Fatalf("cc: %+v / %+v", r.GPU.Devices[0].CC, r.GPU.Devices[1].CC)
	}
	p := &attestation.Policy{AllowedAgentSHA256: []string{h.exeSHA}, RequireGPUCC: true}
	v := p.Evaluate(r, attestation.Expected{Now: r.Time})
	if f := v.Failed(); len(f) != 1 || f[0].Name != "gpu_cc/"+r.GPU.Devices[1].UUID || f[0].Actual != r.GPU.Devices[1].CC.Status {
		t.Fatalf("failed %+v", f)
	}
}

// openTPM starts the TPM simulator (one per process at a time).
func openTPM(t *testing.T) transport.TPMCloser {
	t.Helper()
	tpm, err := tpmsim.OpenSimulator()
	if err != nil {
		t.Fatalf("start tpm simulator: %v", err)
	}
	t.Cleanup(func() { tpm.Close() })
	return tpm
}

func extend(t *testing.T, tpm transport.TPM, pcr int, data string) {
	t.Helper()
	d := sha256.Sum256([]byte(data))
	_, err := tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(pcr), Auth: tpm2.PasswordAuth(nil)},
		Digests:   tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: d[:]}}},
	}.Execute(tpm)
	if err != nil {
		t.Fatal(err)
	}
}

// TPM simulator: a quote verifies; one with a wrong nonce, a tampered PCR
// value or a report changed after quoting does not.
func TestTPMQuote(t *testing.T) {
	tpm := openTPM(t)
	extend(t, tpm, 7, "secure boot policy")
	h := newHost(t, nil)
	h.cfg.TPM = tpm
	c, err := attest.New(h.cfg)
	if err != nil {
		t.Fatal(err)
	}
	ca := attestationtest.NewCA(t)
	svid := ca.AgentSVID(t, "node-a")
	s, err := c.Respond(t.Context(), nonce, svid)
	if err != nil {
		t.Fatal(err)
	}
	r, _, err := attestation.Verify(s, ca.Bundle(), attestationtest.TrustDomain)
	if err != nil {
		t.Fatal(err)
	}
	q := r.TPM.Quote
	if r.TPM.Status != attestation.TPMPresent || q == nil || len(q.PCRs) != 8 {
		t.Fatalf("tpm evidence: %+v", r.TPM)
	}
	pcr7 := q.PCRs[7].SHA256
	if pcr7 == strings.Repeat("00", 32) {
		t.Fatal("pcr 7 was not extended")
	}
	policy := &attestation.Policy{
		AllowedAgentSHA256: []string{h.exeSHA}, RequireTPM: true,
		PCRs:           []attestation.PCRValue{{Index: 0, SHA256: strings.Repeat("00", 32)}, {Index: 7, SHA256: pcr7}},
		AKPublicSHA256: map[string]string{"node-a": attestation.AKPublicSHA256(q.AKPublic)},
	}
	exp := attestation.Expected{Node: "node-a", Nonce: nonce, Now: r.Time}
	if v := policy.Evaluate(r, exp); v.Status != attestation.StatusPass {
		t.Fatalf("genuine quote: %s %+v", v.Status, v.Failed())
	}

	hash, err := attestation.HashWithoutQuote(r)
	if err != nil {
		t.Fatal(err)
	}
	t.Run("verifies", func(t *testing.T) {
		if err := attestation.VerifyQuote(q, attestation.QualifyingData(nonce, hash)); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("wrong nonce", func(t *testing.T) {
		err := attestation.VerifyQuote(q, attestation.QualifyingData([]byte("another-challenge-nonce-01234567"), hash))
		if !errors.Is(err, attestation.ErrQuote) || !strings.Contains(err.Error(), "qualifying data") {
			t.Fatalf("wrong nonce: %v", err)
		}
		// An agent key holder that re-signs the report for a newer nonce
		// cannot reuse the quote: the TPM check fails.
		r2 := *r
		r2.Nonce = []byte("another-challenge-nonce-01234567")
		s2, err := attestation.Sign(&r2, svid)
		if err != nil {
			t.Fatal(err)
		}
		v := policy.VerifyAndEvaluate(s2, attestation.NewVerifier(ca.Bundle(), attestationtest.TrustDomain, 0), attestation.Expected{Node: "node-a", Nonce: r2.Nonce, Now: r.Time})
		if c, _ := v.Check(attestation.CheckTPMQuote); v.Status != attestation.StatusFail || c.OK {
			t.Fatalf("replayed quote: %s %+v", v.Status, v.Failed())
		}
	})
	t.Run("tampered pcr value", func(t *testing.T) {
		tq := *q
		tq.PCRs = append([]attestation.PCRValue(nil), q.PCRs...)
		tq.PCRs[7].SHA256 = strings.Repeat("00", 32)
		err := attestation.VerifyQuote(&tq, attestation.QualifyingData(nonce, hash))
		if !errors.Is(err, attestation.ErrQuote) || !strings.Contains(err.Error(), "pcr digest") {
			t.Fatalf("tampered pcr: %v", err)
		}
	})
	t.Run("pcr differs from policy", func(t *testing.T) {
		p := *policy
		p.PCRs = []attestation.PCRValue{{Index: 7, SHA256: strings.Repeat("11", 32)}}
		v := p.Evaluate(r, exp)
		if c, ok := v.Check("pcr/7"); v.Status != attestation.StatusFail || !ok || c.OK || c.Actual != pcr7 {
			t.Fatalf("%s %+v", v.Status, v.Failed())
		}
	})
	t.Run("report changed after quoting", func(t *testing.T) {
		r2 := *r
		r2.Agent.BinarySHA256 = strings.Repeat("ee", 32)
		p := *policy
		p.AllowedAgentSHA256 = []string{r2.Agent.BinarySHA256}
		v := p.Evaluate(&r2, exp)
		if c, _ := v.Check(attestation.CheckTPMQuote); v.Status != attestation.StatusFail || c.OK {
			t.Fatalf("%s %+v", v.Status, v.Failed())
		}
	})
	t.Run("unpinned attestation key", func(t *testing.T) {
		p := *policy
		p.AKPublicSHA256 = map[string]string{"node-a": strings.Repeat("00", 32)}
		v := p.Evaluate(r, exp)
		if c, _ := v.Check(attestation.CheckTPMKey); v.Status != attestation.StatusFail || c.OK {
			t.Fatalf("%s %+v", v.Status, v.Failed())
		}
	})
}
