package identity

import (
	"crypto/tls"

	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc/credentials"
)

// ServerTLSConfig returns an mTLS server configuration built by go-spiffe's
// tlsconfig.MTLSServerConfig: it presents src's current SVID, requires a
// client SVID that chains to src's bundle for the client's trust domain, and
// admits it only if authorize returns nil. A nil authorize admits nobody; a
// nil src fails every handshake.
//
// The configuration is pinned to TLS 1.3 and has session tickets disabled:
// a resumed TLS session skips certificate verification callbacks, so every
// connection must do a full handshake against the current bundle and policy.
func ServerTLSConfig(src Source, authorize tlsconfig.Authorizer) *tls.Config {
	src, authorize = orFailClosed(src, authorize)
	c := tlsconfig.MTLSServerConfig(src, src, authorize)
	c.MinVersion = tls.VersionTLS13
	c.MaxVersion = tls.VersionTLS13
	c.SessionTicketsDisabled = true
	return c
}

// ClientTLSConfig returns an mTLS client configuration built by go-spiffe's
// tlsconfig.MTLSClientConfig: it presents src's current SVID and admits the
// server only if its SVID chains to src's bundle and authorize returns nil.
// Host names are not checked; the SPIFFE ID is the server's identity. A nil
// authorize admits nobody; a nil src fails every handshake. TLS 1.3 only, no
// session resumption.
func ClientTLSConfig(src Source, authorize tlsconfig.Authorizer) *tls.Config {
	src, authorize = orFailClosed(src, authorize)
	c := tlsconfig.MTLSClientConfig(src, src, authorize)
	c.MinVersion = tls.VersionTLS13
	c.MaxVersion = tls.VersionTLS13
	c.ClientSessionCache = nil
	return c
}

// ServerCredentials is ServerTLSConfig as gRPC transport credentials. Servers
// that use PeerID must use these (or credentials.NewTLS(ServerTLSConfig(...))).
func ServerCredentials(src Source, authorize tlsconfig.Authorizer) credentials.TransportCredentials {
	return credentials.NewTLS(ServerTLSConfig(src, authorize))
}

// ClientCredentials is ClientTLSConfig as gRPC transport credentials.
func ClientCredentials(src Source, authorize tlsconfig.Authorizer) credentials.TransportCredentials {
	return credentials.NewTLS(ClientTLSConfig(src, authorize))
}

func orFailClosed(src Source, authorize tlsconfig.Authorizer) (Source, tlsconfig.Authorizer) {
	if src == nil {
		src = failedSource{}
	}
	if authorize == nil {
		authorize = denyAll
	}
	return src, authorize
}
