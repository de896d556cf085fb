package attestation

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"math/big"

	"github.com/google/go-tpm/tpm2"
)

// ErrQuote is the class of every TPM quote verification failure.
var ErrQuote = errors.New("tpm quote invalid")

// MaxPCR is the highest PCR index a quote may select (PC Client: 24 PCRs).
const MaxPCR = 23

// PCRSelection returns the TPM's PCR selection bitmap for the indices, in
// the PC Client format (at least 3 bytes).
func PCRSelection(indices []int) []byte {
	sel := make([]byte, 3)
	for _, i := range indices {
		if i >= 0 && i <= MaxPCR {
			sel[i/8] |= 1 << (i % 8)
		}
	}
	return sel
}

// PCRDigest is SHA-256 of the PCR values concatenated in index order: the
// digest a TPM puts in a quote over SHA-256 PCRs.
func PCRDigest(pcrs []PCRValue) ([]byte, error) {
	h := sha256.New()
	last := -1
	for _, p := range pcrs {
		if p.Index <= last || p.Index > MaxPCR {
			return nil, fmt.Errorf("%w: pcr indices not ascending in 0..%d", ErrQuote, MaxPCR)
		}
		last = p.Index
		v, err := hex.DecodeString(p.SHA256)
		if err != nil || len(v) != sha256.Size {
			return nil, fmt.Errorf("%w: pcr %d is not a sha256 hex value", ErrQuote, p.Index)
		}
		h.Write(v)
	}
	return h.Sum(nil), nil
}

// VerifyQuote checks a TPM quote: the attestation key is a restricted
// signing key (so it signs only TPM-generated structures), its signature
// over the attest structure holds, the structure is a TPM-generated quote
// whose qualifying data equals qualifying, and it covers exactly the
// reported SHA-256 PCRs with a digest of the reported values. Whether the
// attestation key belongs to the node is the caller's check (policy pins
// its hash). Every failure wraps ErrQuote.
func VerifyQuote(q *TPMQuote, qualifying []byte) (err error) {
	if q == nil {
		return fmt.Errorf("%w: no quote", ErrQuote)
	}
	// go-tpm unmarshals by reflection; a malformed structure must be an
	// error, never a panic of the verifier.
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("%w: malformed tpm structure: %v", ErrQuote, p)
		}
	}()
	pub, err := akPublicKey(q.AKPublic)
	if err != nil {
		return err
	}
	sig, err := tpm2.Unmarshal[tpm2.TPMTSignature](q.Signature)
	if err != nil {
		return fmt.Errorf("%w: signature: %v", ErrQuote, err)
	}
	digest := sha256.Sum256(q.Attest)
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		s, err := sig.Signature.ECDSA()
		if err != nil || sig.SigAlg != tpm2.TPMAlgECDSA || s.Hash != tpm2.TPMAlgSHA256 {
			return fmt.Errorf("%w: signature is not ecdsa with sha256", ErrQuote)
		}
		if !ecdsa.Verify(k, digest[:], new(big.Int).SetBytes(s.SignatureR.Buffer), new(big.Int).SetBytes(s.SignatureS.Buffer)) {
			return fmt.Errorf("%w: signature does not verify with the attestation key", ErrQuote)
		}
	case *rsa.PublicKey:
		s, err := sig.Signature.RSASSA()
		if err != nil || sig.SigAlg != tpm2.TPMAlgRSASSA || s.Hash != tpm2.TPMAlgSHA256 {
			return fmt.Errorf("%w: signature is not rsassa with sha256", ErrQuote)
		}
		if rsa.VerifyPKCS1v15(k, crypto.SHA256, digest[:], s.Sig.Buffer) != nil {
			return fmt.Errorf("%w: signature does not verify with the attestation key", ErrQuote)
		}
	}
	att, err := tpm2.Unmarshal[tpm2.TPMSAttest](q.Attest)
	if err != nil {
		return fmt.Errorf("%w: attest: %v", ErrQuote, err)
	}
	if att.Magic != tpm2.TPMGeneratedValue || att.Type != tpm2.TPMSTAttestQuote {
		return fmt.Errorf("%w: not a tpm-generated quote", ErrQuote)
	}
	if !bytes.Equal(att.ExtraData.Buffer, qualifying) {
		return fmt.Errorf("%w: qualifying data %x, expected %x (nonce or report hash differ)", ErrQuote, att.ExtraData.Buffer, qualifying)
	}
	info, err := att.Attested.Quote()
	if err != nil {
		return fmt.Errorf("%w: quote info: %v", ErrQuote, err)
	}
	sels := info.PCRSelect.PCRSelections
	indices := make([]int, 0, len(q.PCRs))
	for _, p := range q.PCRs {
		indices = append(indices, p.Index)
	}
	if len(sels) != 1 || sels[0].Hash != tpm2.TPMAlgSHA256 || !bytes.Equal(trimSelection(sels[0].PCRSelect), trimSelection(PCRSelection(indices))) {
		return fmt.Errorf("%w: quoted pcr selection differs from the reported pcrs", ErrQuote)
	}
	want, err := PCRDigest(q.PCRs)
	if err != nil {
		return err
	}
	if !bytes.Equal(info.PCRDigest.Buffer, want) {
		return fmt.Errorf("%w: quoted pcr digest %x differs from the digest of the reported values %x", ErrQuote, info.PCRDigest.Buffer, want)
	}
	return nil
}

// AKPublicSHA256 is the hex SHA-256 of the marshalled attestation key, the
// value a policy pins per node.
func AKPublicSHA256(akPublic []byte) string {
	h := sha256.Sum256(akPublic)
	return hex.EncodeToString(h[:])
}

func akPublicKey(b []byte) (crypto.PublicKey, error) {
	ak, err := tpm2.Unmarshal[tpm2.TPMTPublic](b)
	if err != nil {
		return nil, fmt.Errorf("%w: attestation key: %v", ErrQuote, err)
	}
	a := ak.ObjectAttributes
	if !a.Restricted || !a.SignEncrypt || !a.FixedTPM || a.Decrypt {
		return nil, fmt.Errorf("%w: attestation key is not a restricted tpm-resident signing key", ErrQuote)
	}
	switch ak.Type {
	case tpm2.TPMAlgECC:
		parms, err := ak.Parameters.ECCDetail()
		if err != nil {
			return nil, fmt.Errorf("%w: attestation key: %v", ErrQuote, err)
		}
		pt, err := ak.Unique.ECC()
		if err != nil {
			return nil, fmt.Errorf("%w: attestation key: %v", ErrQuote, err)
		}
		k, err := tpm2.ECDSAPub(parms, pt)
		if err == nil {
			// Re-parsed through the checked encoding: the point must be
			// on the curve.
			var b []byte
			if b, err = k.Bytes(); err == nil {
				k, err = ecdsa.ParseUncompressedPublicKey(k.Curve, b)
			}
		}
		if err != nil {
			return nil, fmt.Errorf("%w: attestation key is not a valid ecc point", ErrQuote)
		}
		return k, nil
	case tpm2.TPMAlgRSA:
		parms, err := ak.Parameters.RSADetail()
		if err != nil {
			return nil, fmt.Errorf("%w: attestation key: %v", ErrQuote, err)
		}
		n, err := ak.Unique.RSA()
		if err != nil {
			return nil, fmt.Errorf("%w: attestation key: %v", ErrQuote, err)
		}
		k, err := tpm2.RSAPub(parms, n)
		if err != nil || k.N.BitLen() < 2048 {
			return nil, fmt.Errorf("%w: attestation key is not an rsa key of at least 2048 bits", ErrQuote)
		}
		return k, nil
	}
	return nil, fmt.Errorf("%w: attestation key type %v is not ecc or rsa", ErrQuote, ak.Type)
}

// trimSelection drops trailing zero bytes so selections of different sizes
// compare by the PCRs they select.
func trimSelection(b []byte) []byte { return bytes.TrimRight(b, "\x00") }
