package identity

import (
	"errors"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Source is the identity seam: where a daemon gets its own X509-SVID and the
// trust bundle that peers are verified against. FileSource implements it, and
// so does go-spiffe's workloadapi.X509Source (SPIRE). Implementations must be
// safe for concurrent use and must return the current SVID on every call, so
// that TLS configurations built on them pick up rotations without a restart.
type Source interface {
	x509svid.Source
	x509bundle.Source
}

// ErrNoIdentity is the class of errors for a source that has no usable
// identity (never loaded, expired, wrong trust domain).
var ErrNoIdentity = errors.New("no usable identity")

// StaticSource is a Source with a fixed SVID and bundle. It performs no
// validation, so tests can hand it expired or foreign SVIDs; production code
// should use FileSource or the Workload API.
type StaticSource struct {
	SVID   *x509svid.SVID
	Bundle *x509bundle.Bundle
}

// GetX509SVID returns the fixed SVID.
func (s StaticSource) GetX509SVID() (*x509svid.SVID, error) {
	if s.SVID == nil {
		return nil, fmt.Errorf("static source: %w: no svid", ErrNoIdentity)
	}
	return s.SVID, nil
}

// GetX509BundleForTrustDomain returns the fixed bundle if it is for td.
func (s StaticSource) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	if s.Bundle == nil || s.Bundle.TrustDomain() != td {
		return nil, fmt.Errorf("static source: no bundle for trust domain %q", td.Name())
	}
	return s.Bundle, nil
}

// failedSource is used when a caller passes a nil Source: every handshake
// fails with a clear error instead of a nil dereference.
type failedSource struct{}

func (failedSource) GetX509SVID() (*x509svid.SVID, error) {
	return nil, fmt.Errorf("%w: no identity source configured", ErrNoIdentity)
}

func (failedSource) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	return nil, fmt.Errorf("%w: no identity source configured for trust domain %q", ErrNoIdentity, td.Name())
}
