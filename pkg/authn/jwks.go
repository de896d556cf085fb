package authn

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"
)

// Limits on what is read from the identity provider.
const (
	maxJWKSBytes      = 1 << 20
	maxDiscoveryBytes = 256 << 10
	maxKeys           = 100
	minRSABits        = 2048
	maxRSABits        = 8192
)

// ErrNoKeys is the class of errors for a key set that cannot be obtained
// (fetch failed and nothing usable is cached).
var ErrNoKeys = errors.New("no usable key set")

// publicKey is one verification key of a set.
type publicKey struct {
	alg string // the one algorithm this key may verify
	key crypto.PublicKey
	// rs256 is an RS256 key's modulus, prepared once per key set so that
	// no verification rebuilds it; set for every RSA key parseJWKS returns.
	rs256 *rs256Key
}

// jwk is the part of RFC 7517 we read.
type jwk struct {
	Kty    string   `json:"kty"`
	Kid    string   `json:"kid"`
	Use    string   `json:"use"`
	Alg    string   `json:"alg"`
	KeyOps []string `json:"key_ops"`
	Crv    string   `json:"crv"`
	N      string   `json:"n"`
	E      string   `json:"e"`
	X      string   `json:"x"`
	Y      string   `json:"y"`
}

// parseJWKS parses a JSON Web Key Set into the signature keys it holds, by
// kid. Keys that are not for signatures, of a type or curve we do not
// accept (symmetric "oct" keys among them), or without a kid are skipped;
// a malformed key of an accepted type, or a kid used twice, is an error.
func parseJWKS(raw []byte) (map[string]publicKey, error) {
	var set struct {
		Keys []json.RawMessage `json:"keys"`
	}
	if err := json.Unmarshal(raw, &set); err != nil {
		return nil, fmt.Errorf("parse jwks: %w", err)
	}
	if set.Keys == nil {
		return nil, errors.New("parse jwks: no \"keys\" array")
	}
	if len(set.Keys) > maxKeys {
		return nil, fmt.Errorf("parse jwks: %d keys, at most %d accepted", len(set.Keys), maxKeys)
	}
	out := make(map[string]publicKey, len(set.Keys))
	for i, rawKey := range set.Keys {
		var k jwk
		if err := json.Unmarshal(rawKey, &k); err != nil {
			return nil, fmt.Errorf("parse jwks: key %d: %w", i, err)
		}
		if k.Kid == "" || (k.Use != "" && k.Use != "sig") || !allowsVerify(k.KeyOps) {
			continue
		}
		pk, ok, err := k.publicKey()
		if err != nil {
			return nil, fmt.Errorf("parse jwks: key %q: %w", k.Kid, err)
		}
		if !ok {
			continue
		}
		if _, dup := out[k.Kid]; dup {
			return nil, fmt.Errorf("parse jwks: kid %q is used by two keys", k.Kid)
		}
		out[k.Kid] = pk
	}
	return out, nil
}

func allowsVerify(ops []string) bool {
	if ops == nil {
		return true
	}
	for _, o := range ops {
		if o == "verify" {
			return true
		}
	}
	return false
}

func b64(field, s string) ([]byte, error) {
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("%s: not base64url: %w", field, err)
	}
	return b, nil
}

// publicKey returns the key and the one algorithm it verifies; ok is false
// for a key type we do not accept.
func (k jwk) publicKey() (publicKey, bool, error) {
	switch k.Kty {
	case "RSA":
		if k.Alg != "" && k.Alg != AlgRS256 {
			return publicKey{}, false, nil
		}
		nb, err := b64("n", k.N)
		if err != nil {
			return publicKey{}, false, err
		}
		eb, err := b64("e", k.E)
		if err != nil {
			return publicKey{}, false, err
		}
		n := new(big.Int).SetBytes(nb)
		if bits := n.BitLen(); bits < minRSABits || bits > maxRSABits {
			return publicKey{}, false, fmt.Errorf("rsa modulus of %d bits, want %d-%d", bits, minRSABits, maxRSABits)
		}
		if len(eb) == 0 || len(eb) > 4 {
			return publicKey{}, false, errors.New("rsa exponent out of range")
		}
		if n.Bit(0) == 0 {
			return publicKey{}, false, errors.New("rsa modulus is even")
		}
		e := new(big.Int).SetBytes(eb)
		if e.Int64() < 3 || e.Int64() > 1<<31-1 || e.Bit(0) == 0 {
			return publicKey{}, false, errors.New("rsa exponent out of range")
		}
		pub := &rsa.PublicKey{N: n, E: int(e.Int64())}
		rk, err := newRS256Key(pub)
		if err != nil {
			return publicKey{}, false, err
		}
		return publicKey{alg: AlgRS256, key: pub, rs256: rk}, true, nil
	case "EC":
		if k.Crv != "P-256" || (k.Alg != "" && k.Alg != AlgES256) {
			return publicKey{}, false, nil
		}
		x, err := b64("x", k.X)
		if err != nil {
			return publicKey{}, false, err
		}
		y, err := b64("y", k.Y)
		if err != nil {
			return publicKey{}, false, err
		}
		if len(x) != 32 || len(y) != 32 {
			return publicKey{}, false, errors.New("p-256 coordinates must be 32 bytes")
		}
		point := append(append([]byte{4}, x...), y...)
		pub, err := ecdsa.ParseUncompressedPublicKey(elliptic.P256(), point)
		if err != nil {
			return publicKey{}, false, fmt.Errorf("p-256 point: %w", err)
		}
		return publicKey{alg: AlgES256, key: pub}, true, nil
	case "OKP":
		if k.Crv != "Ed25519" || (k.Alg != "" && k.Alg != AlgEdDSA) {
			return publicKey{}, false, nil
		}
		x, err := b64("x", k.X)
		if err != nil {
			return publicKey{}, false, err
		}
		if len(x) != ed25519.PublicKeySize {
			return publicKey{}, false, errors.New("ed25519 key must be 32 bytes")
		}
		return publicKey{alg: AlgEdDSA, key: ed25519.PublicKey(x)}, true, nil
	}
	return publicKey{}, false, nil
}

// keySource fetches the raw key set.
type keySource func(ctx context.Context) ([]byte, error)

func readLimited(r io.Reader, limit int64) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("larger than %d bytes", limit)
	}
	return b, nil
}

func httpGet(ctx context.Context, c *http.Client, u string, limit int64) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := c.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
		return nil, fmt.Errorf("GET %s: status %d", u, resp.StatusCode)
	}
	b, err := readLimited(resp.Body, limit)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", u, err)
	}
	return b, nil
}

// checkHTTPS refuses key material over plain HTTP.
func checkHTTPS(what, u string) error {
	pu, err := url.Parse(u)
	if err != nil || pu.Scheme != "https" || pu.Host == "" {
		return fmt.Errorf("%s %q must be an https URL", what, u)
	}
	return nil
}

func urlSource(c *http.Client, u string) keySource {
	return func(ctx context.Context) ([]byte, error) { return httpGet(ctx, c, u, maxJWKSBytes) }
}

func fileSource(path string) keySource {
	return func(context.Context) ([]byte, error) {
		f, err := os.Open(path)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		return readLimited(f, maxJWKSBytes)
	}
}

// discoverySource reads jwks_uri from the issuer's discovery document on
// every refresh (so a moved key set is followed) and fetches it. The
// document's issuer must equal the configured one (OIDC Discovery 4.3).
func discoverySource(c *http.Client, issuer string) keySource {
	wellKnown := strings.TrimSuffix(issuer, "/") + "/.well-known/openid-configuration"
	return func(ctx context.Context) ([]byte, error) {
		raw, err := httpGet(ctx, c, wellKnown, maxDiscoveryBytes)
		if err != nil {
			return nil, fmt.Errorf("discovery: %w", err)
		}
		var doc struct {
			Issuer  string `json:"issuer"`
			JWKSURI string `json:"jwks_uri"`
		}
		if err := json.Unmarshal(raw, &doc); err != nil {
			return nil, fmt.Errorf("discovery: %w", err)
		}
		if doc.Issuer != issuer {
			return nil, fmt.Errorf("discovery: document is for issuer %q, not %q", doc.Issuer, issuer)
		}
		if err := checkHTTPS("discovery: jwks_uri", doc.JWKSURI); err != nil {
			return nil, err
		}
		return httpGet(ctx, c, doc.JWKSURI, maxJWKSBytes)
	}
}

// keyCache holds the current key set and refreshes it: on age (ttl), and
// on an unknown kid, at most once per minRefresh, one fetch at a time.
type keyCache struct {
	fetch      keySource
	ttl        time.Duration
	minRefresh time.Duration
	maxStale   time.Duration
	timeout    time.Duration
	now        func() time.Time
	onRefresh  func(err error)

	mu          sync.RWMutex
	keys        map[string]publicKey
	fetched     time.Time // last successful fetch
	gen         uint64    // successful fetches; a verified token is tied to one
	lastAttempt time.Time // last fetch attempt, successful or not
	fetches     int       // attempts, for tests and metrics

	sf singleflight.Group
}

// lookup returns the key for kid, refreshing the set when it is older than
// the TTL or does not know kid (rate-limited).
func (c *keyCache) lookup(ctx context.Context, kid string) (publicKey, error) {
	now := c.now()
	c.mu.RLock()
	k, known := c.keys[kid]
	fresh := c.keys != nil && now.Sub(c.fetched) < c.ttl
	c.mu.RUnlock()
	if known && fresh {
		return k, nil
	}
	c.refresh(ctx)
	now = c.now()
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.keys == nil || now.Sub(c.fetched) >= c.maxStale {
		return publicKey{}, ErrNoKeys
	}
	k, known = c.keys[kid]
	if !known {
		return publicKey{}, errUnknownKid
	}
	return k, nil
}

var errUnknownKid = errors.New("unknown kid")

// current returns the generation of the key set if it is within its TTL
// (0 if there is none or it is due for a refresh).
func (c *keyCache) current() uint64 {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.keys == nil || c.now().Sub(c.fetched) >= c.ttl {
		return 0
	}
	return c.gen
}

// refresh fetches the key set unless one was attempted less than
// minRefresh ago; concurrent callers share one fetch.
func (c *keyCache) refresh(ctx context.Context) {
	c.mu.RLock()
	recent := !c.lastAttempt.IsZero() && c.now().Sub(c.lastAttempt) < c.minRefresh
	c.mu.RUnlock()
	if recent {
		return
	}
	// The shared fetch must not die with the first caller's request; a
	// caller whose request ends stops waiting for it.
	ch := c.sf.DoChan("jwks", func() (any, error) {
		c.mu.Lock()
		if !c.lastAttempt.IsZero() && c.now().Sub(c.lastAttempt) < c.minRefresh {
			c.mu.Unlock()
			return nil, nil
		}
		c.lastAttempt = c.now()
		c.fetches++
		c.mu.Unlock()

		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.timeout)
		defer cancel()
		raw, err := c.fetch(fctx)
		var keys map[string]publicKey
		if err == nil {
			keys, err = parseJWKS(raw)
		}
		if err == nil {
			c.mu.Lock()
			c.keys, c.fetched = keys, c.now()
			c.gen++
			c.mu.Unlock()
		}
		if c.onRefresh != nil {
			c.onRefresh(err)
		}
		return nil, err
	})
	select {
	case <-ch:
	case <-ctx.Done():
	}
}

// attempts returns how many key set fetches were attempted.
func (c *keyCache) attempts() int {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.fetches
}
