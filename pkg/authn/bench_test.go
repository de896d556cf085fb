package authn_test

import (
	"context"
	"testing"

	"github.com/gpuaas/gpuaas/pkg/authn"
	"github.com/gpuaas/gpuaas/pkg/authn/authntest"
)

// BenchmarkVerify measures one verification against a cached JWKS, per
// algorithm. "signature" checks every token's signature (the verified-token
// cache disabled: the cost of a token never seen before); "repeat" is the
// same token presented again (a client reusing its token until exp), served
// from the verified-token cache. Run with -cpu 1: verifications/s is per
// core.
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
}
