package identity

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/gpuaas/gpuaas/pkg/config"
)

// ClosableSource is a Source the daemon closes when it stops.
type ClosableSource interface {
	Source
	Close() error
}

// DefaultWorkloadAPITimeout bounds the wait for the first SVID from the
// Workload API at start.
const DefaultWorkloadAPITimeout = 30 * time.Second

// Open returns the daemon's identity source as configured: the SPIFFE
// Workload API (SPIRE), whose SVIDs rotate through the stream the agent
// pushes, or watched files (NewFileSource). Either way the SVID must be in
// td: a Workload API that hands out another trust domain's SVID is refused.
func Open(ctx context.Context, cfg config.SVID, td spiffeid.TrustDomain, log *slog.Logger) (ClosableSource, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.WorkloadAPI == "" {
		return NewFileSource(ctx, FileSourceConfig{CertPath: cfg.Cert, KeyPath: cfg.Key, BundlePath: cfg.Bundle, TrustDomain: td, Logger: log})
	}
	return NewWorkloadSource(ctx, cfg.WorkloadAPI, td, DefaultWorkloadAPITimeout)
}

// WorkloadSource is a Source backed by the SPIFFE Workload API
// (go-spiffe's workloadapi.X509Source), confined to one trust domain.
type WorkloadSource struct {
	src *workloadapi.X509Source
	td  spiffeid.TrustDomain
}

// NewWorkloadSource connects to the Workload API at addr and waits (at most
// timeout) for the first SVID, which must belong to td.
func NewWorkloadSource(ctx context.Context, addr string, td spiffeid.TrustDomain, timeout time.Duration) (*WorkloadSource, error) {
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	src, err := workloadapi.NewX509Source(wctx, workloadapi.WithClientOptions(workloadapi.WithAddr(addr)))
	if err != nil {
		return nil, fmt.Errorf("%w: workload API %s: %v", ErrNoIdentity, addr, err)
	}
	s := &WorkloadSource{src: src, td: td}
	if _, err := s.GetX509SVID(); err != nil {
		src.Close()
		return nil, err
	}
	return s, nil
}

// GetX509SVID returns the current SVID; one outside the trust domain is an
// error (ErrNoIdentity).
func (s *WorkloadSource) GetX509SVID() (*x509svid.SVID, error) {
	svid, err := s.src.GetX509SVID()
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoIdentity, err)
	}
	if !svid.ID.MemberOf(s.td) {
		return nil, fmt.Errorf("%w: workload API SVID %s is not in trust domain %s", ErrNoIdentity, svid.ID, s.td)
	}
	return svid, nil
}

// GetX509BundleForTrustDomain returns the bundle of the source's own trust
// domain only: federation is not used.
func (s *WorkloadSource) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	if td != s.td {
		return nil, fmt.Errorf("%w: no bundle for trust domain %s", ErrNoIdentity, td)
	}
	return s.src.GetX509BundleForTrustDomain(td)
}

// Close stops watching the Workload API.
func (s *WorkloadSource) Close() error { return s.src.Close() }
