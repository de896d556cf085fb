package authn

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/gpuaas/gpuaas/pkg/errs"
)

// Accepted algorithms. Nothing else is ever accepted, whatever the
// configuration says.
const (
	AlgRS256 = "RS256"
	AlgES256 = "ES256"
	AlgEdDSA = "EdDSA"
)

// Defaults and bounds of Config.
const (
	DefaultLeeway        = 30 * time.Second
	MaxLeeway            = 5 * time.Minute
	DefaultCacheTTL      = 10 * time.Minute
	DefaultMinRefresh    = 30 * time.Second
	DefaultMaxStale      = 24 * time.Hour
	DefaultFetchTimeout  = 10 * time.Second
	DefaultTenantClaim   = "tenant"
	DefaultVerifiedCache = 4096
	// MaxTokenBytes bounds a token before anything parses it.
	MaxTokenBytes = 8 << 10
)

// Config configures a Verifier. Exactly one key source is used: JWKSFile,
// else JWKSURL, else the issuer's discovery document.
type Config struct {
	// Issuer is the required iss claim, and the base of discovery.
	Issuer string
	// Audience is the audience that must be in aud.
	Audience string
	// JWKSURL is an https URL of the key set; skips discovery.
	JWKSURL string
	// JWKSFile is a key set file, re-read on every refresh.
	JWKSFile string
	// Algorithms is the allowlist; default all of RS256, ES256, EdDSA.
	// Any other value (none, HS256, ...) is a configuration error.
	Algorithms []string
	// Leeway is the clock skew allowed on exp, nbf and iat; at most
	// MaxLeeway. Default DefaultLeeway.
	Leeway time.Duration
	// TenantClaim names the string claim that holds the tenant.
	TenantClaim string
	// AdminScope, if set, is a scope that makes the caller a platform
	// admin (every scope, every tenant).
	AdminScope string
	// AdminClaim, if set, names a claim that makes the caller an admin
	// when it is the boolean true.
	AdminClaim string
	// CacheTTL is how long a fetched key set is used before it is
	// refreshed; MinRefresh is the least time between two fetches (the
	// bound on fetches caused by unknown kids); MaxStale is how long keys
	// are still used while refreshes fail.
	CacheTTL   time.Duration
	MinRefresh time.Duration
	MaxStale   time.Duration
	// HTTPClient fetches discovery and the key set; default a client with
	// FetchTimeout.
	HTTPClient   *http.Client
	FetchTimeout time.Duration
	// Now is the clock; default time.Now.
	Now func() time.Time
	// VerifiedCacheSize bounds the cache of verified tokens (by SHA-256
	// of the token): a token seen again is accepted without a second
	// signature check while its exp holds and the key set it was verified
	// against is current. Default DefaultVerifiedCache; negative disables.
	VerifiedCacheSize int
	// OnRefresh, if set, is told the outcome of every key set fetch
	// (for logs and metrics; it never sees a token).
	OnRefresh func(err error)
}

// Verifier verifies bearer tokens. It is safe for concurrent use.
type Verifier struct {
	cfg      Config
	cache    *keyCache
	parser   *jwt.Parser
	algs     []string
	verified *verifiedCache
}

// NewVerifier validates cfg and returns a Verifier. It fetches nothing:
// the first verification (or Refresh) loads the key set.
func NewVerifier(cfg Config) (*Verifier, error) {
	if cfg.Issuer == "" {
		return nil, errors.New("authn: issuer is required")
	}
	if cfg.Audience == "" {
		return nil, errors.New("authn: audience is required")
	}
	if cfg.Leeway == 0 {
		cfg.Leeway = DefaultLeeway
	}
	if cfg.Leeway < 0 || cfg.Leeway > MaxLeeway {
		return nil, fmt.Errorf("authn: leeway %s must be between 0 and %s", cfg.Leeway, MaxLeeway)
	}
	if cfg.TenantClaim == "" {
		cfg.TenantClaim = DefaultTenantClaim
	}
	if len(cfg.Algorithms) == 0 {
		cfg.Algorithms = []string{AlgRS256, AlgES256, AlgEdDSA}
	}
	for _, a := range cfg.Algorithms {
		if a != AlgRS256 && a != AlgES256 && a != AlgEdDSA {
			return nil, fmt.Errorf("authn: algorithm %q is not accepted (only %s, %s, %s)", a, AlgRS256, AlgES256, AlgEdDSA)
		}
	}
	if cfg.CacheTTL == 0 {
		cfg.CacheTTL = DefaultCacheTTL
	}
	if cfg.MinRefresh == 0 {
		cfg.MinRefresh = DefaultMinRefresh
	}
	if cfg.MaxStale == 0 {
		cfg.MaxStale = DefaultMaxStale
	}
	if cfg.FetchTimeout == 0 {
		cfg.FetchTimeout = DefaultFetchTimeout
	}
	if cfg.CacheTTL < 0 || cfg.MinRefresh < 0 || cfg.MaxStale < cfg.CacheTTL {
		return nil, errors.New("authn: cache ttl and min refresh must be positive, max stale at least the ttl")
	}
	if cfg.VerifiedCacheSize == 0 {
		cfg.VerifiedCacheSize = DefaultVerifiedCache
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.HTTPClient == nil {
		cfg.HTTPClient = &http.Client{Timeout: cfg.FetchTimeout}
	}
	var src keySource
	switch {
	case cfg.JWKSFile != "":
		src = fileSource(cfg.JWKSFile)
	case cfg.JWKSURL != "":
		if err := checkHTTPS("authn: jwks url", cfg.JWKSURL); err != nil {
			return nil, err
		}
		src = urlSource(cfg.HTTPClient, cfg.JWKSURL)
	default:
		if err := checkHTTPS("authn: issuer", cfg.Issuer); err != nil {
			return nil, fmt.Errorf("%w (discovery needs https; or set a jwks url or file)", err)
		}
		src = discoverySource(cfg.HTTPClient, cfg.Issuer)
	}
	v := &Verifier{
		cfg:  cfg,
		algs: slices.Clone(cfg.Algorithms),
		cache: &keyCache{fetch: src, ttl: cfg.CacheTTL, minRefresh: cfg.MinRefresh, maxStale: cfg.MaxStale,
			timeout: cfg.FetchTimeout, now: cfg.Now, onRefresh: cfg.OnRefresh},
	}
	if cfg.VerifiedCacheSize > 0 {
		v.verified = &verifiedCache{max: cfg.VerifiedCacheSize, m: map[[sha256.Size]byte]verifiedToken{}}
	}
	v.parser = jwt.NewParser(
		jwt.WithValidMethods(v.algs),
		jwt.WithIssuer(cfg.Issuer),
		jwt.WithAudience(cfg.Audience),
		jwt.WithLeeway(cfg.Leeway),
		jwt.WithExpirationRequired(),
		jwt.WithIssuedAt(),
		jwt.WithTimeFunc(cfg.Now),
		jwt.WithStrictDecoding(),
	)
	return v, nil
}

// Refresh fetches the key set now (subject to the MinRefresh bound) and
// reports whether usable keys are cached afterwards.
func (v *Verifier) Refresh(ctx context.Context) error {
	v.cache.refresh(ctx)
	v.cache.mu.RLock()
	defer v.cache.mu.RUnlock()
	if v.cache.keys == nil {
		return ErrNoKeys
	}
	return nil
}

// KeyFetches returns how many key set fetches were attempted so far.
func (v *Verifier) KeyFetches() int { return v.cache.attempts() }

// Token errors: their reason is stable, their message safe for the caller.
func tokenError(reason, msg string, cause error) error {
	return errs.Wrap(errs.ErrUnauthenticated, reason, msg, cause)
}

// header is the JOSE header fields we look at before the library does.
type header struct {
	Alg  string `json:"alg"`
	Kid  string `json:"kid"`
	Crit []any  `json:"crit"`
}

// Verify authenticates token and returns its principal. Every failure is
// an errs.ErrUnauthenticated *errs.Error with a stable TOKEN_* reason
// (JWKS_UNAVAILABLE, class Unavailable, when no keys can be had).
func (v *Verifier) Verify(ctx context.Context, token string) (Principal, error) {
	if len(token) > MaxTokenBytes {
		return Principal{}, tokenError("TOKEN_TOO_LARGE", "bearer token too large", nil)
	}
	var sum [sha256.Size]byte
	if v.verified != nil {
		sum = sha256.Sum256([]byte(token))
		if p, ok := v.verified.get(sum, v.cache.current(), v.cfg.Now().Add(-v.cfg.Leeway)); ok {
			return p, nil
		}
	}
	h, err := parseHeader(token)
	if err != nil {
		return Principal{}, tokenError("TOKEN_MALFORMED", "bearer token is malformed", err)
	}
	if !slices.Contains(v.algs, h.Alg) {
		return Principal{}, tokenError("TOKEN_ALG_NOT_ALLOWED", "bearer token algorithm is not allowed", fmt.Errorf("alg %q", truncate(h.Alg, 16)))
	}
	if h.Crit != nil {
		return Principal{}, tokenError("TOKEN_MALFORMED", "bearer token has critical header extensions", nil)
	}
	if h.Kid == "" {
		return Principal{}, tokenError("TOKEN_KID_MISSING", "bearer token has no key id", nil)
	}
	gen := v.cache.current()
	key, err := v.cache.lookup(ctx, h.Kid)
	switch {
	case errors.Is(err, ErrNoKeys):
		return Principal{}, errs.Wrap(errs.ErrUnavailable, "JWKS_UNAVAILABLE", "token keys are unavailable", err)
	case err != nil:
		return Principal{}, tokenError("TOKEN_KID_UNKNOWN", "bearer token key id is unknown", err)
	case key.alg != h.Alg:
		return Principal{}, tokenError("TOKEN_ALG_NOT_ALLOWED", "bearer token algorithm does not match its key", fmt.Errorf("alg %s, key for %s", h.Alg, key.alg))
	}
	claims := jwt.MapClaims{}
	_, err = v.parser.ParseWithClaims(token, claims, func(t *jwt.Token) (any, error) {
		// The header the library parsed must be the one we checked.
		if t.Method.Alg() != key.alg || t.Header["kid"] != h.Kid {
			return nil, errors.New("header changed between parses")
		}
		return key.key, nil
	})
	if err != nil {
		return Principal{}, classify(err)
	}
	p, err := v.principal(claims)
	if err == nil && v.verified != nil && gen != 0 && gen == v.cache.current() {
		v.verified.put(sum, verifiedToken{p: p, gen: gen})
	}
	return p, err
}

// verifiedToken is a token that passed every check against key set gen.
type verifiedToken struct {
	p   Principal
	gen uint64
}

// verifiedCache remembers verified tokens. It is bounded by emptying it
// when full: cheap, and an attacker cannot grow it (only valid tokens enter).
type verifiedCache struct {
	mu  sync.Mutex
	max int
	m   map[[sha256.Size]byte]verifiedToken
}

// get returns the principal of a token verified against key set gen that
// had not expired at notExpiredAt (now minus the leeway).
func (c *verifiedCache) get(sum [sha256.Size]byte, gen uint64, notExpiredAt time.Time) (Principal, bool) {
	if gen == 0 {
		return Principal{}, false
	}
	c.mu.Lock()
	e, ok := c.m[sum]
	c.mu.Unlock()
	if !ok || e.gen != gen || !notExpiredAt.Before(e.p.Expiry) {
		return Principal{}, false
	}
	p := e.p
	p.Scopes = slices.Clone(p.Scopes)
	return p, true
}

func (c *verifiedCache) put(sum [sha256.Size]byte, e verifiedToken) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.m) >= c.max {
		clear(c.m)
	}
	c.m[sum] = e
}

func classify(err error) error {
	type rule struct {
		class   error
		reason  string
		message string
	}
	for _, r := range []rule{
		{jwt.ErrTokenMalformed, "TOKEN_MALFORMED", "bearer token is malformed"},
		{jwt.ErrTokenSignatureInvalid, "TOKEN_SIGNATURE_INVALID", "bearer token signature is invalid"},
		{jwt.ErrTokenUnverifiable, "TOKEN_SIGNATURE_INVALID", "bearer token cannot be verified"},
		{jwt.ErrTokenExpired, "TOKEN_EXPIRED", "bearer token has expired"},
		{jwt.ErrTokenNotValidYet, "TOKEN_NOT_YET_VALID", "bearer token is not valid yet"},
		{jwt.ErrTokenUsedBeforeIssued, "TOKEN_ISSUED_IN_FUTURE", "bearer token is issued in the future"},
		{jwt.ErrTokenInvalidIssuer, "TOKEN_ISSUER_INVALID", "bearer token issuer is not accepted"},
		{jwt.ErrTokenInvalidAudience, "TOKEN_AUDIENCE_INVALID", "bearer token is not for this audience"},
		{jwt.ErrTokenRequiredClaimMissing, "TOKEN_CLAIMS_INVALID", "bearer token lacks a required claim"},
	} {
		if errors.Is(err, r.class) {
			return tokenError(r.reason, r.message, err)
		}
	}
	return tokenError("TOKEN_INVALID", "bearer token is invalid", err)
}

// parseHeader decodes the protected header of a compact JWS.
func parseHeader(token string) (header, error) {
	var h header
	head, rest, ok := strings.Cut(token, ".")
	if !ok || strings.Count(rest, ".") != 1 || head == "" {
		return h, errors.New("not a compact jws")
	}
	raw, err := base64.RawURLEncoding.DecodeString(head)
	if err != nil {
		return h, fmt.Errorf("header: %w", err)
	}
	if err := json.Unmarshal(raw, &h); err != nil {
		return h, fmt.Errorf("header: %w", err)
	}
	return h, nil
}

// principal turns verified claims into a Principal.
func (v *Verifier) principal(c jwt.MapClaims) (Principal, error) {
	sub, _ := c["sub"].(string)
	if !validText(sub, 256) {
		return Principal{}, tokenError("TOKEN_CLAIMS_INVALID", "bearer token subject is missing or invalid", nil)
	}
	p := Principal{Kind: KindToken, Subject: sub, Issuer: v.cfg.Issuer}
	if exp, err := c.GetExpirationTime(); err == nil && exp != nil {
		p.Expiry = exp.Time
	}
	scopes, err := scopesOf(c)
	if err != nil {
		return Principal{}, tokenError("TOKEN_CLAIMS_INVALID", "bearer token scopes are invalid", err)
	}
	if v.cfg.AdminScope != "" && slices.Contains(scopes, Scope(v.cfg.AdminScope)) {
		p.Admin = true
	}
	if v.cfg.AdminClaim != "" {
		if b, ok := c[v.cfg.AdminClaim].(bool); ok && b {
			p.Admin = true
		}
	}
	p.Scopes = scopes
	if t, present := c[v.cfg.TenantClaim]; present {
		ts, ok := t.(string)
		if !ok || !validText(ts, 128) {
			return Principal{}, tokenError("TOKEN_CLAIMS_INVALID", "bearer token tenant claim is invalid", nil)
		}
		p.Tenant = ts
	}
	return p, nil
}

// scopesOf reads the space-separated "scope" claim (RFC 8693) and the
// "scp" claim (an array, or a space-separated string), sorted, deduplicated.
func scopesOf(c jwt.MapClaims) ([]Scope, error) {
	var out []Scope
	add := func(s string) error {
		for f := range strings.FieldsSeq(s) {
			if !validText(f, 128) {
				return errors.New("scope is not printable text of at most 128 bytes")
			}
			out = append(out, Scope(f))
		}
		return nil
	}
	if s, present := c["scope"]; present {
		str, ok := s.(string)
		if !ok {
			return nil, errors.New("scope is not a string")
		}
		if err := add(str); err != nil {
			return nil, err
		}
	}
	switch scp := c["scp"].(type) {
	case nil:
	case string:
		if err := add(scp); err != nil {
			return nil, err
		}
	case []any:
		for _, e := range scp {
			s, ok := e.(string)
			if !ok {
				return nil, errors.New("scp holds a non-string")
			}
			if err := add(s); err != nil {
				return nil, err
			}
		}
	default:
		return nil, errors.New("scp is neither a string nor an array")
	}
	if len(out) > 256 {
		return nil, errors.New("too many scopes")
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}

// validText is non-empty printable ASCII of at most max bytes.
func validText(s string, max int) bool {
	if s == "" || len(s) > max {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < 0x21 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}
