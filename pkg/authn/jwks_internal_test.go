package authn

import (
	"strings"
	"testing"
)

func TestParseJWKSAcceptsOnlySignatureKeysOfAcceptedTypes(t *testing.T) {
	const rsaN = "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw"
	raw := `{"keys":[
	 {"kty":"oct","kid":"hmac","k":"c2VjcmV0"},
	 {"kty":"RSA","kid":"enc","use":"enc","n":"` + rsaN + `","e":"AQAB"},
	 {"kty":"RSA","kid":"ops","key_ops":["encrypt"],"n":"` + rsaN + `","e":"AQAB"},
	 {"kty":"RSA","kid":"ps","alg":"PS256","n":"` + rsaN + `","e":"AQAB"},
	 {"kty":"EC","kid":"p384","crv":"P-384","x":"AA","y":"AA"},
	 {"kty":"RSA","n":"` + rsaN + `","e":"AQAB"},
	 {"kty":"RSA","kid":"good","use":"sig","n":"` + rsaN + `","e":"AQAB"}
	]}`
	keys, err := parseJWKS([]byte(raw))
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 1 || keys["good"].alg != AlgRS256 {
		t.Fatalf("keys = %v", keys)
	}
	for name, bad := range map[string]string{
		"small rsa":     `{"keys":[{"kty":"RSA","kid":"a","n":"AQAB","e":"AQAB"}]}`,
		"even modulus":  `{"keys":[{"kty":"RSA","kid":"a","n":"` + rsaN[:len(rsaN)-2] + `Rg","e":"AQAB"}]}`,
		"even exponent": `{"keys":[{"kty":"RSA","kid":"a","n":"` + rsaN + `","e":"Ag"}]}`,
		"dup kid":       `{"keys":[{"kty":"RSA","kid":"a","n":"` + rsaN + `","e":"AQAB"},{"kty":"RSA","kid":"a","n":"` + rsaN + `","e":"AQAB"}]}`,
		"off curve":     `{"keys":[{"kty":"EC","kid":"a","crv":"P-256","x":"` + strings.Repeat("A", 43) + `","y":"` + strings.Repeat("B", 43) + `"}]}`,
		"short ed25519": `{"keys":[{"kty":"OKP","kid":"a","crv":"Ed25519","x":"AAAA"}]}`,
		"no keys":       `{}`,
		"not json":      `[`,
	} {
		if _, err := parseJWKS([]byte(bad)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// FuzzParseJWKS feeds arbitrary key set documents (what an identity
// provider, or whoever sits between it and us, can send): never a panic,
// and every key accepted is of a type and size we verify with.
func FuzzParseJWKS(f *testing.F) {
	for _, s := range []string{
		`{"keys":[]}`, `{"keys":[{"kty":"OKP","kid":"a","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}`,
		`{"keys":[{"kty":"EC","kid":"e","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}`,
		`{"keys":[{"kty":"RSA","kid":"r","n":"AQAB","e":"AQAB"}]}`, `{"keys":[{"kty":"oct","kid":"h","k":"c2VjcmV0"}]}`, `{`, `null`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		keys, err := parseJWKS(raw)
		if err != nil {
			return
		}
		for kid, k := range keys {
			if kid == "" {
				t.Fatal("a key without a kid was accepted")
			}
			switch k.alg {
			case AlgRS256:
				if k.rs256 == nil {
					t.Fatalf("RS256 key %q without its prepared modulus", kid)
				}
			case AlgES256, AlgEdDSA:
			default:
				t.Fatalf("key %q for algorithm %q", kid, k.alg)
			}
		}
	})
}
