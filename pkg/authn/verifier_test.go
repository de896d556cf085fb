package authn_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/pkg/authn"
	"github.com/gpuaas/gpuaas/pkg/authn/authntest"
	"github.com/gpuaas/gpuaas/pkg/errs"
)

const aud = "gpuaas"

// clock is a settable clock for the key cache.
type clock struct{ ns atomic.Int64 }

func newClock() *clock               { c := &clock{}; c.ns.Store(time.Now().UnixNano()); return c }
func (c *clock) now() time.Time      { return time.Unix(0, c.ns.Load()) }
func (c *clock) add(d time.Duration) { c.ns.Add(int64(d)) }

type fixture struct {
	idp   *authntest.Provider
	rsa   authntest.Key
	ec    authntest.Key
	ed    authntest.Key
	clock *clock
	v     *authn.Verifier
}

func newFixture(t testing.TB, mod func(*authn.Config)) *fixture {
	t.Helper()
	f := &fixture{rsa: authntest.NewKey("rsa-1", "RS256"), ec: authntest.NewKey("ec-1", "ES256"), ed: authntest.NewKey("ed-1", "EdDSA"), clock: newClock()}
	f.idp = authntest.NewProvider(f.rsa, f.ec, f.ed)
	t.Cleanup(f.idp.Close)
	cfg := authn.Config{Issuer: f.idp.Issuer, Audience: aud, HTTPClient: f.idp.Client(), Now: f.clock.now,
		AdminScope: "gpuaas:admin", TenantClaim: "tenant"}
	if mod != nil {
		mod(&cfg)
	}
	v, err := authn.NewVerifier(cfg)
	if err != nil {
		t.Fatal(err)
	}
	f.v = v
	return f
}

func (f *fixture) claims(extra map[string]any) map[string]any {
	return f.idp.Claims(aud, "alice", extra)
}

func reasonOf(t *testing.T, err error) string {
	t.Helper()
	if err == nil {
		t.Fatal("token accepted")
	}
	return errs.ReasonOf(err)
}

func TestVerifyAcceptsEachAllowedAlgorithm(t *testing.T) {
	f := newFixture(t, nil)
	for _, k := range []authntest.Key{f.rsa, f.ec, f.ed} {
		p, err := f.v.Verify(context.Background(), k.Sign(f.claims(map[string]any{"scope": "lease:read lease:write", "tenant": "acme"})))
		if err != nil {
			t.Fatalf("%s: %v", k.Alg, err)
		}
		if p.Kind != authn.KindToken || p.Subject != "alice" || p.ID() != "oidc:alice" || p.Tenant != "acme" || p.Admin ||
			!slices.Equal(p.Scopes, []authn.Scope{authn.ScopeLeaseRead, authn.ScopeLeaseWrite}) {
			t.Fatalf("%s: principal = %+v", k.Alg, p)
		}
		if !p.HasScope(authn.ScopeLeaseRead) || p.HasScope(authn.ScopeNodeRead) || p.TenantFilter() != "acme" {
			t.Fatalf("%s: scope checks wrong for %+v", k.Alg, p)
		}
	}
	if n := f.v.KeyFetches(); n != 1 {
		t.Fatalf("key set fetched %d times for three verifications, want 1 (cached)", n)
	}
}

func TestVerifyRejectsForgedAndInvalidTokens(t *testing.T) {
	f := newFixture(t, nil)
	now := time.Now()
	other := authntest.NewKey("rsa-1", "RS256") // same kid, key not published
	cases := []struct {
		name, reason string
		token        func() string
	}{
		{"alg none", "TOKEN_ALG_NOT_ALLOWED", func() string {
			return authntest.Raw(map[string]any{"alg": "none", "kid": "rsa-1"}, f.claims(nil), nil)
		}},
		{"alg none without kid", "TOKEN_ALG_NOT_ALLOWED", func() string {
			return authntest.Raw(map[string]any{"alg": "none"}, f.claims(nil), nil)
		}},
		{"HS256 signed with the RSA public key", "TOKEN_ALG_NOT_ALLOWED", func() string {
			return authntest.HS256(map[string]any{"kid": "rsa-1"}, f.claims(nil), f.rsa.PublicPEM())
		}},
		{"HS256 signed with the JWK modulus", "TOKEN_ALG_NOT_ALLOWED", func() string {
			return authntest.HS256(map[string]any{"kid": "rsa-1"}, f.claims(nil), []byte(f.rsa.JWK()["n"].(string)))
		}},
		{"RS384", "TOKEN_ALG_NOT_ALLOWED", func() string {
			return authntest.Raw(map[string]any{"alg": "RS384", "kid": "rsa-1"}, f.claims(nil), []byte("x"))
		}},
		{"ES256 header on an RSA key", "TOKEN_ALG_NOT_ALLOWED", func() string {
			return f.ec.SignWithHeader(map[string]any{"kid": "rsa-1"}, f.claims(nil))
		}},
		{"signed by an unpublished key", "TOKEN_SIGNATURE_INVALID", func() string { return other.Sign(f.claims(nil)) }},
		{"tampered claims", "TOKEN_SIGNATURE_INVALID", func() string {
			good := f.rsa.Sign(f.claims(nil))
			bad := f.rsa.Sign(f.claims(map[string]any{"sub": "mallory"}))
			return good[:indexDot(good)] + bad[indexDot(bad):lastDot(bad)] + good[lastDot(good):]
		}},
		{"no kid", "TOKEN_KID_MISSING", func() string { return f.rsa.SignWithHeader(map[string]any{"kid": ""}, f.claims(nil)) }},
		{"unknown kid", "TOKEN_KID_UNKNOWN", func() string { return f.rsa.SignWithHeader(map[string]any{"kid": "nope"}, f.claims(nil)) }},
		{"expired", "TOKEN_EXPIRED", func() string {
			return f.rsa.Sign(f.claims(map[string]any{"iat": now.Add(-2 * time.Hour).Unix(), "nbf": now.Add(-2 * time.Hour).Unix(), "exp": now.Add(-time.Hour).Unix()}))
		}},
		{"expired beyond the leeway", "TOKEN_EXPIRED", func() string {
			return f.rsa.Sign(f.claims(map[string]any{"iat": now.Add(-time.Hour).Unix(), "exp": now.Add(-authn.DefaultLeeway - 5*time.Second).Unix()}))
		}},
		{"no exp", "TOKEN_CLAIMS_INVALID", func() string {
			c := f.claims(nil)
			delete(c, "exp")
			return f.rsa.Sign(c)
		}},
		{"not yet valid", "TOKEN_NOT_YET_VALID", func() string {
			return f.rsa.Sign(f.claims(map[string]any{"nbf": now.Add(10 * time.Minute).Unix()}))
		}},
		{"issued in the future", "TOKEN_ISSUED_IN_FUTURE", func() string {
			return f.rsa.Sign(f.claims(map[string]any{"iat": now.Add(10 * time.Minute).Unix()}))
		}},
		{"wrong issuer", "TOKEN_ISSUER_INVALID", func() string { return f.rsa.Sign(f.claims(map[string]any{"iss": "https://evil.example"})) }},
		{"wrong audience", "TOKEN_AUDIENCE_INVALID", func() string { return f.rsa.Sign(f.claims(map[string]any{"aud": "someone-else"})) }},
		{"audience list without us", "TOKEN_AUDIENCE_INVALID", func() string { return f.rsa.Sign(f.claims(map[string]any{"aud": []string{"a", "b"}})) }},
		{"no subject", "TOKEN_CLAIMS_INVALID", func() string { return f.rsa.Sign(f.claims(map[string]any{"sub": ""})) }},
		{"tenant not a string", "TOKEN_CLAIMS_INVALID", func() string { return f.rsa.Sign(f.claims(map[string]any{"tenant": 7})) }},
		{"scp not strings", "TOKEN_CLAIMS_INVALID", func() string { return f.rsa.Sign(f.claims(map[string]any{"scp": []any{1}})) }},
		{"crit header", "TOKEN_MALFORMED", func() string {
			return f.rsa.SignWithHeader(map[string]any{"kid": "rsa-1", "crit": []string{"exp"}}, f.claims(nil))
		}},
		{"garbage", "TOKEN_MALFORMED", func() string { return "not.a.token" }},
		{"two segments", "TOKEN_MALFORMED", func() string { return "abc.def" }},
		{"huge", "TOKEN_TOO_LARGE", func() string { return string(make([]byte, authn.MaxTokenBytes+1)) }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := f.v.Verify(context.Background(), c.token())
			if got := reasonOf(t, err); got != c.reason || !errors.Is(err, errs.ErrUnauthenticated) {
				t.Fatalf("reason = %q (%v), want %q", got, err, c.reason)
			}
		})
	}
}

func indexDot(s string) int { return slices.Index([]byte(s), '.') }
func lastDot(s string) int {
	for i := len(s) - 1; i >= 0; i-- {
		if s[i] == '.' {
			return i
		}
	}
	return -1
}

func TestConfigRefusesUnsafeAlgorithmsAndSkew(t *testing.T) {
	for _, alg := range []string{"none", "HS256", "HS512", "RS384", ""} {
		_, err := authn.NewVerifier(authn.Config{Issuer: "https://idp", Audience: aud, Algorithms: []string{alg}})
		if err == nil {
			t.Fatalf("algorithm %q accepted in the configuration", alg)
		}
	}
	if _, err := authn.NewVerifier(authn.Config{Issuer: "https://idp", Audience: aud, Leeway: time.Hour}); err == nil {
		t.Fatal("a one-hour clock skew was accepted")
	}
	if _, err := authn.NewVerifier(authn.Config{Issuer: "http://idp", Audience: aud}); err == nil {
		t.Fatal("discovery over plain http was accepted")
	}
	if _, err := authn.NewVerifier(authn.Config{Issuer: "https://idp", Audience: aud, JWKSURL: "http://idp/keys"}); err == nil {
		t.Fatal("a plain-http jwks url was accepted")
	}
	if _, err := authn.NewVerifier(authn.Config{Issuer: "https://idp"}); err == nil {
		t.Fatal("no audience was accepted")
	}
}

func TestAlgorithmAllowlistIsConfigurable(t *testing.T) {
	f := newFixture(t, func(c *authn.Config) { c.Algorithms = []string{authn.AlgEdDSA} })
	if _, err := f.v.Verify(context.Background(), f.rsa.Sign(f.claims(nil))); reasonOf(t, err) != "TOKEN_ALG_NOT_ALLOWED" {
		t.Fatalf("RS256 with an EdDSA-only allowlist: %v", err)
	}
	if _, err := f.v.Verify(context.Background(), f.ed.Sign(f.claims(nil))); err != nil {
		t.Fatal(err)
	}
}

func TestUnknownKidRefreshIsRateLimited(t *testing.T) {
	f := newFixture(t, func(c *authn.Config) { c.MinRefresh = time.Minute; c.CacheTTL = time.Hour })
	ctx := context.Background()
	if _, err := f.v.Verify(ctx, f.rsa.Sign(f.claims(nil))); err != nil {
		t.Fatal(err)
	}
	// A flood of random kids, concurrently and sequentially, within one
	// MinRefresh interval: no fetch at all (the first fetch was < 1m ago).
	var wg sync.WaitGroup
	for i := range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tok := f.rsa.SignWithHeader(map[string]any{"kid": "random-" + string(rune('a'+i%26))}, f.claims(nil))
			if _, err := f.v.Verify(ctx, tok); errs.ReasonOf(err) != "TOKEN_KID_UNKNOWN" {
				t.Errorf("random kid: %v", err)
			}
		}()
	}
	wg.Wait()
	if n := f.idp.Fetches.Load(); n != 1 {
		t.Fatalf("%d key set fetches after a kid flood, want 1", n)
	}
	// After the interval, an unknown kid may cause exactly one more fetch,
	// however many arrive at once.
	f.clock.add(time.Minute)
	for i := range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tok := f.rsa.SignWithHeader(map[string]any{"kid": "again-" + string(rune('a'+i%26))}, f.claims(nil))
			_, _ = f.v.Verify(ctx, tok)
		}()
	}
	wg.Wait()
	if n := f.idp.Fetches.Load(); n != 2 {
		t.Fatalf("%d key set fetches, want 2", n)
	}
}

func TestKeyRotationIsPickedUp(t *testing.T) {
	f := newFixture(t, func(c *authn.Config) { c.MinRefresh = time.Minute; c.CacheTTL = 10 * time.Minute })
	ctx := context.Background()
	if _, err := f.v.Verify(ctx, f.rsa.Sign(f.claims(nil))); err != nil {
		t.Fatal(err)
	}
	// The IdP rotates: a new key is added, the old one later removed.
	next := authntest.NewKey("rsa-2", "RS256")
	f.idp.SetKeys(f.rsa, next)
	f.clock.add(2 * time.Minute)
	if _, err := f.v.Verify(ctx, next.Sign(f.claims(nil))); err != nil {
		t.Fatalf("token of the new key (unknown kid refresh): %v", err)
	}
	f.idp.SetKeys(next)
	// Within the TTL the removed key is still cached...
	if _, err := f.v.Verify(ctx, f.rsa.Sign(f.claims(nil))); err != nil {
		t.Fatalf("old key inside the ttl: %v", err)
	}
	// ...and once the set is older than the TTL it is refetched and gone.
	f.clock.add(11 * time.Minute)
	if _, err := f.v.Verify(ctx, f.rsa.Sign(f.claims(nil))); reasonOf(t, err) != "TOKEN_KID_UNKNOWN" {
		t.Fatalf("removed key after the ttl: %v", err)
	}
}

func TestFailedRefreshKeepsKeysUntilMaxStale(t *testing.T) {
	f := newFixture(t, func(c *authn.Config) {
		c.MinRefresh = time.Second
		c.CacheTTL = time.Minute
		c.MaxStale = time.Hour
	})
	ctx := context.Background()
	tok := f.rsa.Sign(f.claims(nil))
	if _, err := f.v.Verify(ctx, tok); err != nil {
		t.Fatal(err)
	}
	f.idp.Close() // the IdP goes away
	f.clock.add(2 * time.Minute)
	if _, err := f.v.Verify(ctx, tok); err != nil {
		t.Fatalf("stale keys not used while the IdP is down: %v", err)
	}
	f.clock.add(2 * time.Hour)
	_, err := f.v.Verify(ctx, tok)
	if !errors.Is(err, errs.ErrUnavailable) || errs.ReasonOf(err) != "JWKS_UNAVAILABLE" {
		t.Fatalf("keys past max stale: %v", err)
	}
}

func TestScopesTenantAndAdmin(t *testing.T) {
	f := newFixture(t, func(c *authn.Config) { c.TenantClaim = "https://gpuaas.dev/tenant"; c.AdminClaim = "gpuaas_admin" })
	ctx := context.Background()
	p, err := f.v.Verify(ctx, f.rsa.Sign(f.claims(map[string]any{"scp": []any{"node:read", "lease:read"}, "scope": "lease:read audit:read", "https://gpuaas.dev/tenant": "acme", "tenant": "ignored"})))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(p.Scopes, []authn.Scope{"audit:read", "lease:read", "node:read"}) || p.Tenant != "acme" || p.Admin {
		t.Fatalf("principal = %+v", p)
	}
	p, err = f.v.Verify(ctx, f.rsa.Sign(f.claims(map[string]any{"scp": "lease:write", "gpuaas_admin": true})))
	if err != nil || !p.Admin || !p.HasScope(authn.ScopeNodeAdmin) || p.TenantFilter() != "" {
		t.Fatalf("admin claim: %+v %v", p, err)
	}
	p, err = f.v.Verify(ctx, f.rsa.Sign(f.claims(map[string]any{"gpuaas_admin": "true"})))
	if err != nil || p.Admin {
		t.Fatalf("a non-boolean admin claim made an admin: %+v %v", p, err)
	}
	p, err = f.v.Verify(ctx, f.rsa.Sign(f.claims(map[string]any{"scope": "gpuaas:admin", "https://gpuaas.dev/tenant": "acme"})))
	if err != nil || !p.Admin || p.TenantFilter() != "" {
		t.Fatalf("admin scope: %+v %v", p, err)
	}
}

func TestDiscoveryIssuerMustMatch(t *testing.T) {
	idp := authntest.NewProvider(authntest.NewKey("k", "RS256"))
	defer idp.Close()
	v, err := authn.NewVerifier(authn.Config{Issuer: idp.Issuer + "/other", Audience: aud, HTTPClient: idp.Client()})
	if err != nil {
		t.Fatal(err)
	}
	if err := v.Refresh(context.Background()); err == nil {
		t.Fatal("a discovery document for another issuer was accepted")
	}
}

func TestJWKSFromURLAndFile(t *testing.T) {
	k := authntest.NewKey("k1", "ES256")
	idp := authntest.NewProvider(k)
	defer idp.Close()
	path := filepath.Join(t.TempDir(), "jwks.json")
	if err := os.WriteFile(path, authntest.JWKS(k), 0o600); err != nil {
		t.Fatal(err)
	}
	for name, cfg := range map[string]authn.Config{
		"url":  {Issuer: "https://issuer.example", Audience: aud, JWKSURL: idp.Issuer + "/keys", HTTPClient: idp.Client()},
		"file": {Issuer: "https://issuer.example", Audience: aud, JWKSFile: path},
	} {
		v, err := authn.NewVerifier(cfg)
		if err != nil {
			t.Fatal(err)
		}
		c := idp.Claims(aud, "svc", nil)
		c["iss"] = "https://issuer.example"
		if _, err := v.Verify(context.Background(), k.Sign(c)); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
	if idp.Discoveries.Load() != 0 {
		t.Fatal("discovery used although a jwks url was configured")
	}
}

func TestContextCarriesPrincipal(t *testing.T) {
	if _, ok := authn.FromContext(context.Background()); ok {
		t.Fatal("principal in an empty context")
	}
	p := authn.Principal{Kind: authn.KindSPIFFE, Subject: "spiffe://td/gpuaas/operator/a", Admin: true}
	got, ok := authn.FromContext(authn.NewContext(context.Background(), p))
	if !ok || got.ID() != "spiffe://td/gpuaas/operator/a" || !got.HasScope(authn.ScopeAuditRead) {
		t.Fatalf("got %+v", got)
	}
}

func TestVerifiedTokenCacheHonoursExpiryAndRotation(t *testing.T) {
	f := newFixture(t, func(c *authn.Config) {
		c.MinRefresh = time.Second
		c.CacheTTL = 10 * time.Minute
		c.Leeway = time.Second
	})
	ctx := context.Background()
	now := f.clock.now()
	tok := f.rsa.Sign(f.claims(map[string]any{"exp": now.Add(5 * time.Minute).Unix()}))
	for range 3 {
		if _, err := f.v.Verify(ctx, tok); err != nil {
			t.Fatal(err)
		}
	}
	// Past exp (and the leeway) a cached token is refused like any other.
	f.clock.add(5*time.Minute + 2*time.Second)
	if _, err := f.v.Verify(ctx, tok); reasonOf(t, err) != "TOKEN_EXPIRED" {
		t.Fatalf("cached token past exp: %v", err)
	}
	// A token verified against a key set that has since been replaced
	// (the key was revoked) is not served from the cache.
	tok2 := f.rsa.Sign(f.claims(map[string]any{"iat": f.clock.now().Unix(), "nbf": f.clock.now().Unix(), "exp": f.clock.now().Add(time.Hour).Unix()}))
	if _, err := f.v.Verify(ctx, tok2); err != nil {
		t.Fatal(err)
	}
	f.idp.SetKeys(f.ec)
	f.clock.add(11 * time.Minute)
	if _, err := f.v.Verify(ctx, tok2); reasonOf(t, err) != "TOKEN_KID_UNKNOWN" {
		t.Fatalf("cached token of a revoked key: %v", err)
	}
}

// TestVerifyReadsClaimsExactly covers the claim reader on tokens whose
// JSON is given byte for byte: exact (case-sensitive) names, escapes
// decoded, duplicates of an interpreted member refused, types checked.
func TestVerifyReadsClaimsExactly(t *testing.T) {
	f := newFixture(t, nil)
	now := time.Now().Unix()
	std := fmt.Sprintf(`"iss":%q,"aud":%q,"sub":"alice","exp":%d`, f.idp.Issuer, aud, now+3600)
	hdr := `{"alg":"EdDSA","kid":"ed-1"}`
	ok := []struct {
		name, claims, header string
		check                func(authn.Principal) bool
	}{
		{"escaped names and values", `{` + std + `,"t\u0065nant":"ac\u006de","scope":"lease:read"}`, hdr,
			func(p authn.Principal) bool { return p.Tenant == "acme" && p.HasScope(authn.ScopeLeaseRead) }},
		{"case variants are other claims", `{` + std + `,"Tenant":"evil","SCOPE":"gpuaas:admin","tenant":"acme"}`, hdr,
			func(p authn.Principal) bool { return p.Tenant == "acme" && !p.Admin && len(p.Scopes) == 0 }},
		{"fractional dates, scp null, nested extras", fmt.Sprintf(`{%s,"nbf":%d.5,"iat":%d.25,"scp":null,"x":{"tenant":"evil","a":[1,"}"]}}`, std, now, now), hdr,
			func(p authn.Principal) bool { return p.Tenant == "" && p.Subject == "alice" }},
		{"aud list", fmt.Sprintf(`{"iss":%q,"aud":["other",%q],"sub":"alice","exp":%d}`, f.idp.Issuer, aud, now+60), hdr,
			func(p authn.Principal) bool { return p.Subject == "alice" }},
		{"header with typ and whitespace", `{` + std + `}`, ` { "typ" : "JWT", "kid":"ed-1" , "alg" : "EdDSA" } `,
			func(p authn.Principal) bool { return p.Subject == "alice" }},
	}
	for _, c := range ok {
		p, err := f.v.Verify(context.Background(), f.ed.SignRaw(c.header, c.claims))
		if err != nil || !c.check(p) {
			t.Errorf("%s: %+v %v", c.name, p, err)
		}
	}
	bad := []struct{ name, claims, header, reason string }{
		{"duplicate sub", `{` + std + `,"sub":"root"}`, hdr, "TOKEN_CLAIMS_INVALID"},
		{"duplicate escaped tenant", `{` + std + `,"tenant":"a","t\u0065nant":"b"}`, hdr, "TOKEN_CLAIMS_INVALID"},
		{"duplicate alg", `{` + std + `}`, `{"alg":"EdDSA","alg":"none","kid":"ed-1"}`, "TOKEN_MALFORMED"},
		{"alg not a string", `{` + std + `}`, `{"alg":["EdDSA"],"kid":"ed-1"}`, "TOKEN_ALG_NOT_ALLOWED"},
		{"alg case variant", `{` + std + `}`, `{"ALG":"EdDSA","kid":"ed-1"}`, "TOKEN_ALG_NOT_ALLOWED"},
		{"kid not a string", `{` + std + `}`, `{"alg":"EdDSA","kid":1}`, "TOKEN_MALFORMED"},
		{"crit null", `{` + std + `}`, `{"alg":"EdDSA","kid":"ed-1","crit":null}`, "TOKEN_MALFORMED"},
		{"header not an object", `{` + std + `}`, `["EdDSA"]`, "TOKEN_MALFORMED"},
		{"claims not an object", `[1]`, hdr, "TOKEN_MALFORMED"},
		{"claims not JSON", `{` + std + `,}`, hdr, "TOKEN_MALFORMED"},
		{"exp a string", fmt.Sprintf(`{"iss":%q,"aud":%q,"sub":"alice","exp":"%d"}`, f.idp.Issuer, aud, now+60), hdr, "TOKEN_CLAIMS_INVALID"},
		{"exp absurd", fmt.Sprintf(`{"iss":%q,"aud":%q,"sub":"alice","exp":1e300}`, f.idp.Issuer, aud), hdr, "TOKEN_CLAIMS_INVALID"},
		{"exp zero", fmt.Sprintf(`{"iss":%q,"aud":%q,"sub":"alice","exp":0}`, f.idp.Issuer, aud), hdr, "TOKEN_CLAIMS_INVALID"},
		{"no iss", fmt.Sprintf(`{"aud":%q,"sub":"alice","exp":%d}`, aud, now+60), hdr, "TOKEN_CLAIMS_INVALID"},
		{"iss not a string", fmt.Sprintf(`{"iss":[%q],"aud":%q,"sub":"alice","exp":%d}`, f.idp.Issuer, aud, now+60), hdr, "TOKEN_CLAIMS_INVALID"},
		{"no aud", fmt.Sprintf(`{"iss":%q,"sub":"alice","exp":%d}`, f.idp.Issuer, now+60), hdr, "TOKEN_CLAIMS_INVALID"},
		{"aud holds a number", fmt.Sprintf(`{"iss":%q,"aud":[%q,1],"sub":"alice","exp":%d}`, f.idp.Issuer, aud, now+60), hdr, "TOKEN_CLAIMS_INVALID"},
		{"expired wins over a missing aud", fmt.Sprintf(`{"iss":%q,"sub":"alice","exp":%d}`, f.idp.Issuer, now-3600), hdr, "TOKEN_EXPIRED"},
		{"scope not a string", `{` + std + `,"scope":7}`, hdr, "TOKEN_CLAIMS_INVALID"},
		{"non-ASCII subject", fmt.Sprintf(`{"iss":%q,"aud":%q,"sub":"al\u00efce","exp":%d}`, f.idp.Issuer, aud, now+60), hdr, "TOKEN_CLAIMS_INVALID"},
	}
	for _, c := range bad {
		_, err := f.v.Verify(context.Background(), f.ed.SignRaw(c.header, c.claims))
		if got := errs.ReasonOf(err); got != c.reason || !errors.Is(err, errs.ErrUnauthenticated) {
			t.Errorf("%s: reason %q (%v), want %q", c.name, got, err, c.reason)
		}
	}
	// A signature of the right size that does not verify, per algorithm,
	// and a signature of the wrong size.
	for _, k := range []authntest.Key{f.rsa, f.ec, f.ed} {
		tok := k.Sign(f.claims(nil))
		last := lastDot(tok)
		flipped := []byte(tok)
		flipped[last+2] ^= 1
		for name, bad := range map[string]string{"flipped": string(flipped), "short": tok[:len(tok)-4]} {
			if _, err := f.v.Verify(context.Background(), bad); err == nil {
				t.Errorf("%s: %s signature accepted", k.Alg, name)
			}
		}
	}
}

// TestConfiguredClaimNamesMayShadowRegisteredOnes: a tenant claim named
// like a registered claim is read as both.
func TestConfiguredClaimNamesMayShadowRegisteredOnes(t *testing.T) {
	f := newFixture(t, func(c *authn.Config) { c.TenantClaim = "sub" })
	p, err := f.v.Verify(context.Background(), f.rsa.Sign(f.claims(nil)))
	if err != nil || p.Tenant != "alice" || p.Subject != "alice" {
		t.Fatalf("%+v %v", p, err)
	}
}

// TestKnownHeaderStillChecksKeyAndSignature: once a header is known from
// a verified token, tokens with the same header still need a signature of
// the key and claims that pass, and follow the key set.
func TestKnownHeaderStillChecksKeyAndSignature(t *testing.T) {
	f := newFixture(t, func(c *authn.Config) { c.VerifiedCacheSize = -1; c.MinRefresh = time.Second })
	ctx := context.Background()
	for range 2 {
		if _, err := f.v.Verify(ctx, f.rsa.Sign(f.claims(nil))); err != nil {
			t.Fatal(err)
		}
	}
	imposter := authntest.NewKey("rsa-1", "RS256")
	if _, err := f.v.Verify(ctx, imposter.Sign(f.claims(nil))); reasonOf(t, err) != "TOKEN_SIGNATURE_INVALID" {
		t.Fatalf("same header, other key: %v", err)
	}
	if _, err := f.v.Verify(ctx, f.rsa.Sign(f.claims(map[string]any{"aud": "other"}))); reasonOf(t, err) != "TOKEN_AUDIENCE_INVALID" {
		t.Fatalf("same header, wrong audience: %v", err)
	}
	f.idp.SetKeys(f.ec)
	f.clock.add(authn.DefaultCacheTTL + time.Minute)
	if _, err := f.v.Verify(ctx, f.rsa.Sign(f.claims(nil))); reasonOf(t, err) != "TOKEN_KID_UNKNOWN" {
		t.Fatalf("same header, key removed: %v", err)
	}
}
