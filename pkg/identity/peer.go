package identity

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffegrpc/grpccredentials"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// ErrNoPeerIdentity is the class of errors for a gRPC call without a verified
// peer SPIFFE ID; callers map it to codes.Unauthenticated.
var ErrNoPeerIdentity = errors.New("no verified peer identity")

// PeerID returns the SPIFFE ID of the peer of a gRPC server or stream
// context: the URI SAN of the leaf certificate the peer presented during the
// TLS handshake.
//
// PeerID does not verify the chain itself: it trusts that the handshake did.
// That holds for servers whose transport credentials come from
// ServerCredentials / ServerTLSConfig (or go-spiffe's grpccredentials), which
// refuse any peer whose SVID does not chain to the bundle or that the
// authorizer rejects. It must never be used behind credentials that accept
// unverified client certificates.
func PeerID(ctx context.Context) (spiffeid.ID, error) {
	p, ok := peer.FromContext(ctx)
	if !ok || p == nil {
		return spiffeid.ID{}, fmt.Errorf("peer id: %w: no peer in context", ErrNoPeerIdentity)
	}
	// go-spiffe's own gRPC credentials wrap the auth info and carry the ID.
	if id, ok := grpccredentials.PeerIDFromPeer(p); ok && !id.IsZero() {
		return id, nil
	}
	var state tls.ConnectionState
	switch ai := p.AuthInfo.(type) {
	case credentials.TLSInfo:
		state = ai.State
	case *credentials.TLSInfo:
		if ai == nil {
			return spiffeid.ID{}, fmt.Errorf("peer id: %w: nil tls info", ErrNoPeerIdentity)
		}
		state = ai.State
	default:
		return spiffeid.ID{}, fmt.Errorf("peer id: %w: connection auth is %T, not tls", ErrNoPeerIdentity, p.AuthInfo)
	}
	if !state.HandshakeComplete {
		return spiffeid.ID{}, fmt.Errorf("peer id: %w: tls handshake not complete", ErrNoPeerIdentity)
	}
	if len(state.PeerCertificates) == 0 {
		return spiffeid.ID{}, fmt.Errorf("peer id: %w: peer presented no certificate", ErrNoPeerIdentity)
	}
	leaf := state.PeerCertificates[0]
	if len(state.VerifiedChains) > 0 && len(state.VerifiedChains[0]) > 0 {
		leaf = state.VerifiedChains[0][0]
	}
	id, err := x509svid.IDFromCert(leaf)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("peer id: %w: %v", ErrNoPeerIdentity, err)
	}
	return id, nil
}
