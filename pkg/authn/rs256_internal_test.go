package authn

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"math/big"
	mrand "math/rand/v2"
	"strings"
	"sync"
	"testing"

	"github.com/gpuaas/gpuaas/pkg/authn/authntest"
)

// rs256Parsed returns priv's public key as parseJWKS makes it from the
// identity provider's key set: the key Verify uses.
func rs256Parsed(t testing.TB, priv *rsa.PrivateKey) publicKey {
	t.Helper()
	keys, err := parseJWKS(authntest.JWKS(authntest.Key{Kid: "k", Alg: AlgRS256, Signer: priv}))
	if err != nil {
		t.Fatal(err)
	}
	k, ok := keys["k"]
	if !ok || k.alg != AlgRS256 || k.rs256 == nil {
		t.Fatalf("parsed key = %+v, want an RS256 key with its modulus prepared", k)
	}
	return k
}

// rsaKeyFromPrimes builds the private key (p·q, e).
func rsaKeyFromPrimes(p, q *big.Int, e int) (*rsa.PrivateKey, error) {
	one := big.NewInt(1)
	phi := new(big.Int).Mul(new(big.Int).Sub(p, one), new(big.Int).Sub(q, one))
	d := new(big.Int).ModInverse(big.NewInt(int64(e)), phi)
	if d == nil {
		return nil, fmt.Errorf("e = %d is not invertible", e)
	}
	priv := &rsa.PrivateKey{PublicKey: rsa.PublicKey{N: new(big.Int).Mul(p, q), E: e}, D: d, Primes: []*big.Int{p, q}}
	if err := priv.Validate(); err != nil {
		return nil, err
	}
	priv.Precompute()
	return priv, nil
}

// rsaKeyWithExponent generates a bits-bit key with public exponent e
// (rsa.GenerateKey always uses 65537).
func rsaKeyWithExponent(bits, e int) (*rsa.PrivateKey, error) {
	one := big.NewInt(1)
	coprime := func(p *big.Int) bool {
		return new(big.Int).GCD(nil, nil, big.NewInt(int64(e)), new(big.Int).Sub(p, one)).Cmp(one) == 0
	}
	for {
		p, err := rand.Prime(rand.Reader, bits/2)
		if err != nil {
			return nil, err
		}
		q, err := rand.Prime(rand.Reader, bits-bits/2)
		if err != nil {
			return nil, err
		}
		if p.Cmp(q) == 0 || !coprime(p) || !coprime(q) || new(big.Int).Mul(p, q).BitLen() != bits {
			continue
		}
		return rsaKeyFromPrimes(p, q, e)
	}
}

// rawSign is the bare RSA private-key operation em^d mod N, k bytes long
// (by the CRT, with math/big): it makes a "signature" whose public-key
// result is exactly em, so a test can present encodings that are almost,
// but not quite, the right one. priv must have two primes and be
// precomputed.
func rawSign(priv *rsa.PrivateKey, em []byte) []byte {
	c := new(big.Int).SetBytes(em)
	p, q := priv.Primes[0], priv.Primes[1]
	m1 := new(big.Int).Exp(new(big.Int).Mod(c, p), priv.Precomputed.Dp, p)
	m2 := new(big.Int).Exp(new(big.Int).Mod(c, q), priv.Precomputed.Dq, q)
	h := m1.Sub(m1, m2)
	h.Mul(h, priv.Precomputed.Qinv).Mod(h, p)
	s := h.Mul(h, q).Add(h, m2)
	return s.FillBytes(make([]byte, priv.Size()))
}

// testSHA256Prefix is the SHA-256 DigestInfo of RFC 8017 section 9.2,
// written out again here rather than taken from rs256.go.
var testSHA256Prefix = mustHex("3031300d060960864801650304020105000420")

func mustHex(s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil {
		panic(err)
	}
	return b
}

// emsaPKCS1v15 is the k-byte encoding 0x00 0x01 FF..FF 0x00 || t, with
// the padding as long as it must be to fill k bytes.
func emsaPKCS1v15(k int, t ...[]byte) []byte {
	tail := bytes.Join(t, nil)
	em := make([]byte, k)
	em[1] = 0x01
	for i := 2; i < k-len(tail)-1; i++ {
		em[i] = 0xff
	}
	copy(em[k-len(tail):], tail)
	return em
}

// rsaCase is one signature presented for a digest, and whether it is the
// key's valid signature of that digest.
type rsaCase struct {
	name   string
	digest [sha256.Size]byte
	sig    []byte
	valid  bool
}

// rsaCases returns, for priv and a digest, the valid signature and
// everything near it: flipped bits, changed lengths, another digest, and
// encodings one step from the right one (signed raw).
func rsaCases(priv *rsa.PrivateKey, rng *mrand.Rand, d [sha256.Size]byte) []rsaCase {
	k := priv.Size()
	sig, err := rsa.SignPKCS1v15(nil, priv, crypto.SHA256, d[:])
	if err != nil {
		panic(err)
	}
	cs := []rsaCase{{name: "valid", digest: d, sig: sig, valid: true}}
	flip := func(b []byte, bit int) []byte {
		b = bytes.Clone(b)
		b[bit/8] ^= 1 << (bit % 8)
		return b
	}
	// Every bit of the first and last two bytes, and random ones.
	bits := []int{}
	for i := range 16 {
		bits = append(bits, i, 8*k-1-i)
	}
	for range 8 {
		bits = append(bits, rng.IntN(8*k))
	}
	for _, bit := range bits {
		cs = append(cs, rsaCase{name: fmt.Sprintf("signature bit %d flipped", bit), digest: d, sig: flip(sig, bit)})
	}
	for _, bit := range []int{0, 7, 8*sha256.Size - 1, rng.IntN(8 * sha256.Size)} {
		cs = append(cs, rsaCase{name: fmt.Sprintf("digest bit %d flipped", bit), digest: [sha256.Size]byte(flip(d[:], bit)), sig: sig})
	}
	cs = append(cs,
		// The same number in another length: RFC 8017 8.2.2 step 1.
		rsaCase{name: "leading zero byte added", digest: d, sig: append([]byte{0}, sig...)},
		rsaCase{name: "zero byte appended", digest: d, sig: append(bytes.Clone(sig), 0)},
		rsaCase{name: "last byte cut", digest: d, sig: sig[:k-1]},
		rsaCase{name: "first byte cut", digest: d, sig: sig[1:]},
		rsaCase{name: "empty", digest: d, sig: []byte{}},
		rsaCase{name: "nil", digest: d, sig: nil},
	)
	// The valid signature plus N, where it still fits in k bytes: the
	// same value mod N, refused because it is not less than N.
	if plusN := new(big.Int).Add(new(big.Int).SetBytes(sig), priv.N); plusN.BitLen() <= 8*k {
		cs = append(cs, rsaCase{name: "signature plus N", digest: d, sig: plusN.FillBytes(make([]byte, k))})
	}
	other := sha256.Sum256(d[:])
	bad := func(name string, em []byte) {
		if new(big.Int).SetBytes(em).Cmp(priv.N) >= 0 {
			return
		}
		cs = append(cs, rsaCase{name: "encoding: " + name, digest: d, sig: rawSign(priv, em)})
	}
	good := emsaPKCS1v15(k, testSHA256Prefix, d[:])
	cs = append(cs, rsaCase{name: "encoding: exact, signed raw", digest: d, sig: rawSign(priv, good), valid: true})
	em := bytes.Clone(good)
	em[1] = 0x02
	bad("block type 2", em)
	em = bytes.Clone(good)
	em[0] = 0x01
	bad("first byte 1", em)
	em = bytes.Clone(good)
	em[2+rng.IntN(k-len(testSHA256Prefix)-sha256.Size-3)] = 0x00
	bad("a zero inside the padding", em)
	em = bytes.Clone(good)
	em[k-len(testSHA256Prefix)-sha256.Size-1] = 0xff
	bad("no zero after the padding", em)
	// DigestInfo without the NULL parameters, which some parsers allow.
	bad("digest info without NULL", emsaPKCS1v15(k, mustHex("302f300b0609608648016503040201"), []byte{0x04, 0x20}, d[:]))
	// Bleichenbacher 2006: short padding, the digest, then garbage a
	// lenient parser never reads.
	em = make([]byte, k)
	em[1] = 0x01
	copy(em[2:], bytes.Repeat([]byte{0xff}, 8))
	copy(em[11:], append(bytes.Clone(testSHA256Prefix), d[:]...))
	for i := 11 + len(testSHA256Prefix) + sha256.Size; i < k; i++ {
		em[i] = byte(rng.Uint32())
	}
	bad("short padding, digest, garbage", em)
	bad("shifted two bytes left, zeros after the digest", append(emsaPKCS1v15(k-2, testSHA256Prefix, d[:]), 0, 0))
	bad("another digest", emsaPKCS1v15(k, testSHA256Prefix, other[:]))
	bad("sha-1 digest info", emsaPKCS1v15(k, mustHex("3021300906052b0e03021a05000414"), d[:20]))
	return cs
}

// rsaEdgeValues are signatures that are not signatures of anything: 0, 1,
// N-1, N, N+1, all bits set, each k bytes long where it fits.
func rsaEdgeValues(pub *rsa.PublicKey) map[string][]byte {
	k := pub.Size()
	n := func(x *big.Int) []byte {
		if x.BitLen() > 8*k {
			return x.Bytes()
		}
		return x.FillBytes(make([]byte, k))
	}
	one := big.NewInt(1)
	return map[string][]byte{
		"zero":     make([]byte, k),
		"one":      n(one),
		"two":      n(big.NewInt(2)),
		"N-1":      n(new(big.Int).Sub(pub.N, one)),
		"N":        n(pub.N),
		"N+1":      n(new(big.Int).Add(pub.N, one)),
		"all ff":   bytes.Repeat([]byte{0xff}, k),
		"2^(8k-8)": n(new(big.Int).Lsh(one, uint(8*k-8))),
	}
}

// TestRS256AgreesWithCryptoRSA checks the RS256 verification of a parsed
// key set (the key's modulus prepared once, rs256.go) against
// crypto/rsa.VerifyPKCS1v15: for keys of several sizes and exponents, the
// valid signatures of many messages and every kind of near miss, both
// accept exactly the valid ones.
func TestRS256AgreesWithCryptoRSA(t *testing.T) {
	type key struct {
		name        string
		msgs        int
		leadingZero bool // must meet a valid signature with a leading zero byte
		gen         func() (*rsa.PrivateKey, error)
	}
	generate := func(bits int) func() (*rsa.PrivateKey, error) {
		return func() (*rsa.PrivateKey, error) { return rsa.GenerateKey(rand.Reader, bits) }
	}
	withExponent := func(bits, e int) func() (*rsa.PrivateKey, error) {
		return func() (*rsa.PrivateKey, error) { return rsaKeyWithExponent(bits, e) }
	}
	specs := []key{
		{"2048-bit", 12, false, generate(2048)},
		{"another 2048-bit", 6, false, generate(2048)},
		{"2049-bit (a one-bit top byte)", 6, true, generate(2049)},
		{"3072-bit", 6, false, generate(3072)},
		{"4096-bit", 4, false, generate(4096)},
		{"2048-bit, e=3", 6, false, withExponent(2048, 3)},
		{"2048-bit, e=2^31-1", 6, false, withExponent(2048, 1<<31-1)},
	}
	privs := make([]*rsa.PrivateKey, len(specs))
	errs := make([]error, len(specs))
	var wg sync.WaitGroup
	for i, s := range specs {
		wg.Go(func() { privs[i], errs[i] = s.gen() })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("%s key: %v", specs[i].name, err)
		}
	}

	rng := mrand.New(mrand.NewPCG(1, 2))
	for i, s := range specs {
		priv := privs[i]
		pub := &priv.PublicKey
		pk := rs256Parsed(t, priv)
		accepted, refused := 0, 0
		check := func(name string, d [sha256.Size]byte, sig []byte, valid bool) {
			t.Helper()
			std := rsa.VerifyPKCS1v15(pub, crypto.SHA256, d[:], sig) == nil
			ours := pk.rs256.verify(&d, sig) == nil
			if ours != std || ours != valid {
				t.Errorf("%s key, %s: ours accepts %v, crypto/rsa accepts %v, want %v", s.name, name, ours, std, valid)
			}
			if ours {
				accepted++
			} else {
				refused++
			}
		}
		// Signatures whose first byte is zero, shortened by it (the same
		// number, one byte short) and lengthened by another: at least one
		// is needed, so messages are added until one comes (about every
		// other signature for the 2049-bit key, whose top byte is 0x01).
		leadingZero := 0
		for m := 0; m < s.msgs || (s.leadingZero && leadingZero == 0 && m < 100); m++ {
			msg := fmt.Sprintf("eyJhbGciOiJSUzI1NiJ9.message-%d-%d", i, m)
			d := sha256.Sum256([]byte(msg))
			for _, c := range rsaCases(priv, rng, d) {
				if c.valid && c.sig[0] == 0 {
					leadingZero++
				}
				check(fmt.Sprintf("message %d, %s", m, c.name), c.digest, c.sig, c.valid)
				if c.digest == d {
					// The same through Verify's own entry point.
					if got := verifySignature(pk, msg, c.sig) == nil; got != c.valid {
						t.Errorf("%s key, message %d, %s: verifySignature accepts %v, want %v", s.name, m, c.name, got, c.valid)
					}
				}
			}
		}
		d := sha256.Sum256([]byte("edge"))
		for name, sig := range rsaEdgeValues(pub) {
			check(name, d, sig, false)
		}
		// A valid signature by another key of the same size.
		for j, other := range privs {
			if j != i && other.Size() == priv.Size() {
				sig, err := rsa.SignPKCS1v15(nil, other, crypto.SHA256, d[:])
				if err != nil {
					t.Fatal(err)
				}
				check("signature by "+specs[j].name+" key", d, sig, false)
			}
		}
		if s.leadingZero && leadingZero == 0 {
			t.Fatalf("%s key: no valid signature with a leading zero byte in 100 messages", s.name)
		}
		if accepted < s.msgs || refused < 40*s.msgs {
			t.Fatalf("%s key: %d accepted, %d refused: the cases did not run", s.name, accepted, refused)
		}
	}
}

// TestRS256KeyWithoutPreparedModulusUsesCryptoRSA: a key not made by
// parseJWKS still verifies, through crypto/rsa.
func TestRS256KeyWithoutPreparedModulusUsesCryptoRSA(t *testing.T) {
	priv := fuzzRSAKey(t)
	msg := "a.b"
	d := sha256.Sum256([]byte(msg))
	sig, err := rsa.SignPKCS1v15(nil, priv, crypto.SHA256, d[:])
	if err != nil {
		t.Fatal(err)
	}
	k := publicKey{alg: AlgRS256, key: &priv.PublicKey}
	if err := verifySignature(k, msg, sig); err != nil {
		t.Fatalf("valid signature refused: %v", err)
	}
	if err := verifySignature(k, msg+".", sig); err == nil {
		t.Fatal("signature of another message accepted")
	}
}

func TestNewRS256KeyRefusesWhatCryptoRSARefuses(t *testing.T) {
	priv := fuzzRSAKey(t)
	n := priv.N
	one := big.NewInt(1)
	for _, c := range []struct {
		name string
		pub  *rsa.PublicKey
		ok   bool
	}{
		{"2048 bits, e=65537", &rsa.PublicKey{N: n, E: 65537}, true},
		{"e=3", &rsa.PublicKey{N: n, E: 3}, true},
		{"e=2^31-1", &rsa.PublicKey{N: n, E: 1<<31 - 1}, true},
		{"8192 bits", &rsa.PublicKey{N: new(big.Int).Sub(new(big.Int).Lsh(one, 8192), one), E: 65537}, true},
		{"no modulus", &rsa.PublicKey{E: 65537}, false},
		{"negative modulus", &rsa.PublicKey{N: new(big.Int).Neg(n), E: 65537}, false},
		{"even modulus", &rsa.PublicKey{N: new(big.Int).Sub(n, one), E: 65537}, false},
		{"2047 bits", &rsa.PublicKey{N: new(big.Int).Rsh(n, 1), E: 65537}, false},
		{"8193 bits", &rsa.PublicKey{N: new(big.Int).Add(new(big.Int).Lsh(one, 8192), one), E: 65537}, false},
		{"e=1", &rsa.PublicKey{N: n, E: 1}, false},
		{"e=2", &rsa.PublicKey{N: n, E: 2}, false},
		{"even e", &rsa.PublicKey{N: n, E: 65536}, false},
		{"e=2^31+1", &rsa.PublicKey{N: n, E: 1<<31 + 1}, false},
		{"negative e", &rsa.PublicKey{N: n, E: -65537}, false},
	} {
		k, err := newRS256Key(c.pub)
		if (err == nil) != c.ok {
			t.Errorf("%s: err = %v, want accepted %v", c.name, err, c.ok)
		}
		if err == nil && (k.n.Size() != c.pub.Size() || k.e != uint(c.pub.E)) {
			t.Errorf("%s: prepared key of %d bytes, e=%d", c.name, k.n.Size(), k.e)
		}
	}
	// The key set refuses an even modulus rather than fail each token.
	even := new(big.Int).Sub(n, one)
	raw := `{"keys":[{"kty":"RSA","kid":"a","n":"` + base64.RawURLEncoding.EncodeToString(even.Bytes()) + `","e":"AQAB"}]}`
	if _, err := parseJWKS([]byte(raw)); err == nil || !strings.Contains(err.Error(), "even") {
		t.Fatalf("even modulus: err = %v", err)
	}
}

// The fixed key of FuzzRS256AgreesWithCryptoRSA, so that a failing input
// the fuzzer saves reproduces. A test key, nothing else.
const (
	fuzzRSAP = "ca9ee23184871a5cd4289791de8e800095630d689653d009f83a34230f40ea05ff58a42866f67a6bd09e05a435e8ddbc410a21a7b1e0f4e5b47bd21b85ea9500265e8cbdf616b04cf2282e8be331df11c6738189a0c314150ef586a89caa23846d3bc7a544fac37de598687806b06f892cf96533ed73234eeccc8fc5fc52e9af"
	fuzzRSAQ = "cdccc73b0be4932aa3515bbb18983be87e1bad571a38eea3466d9d96b7cb079916846b4f62a49f8d1d021691e402fa19849b2e23be039ffd1b3fd67e2d8a89b4349c18cc0188f484073887edc73d400146652ff824ea2bb1c0591adfe6e5129dae2010c108c1cd81f180c7e74c345eb3e2746b5cd020b36e221d8a13feafb451"
)

func fuzzRSAKey(t testing.TB) *rsa.PrivateKey {
	p, _ := new(big.Int).SetString(fuzzRSAP, 16)
	q, _ := new(big.Int).SetString(fuzzRSAQ, 16)
	priv, err := rsaKeyFromPrimes(p, q, 65537)
	if err != nil {
		t.Fatal(err)
	}
	return priv
}

// FuzzRS256AgreesWithCryptoRSA compares the RS256 check of a parsed key
// with crypto/rsa.VerifyPKCS1v15 on fuzzer-made digests and signatures.
// With encoded set, the input is an encoded message rather than a
// signature: it is signed raw, so that the fuzzer works on what the
// check compares (the padding, the DigestInfo, the digest) instead of on
// signatures whose every change scrambles it; only the exact encoding of
// the digest may then verify.
func FuzzRS256AgreesWithCryptoRSA(f *testing.F) {
	priv := fuzzRSAKey(f)
	pub := &priv.PublicKey
	pk := rs256Parsed(f, priv)
	k := priv.Size()
	d := sha256.Sum256([]byte("eyJhbGciOiJSUzI1NiJ9.e30"))
	sig, err := rsa.SignPKCS1v15(nil, priv, crypto.SHA256, d[:])
	if err != nil {
		f.Fatal(err)
	}
	good := emsaPKCS1v15(k, testSHA256Prefix, d[:])
	f.Add(d[:], sig, false)
	f.Add(d[:], good, true)
	f.Add(d[:], good[1:], true)
	f.Add(d[:], emsaPKCS1v15(k, mustHex("302f300b0609608648016503040201"), []byte{0x04, 0x20}, d[:]), true)
	f.Add(d[:], append(emsaPKCS1v15(k-2, testSHA256Prefix, d[:]), 0, 0), true)
	typ2 := bytes.Clone(good)
	typ2[1] = 0x02
	f.Add(d[:], typ2, true)
	holed := bytes.Clone(good)
	holed[100] = 0x00
	f.Add(d[:], holed, true)
	f.Add(d[:31], sig, false)
	// Two signatures of the fixed key picked for their value: with N
	// added, the first still fits in k bytes (the same value mod N, to be
	// refused as not less than N); the second starts with a zero byte (to
	// be refused without it, one byte short).
	d0, d1 := sha256.Sum256([]byte("eyJhbGciOiJSUzI1NiJ9.0")), sha256.Sum256([]byte("eyJhbGciOiJSUzI1NiJ9.110"))
	s0, err0 := rsa.SignPKCS1v15(nil, priv, crypto.SHA256, d0[:])
	s1, err1 := rsa.SignPKCS1v15(nil, priv, crypto.SHA256, d1[:])
	plusN := new(big.Int).Add(new(big.Int).SetBytes(s0), pub.N)
	if err0 != nil || err1 != nil || plusN.BitLen() > 8*k || s1[0] != 0 {
		f.Fatalf("the fixed key's signatures are not the seeds they should be (%v, %v)", err0, err1)
	}
	f.Add(d0[:], plusN.FillBytes(make([]byte, k)), false)
	f.Add(d1[:], s1[1:], false)
	for _, v := range rsaEdgeValues(pub) {
		f.Add(d[:], v, false)
	}
	f.Fuzz(func(t *testing.T, digest, in []byte, encoded bool) {
		var d [sha256.Size]byte
		copy(d[:], digest)
		sig := in
		if encoded {
			if len(in) > k || new(big.Int).SetBytes(in).Cmp(pub.N) >= 0 {
				return
			}
			sig = rawSign(priv, in)
		}
		std := rsa.VerifyPKCS1v15(pub, crypto.SHA256, d[:], sig) == nil
		ours := pk.rs256.verify(&d, sig) == nil
		if ours != std {
			t.Fatalf("ours accepts %v, crypto/rsa accepts %v", ours, std)
		}
		if encoded {
			em := make([]byte, k)
			copy(em[k-len(in):], in)
			if exact := bytes.Equal(em, emsaPKCS1v15(k, testSHA256Prefix, d[:])); ours != exact {
				t.Fatalf("accepts %v an encoding that is exact: %v", ours, exact)
			}
		}
	})
}

// BenchmarkVerifyRS256PreparedKey is the RS256 check of a parsed key
// alone (SHA-256 of a token-sized input, then rs256Key.verify): the floor
// of BenchmarkVerify/signature/RS256, to set beside
// BenchmarkVerify/primitive/RS256 (crypto/rsa on the same kind of key).
// Run with -cpu 1.
func BenchmarkVerifyRS256PreparedKey(b *testing.B) {
	priv := fuzzRSAKey(b)
	pk := rs256Parsed(b, priv)
	signing := strings.Repeat("eyJhbGciOiJSUzI1NiJ9", 16)
	d := sha256.Sum256([]byte(signing))
	sig, err := rsa.SignPKCS1v15(nil, priv, crypto.SHA256, d[:])
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if err := verifySignature(pk, signing, sig); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "verifications/s")
}
