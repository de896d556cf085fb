package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"

	"github.com/gpuaas/gpuaas/agent/attest"
	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/agent/isolation"
	"github.com/gpuaas/gpuaas/agent/lease"
	"github.com/gpuaas/gpuaas/agent/runtime"
	"github.com/gpuaas/gpuaas/agent/telemetry"
	"github.com/gpuaas/gpuaas/pkg/attestation"
	"github.com/gpuaas/gpuaas/pkg/identity"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// sessionAttester answers the control plane's challenges with the
// collector's evidence, signed with the agent's current SVID.
type sessionAttester struct {
	c   *attest.Collector
	src identity.Source
}

func (a sessionAttester) Respond(ctx context.Context, nonce []byte) (*agentv1.ChallengeResponse, error) {
	svid, err := a.src.GetX509SVID()
	if err != nil {
		return nil, fmt.Errorf("answer attestation challenge: %w", err)
	}
	s, err := a.c.Respond(ctx, nonce, svid)
	if err != nil {
		return nil, err
	}
	return &agentv1.ChallengeResponse{Nonce: s.Nonce, Report: s.Report, Signature: s.Signature}, nil
}

// holdsDevice reports whether a lease in phase p holds its partition.
func holdsDevice(p leasev1.Phase) bool {
	switch p {
	case leasev1.Phase_PHASE_PROVISIONING, leasev1.Phase_PHASE_RUNNING, leasev1.Phase_PHASE_TERMINATING:
		return true
	}
	return false
}

// leaseEvidence lists the running leases with the fences the kernel
// enforces for each (read back, tag-verified; none without a fencer).
func leaseEvidence(j *lease.Journal, fencer func() *isolation.Enforcer) func(context.Context) ([]attestation.LeaseEvidence, error) {
	return func(context.Context) ([]attestation.LeaseEvidence, error) {
		recs, err := j.Records()
		if err != nil {
			return nil, err
		}
		out := []attestation.LeaseEvidence{}
		enf := fencer()
		for id, r := range recs {
			if r.Phase != leasev1.Phase_PHASE_RUNNING {
				continue
			}
			le := attestation.LeaseEvidence{LeaseID: id, GPUUUID: r.GPUUUID, MIGUUID: r.MIGUUID, ImageDigest: r.ImageDigest, Fences: []attestation.Fence{}}
			if enf != nil {
				d, err := enf.Describe(id)
				if err == nil {
					le.Fences = attest.FencesFromDescription(d)
				} else if !errors.Is(err, isolation.ErrNotFenced) {
					return nil, fmt.Errorf("describe the fence of lease %s: %w", id, err)
				}
			}
			out = append(out, le)
		}
		return out, nil
	}
}

// attribution maps each device a lease holds (its MIG device, or its GPU
// for a whole-GPU lease) to the lease and its tenant, for telemetry.
func attribution(j *lease.Journal, log *slog.Logger) func() map[string]telemetry.Attribution {
	return func() map[string]telemetry.Attribution {
		recs, err := j.Records()
		if err != nil {
			log.Warn("telemetry attribution: read journal", "err", err)
			return nil
		}
		desired, _, err := j.Desired()
		if err != nil {
			log.Warn("telemetry attribution: read desired state", "err", err)
		}
		out := map[string]telemetry.Attribution{}
		for id, r := range recs {
			if !holdsDevice(r.Phase) {
				continue
			}
			dev := r.MIGUUID
			if dev == "" {
				dev = r.GPUUUID
			}
			if dev == "" {
				continue
			}
			out[dev] = telemetry.Attribution{LeaseID: id, Tenant: desired[id].GetSpec().GetTenant()}
		}
		return out
	}
}

// openTPM opens the configured TPM device: "" looks for /dev/tpmrm0 and
// goes without when there is none; "none" never uses one.
func openTPM(path string, log *slog.Logger) (transport.TPMCloser, error) {
	switch path {
	case "none":
		return nil, nil
	case "":
		path = "/dev/tpmrm0"
		if _, err := os.Stat(path); err != nil {
			log.Info("no TPM: attestation reports say so", "device", path)
			return nil, nil
		}
	}
	t, err := linuxtpm.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open tpm %s: %w", path, err)
	}
	return t, nil
}

// newCollector builds the attestation collector.
func newCollector(cfg *Config, cfgPath string, backend gpu.Backend, rt *runtime.Containerd, tpm transport.TPM, j *lease.Journal,
	fencer func() *isolation.Enforcer, telemetryKey []byte) (*attest.Collector, error) {
	return attest.New(attest.Config{
		Node: cfg.Node, Version: version, Backend: backend, ConfigPath: cfgPath,
		ContainerdVersion: func(ctx context.Context) (string, error) { c, _, err := rt.Versions(ctx); return c, err },
		RuncVersion: func(ctx context.Context) (string, error) {
			_, r, err := rt.Versions(ctx)
			return r, err
		},
		Leases:       leaseEvidence(j, fencer),
		GPUCC:        gpuCC(backend),
		TPM:          tpm,
		PCRs:         cfg.Attestation.PCRs,
		TelemetryKey: telemetryKey,
	})
}

// gpuCC reads GPUs' confidential-computing evidence through the backend
// when it can (NVML); nil otherwise, and the reports say "not available".
func gpuCC(backend gpu.Backend) func(context.Context, string, []byte) (attestation.CCAttestation, bool, error) {
	cc, ok := backend.(gpu.CCAttester)
	if !ok {
		return nil
	}
	return func(ctx context.Context, uuid string, nonce []byte) (attestation.CCAttestation, bool, error) {
		ev, err := cc.ConfidentialCompute(ctx, uuid, nonce)
		if err != nil {
			return attestation.CCAttestation{}, false, err
		}
		if len(ev.Report) == 0 {
			return attestation.CCAttestation{Status: ev.Status}, false, nil
		}
		return attestation.CCAttestation{Status: attestation.CCAttested, Report: ev.Report, Certificates: ev.Certificates}, true, nil
	}
}
