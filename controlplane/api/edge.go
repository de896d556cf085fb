package api

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/pkg/errs"
	"github.com/gpuaas/gpuaas/pkg/identity"
)

// Limits are the transport limits of the control plane's gRPC server.
type Limits struct {
	// MaxRecvMsgSize bounds one request message; a larger one is refused
	// with ResourceExhausted before it is decoded. Default 4 MiB.
	MaxRecvMsgSize int
	// MaxConcurrentStreams bounds the calls in flight on one connection.
	// Default 128.
	MaxConcurrentStreams uint32
	// KeepaliveMinTime is the most often a client may ping; a client that
	// pings more often is disconnected (GOAWAY too_many_pings). Default 5s.
	KeepaliveMinTime time.Duration
	// KeepaliveTime and KeepaliveTimeout: the server pings an idle
	// connection after Time and closes it if no answer within Timeout.
	// Defaults 30s and 10s.
	KeepaliveTime    time.Duration
	KeepaliveTimeout time.Duration
	// HandshakeTimeout bounds the TLS handshake of a new connection.
	// Default 10s.
	HandshakeTimeout time.Duration
	// ReadBufferSize is each connection's read buffer (gRPC's default is
	// 32 KiB). Every agent holds a connection open and says little on it,
	// so the default is 8 KiB: a fleet of 10,000 agents keeps ~230 MiB
	// less; TLS still reads whole records beneath it.
	ReadBufferSize int
}

// Limit defaults.
const (
	DefaultMaxRecvMsgSize       = 4 << 20
	DefaultMaxConcurrentStreams = 128
	DefaultUnaryTimeout         = 30 * time.Second
	DefaultReadBufferSize       = 8 << 10
)

func (l Limits) withDefaults() Limits {
	if l.MaxRecvMsgSize <= 0 {
		l.MaxRecvMsgSize = DefaultMaxRecvMsgSize
	}
	if l.MaxConcurrentStreams == 0 {
		l.MaxConcurrentStreams = DefaultMaxConcurrentStreams
	}
	if l.ReadBufferSize <= 0 {
		l.ReadBufferSize = DefaultReadBufferSize
	}
	if l.KeepaliveMinTime <= 0 {
		l.KeepaliveMinTime = 5 * time.Second
	}
	if l.KeepaliveTime <= 0 {
		l.KeepaliveTime = 30 * time.Second
	}
	if l.KeepaliveTimeout <= 0 {
		l.KeepaliveTimeout = 10 * time.Second
	}
	if l.HandshakeTimeout <= 0 {
		l.HandshakeTimeout = 10 * time.Second
	}
	return l
}

// ServerOptions returns the gRPC server options that enforce l (zero
// fields take the defaults).
func (l Limits) ServerOptions() []grpc.ServerOption {
	l = l.withDefaults()
	return []grpc.ServerOption{
		grpc.MaxRecvMsgSize(l.MaxRecvMsgSize),
		grpc.MaxConcurrentStreams(l.MaxConcurrentStreams),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: l.KeepaliveMinTime, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: l.KeepaliveTime, Timeout: l.KeepaliveTimeout}),
		grpc.ConnectionTimeout(l.HandshakeTimeout),
		grpc.ReadBufferSize(l.ReadBufferSize),
	}
}

// TLSOptions configures ServerCredentials.
type TLSOptions struct {
	// TrustDomain is the control plane's; it names a foreign certificate's
	// refusal reason.
	TrustDomain spiffeid.TrustDomain
	// ClientCertOptional admits connections without a client certificate
	// (platform callers that authenticate every call with a bearer
	// token). A certificate that is presented is still verified and
	// authorized, and the interceptors refuse a call that has neither.
	// False: mTLS is required, as on a listener only agents use.
	ClientCertOptional bool
	// Denials audits refused handshakes; nil: not audited.
	Denials *DenialAuditor
}

// ServerCredentials returns the control plane's TLS 1.3 server
// credentials (identity.ServerTLSConfig: SVID from src, client SVIDs
// verified against src's bundle and admitted by authorize), with a client
// certificate optional if o says so, and every refused client certificate
// audited with the ID it claimed and why it was refused.
func ServerCredentials(src identity.Source, authorize tlsconfig.Authorizer, o TLSOptions) credentials.TransportCredentials {
	base := identity.ServerTLSConfig(src, authorize)
	verify := base.VerifyPeerCertificate
	// Request (not require) a certificate so that a missing one reaches the
	// callback below and is audited, or admitted if optional.
	base.ClientAuth = tls.RequestClientCert
	outer := base.Clone()
	outer.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		c := base.Clone()
		remote := ""
		if hello.Conn != nil {
			remote = hello.Conn.RemoteAddr().String()
		}
		c.VerifyPeerCertificate = func(raw [][]byte, chains [][]*x509.Certificate) error {
			var err error
			switch {
			case len(raw) == 0 && o.ClientCertOptional:
				return nil
			case len(raw) == 0:
				err = errors.New("tls: a client certificate is required")
			default:
				err = verify(raw, chains)
			}
			if err != nil && o.Denials != nil {
				claimed, reason := classifyCertRefusal(raw, o.TrustDomain, err)
				o.Denials.Record(context.Background(), Denial{Method: "tls.handshake", Err: errs.New(errs.ErrUnauthenticated, reason, "client certificate refused"),
					Peer: hostOf(remote), Claimed: claimed})
			}
			return err
		}
		return c, nil
	}
	return credentials.NewTLS(outer)
}

func hostOf(addr string) string {
	for i := len(addr) - 1; i >= 0; i-- {
		if addr[i] == ':' {
			h := addr[:i]
			if len(h) > 1 && h[0] == '[' && h[len(h)-1] == ']' {
				h = h[1 : len(h)-1]
			}
			return h
		}
	}
	return addr
}

// classifyCertRefusal names why a client certificate was refused, and the
// SPIFFE ID it claimed (unverified), for the audit entry.
func classifyCertRefusal(raw [][]byte, td spiffeid.TrustDomain, err error) (claimed, reason string) {
	if len(raw) == 0 {
		return "", "NO_CLIENT_CERTIFICATE"
	}
	leaf, perr := x509.ParseCertificate(raw[0])
	if perr != nil {
		return "", "MALFORMED_CERTIFICATE"
	}
	id, ierr := x509svid.IDFromCert(leaf)
	if ierr != nil {
		return "", "NOT_AN_SVID"
	}
	now := time.Now()
	switch {
	case !td.IsZero() && id.TrustDomain() != td:
		return id.String(), "FOREIGN_TRUST_DOMAIN"
	case now.After(leaf.NotAfter):
		return id.String(), "CERTIFICATE_EXPIRED"
	case now.Before(leaf.NotBefore):
		return id.String(), "CERTIFICATE_NOT_YET_VALID"
	case errors.Is(err, identity.ErrUnauthorizedPeer):
		return id.String(), "UNAUTHORIZED_PEER"
	}
	return id.String(), "UNTRUSTED_CERTIFICATE"
}

// rpcMark follows one call from the transport to the interceptors.
type rpcMark struct {
	// The call's context as the transport made it: the mark is the
	// context TagRPC returns, and its own audit slot (Value), so tagging
	// a call allocates the mark and nothing else.
	context.Context
	method  string
	reached atomic.Bool
	// header is the call's incoming metadata as the transport decoded it
	// (keys lower-case), from the InHeader event before any interceptor
	// runs; nil until then.
	header metadata.MD
	// corr is the call's correlation (audit.Slot), set by beginCall.
	corr audit.Correlation
}

func (m *rpcMark) Correlation() audit.Correlation     { return m.corr }
func (m *rpcMark) SetCorrelation(c audit.Correlation) { m.corr = c }

// Value answers the audit slot's key with the mark itself.
func (m *rpcMark) Value(key any) any {
	if audit.IsSlotKey(key) {
		return m
	}
	return m.Context.Value(key)
}

// markOf is the call's mark, nil outside a call the stats handler tagged.
// The mark is the call's audit slot: one context value for both.
func markOf(ctx context.Context) *rpcMark {
	m, _ := audit.SlotFrom(ctx).(*rpcMark)
	return m
}

// markReached notes that the call got to the interceptors.
func markReached(ctx context.Context) {
	if m := markOf(ctx); m != nil {
		m.reached.Store(true)
	}
}

// incomingHeader is the values of the call's incoming header key (lower
// case). Through the mark it is one map lookup: the transport's header
// map is copied once for the stats handlers anyway, and
// metadata.ValueFromIncomingContext walks every header when the key is
// absent (the commonest case: no authorization on a refused call) and
// copies the values when present.
func incomingHeader(ctx context.Context, key string) []string {
	return markOf(ctx).headerValues(ctx, key)
}

// headerValues is incomingHeader for a caller that has the call's mark
// (m may be nil).
func (m *rpcMark) headerValues(ctx context.Context, key string) []string {
	if m != nil && m.header != nil {
		return m.header[key]
	}
	return metadata.ValueFromIncomingContext(ctx, key)
}

// transportRefusals is a stats handler that audits calls the gRPC
// transport refused before any interceptor ran: a request message over
// MaxRecvMsgSize is refused while it is read, so only the call's end shows
// it.
type transportRefusals struct {
	denials *DenialAuditor
}

func (t *transportRefusals) TagRPC(ctx context.Context, info *stats.RPCTagInfo) context.Context {
	return &rpcMark{Context: ctx, method: info.FullMethodName}
}

func (t *transportRefusals) HandleRPC(ctx context.Context, s stats.RPCStats) {
	if in, ok := s.(*stats.InHeader); ok && !in.IsClient() {
		if m := markOf(ctx); m != nil {
			m.header = in.Header
		}
		return
	}
	end, ok := s.(*stats.End)
	if !ok || end.Error == nil || t.denials == nil || end.IsClient() {
		return
	}
	m := markOf(ctx)
	if m == nil || m.reached.Load() {
		return
	}
	if st, _ := status.FromError(end.Error); st.Code() == codes.ResourceExhausted {
		t.denials.Record(ctx, Denial{Method: m.method, Err: errs.ResourceExhausted("REQUEST_TOO_LARGE", "request message too large")})
	}
}

func (t *transportRefusals) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context {
	return ctx
}

func (t *transportRefusals) HandleConn(context.Context, stats.ConnStats) {}
