// Package api is the control plane's gRPC edge: the servers for the agent,
// lease and node services, and the interceptors every call passes through
// (authentication from the peer's SPIFFE ID, per-method authorization,
// panic recovery, canonical errors, logging). A method not listed in the
// authorization table is refused: deny by default.
package api

import (
	"context"
	"fmt"
	"log/slog"
	"runtime/debug"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"

	"github.com/gpuaas/gpuaas/controlplane/lease"
	"github.com/gpuaas/gpuaas/pkg/errs"
	"github.com/gpuaas/gpuaas/pkg/identity"
)

// Role is what kind of caller a method accepts.
type Role int

const (
	RoleAgent Role = iota + 1
	RoleOperator
)

// methodRoles is the authorization table: every served method and the one
// role that may call it.
var methodRoles = map[string]Role{
	"/gpuaas.agent.v1.AgentService/Session":      RoleAgent,
	"/gpuaas.lease.v1.LeaseService/CreateLease":  RoleOperator,
	"/gpuaas.lease.v1.LeaseService/GetLease":     RoleOperator,
	"/gpuaas.lease.v1.LeaseService/ListLeases":   RoleOperator,
	"/gpuaas.lease.v1.LeaseService/CancelLease":  RoleOperator,
	"/gpuaas.lease.v1.LeaseService/ExtendLease":  RoleOperator,
	"/gpuaas.lease.v1.LeaseService/WatchLeases":  RoleOperator,
	"/gpuaas.lease.v1.LeaseService/GetLeaseLogs": RoleOperator,
	"/gpuaas.node.v1.NodeService/ListNodes":      RoleOperator,
	"/gpuaas.node.v1.NodeService/GetNode":        RoleOperator,
}

// Authorizer decides who may call what.
type Authorizer struct {
	TrustDomain spiffeid.TrustDomain
	// Operators allowlists operator SPIFFE IDs; empty allows every
	// spiffe://TD/gpuaas/operator/* ID.
	Operators []spiffeid.ID
}

type callerKey struct{}

// CallerFrom returns the authenticated caller of a request.
func CallerFrom(ctx context.Context) (lease.Caller, bool) {
	c, ok := ctx.Value(callerKey{}).(lease.Caller)
	return c, ok
}

// authorize authenticates the peer and checks the method table.
func (a Authorizer) authorize(ctx context.Context, method string) (context.Context, error) {
	role, ok := methodRoles[method]
	if !ok {
		return nil, errs.PermissionDenied("METHOD_NOT_ALLOWED", "method not allowed")
	}
	id, err := identity.PeerID(ctx)
	if err != nil {
		return nil, errs.New(errs.ErrUnauthenticated, "NO_PEER_IDENTITY", "a SPIFFE X.509 SVID is required")
	}
	if id.TrustDomain() != a.TrustDomain {
		return nil, errs.PermissionDenied("FOREIGN_TRUST_DOMAIN", "peer is not in this trust domain")
	}
	switch role {
	case RoleAgent:
		if _, ok := identity.ParseAgentNode(id); !ok {
			return nil, errs.PermissionDenied("NOT_AN_AGENT", "only agents may call this method")
		}
	case RoleOperator:
		if !a.operatorAllowed(id) {
			return nil, errs.PermissionDenied("NOT_AN_OPERATOR", "caller is not an allowed operator")
		}
	}
	c := lease.Caller{ID: id.String(), RequestID: requestID(ctx)}
	return context.WithValue(ctx, callerKey{}, c), nil
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

func requestID(ctx context.Context) string {
	if md, ok := metadata.FromIncomingContext(ctx); ok {
		if v := md.Get("x-request-id"); len(v) > 0 && len(v[0]) <= 64 {
			return strings.Map(func(r rune) rune {
				if r < 0x21 || r > 0x7e {
					return -1
				}
				return r
			}, v[0])
		}
	}
	return ""
}

// Unary returns the unary interceptor chain.
func (a Authorizer) Unary(log *slog.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
		start := time.Now()
		defer func() {
			if p := recover(); p != nil {
				log.Error("panic in handler", "method", info.FullMethod, "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
				err = errs.New(errs.ErrInternal, "INTERNAL", "internal error")
			}
			err = finish(log, ctx, info.FullMethod, start, err)
		}()
		actx, aerr := a.authorize(ctx, info.FullMethod)
		if aerr != nil {
			return nil, aerr
		}
		return handler(actx, req)
	}
}

type wrappedStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (w wrappedStream) Context() context.Context { return w.ctx }

// Stream returns the stream interceptor chain.
func (a Authorizer) Stream(log *slog.Logger) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) (err error) {
		start := time.Now()
		defer func() {
			if p := recover(); p != nil {
				log.Error("panic in handler", "method", info.FullMethod, "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
				err = errs.New(errs.ErrInternal, "INTERNAL", "internal error")
			}
			err = finish(log, ss.Context(), info.FullMethod, start, err)
		}()
		actx, aerr := a.authorize(ss.Context(), info.FullMethod)
		if aerr != nil {
			return aerr
		}
		return handler(srv, wrappedStream{ServerStream: ss, ctx: actx})
	}
}

// finish logs the call and turns err into its canonical status.
func finish(log *slog.Logger, ctx context.Context, method string, start time.Time, err error) error {
	peer := ""
	if id, perr := identity.PeerID(ctx); perr == nil {
		peer = id.String()
	}
	st := errs.ToStatus(err)
	attrs := []any{"method", method, "code", st.Code().String(), "duration", time.Since(start), "peer", peer}
	if err != nil {
		attrs = append(attrs, "reason", errs.ReasonOf(err), "err", err)
		switch st.Code() {
		case codes.Internal, codes.Unknown, codes.DataLoss, codes.Unavailable:
			log.Error("rpc failed", attrs...)
		case codes.PermissionDenied, codes.Unauthenticated:
			log.Warn("rpc refused", attrs...)
		default:
			log.Info("rpc failed", attrs...)
		}
		return st.Err()
	}
	log.Debug("rpc", attrs...)
	return nil
}
