package authn_test

import (
	"context"
	"errors"
	"testing"

	"github.com/gpuaas/gpuaas/pkg/authn"
	"github.com/gpuaas/gpuaas/pkg/authn/authntest"
	"github.com/gpuaas/gpuaas/pkg/errs"
)

// FuzzVerify feeds arbitrary bearer tokens to a verifier with a cached key
// set: it must never panic, never accept a token the key did not sign, and
// every refusal must be a canonical Unauthenticated error.
func FuzzVerify(f *testing.F) {
	fx := newFixture(f, func(c *authn.Config) { c.MinRefresh = 1 << 62 })
	good := fx.rsa.Sign(fx.claims(map[string]any{"scope": "lease:read", "tenant": "acme"}))
	if _, err := fx.v.Verify(context.Background(), good); err != nil {
		f.Fatal(err)
	}
	for _, s := range []string{
		good, good + "x", good[:len(good)-2],
		fx.ed.Sign(fx.claims(nil)), fx.ec.Sign(fx.claims(map[string]any{"scp": []any{"a", "b"}})),
		authntest.Raw(map[string]any{"alg": "none", "kid": "rsa-1"}, fx.claims(nil), nil),
		authntest.HS256(map[string]any{"kid": "rsa-1"}, fx.claims(nil), fx.rsa.PublicPEM()),
		"", ".", "..", "a.b.c", "eyJhbGciOiJSUzI1NiJ9..", "eyJ9.e30.",
		// Signed tokens whose JSON is given byte for byte: escapes,
		// duplicates, nesting, odd types (the member scanner's paths).
		fx.ed.SignRaw(`{"alg":"EdDSA","kid":"ed-1"}`, `{"iss":"`+fx.idp.Issuer+`","aud":"gpuaas","sub":"a\u006c","exp":4102444800,"t\u0065nant":"acme","x":{"y":["}"]}}`),
		fx.ed.SignRaw(`{"alg":"EdDSA","kid":"ed-1","kid":"ed-1"}`, `{"sub":"a"}`),
		fx.ed.SignRaw(`{"alg":"EdDSA","kid":"ed-1"}`, `{"iss":"`+fx.idp.Issuer+`","aud":["gpuaas"],"sub":"a","sub":"b","exp":4102444800}`),
		fx.ed.SignRaw(` {"kid" : "ed-1", "alg":"EdDSA"}`, `{"iss":"`+fx.idp.Issuer+`","aud":"gpuaas","sub":"a","exp":4102444800.5,"scp":["lease:read"],"scope":null}`),
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, token string) {
		p, err := fx.v.Verify(context.Background(), token)
		if err == nil {
			// Only an untouched token of one of our keys may pass: a
			// fuzzer cannot produce a signature, so it must have kept one.
			if p.Subject == "" || p.Kind != authn.KindToken {
				t.Fatalf("accepted with principal %+v", p)
			}
			return
		}
		if !errors.Is(err, errs.ErrUnauthenticated) && !errors.Is(err, errs.ErrUnavailable) {
			t.Fatalf("refusal is not canonical: %v", err)
		}
		if errs.ReasonOf(err) == "" {
			t.Fatalf("refusal without a reason: %v", err)
		}
	})
}
