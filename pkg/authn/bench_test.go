package authn_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"math/big"
	"strings"
	"testing"

	"github.com/gpuaas/gpuaas/pkg/authn"
	"github.com/gpuaas/gpuaas/pkg/authn/authntest"
)

// BenchmarkVerify measures one verification against a cached JWKS, per
// algorithm. "signature" checks every token's signature (the verified-token
// cache disabled: the cost of a token never seen before); "repeat" is the
// same token presented again (a client reusing its token until exp), served
// from the verified-token cache. "primitive" is the standard library's
// signature check alone (crypto/rsa, crypto/ecdsa, crypto/ed25519 over the
// same token's signing input, key already parsed), measured in the same
// run: the floor "signature" cannot go under for ES256 and EdDSA. RS256
// is verified with the key's modulus prepared when the key set was parsed
// (rs256.go), so "signature/RS256" comes in under "primitive/RS256" by
// what crypto/rsa spends rebuilding the modulus on every call;
// BenchmarkVerifyRS256PreparedKey is that check alone. Run with -cpu 1:
// verifications/s is per core.
func BenchmarkVerify(b *testing.B) {
	for _, mode := range []struct {
		name  string
		cache int
	}{{"signature", -1}, {"repeat", 0}} {
		fx := newFixture(b, func(c *authn.Config) { c.VerifiedCacheSize = mode.cache })
		for _, k := range []authntest.Key{fx.rsa, fx.ec, fx.ed} {
			tok := k.Sign(fx.claims(map[string]any{"scope": "lease:read lease:write", "tenant": "acme"}))
			if _, err := fx.v.Verify(context.Background(), tok); err != nil {
				b.Fatal(err)
			}
			b.Run(mode.name+"/"+k.Alg, func(b *testing.B) {
				b.ReportAllocs()
				ctx := context.Background()
				for b.Loop() {
					if _, err := fx.v.Verify(ctx, tok); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "verifications/s")
			})
		}
	}
	fx := newFixture(b, nil)
	for _, k := range []authntest.Key{fx.rsa, fx.ec, fx.ed} {
		tok := k.Sign(fx.claims(map[string]any{"scope": "lease:read lease:write", "tenant": "acme"}))
		dot := strings.LastIndexByte(tok, '.')
		signing := []byte(tok[:dot])
		sig, err := base64.RawURLEncoding.DecodeString(tok[dot+1:])
		if err != nil {
			b.Fatal(err)
		}
		verify := primitive(b, k, signing, sig)
		b.Run("primitive/"+k.Alg, func(b *testing.B) {
			for b.Loop() {
				if !verify() {
					b.Fatal("signature does not verify")
				}
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "verifications/s")
		})
	}
}

// primitive returns the standard library's check of sig over signing.
func primitive(b *testing.B, k authntest.Key, signing, sig []byte) func() bool {
	switch pub := k.Signer.Public().(type) {
	case *rsa.PublicKey:
		return func() bool {
			d := sha256.Sum256(signing)
			return rsa.VerifyPKCS1v15(pub, crypto.SHA256, d[:], sig) == nil
		}
	case *ecdsa.PublicKey:
		return func() bool {
			d := sha256.Sum256(signing)
			return ecdsa.Verify(pub, d[:], new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:]))
		}
	case ed25519.PublicKey:
		return func() bool { return ed25519.Verify(pub, signing, sig) }
	}
	b.Fatalf("key type %T", k.Signer.Public())
	return nil
}
