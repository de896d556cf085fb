// Package api is the control plane's gRPC edge: the servers for the agent,
// lease and node services, and the interceptors every call passes through
// (authentication from the peer's SPIFFE ID or an OIDC bearer token,
// per-method authorization by role and scope, tenant confinement,
// per-identity rate limits, default deadlines, audited denials, panic
// recovery, canonical errors, logging, tracing with one request id per
// call). A method not listed in the
// authorization table is refused: deny by default. Authentication and
// authorization run before any handler, so a refused call never reaches
// the store.
package api

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"

	"github.com/gpuaas/gpuaas/controlplane/lease"
	"github.com/gpuaas/gpuaas/pkg/authn"
	"github.com/gpuaas/gpuaas/pkg/errs"
	"github.com/gpuaas/gpuaas/pkg/identity"
)

// Role is what kind of caller a method accepts.
type Role int

const (
	// RoleAgent: an agent SVID (spiffe://TD/gpuaas/agent/NODE) only.
	RoleAgent Role = iota + 1
	// RoleOperator: a platform caller, either an allowlisted operator SVID
	// (a platform-admin service caller) or a bearer token holding the
	// method's scope.
	RoleOperator
)

// Access is who may call a method: the role, and for RoleOperator the
// scope a token caller needs.
type Access struct {
	Role  Role
	Scope authn.Scope
	// SelfAudited methods append their own audit entry for every outcome,
	// denials included, so the edge does not add a second one for a
	// denial the handler returns.
	SelfAudited bool
}

// methodRoles is the authorization table: every served method, the one
// role that may call it and the scope it requires. docs/security/scopes.md
// is the same table for humans; TestScopeTableMatchesDocs keeps them equal
// and test/guard checks every RPC of the protos is here.
var methodRoles = map[string]Access{
	"/gpuaas.agent.v1.AgentService/Session":              {Role: RoleAgent, SelfAudited: true},
	"/gpuaas.lease.v1.LeaseService/CreateLease":          {Role: RoleOperator, Scope: authn.ScopeLeaseWrite},
	"/gpuaas.lease.v1.LeaseService/GetLease":             {Role: RoleOperator, Scope: authn.ScopeLeaseRead},
	"/gpuaas.lease.v1.LeaseService/ListLeases":           {Role: RoleOperator, Scope: authn.ScopeLeaseRead},
	"/gpuaas.lease.v1.LeaseService/CancelLease":          {Role: RoleOperator, Scope: authn.ScopeLeaseWrite},
	"/gpuaas.lease.v1.LeaseService/ExtendLease":          {Role: RoleOperator, Scope: authn.ScopeLeaseWrite},
	"/gpuaas.lease.v1.LeaseService/WatchLeases":          {Role: RoleOperator, Scope: authn.ScopeLeaseRead},
	"/gpuaas.lease.v1.LeaseService/GetLeaseLogs":         {Role: RoleOperator, Scope: authn.ScopeLeaseRead, SelfAudited: true},
	"/gpuaas.node.v1.NodeService/ListNodes":              {Role: RoleOperator, Scope: authn.ScopeNodeRead},
	"/gpuaas.node.v1.NodeService/GetNode":                {Role: RoleOperator, Scope: authn.ScopeNodeRead},
	"/gpuaas.node.v1.NodeService/CordonNode":             {Role: RoleOperator, Scope: authn.ScopeNodeAdmin},
	"/gpuaas.node.v1.NodeService/UncordonNode":           {Role: RoleOperator, Scope: authn.ScopeNodeAdmin},
	"/gpuaas.node.v1.NodeService/DrainNode":              {Role: RoleOperator, Scope: authn.ScopeNodeAdmin},
	"/gpuaas.audit.v1.AuditLogService/ListAuditEntries":  {Role: RoleOperator, Scope: authn.ScopeAuditRead, SelfAudited: true},
	"/gpuaas.audit.v1.AuditLogService/GetInclusionProof": {Role: RoleOperator, Scope: authn.ScopeAuditRead, SelfAudited: true},
	"/gpuaas.node.v1.NodeService/GetNodeAttestation":     {Role: RoleOperator, Scope: authn.ScopeAttestRead},
	"/gpuaas.node.v1.NodeService/ListNodeAttestations":   {Role: RoleOperator, Scope: authn.ScopeAttestRead},
}

// TokenVerifier authenticates bearer tokens; *authn.Verifier is one.
type TokenVerifier interface {
	Verify(ctx context.Context, token string) (authn.Principal, error)
}

// Authorizer decides who may call what. Its zero optional fields disable
// what they configure: no tokens accepted, no rate limit, denials only
// logged, no default deadline.
type Authorizer struct {
	TrustDomain spiffeid.TrustDomain
	// Operators allowlists operator SPIFFE IDs; empty allows every
	// spiffe://TD/gpuaas/operator/* ID. Operators are platform-admin
	// service callers: every scope, every tenant.
	Operators []spiffeid.ID
	// Tokens verifies OIDC bearer tokens on RoleOperator methods; nil
	// refuses every token.
	Tokens TokenVerifier
	// Limiter rate-limits each authenticated identity; nil: no limit.
	Limiter *RateLimiter
	// Denials audits every refused call; nil: refusals are only logged.
	Denials *DenialAuditor
	// UnaryTimeout is the deadline of a unary call that has none, and the
	// longest one a caller may ask for; 0: none.
	UnaryTimeout time.Duration
	// Tracer traces every call (NewTracerProvider); nil: no spans (the
	// calls still get request ids). TrustTraceParent makes a caller's
	// W3C traceparent the parent of the call's span; by default it is
	// only linked, so callers cannot choose the trace id audit entries
	// record.
	Tracer           trace.TracerProvider
	TrustTraceParent bool
}

type callerKey struct{}

// CallerFrom returns the authenticated caller of a request.
func CallerFrom(ctx context.Context) (lease.Caller, bool) {
	c, ok := ctx.Value(callerKey{}).(lease.Caller)
	return c, ok
}

// refusal is a refused call: the canonical error, and who made it as far
// as we know.
type refusal struct {
	err    error
	actor  string // verified identity, or ""
	tenant string
}

// bearerToken returns the bearer token of the call's authorization
// metadata; present is true when the caller sent an authorization header
// at all (a malformed one is an error, not an absent one).
func bearerToken(ctx context.Context) (token string, present bool, err error) {
	vals := incomingHeader(ctx, "authorization")
	if len(vals) == 0 {
		return "", false, nil
	}
	if len(vals) > 1 {
		return "", true, errs.New(errs.ErrUnauthenticated, "TOKEN_MALFORMED", "more than one authorization header")
	}
	scheme, tok, found := strings.Cut(vals[0], " ")
	if !found || !strings.EqualFold(scheme, "bearer") || tok == "" {
		return "", true, errs.New(errs.ErrUnauthenticated, "TOKEN_MALFORMED", "authorization must be \"Bearer <token>\"")
	}
	return strings.TrimSpace(tok), true, nil
}

// authenticate establishes the principal of a call to a method of role:
// a bearer token if one is sent (RoleOperator methods only), otherwise the
// peer's SVID.
func (a Authorizer) authenticate(ctx context.Context, role Role) (authn.Principal, *refusal) {
	token, present, err := bearerToken(ctx)
	if err != nil {
		return authn.Principal{}, &refusal{err: err}
	}
	if present {
		if role != RoleOperator {
			return authn.Principal{}, &refusal{err: errs.PermissionDenied("NOT_AN_AGENT", "only agents may call this method")}
		}
		if a.Tokens == nil {
			return authn.Principal{}, &refusal{err: errs.New(errs.ErrUnauthenticated, "TOKENS_NOT_ACCEPTED", "bearer tokens are not accepted here")}
		}
		p, err := a.Tokens.Verify(ctx, token)
		if err != nil {
			return authn.Principal{}, &refusal{err: err}
		}
		return p, nil
	}
	if !peerPresentedCert(ctx) {
		return authn.Principal{}, noCredentialsRefusal
	}
	id, err := identity.PeerID(ctx)
	if err != nil {
		return authn.Principal{}, noCredentialsRefusal
	}
	p := authn.Principal{Kind: authn.KindSPIFFE, Subject: id.String()}
	if id.TrustDomain() != a.TrustDomain {
		return p, &refusal{err: errs.PermissionDenied("FOREIGN_TRUST_DOMAIN", "peer is not in this trust domain"), actor: p.ID()}
	}
	switch role {
	case RoleAgent:
		if _, ok := identity.ParseAgentNode(id); !ok {
			return p, &refusal{err: errs.PermissionDenied("NOT_AN_AGENT", "only agents may call this method"), actor: p.ID()}
		}
	case RoleOperator:
		if !a.operatorAllowed(id) {
			return p, &refusal{err: errs.PermissionDenied("NOT_AN_OPERATOR", "caller is not an allowed operator"), actor: p.ID()}
		}
		p.Admin = true
	}
	return p, nil
}

var errNoCredentials = errs.New(errs.ErrUnauthenticated, "NO_CREDENTIALS", "a SPIFFE X.509 SVID or a bearer token is required")

// noCredentialsRefusal is the refusal of every call without credentials,
// shared (refusals are never modified): the same for every caller, and
// refusing costs no allocation.
var noCredentialsRefusal = &refusal{err: errNoCredentials}

// peerPresentedCert is a cheap pre-check of identity.PeerID: false only
// when the peer's TLS state certainly holds no certificate, so refusing a
// call without credentials costs no error formatting.
func peerPresentedCert(ctx context.Context) bool {
	p, ok := peer.FromContext(ctx)
	if !ok || p == nil {
		return false
	}
	switch ai := p.AuthInfo.(type) {
	case credentials.TLSInfo:
		return len(ai.State.PeerCertificates) > 0
	case *credentials.TLSInfo:
		return ai != nil && len(ai.State.PeerCertificates) > 0
	}
	return true // another credentials type: PeerID decides
}

// authorize checks the authenticated principal against the method's
// access and returns the request context carrying it.
func (a Authorizer) authorize(ctx context.Context, acc Access, p authn.Principal) (context.Context, *refusal) {
	deny := func(err error) (context.Context, *refusal) {
		return nil, &refusal{err: err, actor: p.ID(), tenant: p.Tenant}
	}
	if p.Kind == authn.KindToken {
		if !p.HasScope(acc.Scope) {
			return deny(errs.PermissionDenied("MISSING_SCOPE", "the token lacks scope %s", acc.Scope))
		}
		if !p.Admin && p.Tenant == "" {
			// Without a tenant claim a non-admin caller would see every
			// tenant: refuse instead.
			return deny(errs.PermissionDenied("NO_TENANT", "the token names no tenant"))
		}
	}
	c := lease.Caller{ID: p.ID(), Tenant: p.TenantFilter(), RequestID: requestID(ctx)}
	return authn.NewContext(context.WithValue(ctx, callerKey{}, c), p), nil
}

// admit runs authentication, the rate limit and authorization for a call.
// setTrailer attaches metadata to the response (retry-after).
func (a Authorizer) admit(ctx context.Context, method string, setTrailer func(metadata.MD)) (context.Context, *refusal) {
	acc, ok := methodRoles[method]
	if !ok {
		return nil, &refusal{err: errs.PermissionDenied("METHOD_NOT_ALLOWED", "method not allowed")}
	}
	p, r := a.authenticate(ctx, acc.Role)
	if r != nil {
		return nil, r
	}
	if a.Limiter != nil {
		if ok, wait := a.Limiter.Allow(p.ID()); !ok {
			secs := int64((wait + time.Second - 1) / time.Second)
			setTrailer(metadata.Pairs("retry-after", fmt.Sprint(secs), "retry-after-ms", fmt.Sprint(wait.Milliseconds()+1)))
			return nil, &refusal{err: errs.ResourceExhausted("RATE_LIMITED", "too many requests; retry after %ds", secs), actor: p.ID(), tenant: p.Tenant}
		}
	}
	return a.authorize(ctx, acc, p)
}

// deadline gives a unary call the default deadline, or caps a longer one.
func (a Authorizer) deadline(ctx context.Context) (context.Context, context.CancelFunc) {
	if a.UnaryTimeout <= 0 {
		return ctx, func() {}
	}
	if d, ok := ctx.Deadline(); ok && time.Until(d) <= a.UnaryTimeout {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, a.UnaryTimeout)
}

// refused audits a refused call.
func (a Authorizer) refused(ctx context.Context, method string, r *refusal) {
	if a.Denials == nil {
		return
	}
	a.Denials.Record(ctx, Denial{Actor: r.actor, Tenant: r.tenant, Method: method, Err: r.err, RequestID: requestID(ctx)})
}

// handlerDenial audits a denial decided by a handler: PermissionDenied or
// Unauthenticated, or a NotFound that hides another tenant's resource.
func (a Authorizer) handlerDenial(ctx context.Context, method string, err error) {
	if err == nil || a.Denials == nil || methodRoles[method].SelfAudited {
		return
	}
	if !errors.Is(err, errs.ErrPermissionDenied) && !errors.Is(err, errs.ErrUnauthenticated) && !errors.Is(err, authn.ErrOtherTenant) {
		return
	}
	d := Denial{Method: method, Err: err, RequestID: requestID(ctx)}
	if p, ok := authn.FromContext(ctx); ok {
		d.Actor, d.Tenant = p.ID(), p.Tenant
	}
	if errors.Is(err, authn.ErrOtherTenant) {
		d.Reason = "OTHER_TENANT"
	}
	a.Denials.Record(ctx, d)
}

func (a Authorizer) operatorAllowed(id spiffeid.ID) bool {
	if len(a.Operators) == 0 {
		return identity.Kind(id) == identity.PeerOperator
	}
	for _, o := range a.Operators {
		if o == id {
			return true
		}
	}
	return false
}

// requestID is the call's request id (beginCall); outside the edge's
// interceptors, the caller's if well-formed.
func requestID(ctx context.Context) string {
	if id := RequestIDFrom(ctx); id != "" {
		return id
	}
	id, _ := incomingRequestID(ctx)
	return id
}

// Unary returns the unary interceptor chain.
func (a Authorizer) Unary(log *slog.Logger) grpc.UnaryServerInterceptor {
	return func(rctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
		start := time.Now()
		markReached(rctx)
		ctx := beginCall(rctx, func(id string) { sendRequestID(rctx, id) })
		who := ""
		defer func() {
			if p := recover(); p != nil {
				log.ErrorContext(ctx, "panic in handler", "method", info.FullMethod, "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
				err = errs.New(errs.ErrInternal, "INTERNAL", "internal error")
			}
			err = finish(ctx, log, who, info.FullMethod, start, err)
		}()
		actx, r := a.admit(ctx, info.FullMethod, func(md metadata.MD) { _ = grpc.SetTrailer(ctx, md) })
		if r != nil {
			who = r.actor
			a.refused(ctx, info.FullMethod, r)
			return nil, r.err
		}
		who = principalID(actx)
		actx, cancel := a.deadline(actx)
		defer cancel()
		resp, err = handler(actx, req)
		a.handlerDenial(actx, info.FullMethod, err)
		return resp, err
	}
}

type wrappedStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (w wrappedStream) Context() context.Context { return w.ctx }

// Stream returns the stream interceptor chain. Streams get no default
// deadline: sessions and watches are long-lived by design; keepalive
// enforcement ends dead ones.
func (a Authorizer) Stream(log *slog.Logger) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) (err error) {
		start := time.Now()
		markReached(ss.Context())
		ctx := beginCall(ss.Context(), func(id string) { _ = ss.SetHeader(metadata.MD{RequestIDHeader: {id}}) })
		who := ""
		defer func() {
			if p := recover(); p != nil {
				log.ErrorContext(ctx, "panic in handler", "method", info.FullMethod, "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
				err = errs.New(errs.ErrInternal, "INTERNAL", "internal error")
			}
			err = finish(ctx, log, who, info.FullMethod, start, err)
		}()
		actx, r := a.admit(ctx, info.FullMethod, ss.SetTrailer)
		if r != nil {
			who = r.actor
			a.refused(ctx, info.FullMethod, r)
			return r.err
		}
		who = principalID(actx)
		// A stream authenticated by a bearer token lives no longer than the
		// token: at its expiry the stream ends and the caller must come
		// back with a fresh token (an SVID's stream lives on: the agent
		// signs with its rotated SVID and sessions survive rotation).
		if p, ok := authn.FromContext(actx); ok && p.Kind == authn.KindToken && !p.Expiry.IsZero() {
			var cancel context.CancelFunc
			actx, cancel = context.WithDeadlineCause(actx, p.Expiry, errStreamTokenExpired)
			defer cancel()
		}
		err = handler(srv, wrappedStream{ServerStream: ss, ctx: actx})
		if errors.Is(context.Cause(actx), errStreamTokenExpired) {
			err = errs.New(errs.ErrUnauthenticated, "TOKEN_EXPIRED", "the bearer token expired during the stream; call again with a fresh token")
		}
		a.handlerDenial(actx, info.FullMethod, err)
		return err
	}
}

// errStreamTokenExpired ends a stream whose bearer token expired.
var errStreamTokenExpired = errors.New("bearer token expired during the stream")

// ServerOptions returns the interceptors, the stats handler that audits
// calls refused by the transport before they reach an interceptor (an
// oversized message), and with a Tracer the one that starts every call's
// span. log should be built on CorrelatedHandler, so the call's lines
// carry its request id.
func (a Authorizer) ServerOptions(log *slog.Logger) []grpc.ServerOption {
	opts := []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(a.Unary(log)),
		grpc.ChainStreamInterceptor(a.Stream(log)),
		grpc.StatsHandler(&transportRefusals{denials: a.Denials}),
	}
	if a.Tracer != nil {
		opts = append(opts, tracingOption(a.Tracer, a.TrustTraceParent))
	}
	return opts
}

func principalID(ctx context.Context) string {
	if p, ok := authn.FromContext(ctx); ok {
		return p.ID()
	}
	return ""
}

// requestIDHeaders recycles the one-key header maps sendRequestID hands to
// grpc.SetHeader, which merges them into the stream's own header (the
// transport keeps none of it): a map per call would be most of what
// refusing a call allocates.
var requestIDHeaders = sync.Pool{New: func() any {
	h := &requestIDHeader{md: metadata.MD{RequestIDHeader: make([]string, 1)}}
	h.val = h.md[RequestIDHeader]
	return h
}}

// requestIDHeader is a pooled header map and its one value slice.
type requestIDHeader struct {
	md  metadata.MD
	val []string
}

// sendRequestID sets the response header that returns the call's request
// id. Outside a served call (a benchmark) there is no header to set; the
// id still names the call everywhere else.
func sendRequestID(ctx context.Context, id string) {
	if grpc.ServerTransportStreamFromContext(ctx) == nil {
		return
	}
	h := requestIDHeaders.Get().(*requestIDHeader)
	h.val[0] = id
	_ = grpc.SetHeader(ctx, h.md)
	h.val[0] = ""
	requestIDHeaders.Put(h)
}

// refusalLogs bounds the "rpc refused" log lines of the process: a flood
// of refused calls must not become a flood of log writes (each refusal is
// counted, and audited within the DenialAuditor's budget, anyway).
var refusalLogs = rate.NewLimiter(20, 100)

// noCredentialsStatus is the status of the commonest refusal, built once:
// refusing a call without credentials allocates next to nothing.
var noCredentialsStatus = errs.ToStatus(errNoCredentials)

// noCredentialsErr is the prebuilt refusal of a call without credentials.
var noCredentialsErr = noCredentialsStatus.Err()

// finish logs the call, records its outcome on its span and turns err
// into its canonical status, which carries the call's request id. who is
// the caller's verified identity, "" if none.
func finish(ctx context.Context, log *slog.Logger, who, method string, start time.Time, err error) error {
	reqID := RequestIDFrom(ctx)
	if err == errNoCredentials { //nolint:errorlint // identity: the shared sentinel value
		endCall(ctx, who, codes.Unauthenticated, errNoCredentials.Reason)
		// The call's start time stands for now (no second clock read).
		if refusalLogs.AllowN(start, 1) {
			log.WarnContext(ctx, "rpc refused", "method", method, "code", codes.Unauthenticated.String(), "peer", who, "reason", errNoCredentials.Reason)
		}
		// The cheapest refusal: a prebuilt status (its request id went out
		// in the response header), so an unauthenticated flood costs no
		// more than it must.
		return noCredentialsErr
	}
	st := errs.ToStatusFor(err, reqID)
	endCall(ctx, who, st.Code(), errs.ReasonOf(err))
	if err == nil {
		if log.Enabled(ctx, slog.LevelDebug) {
			log.DebugContext(ctx, "rpc", "method", method, "code", st.Code().String(), "duration", time.Since(start), "peer", who)
		}
		return nil
	}
	attrs := []any{"method", method, "code", st.Code().String(), "duration", time.Since(start), "peer", who, "reason", errs.ReasonOf(err), "err", err}
	switch st.Code() {
	case codes.Internal, codes.Unknown, codes.DataLoss, codes.Unavailable:
		log.ErrorContext(ctx, "rpc failed", attrs...)
	case codes.PermissionDenied, codes.Unauthenticated:
		if refusalLogs.Allow() {
			log.WarnContext(ctx, "rpc refused", attrs...)
		}
	default:
		if errs.ReasonOf(err) == "RATE_LIMITED" {
			if refusalLogs.Allow() {
				log.WarnContext(ctx, "rpc refused", attrs...)
			}
			break
		}
		log.InfoContext(ctx, "rpc failed", attrs...)
	}
	return st.Err()
}
