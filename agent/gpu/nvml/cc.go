//go:build cgo

package nvml

import (
	"context"
	"crypto/sha256"
	"fmt"

	"github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/gpuaas/gpuaas/agent/gpu"
)

// CC evidence statuses.
const (
	ccAttested     = "attested"
	ccOff          = "not available (CC mode off)"
	ccNoDriver     = "not available (driver without confidential-computing support)"
	ccNotSupported = "not available (not supported on this system)"
)

var _ gpu.CCAttester = (*Backend)(nil)

// ConfidentialCompute reads a GPU's confidential-computing attestation
// report over nonce and its attestation certificate chain, when the system
// is in CC mode; otherwise it says why there is none. Read-only: it never
// changes the CC mode or any setting. NVML takes a 32-byte nonce; a nonce
// of another length is bound through its SHA-256.
func (b *Backend) ConfidentialCompute(ctx context.Context, gpuUUID string, nonce []byte) (ev gpu.CCEvidence, err error) {
	done, err := b.enter(ctx, "read confidential-computing evidence of "+gpuUUID)
	if err != nil {
		return gpu.CCEvidence{}, err
	}
	defer done(&err)
	for _, sym := range []string{"nvmlSystemGetConfComputeState", "nvmlDeviceGetConfComputeGpuAttestationReport", "nvmlDeviceGetConfComputeGpuCertificate"} {
		if !b.has(sym) {
			return gpu.CCEvidence{Status: ccNoDriver}, nil
		}
	}
	st, ret := b.lib.SystemGetConfComputeState()
	switch ret {
	case nvml.SUCCESS:
	case nvml.ERROR_NOT_SUPPORTED:
		return gpu.CCEvidence{Status: ccNotSupported}, nil
	default:
		return gpu.CCEvidence{}, mapReturn("read the confidential-computing state", ret)
	}
	if st.CcFeature != nvml.CC_SYSTEM_FEATURE_ENABLED {
		return gpu.CCEvidence{Status: ccOff}, nil
	}
	dev, err := b.gpuByUUID(gpuUUID)
	if err != nil {
		return gpu.CCEvidence{}, err
	}
	var rep nvml.ConfComputeGpuAttestationReport
	if len(nonce) == len(rep.Nonce) {
		copy(rep.Nonce[:], nonce)
	} else {
		rep.Nonce = sha256.Sum256(nonce)
	}
	if ret := dev.GetConfComputeGpuAttestationReport(&rep); ret != nvml.SUCCESS {
		return gpu.CCEvidence{}, mapReturn("read the gpu attestation report", ret)
	}
	cert, ret := dev.GetConfComputeGpuCertificate()
	if ret != nvml.SUCCESS {
		return gpu.CCEvidence{}, mapReturn("read the gpu attestation certificate", ret)
	}
	if int(rep.AttestationReportSize) > len(rep.AttestationReport) || int(cert.AttestationCertChainSize) > len(cert.AttestationCertChain) ||
		rep.AttestationReportSize == 0 {
		return gpu.CCEvidence{}, fmt.Errorf("read the gpu attestation report: the driver returned sizes out of range (report %d, certificates %d)",
			rep.AttestationReportSize, cert.AttestationCertChainSize)
	}
	return gpu.CCEvidence{Status: ccAttested,
		Report:       append([]byte(nil), rep.AttestationReport[:rep.AttestationReportSize]...),
		Certificates: append([]byte(nil), cert.AttestationCertChain[:cert.AttestationCertChainSize]...),
	}, nil
}
