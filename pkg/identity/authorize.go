package identity

import (
	"crypto/x509"
	"errors"
	"fmt"
	"slices"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
)

// ErrUnauthorizedPeer is the class of errors for a verified peer whose ID is
// not allowed on a connection.
var ErrUnauthorizedPeer = errors.New("unauthorized peer")

// AuthorizeKinds returns a TLS authorizer that admits IDs that are members of
// td and whose Kind is one of kinds. With no kinds it admits nobody. It is a
// connection-level gate only: per-RPC checks (an agent speaks only for its
// own node) remain the caller's job.
func AuthorizeKinds(td spiffeid.TrustDomain, kinds ...PeerKind) tlsconfig.Authorizer {
	allowed := slices.Clone(kinds)
	return func(id spiffeid.ID, _ [][]*x509.Certificate) error {
		if td.IsZero() || !id.MemberOf(td) {
			return fmt.Errorf("authorize %s: %w: not in trust domain %q", id, ErrUnauthorizedPeer, td.Name())
		}
		k := Kind(id)
		if k == PeerUnknown || !slices.Contains(allowed, k) {
			return fmt.Errorf("authorize %s: %w: kind %s not in %v", id, ErrUnauthorizedPeer, k, allowed)
		}
		return nil
	}
}

// denyAll is the authorizer used when a caller passes nil: fail closed.
func denyAll(id spiffeid.ID, _ [][]*x509.Certificate) error {
	return fmt.Errorf("authorize %s: %w: no authorizer configured", id, ErrUnauthorizedPeer)
}
