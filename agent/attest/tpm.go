package attest

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/gpuaas/gpuaas/pkg/attestation"
)

// quoteAttempts bounds how often a quote is retaken when a PCR is extended
// between reading the PCRs and quoting them.
const quoteAttempts = 3

// AKTemplate is the attestation key: an ECC P-256 restricted signing
// primary (ECDSA, SHA-256) in the owner hierarchy. A primary is derived
// from the hierarchy seed, so the same TPM yields the same key every time
// and a control plane can pin its hash (attestation.AKPublicSHA256).
var AKTemplate = tpm2.TPMTPublic{
	Type:    tpm2.TPMAlgECC,
	NameAlg: tpm2.TPMAlgSHA256,
	ObjectAttributes: tpm2.TPMAObject{
		FixedTPM:            true,
		FixedParent:         true,
		SensitiveDataOrigin: true,
		UserWithAuth:        true,
		NoDA:                true,
		Restricted:          true,
		SignEncrypt:         true,
	},
	Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
		Scheme: tpm2.TPMTECCScheme{
			Scheme:  tpm2.TPMAlgECDSA,
			Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256}),
		},
		CurveID: tpm2.TPMECCNistP256,
	}),
}

// Quote creates the attestation key and quotes the SHA-256 PCRs with the
// qualifying data. The reported PCR values are read around the quote and
// the quote is retaken if they moved, so the values always match the
// quoted digest.
func Quote(tpm transport.TPM, pcrs []int, qualifying []byte) (q *attestation.TPMQuote, err error) {
	ak, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(AKTemplate)}.Execute(tpm)
	if err != nil {
		return nil, fmt.Errorf("tpm quote: create attestation key: %w", err)
	}
	defer func() {
		if _, ferr := (tpm2.FlushContext{FlushHandle: ak.ObjectHandle}).Execute(tpm); ferr != nil && err == nil {
			err = fmt.Errorf("tpm quote: flush attestation key: %w", ferr)
		}
	}()
	upcrs := make([]uint, len(pcrs))
	for i, p := range pcrs {
		upcrs[i] = uint(p)
	}
	sel := tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(upcrs...)}}}
	for range quoteAttempts {
		values, err := readPCRs(tpm, pcrs)
		if err != nil {
			return nil, err
		}
		rsp, err := tpm2.Quote{
			SignHandle:     tpm2.AuthHandle{Handle: ak.ObjectHandle, Name: ak.Name, Auth: tpm2.PasswordAuth(nil)},
			QualifyingData: tpm2.TPM2BData{Buffer: qualifying},
			InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
			PCRSelect:      sel,
		}.Execute(tpm)
		if err != nil {
			return nil, fmt.Errorf("tpm quote: %w", err)
		}
		att, err := rsp.Quoted.Contents()
		if err != nil {
			return nil, fmt.Errorf("tpm quote: parse: %w", err)
		}
		info, err := att.Attested.Quote()
		if err != nil {
			return nil, fmt.Errorf("tpm quote: parse: %w", err)
		}
		want, err := attestation.PCRDigest(values)
		if err != nil {
			return nil, fmt.Errorf("tpm quote: %w", err)
		}
		if !bytes.Equal(info.PCRDigest.Buffer, want) {
			continue // a PCR was extended in between: read and quote again
		}
		return &attestation.TPMQuote{
			PCRs:      values,
			Attest:    rsp.Quoted.Bytes(),
			Signature: tpm2.Marshal(rsp.Signature),
			AKPublic:  ak.OutPublic.Bytes(),
		}, nil
	}
	return nil, fmt.Errorf("tpm quote: pcrs kept changing over %d attempts", quoteAttempts)
}

// readPCRs reads the SHA-256 PCRs; a TPM returns at most a few per call.
func readPCRs(tpm transport.TPM, pcrs []int) ([]attestation.PCRValue, error) {
	got := map[int]string{}
	for range len(pcrs) {
		var want []uint
		for _, p := range pcrs {
			if _, ok := got[p]; !ok {
				want = append(want, uint(p))
			}
		}
		if len(want) == 0 {
			break
		}
		rsp, err := tpm2.PCRRead{PCRSelectionIn: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(want...)}}}}.Execute(tpm)
		if err != nil {
			return nil, fmt.Errorf("tpm quote: read pcrs: %w", err)
		}
		var idx []int
		for _, s := range rsp.PCRSelectionOut.PCRSelections {
			if s.Hash != tpm2.TPMAlgSHA256 {
				continue
			}
			for i, b := range s.PCRSelect {
				for bit := range 8 {
					if b&(1<<bit) != 0 {
						idx = append(idx, i*8+bit)
					}
				}
			}
		}
		if len(idx) == 0 || len(idx) != len(rsp.PCRValues.Digests) {
			return nil, errors.New("tpm quote: read pcrs: the tpm returned no sha256 pcr values")
		}
		for i, p := range idx {
			got[p] = hex.EncodeToString(rsp.PCRValues.Digests[i].Buffer)
		}
	}
	out := make([]attestation.PCRValue, 0, len(pcrs))
	for _, p := range pcrs {
		v, ok := got[p]
		if !ok {
			return nil, fmt.Errorf("tpm quote: read pcrs: the tpm did not return pcr %d", p)
		}
		out = append(out, attestation.PCRValue{Index: p, SHA256: v})
	}
	return out, nil
}
