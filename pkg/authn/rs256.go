package authn

import (
	"crypto/rsa"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"

	"filippo.io/bigmod"
)

// rs256Key is an RSA public key of a key set with its modulus prepared
// once, when the set is parsed. crypto/rsa keeps no state for a public key
// and rebuilds the modulus (bigmod.NewModulus: R² mod N and the Montgomery
// constant) on every verification, about a third of an RS256 check; here
// that is paid once per key and key set fetch.
//
// The arithmetic is filippo.io/bigmod, the export of the standard
// library's crypto/internal/fips140/bigmod that crypto/rsa itself runs on.
// A Modulus is never written after NewModulus, so one rs256Key is safe for
// concurrent use.
type rs256Key struct {
	n *bigmod.Modulus
	e uint
}

// sha256DigestInfo is the DER DigestInfo prefix of a SHA-256 digest
// (RFC 8017 section 9.2, note 1).
var sha256DigestInfo = []byte{0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20}

// newRS256Key prepares pub for RS256. It refuses what crypto/rsa refuses
// (an even modulus; an exponent that is even, below 3 or above 2³¹-1) and
// what this package refuses (a modulus outside minRSABits-maxRSABits).
func newRS256Key(pub *rsa.PublicKey) (*rs256Key, error) {
	if pub == nil || pub.N == nil || pub.N.Sign() <= 0 {
		return nil, errors.New("rsa modulus missing")
	}
	if bits := pub.N.BitLen(); bits < minRSABits || bits > maxRSABits {
		return nil, fmt.Errorf("rsa modulus of %d bits, want %d-%d", bits, minRSABits, maxRSABits)
	}
	if pub.N.Bit(0) == 0 {
		return nil, errors.New("rsa modulus is even")
	}
	if pub.E < 3 || pub.E > 1<<31-1 || pub.E&1 == 0 {
		return nil, errors.New("rsa exponent out of range")
	}
	n, err := bigmod.NewModulus(pub.N.Bytes())
	if err != nil {
		return nil, fmt.Errorf("rsa modulus: %w", err)
	}
	return &rs256Key{n: n, e: uint(pub.E)}, nil
}

// verify checks an RSASSA-PKCS1-v1_5 signature with SHA-256 (RFC 8017
// section 8.2.2) as crypto/rsa.VerifyPKCS1v15 does: sig must be exactly
// as long as the modulus and less than it; s^e mod N must equal the
// encoding of digest built anew (0x00 0x01 FF..FF 0x00 DigestInfo digest),
// compared whole. The decrypted block is never parsed, so no leniency in
// reading the padding can let a forged signature through.
func (k *rs256Key) verify(digest *[sha256.Size]byte, sig []byte) error {
	size := k.n.Size()
	if len(sig) != size {
		return errBadSignature
	}
	s, err := bigmod.NewNat().SetBytes(sig, k.n)
	if err != nil { // s >= N
		return errBadSignature
	}
	em := bigmod.NewNat().ExpShortVarTime(s, k.e, k.n).Bytes(k.n)

	var buf [maxRSABits / 8]byte
	want := buf[:size]
	// size is at least minRSABits/8 = 256 bytes, far above the 62 an
	// encoding with 8 bytes of padding needs.
	tLen := len(sha256DigestInfo) + len(digest)
	want[1] = 0x01
	for i := 2; i < size-tLen-1; i++ {
		want[i] = 0xff
	}
	copy(want[size-tLen:], sha256DigestInfo)
	copy(want[size-len(digest):], digest[:])
	if subtle.ConstantTimeCompare(em, want) != 1 {
		return errBadSignature
	}
	return nil
}
