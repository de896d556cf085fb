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
// Library choice: JWS parsing and signature verification use
// github.com/golang-jwt/jwt/v5. It is the most widely used Go JWT library,
// actively maintained, has a security policy and a history of prompt fixes,
// lets the caller pin the accepted algorithms (WithValidMethods) and checks
// the key's Go type against the algorithm (an HMAC method never accepts an
// *rsa.PublicKey), verifies the signature before it validates claims, and it
// was already in the module graph, so no new dependency enters the build.
// It does not parse JWK sets; jwks.go does that with the standard library
// only (RSA >= 2048 bits, P-256, Ed25519; symmetric keys are never loaded),
// which keeps the key types we accept explicit. go-jose/v4 and
// coreos/go-oidc would also fit but are not in go.mod.
//
// This package never logs tokens, and its errors never contain one.
package authn
