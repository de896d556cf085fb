package authn

import (
	"context"
	"errors"
	"slices"
	"time"
)

// Scope is a permission a caller holds. The platform's scopes are below;
// docs/security/scopes.md maps each RPC to the one it requires.
type Scope string

// Scopes.
const (
	ScopeLeaseRead  Scope = "lease:read"
	ScopeLeaseWrite Scope = "lease:write"
	ScopeNodeRead   Scope = "node:read"
	ScopeNodeAdmin  Scope = "node:admin"
	ScopeAuditRead  Scope = "audit:read"
	ScopeAttestRead Scope = "attest:read"
)

// AllScopes lists every scope, in a fixed order.
var AllScopes = []Scope{ScopeLeaseRead, ScopeLeaseWrite, ScopeNodeRead, ScopeNodeAdmin, ScopeAuditRead, ScopeAttestRead}

// Kind says how a principal authenticated.
type Kind int

// Kinds.
const (
	// KindToken authenticated with an OIDC JWT bearer token.
	KindToken Kind = iota + 1
	// KindSPIFFE authenticated with an X.509 SVID (mTLS).
	KindSPIFFE
)

func (k Kind) String() string {
	switch k {
	case KindToken:
		return "token"
	case KindSPIFFE:
		return "spiffe"
	}
	return "unknown"
}

// TokenActorPrefix starts the ID of every token principal, so that no token
// subject can pass for a SPIFFE ID in the audit log.
const TokenActorPrefix = "oidc:"

// Principal is an authenticated caller.
type Principal struct {
	Kind Kind
	// Subject is the token's sub, or the SPIFFE ID of an SVID.
	Subject string
	// Issuer is the token's iss; empty for SVIDs.
	Issuer string
	// Tenant confines a non-admin caller to one tenant's resources.
	Tenant string
	// Scopes are the caller's scopes, sorted and without duplicates.
	Scopes []Scope
	// Admin is a platform administrator: every scope, every tenant.
	Admin bool
	// Expiry is when the credential stops being valid (token exp).
	Expiry time.Time
}

// ID is the principal's stable identifier, used as the audit actor and as
// the rate-limit key: the SPIFFE ID, or "oidc:" + the token subject.
func (p Principal) ID() string {
	if p.Kind == KindToken {
		return TokenActorPrefix + p.Subject
	}
	return p.Subject
}

// HasScope reports whether the principal may use scope s. Admins hold all.
func (p Principal) HasScope(s Scope) bool {
	if p.Admin {
		return true
	}
	_, found := slices.BinarySearch(p.Scopes, s)
	return found
}

// TenantFilter is the tenant the principal is confined to, or "" when it
// may act for every tenant (admins). A non-admin principal without a tenant
// has TenantFilter "" too: callers must refuse it (see Confined).
func (p Principal) TenantFilter() string {
	if p.Admin {
		return ""
	}
	return p.Tenant
}

// Unconfined reports whether the principal may see every tenant: an admin.
func (p Principal) Unconfined() bool { return p.Admin }

type principalKey struct{}

// NewContext returns ctx carrying p.
func NewContext(ctx context.Context, p Principal) context.Context {
	return context.WithValue(ctx, principalKey{}, p)
}

// FromContext returns the principal the edge authenticated for this
// request, if any.
func FromContext(ctx context.Context) (Principal, bool) {
	p, ok := ctx.Value(principalKey{}).(Principal)
	return p, ok
}

// ErrOtherTenant marks (as the internal cause of a NotFound) a refusal
// because the resource belongs to another tenant. The caller sees only
// NotFound; the edge uses errors.Is(err, ErrOtherTenant) to audit the
// attempt as a denied access.
var ErrOtherTenant = errors.New("resource belongs to another tenant")
