//go:build cgo

package nvml

import (
	"bytes"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxh200"
	mockserver "github.com/NVIDIA/go-nvml/pkg/nvml/mock/server"
)

// ccServer is the DGX H200 mock with a driver that has the CC functions
// (or not) and a system CC state.
func ccServer(t *testing.T, symbols bool, feature uint32) (*mockserver.Server, *Backend) {
	t.Helper()
	server := dgxh200.New()
	patchMock(server)
	server.ExtensionsFunc = func() nvml.ExtendedInterface {
		return &mock.ExtendedInterface{LookupSymbolFunc: func(string) error {
			if symbols {
				return nil
			}
			return nvml.ERROR_FUNCTION_NOT_FOUND
		}}
	}
	server.SystemGetConfComputeStateFunc = func() (nvml.ConfComputeSystemState, nvml.Return) {
		return nvml.ConfComputeSystemState{CcFeature: feature}, nvml.SUCCESS
	}
	b, err := newWithInterface(server, Options{Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return server, b
}

// TestConfidentialComputeEvidence: with CC on, the GPU's report over the
// challenge nonce and its certificate chain come back as the driver gives
// them; with CC off, or a driver without the functions, the evidence says
// so and nothing is read.
func TestConfidentialComputeEvidence(t *testing.T) {
	nonce := bytes.Repeat([]byte{0x5a}, 32)
	server, b := ccServer(t, true, nvml.CC_SYSTEM_FEATURE_ENABLED)
	dev := server.Devices[0].(*mockserver.Device)
	dev.GetConfComputeGpuAttestationReportFunc = func(r *nvml.ConfComputeGpuAttestationReport) nvml.Return {
		if !bytes.Equal(r.Nonce[:], nonce) {
			t.Errorf("the driver got nonce %x, want the challenge's", r.Nonce)
		}
		copy(r.AttestationReport[:], "report-over-nonce")
		r.AttestationReportSize = uint32(len("report-over-nonce"))
		return nvml.SUCCESS
	}
	dev.GetConfComputeGpuCertificateFunc = func() (nvml.ConfComputeGpuCertificate, nvml.Return) {
		var c nvml.ConfComputeGpuCertificate
		copy(c.AttestationCertChain[:], "cert-chain")
		c.AttestationCertChainSize = uint32(len("cert-chain"))
		return c, nvml.SUCCESS
	}
	ev, err := b.ConfidentialCompute(t.Context(), dev.UUID, nonce)
	if err != nil || ev.Status != ccAttested || string(ev.Report) != "report-over-nonce" || string(ev.Certificates) != "cert-chain" {
		t.Fatalf("CC on: %+v, %v", ev, err)
	}
	// A size beyond the buffer is refused, not read past.
	dev.GetConfComputeGpuCertificateFunc = func() (nvml.ConfComputeGpuCertificate, nvml.Return) {
		return nvml.ConfComputeGpuCertificate{AttestationCertChainSize: 1 << 20}, nvml.SUCCESS
	}
	if _, err := b.ConfidentialCompute(t.Context(), dev.UUID, nonce); err == nil {
		t.Fatal("an out-of-range size was accepted")
	}

	_, off := ccServer(t, true, nvml.CC_SYSTEM_FEATURE_DISABLED)
	if ev, err := off.ConfidentialCompute(t.Context(), dev.UUID, nonce); err != nil || ev.Status != ccOff || ev.Report != nil {
		t.Fatalf("CC off: %+v, %v", ev, err)
	}
	_, old := ccServer(t, false, nvml.CC_SYSTEM_FEATURE_ENABLED)
	if ev, err := old.ConfidentialCompute(t.Context(), dev.UUID, nonce); err != nil || ev.Status != ccNoDriver {
		t.Fatalf("driver without CC: %+v, %v", ev, err)
	}
}
