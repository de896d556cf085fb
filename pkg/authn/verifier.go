package authn

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"math/big"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

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
	algs     []string
	verified *verifiedCache
	headers  headerCache
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

// Verify authenticates token and returns its principal. Every failure is
// an errs.ErrUnauthenticated *errs.Error with a stable TOKEN_* reason
// (JWKS_UNAVAILABLE, class Unavailable, when no keys can be had).
//
// The order: size; the verified-token cache; the header (algorithm
// allowlist, no crit, a kid); the key, whose own algorithm must be the
// header's; the signature over the signing input (RS256 with the key's
// prepared modulus, rs256.go; ES256 and EdDSA with crypto/ecdsa and
// crypto/ed25519); only then the claims.
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
	headSeg, payloadSeg, sigSeg, signing, ok := splitJWS(token)
	if !ok {
		return Principal{}, tokenError("TOKEN_MALFORMED", "bearer token is malformed", errors.New("not a compact jws"))
	}
	var buf [1024]byte
	var fields [16]member
	alg, kid, known := v.headers.get(headSeg)
	if !known {
		var err error
		if alg, kid, err = v.header(buf[:], fields[:0], headSeg); err != nil {
			return Principal{}, err
		}
	}
	gen := v.cache.current()
	key, err := v.cache.lookup(ctx, kid)
	switch {
	case errors.Is(err, ErrNoKeys):
		return Principal{}, errs.Wrap(errs.ErrUnavailable, "JWKS_UNAVAILABLE", "token keys are unavailable", err)
	case err != nil:
		return Principal{}, tokenError("TOKEN_KID_UNKNOWN", "bearer token key id is unknown", err)
	case key.alg != alg:
		return Principal{}, tokenError("TOKEN_ALG_NOT_ALLOWED", "bearer token algorithm does not match its key", fmt.Errorf("alg %s, key for %s", alg, key.alg))
	}
	sig, err := decodeSegment(buf[:], sigSeg)
	if err != nil {
		return Principal{}, tokenError("TOKEN_MALFORMED", "bearer token is malformed", fmt.Errorf("signature: %w", err))
	}
	if err := verifySignature(key, signing, sig); err != nil {
		return Principal{}, tokenError("TOKEN_SIGNATURE_INVALID", "bearer token signature is invalid", err)
	}
	var claimBuf [2048]byte
	payload, err := decodeSegment(claimBuf[:], payloadSeg)
	if err != nil {
		return Principal{}, tokenError("TOKEN_MALFORMED", "bearer token is malformed", fmt.Errorf("claims: %w", err))
	}
	var claimFields [32]member
	p, err := v.claims(payload, claimFields[:0])
	if err == nil && !known {
		v.headers.put(headSeg, alg, kid)
	}
	if err == nil && v.verified != nil && gen != 0 && gen == v.cache.current() {
		v.verified.put(sum, verifiedToken{p: p, gen: gen})
	}
	return p, err
}

// header reads and checks the protected header: alg in the allowlist (so
// none and HMAC are refused before any key is looked up), no crit, a kid.
func (v *Verifier) header(buf []byte, fields []member, seg string) (alg, kid string, err error) {
	raw, err := decodeSegment(buf, seg)
	if err != nil {
		return "", "", tokenError("TOKEN_MALFORMED", "bearer token is malformed", fmt.Errorf("header: %w", err))
	}
	fields, err = objectMembers(raw, fields)
	if err != nil {
		return "", "", tokenError("TOKEN_MALFORMED", "bearer token is malformed", fmt.Errorf("header: %w", err))
	}
	var vals [3][]byte // alg, kid, crit
	for _, f := range fields {
		for i, name := range [...]string{"alg", "kid", "crit"} {
			if !f.is(raw, name) {
				continue
			}
			if vals[i] != nil {
				return "", "", tokenError("TOKEN_MALFORMED", "bearer token is malformed", fmt.Errorf("header: duplicate %q", name))
			}
			vals[i] = raw[f.v0:f.v1]
		}
	}
	algRaw, kidRaw, crit := vals[0], vals[1], vals[2] != nil
	// The allowlist holds only the three accepted names; anything else,
	// including a non-string alg, is refused here.
	for _, a := range v.algs {
		if algRaw != nil && equalString(algRaw, a) {
			alg = a
			break
		}
	}
	if alg == "" {
		shown := "<absent>"
		if algRaw != nil {
			shown = truncate(string(algRaw), 18)
		}
		return "", "", tokenError("TOKEN_ALG_NOT_ALLOWED", "bearer token algorithm is not allowed", fmt.Errorf("alg %s", shown))
	}
	if crit {
		return "", "", tokenError("TOKEN_MALFORMED", "bearer token has critical header extensions", nil)
	}
	if kidRaw != nil && !isString(kidRaw) {
		return "", "", tokenError("TOKEN_MALFORMED", "bearer token is malformed", errors.New("header: kid is not a string"))
	}
	if kidRaw != nil {
		if kid, err = unquote(kidRaw); err != nil {
			return "", "", tokenError("TOKEN_MALFORMED", "bearer token is malformed", fmt.Errorf("header: kid: %w", err))
		}
	}
	if kid == "" {
		return "", "", tokenError("TOKEN_KID_MISSING", "bearer token has no key id", nil)
	}
	return alg, kid, nil
}

// verifySignature checks sig over the signing input with key, by the
// key's one algorithm (already checked equal to the header's).
func verifySignature(key publicKey, signing string, sig []byte) error {
	switch key.alg {
	case AlgRS256:
		digest := sha256.Sum256([]byte(signing))
		if key.rs256 != nil {
			return key.rs256.verify(&digest, sig)
		}
		// A key not prepared by parseJWKS: crypto/rsa, which rebuilds the
		// modulus per call.
		pub, ok := key.key.(*rsa.PublicKey)
		if !ok {
			return errKeyType
		}
		return rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig)
	case AlgES256:
		pub, ok := key.key.(*ecdsa.PublicKey)
		if !ok {
			return errKeyType
		}
		// RFC 7518 section 3.4: R and S, 32 bytes each, big-endian.
		if len(sig) != 64 {
			return errBadSignature
		}
		digest := sha256.Sum256([]byte(signing))
		r, s := new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:])
		if !ecdsa.Verify(pub, digest[:], r, s) {
			return errBadSignature
		}
		return nil
	case AlgEdDSA:
		pub, ok := key.key.(ed25519.PublicKey)
		if !ok {
			return errKeyType
		}
		if len(sig) != ed25519.SignatureSize || !ed25519.Verify(pub, []byte(signing), sig) {
			return errBadSignature
		}
		return nil
	}
	return errKeyType
}

var (
	errKeyType      = errors.New("key type does not match its algorithm")
	errBadSignature = errors.New("signature does not verify")
)

// headerCache remembers the protected headers (the encoded segment, as
// sent) of tokens that verified, with the alg and kid read from them: an
// identity provider signs every token of a key with the same header, so a
// new token usually needs no header parsing. Only headers of verified
// tokens enter (an attacker cannot fill it) and it is emptied when full.
// The same bytes always parse to the same alg and kid, and the key, its
// algorithm and the signature are still checked on every token.
type headerCache struct {
	mu sync.RWMutex
	m  map[string]parsedHeader
}

type parsedHeader struct{ alg, kid string }

const maxCachedHeaders = 64

func (c *headerCache) get(seg string) (alg, kid string, ok bool) {
	c.mu.RLock()
	h, ok := c.m[seg]
	c.mu.RUnlock()
	return h.alg, h.kid, ok
}

func (c *headerCache) put(seg, alg, kid string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil || len(c.m) >= maxCachedHeaders {
		c.m = make(map[string]parsedHeader, maxCachedHeaders)
	}
	// A copy: seg points into the caller's token.
	c.m[strings.Clone(seg)] = parsedHeader{alg: alg, kid: kid}
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

// Indexes of the claims Verify interprets.
const (
	cTenant = iota
	cAdmin
	cIss
	cAud
	cSub
	cExp
	cNbf
	cIat
	cScope
	cScp
	nClaims
)

// claimsOf are the claims Verify interprets, as raw JSON values (nil when
// absent).
type claimsOf struct {
	iss, aud, sub, exp, nbf, iat, scope, scp, tenant, admin []byte
}

// claims checks the claims of a token whose signature verified and turns
// them into a Principal. The checks and their reasons, in order of
// precedence: exp (TOKEN_EXPIRED), nbf (TOKEN_NOT_YET_VALID), iat
// (TOKEN_ISSUED_IN_FUTURE), iss (TOKEN_ISSUER_INVALID), aud
// (TOKEN_AUDIENCE_INVALID), a required claim missing or of the wrong type
// (TOKEN_CLAIMS_INVALID). exp, iss and aud are required.
func (v *Verifier) claims(payload []byte, fields []member) (Principal, error) {
	fields, err := objectMembers(payload, fields)
	if err != nil {
		return Principal{}, tokenError("TOKEN_MALFORMED", "bearer token is malformed", fmt.Errorf("claims: %w", err))
	}
	var vals [nClaims][]byte
	names := [nClaims]string{cTenant: v.cfg.TenantClaim, cAdmin: v.cfg.AdminClaim, cIss: "iss", cAud: "aud", cSub: "sub",
		cExp: "exp", cNbf: "nbf", cIat: "iat", cScope: "scope", cScp: "scp"}
	for _, f := range fields {
		// The configured tenant and admin claims may share a name with a
		// registered one (the tenant in "aud", say): each is read apart.
		for i, name := range names {
			if name == "" || !f.is(payload, name) {
				continue
			}
			if vals[i] != nil {
				return Principal{}, tokenError("TOKEN_CLAIMS_INVALID", "bearer token repeats a claim", fmt.Errorf("duplicate %q", truncate(name, 64)))
			}
			vals[i] = payload[f.v0:f.v1]
		}
	}
	c := claimsOf{tenant: vals[cTenant], admin: vals[cAdmin], iss: vals[cIss], aud: vals[cAud], sub: vals[cSub],
		exp: vals[cExp], nbf: vals[cNbf], iat: vals[cIat], scope: vals[cScope], scp: vals[cScp]}
	invalid := func(err error) (Principal, error) {
		return Principal{}, tokenError("TOKEN_CLAIMS_INVALID", "bearer token claims are invalid", err)
	}
	exp, hasExp, err := numericDate(c.exp)
	if err != nil {
		return invalid(fmt.Errorf("exp: %w", err))
	}
	nbf, hasNbf, err := numericDate(c.nbf)
	if err != nil {
		return invalid(fmt.Errorf("nbf: %w", err))
	}
	iat, hasIat, err := numericDate(c.iat)
	if err != nil {
		return invalid(fmt.Errorf("iat: %w", err))
	}
	if c.iss != nil && !isString(c.iss) {
		return invalid(errors.New("iss is not a string"))
	}
	var aud []string
	if c.aud != nil {
		if aud, err = stringList(c.aud); err != nil {
			return invalid(fmt.Errorf("aud: %w", err))
		}
	}
	now := v.cfg.Now()
	leeway := v.cfg.Leeway
	switch {
	case hasExp && !now.Before(exp.Add(leeway)):
		return Principal{}, tokenError("TOKEN_EXPIRED", "bearer token has expired", nil)
	case hasNbf && now.Before(nbf.Add(-leeway)):
		return Principal{}, tokenError("TOKEN_NOT_YET_VALID", "bearer token is not valid yet", nil)
	case hasIat && now.Before(iat.Add(-leeway)):
		return Principal{}, tokenError("TOKEN_ISSUED_IN_FUTURE", "bearer token is issued in the future", nil)
	case c.iss != nil && !equalString(c.iss, "") && !equalString(c.iss, v.cfg.Issuer):
		return Principal{}, tokenError("TOKEN_ISSUER_INVALID", "bearer token issuer is not accepted", nil)
	case len(aud) > 0 && !(len(aud) == 1 && aud[0] == "") && !slices.Contains(aud, v.cfg.Audience):
		return Principal{}, tokenError("TOKEN_AUDIENCE_INVALID", "bearer token is not for this audience", nil)
	case !hasExp || c.iss == nil || equalString(c.iss, "") || len(aud) == 0 || (len(aud) == 1 && aud[0] == ""):
		return Principal{}, tokenError("TOKEN_CLAIMS_INVALID", "bearer token lacks a required claim", nil)
	}
	return v.principal(c, exp)
}

// principal turns verified claims into a Principal.
func (v *Verifier) principal(c claimsOf, exp time.Time) (Principal, error) {
	sub, err := textClaim(c.sub, 256)
	if err != nil {
		return Principal{}, tokenError("TOKEN_CLAIMS_INVALID", "bearer token subject is missing or invalid", nil)
	}
	p := Principal{Kind: KindToken, Subject: sub, Issuer: v.cfg.Issuer, Expiry: exp}
	scopes, err := scopesOf(c.scope, c.scp)
	if err != nil {
		return Principal{}, tokenError("TOKEN_CLAIMS_INVALID", "bearer token scopes are invalid", err)
	}
	if v.cfg.AdminScope != "" && slices.Contains(scopes, Scope(v.cfg.AdminScope)) {
		p.Admin = true
	}
	if c.admin != nil && string(c.admin) == "true" {
		p.Admin = true
	}
	p.Scopes = scopes
	if c.tenant != nil {
		if p.Tenant, err = textClaim(c.tenant, 128); err != nil {
			return Principal{}, tokenError("TOKEN_CLAIMS_INVALID", "bearer token tenant claim is invalid", nil)
		}
	}
	return p, nil
}

// textClaim reads a string claim that must be validText of at most max
// bytes.
func textClaim(raw []byte, max int) (string, error) {
	if !isString(raw) {
		return "", errors.New("not a string")
	}
	s, err := unquote(raw)
	if err != nil || !validText(s, max) {
		return "", errors.New("not printable text")
	}
	return s, nil
}

// scopesOf reads the space-separated "scope" claim (RFC 8693) and the
// "scp" claim (an array, or a space-separated string), sorted, deduplicated.
func scopesOf(scope, scp []byte) ([]Scope, error) {
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
	if scope != nil {
		if !isString(scope) {
			return nil, errors.New("scope is not a string")
		}
		s, err := unquote(scope)
		if err != nil {
			return nil, err
		}
		if err := add(s); err != nil {
			return nil, err
		}
	}
	if scp != nil && string(scp) != "null" {
		list, err := stringList(scp)
		if err != nil {
			return nil, fmt.Errorf("scp: %w", err)
		}
		for _, s := range list {
			if err := add(s); err != nil {
				return nil, err
			}
		}
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
