// Package authntest is a test identity provider for pkg/authn: it holds
// signing keys of every accepted type, serves OIDC discovery and a JWKS
// over HTTPS (httptest), and mints tokens, including the malformed and
// malicious ones attack tests need. It is for tests only.
package authntest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// Key is one signing key of the provider.
type Key struct {
	Kid    string
	Alg    string // RS256, ES256 or EdDSA
	Signer crypto.Signer
}

// NewKey generates a key for alg (RS256 keys are 2048-bit).
func NewKey(kid, alg string) Key {
	var (
		s   crypto.Signer
		err error
	)
	switch alg {
	case "RS256":
		s, err = rsa.GenerateKey(rand.Reader, 2048)
	case "ES256":
		s, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case "EdDSA":
		_, s, err = ed25519.GenerateKey(rand.Reader)
	default:
		panic("authntest: unsupported alg " + alg)
	}
	if err != nil {
		panic(err)
	}
	return Key{Kid: kid, Alg: alg, Signer: s}
}

func b64(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

// JWK is the key's public JSON Web Key.
func (k Key) JWK() map[string]any {
	m := map[string]any{"kid": k.Kid, "alg": k.Alg, "use": "sig"}
	switch pub := k.Signer.Public().(type) {
	case *rsa.PublicKey:
		m["kty"], m["n"], m["e"] = "RSA", b64(pub.N.Bytes()), b64(big.NewInt(int64(pub.E)).Bytes())
	case *ecdsa.PublicKey:
		raw, _ := pub.Bytes()
		m["kty"], m["crv"], m["x"], m["y"] = "EC", "P-256", b64(raw[1:33]), b64(raw[33:])
	case ed25519.PublicKey:
		m["kty"], m["crv"], m["x"] = "OKP", "Ed25519", b64(pub)
	}
	return m
}

// PublicPEM is the key's public key as a PKIX PEM block, the bytes an
// attacker would use as an HMAC secret in a key-confusion attack.
func (k Key) PublicPEM() []byte {
	der, err := x509.MarshalPKIXPublicKey(k.Signer.Public())
	if err != nil {
		panic(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
}

// JWKS returns a key set document for keys.
func JWKS(keys ...Key) []byte {
	set := struct {
		Keys []map[string]any `json:"keys"`
	}{Keys: []map[string]any{}}
	for _, k := range keys {
		set.Keys = append(set.Keys, k.JWK())
	}
	b, _ := json.Marshal(set)
	return b
}

// Sign makes a compact JWS over claims with k, with kid in the header.
func (k Key) Sign(claims map[string]any) string {
	return k.SignWithHeader(map[string]any{"kid": k.Kid}, claims)
}

// SignWithHeader signs claims with k, with extra header fields (alg and
// typ are set from the key unless given).
func (k Key) SignWithHeader(hdr map[string]any, claims map[string]any) string {
	m := k.method()
	t := jwt.NewWithClaims(m, jwt.MapClaims(claims))
	for h, v := range hdr {
		t.Header[h] = v
	}
	s, err := t.SignedString(k.Signer)
	if err != nil {
		panic(err)
	}
	return s
}

// method is k's golang-jwt signing method.
func (k Key) method() jwt.SigningMethod {
	switch k.Alg {
	case "RS256":
		return jwt.SigningMethodRS256
	case "ES256":
		return jwt.SigningMethodES256
	case "EdDSA":
		return jwt.SigningMethodEdDSA
	}
	return nil
}

// SignRaw signs a token whose header and claims are the given JSON bytes,
// as they are (duplicate members, escapes, odd types): for parser tests.
func (k Key) SignRaw(header, claims string) string {
	signing := b64([]byte(header)) + "." + b64([]byte(claims))
	m := k.method()
	sig, err := m.Sign(signing, k.Signer)
	if err != nil {
		panic(err)
	}
	return signing + "." + b64(sig)
}

// Raw assembles a token from a header, claims and signature as given,
// without signing: for alg "none" and other forgeries.
func Raw(hdr, claims map[string]any, sig []byte) string {
	h, _ := json.Marshal(hdr)
	c, _ := json.Marshal(claims)
	return b64(h) + "." + b64(c) + "." + b64(sig)
}

// HS256 signs hdr+claims with HMAC-SHA256 under secret (hdr's alg is set
// to HS256): the algorithm-confusion forgery when secret is a public key.
func HS256(hdr, claims map[string]any, secret []byte) string {
	hdr["alg"] = "HS256"
	h, _ := json.Marshal(hdr)
	c, _ := json.Marshal(claims)
	signing := b64(h) + "." + b64(c)
	mac := hmac.New(sha256.New, secret)
	mac.Write([]byte(signing))
	return signing + "." + b64(mac.Sum(nil))
}

// Provider is an OIDC identity provider served over HTTPS on loopback.
type Provider struct {
	Server *httptest.Server
	// Issuer is the provider's issuer URL (the server's URL).
	Issuer string

	mu   sync.Mutex
	keys []Key
	// Fetches counts key set requests.
	Fetches atomic.Int64
	// Discoveries counts discovery document requests.
	Discoveries atomic.Int64
}

// NewProvider starts a provider publishing keys. Close it when done.
func NewProvider(keys ...Key) *Provider {
	p := &Provider{keys: keys}
	mux := http.NewServeMux()
	mux.HandleFunc("/.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
		p.Discoveries.Add(1)
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{"issuer": p.Issuer, "jwks_uri": p.Issuer + "/keys"})
	})
	mux.HandleFunc("/keys", func(w http.ResponseWriter, r *http.Request) {
		p.Fetches.Add(1)
		p.mu.Lock()
		body := JWKS(p.keys...)
		p.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(body)
	})
	p.Server = httptest.NewTLSServer(mux)
	p.Issuer = p.Server.URL
	return p
}

// SetKeys replaces the published keys (a rotation).
func (p *Provider) SetKeys(keys ...Key) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.keys = keys
}

// Client is an HTTP client that trusts the provider's certificate.
func (p *Provider) Client() *http.Client { return p.Server.Client() }

// Close stops the server.
func (p *Provider) Close() { p.Server.Close() }

// Claims returns a valid claim set for the provider: iss, aud, sub, iat,
// nbf, exp (one hour), and the given extra claims.
func (p *Provider) Claims(aud, sub string, extra map[string]any) map[string]any {
	now := time.Now()
	c := map[string]any{"iss": p.Issuer, "aud": aud, "sub": sub, "iat": now.Unix(), "nbf": now.Unix(), "exp": now.Add(time.Hour).Unix()}
	for k, v := range extra {
		c[k] = v
	}
	return c
}

// Scopes joins scopes for the "scope" claim.
func Scopes(s ...string) string { return strings.Join(s, " ") }
