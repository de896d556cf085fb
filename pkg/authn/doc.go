// Package authn authenticates platform callers that present an OIDC JWT
// bearer token, and carries the resulting Principal (subject, tenant,
// scopes, admin flag) through a request's context (DESIGN.md contract 4).
//
// A Verifier checks a compact JWS against a JSON Web Key Set obtained from
// the issuer's discovery document (/.well-known/openid-configuration), a
// URL, or a file. It enforces, in this order: a size limit; an algorithm
// allowlist (RS256, ES256, EdDSA only: `none` and every HMAC algorithm are
// refused before any key is looked up, so "HS256 signed with the RSA public
// key" can never verify); a key id that names a key of the set whose type
// matches the algorithm; the signature; then issuer, audience, exp (required),
// nbf and iat with a bounded clock skew. Claims of a token whose signature
// does not verify are never evaluated.
//
// The key set is cached. It is refreshed when older than its TTL, and on a
// token with an unknown kid, but never more than once per MinRefresh
// interval and never concurrently (singleflight): a flood of tokens with
// random kids costs the identity provider at most one fetch per interval.
// A refresh that fails keeps the previous keys until they are MaxStale old;
// after that verification fails closed.
//
// Parsing and cryptography: the signature is checked over the token's
// signing input, with the key's Go type checked against its one
// algorithm. ES256 and EdDSA use the standard library (crypto/ecdsa P-256
// with the 64-byte R||S of RFC 7518, crypto/ed25519). RS256 (PKCS#1 v1.5
// with SHA-256) uses filippo.io/bigmod, the export of the standard
// library's crypto/internal/fips140/bigmod that crypto/rsa runs on, with
// the key's modulus prepared once when the key set is parsed (rs256.go):
// the same steps as crypto/rsa.VerifyPKCS1v15 (exact signature length,
// s < N, s^e mod N compared whole with the expected encoding built anew;
// the decrypted block is never parsed), and held to its answers by a
// differential test and a fuzz target. No arithmetic is implemented here;
// a key not from a parsed key set falls back to crypto/rsa.
//
// The header and claims are validated as JSON by encoding/json and their
// top-level members read in one pass (jws.go): member names match exactly
// (encoding/json's struct decoding would match "Tenant" for "tenant"), and
// a member this package interprets may appear only once. This replaced
// golang-jwt/jwt/v5's parser (which decoded the header twice and the claims
// into a map per token: about a quarter of a verification's time); its
// claim rules are kept: exp required, nbf and iat checked when present, a
// NumericDate of zero counts as absent, aud a string or an array of
// strings, and the same precedence of reasons. golang-jwt remains the test
// identity provider's signer (authntest), an independent implementation to
// verify against. JWK sets are parsed by jwks.go with the standard library
// only (RSA 2048-8192 bits with an odd modulus and exponent, P-256,
// Ed25519; symmetric keys are never loaded), which keeps the key types we
// accept explicit.
//
// Costs: Go 1.26's crypto/rsa rebuilds the modulus (bigmod.NewModulus,
// R² mod N) on every public-key operation, about a third of its RS256
// check, which is why RS256 keeps it with the key instead. crypto/ecdsa
// and crypto/ed25519 decode the public point on every call and expose no
// way to keep that per key. Tokens seen again skip the signature through
// the verified-token cache.
//
// This package never logs tokens, and its errors never contain one.
package authn
