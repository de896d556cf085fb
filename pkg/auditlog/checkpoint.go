package auditlog

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/mod/sumdb/note"
)

// Checkpoint is a commitment to the first Size entries of a log: the C2SP
// tlog-checkpoint body (https://c2sp.org/tlog-checkpoint), three lines:
// the origin, the tree size in decimal and the base64 root hash.
type Checkpoint struct {
	Origin string
	Size   uint64
	Root   []byte
}

// ErrUntrusted is the class of errors for a checkpoint that no trusted key
// signed, or that a trusted key's signature does not match.
var ErrUntrusted = errors.New("checkpoint not signed by a trusted key")

// ErrInconsistent is the class of errors for two checkpoints that cannot
// both be true: the same size with different roots, a smaller size after a
// larger one, or a failed consistency proof. Such a checkpoint is never
// signed.
var ErrInconsistent = errors.New("inconsistent checkpoints")

// MaxCheckpointSize bounds a signed checkpoint note when parsing outside
// input.
const MaxCheckpointSize = 16 << 10

// Marshal is the checkpoint body, the text a note signs.
func (c Checkpoint) Marshal() []byte {
	return fmt.Appendf(nil, "%s\n%d\n%s\n", c.Origin, c.Size, base64.StdEncoding.EncodeToString(c.Root))
}

// String names the checkpoint in errors and logs.
func (c Checkpoint) String() string {
	return fmt.Sprintf("checkpoint %d (%s, root %.12s)", c.Size, c.Origin, base64.StdEncoding.EncodeToString(c.Root))
}

// ParseCheckpoint parses a checkpoint body. Extension lines after the root
// are allowed by C2SP and ignored here.
func ParseCheckpoint(text []byte) (Checkpoint, error) {
	if len(text) > MaxCheckpointSize {
		return Checkpoint{}, fmt.Errorf("parse checkpoint: %d bytes", len(text))
	}
	if !bytes.HasSuffix(text, []byte("\n")) {
		return Checkpoint{}, errors.New("parse checkpoint: body does not end with a newline")
	}
	lines := strings.Split(strings.TrimSuffix(string(text), "\n"), "\n")
	if len(lines) < 3 {
		return Checkpoint{}, fmt.Errorf("parse checkpoint: %d lines, want at least 3", len(lines))
	}
	if lines[0] == "" {
		return Checkpoint{}, errors.New("parse checkpoint: empty origin")
	}
	size, err := strconv.ParseUint(lines[1], 10, 64)
	if err != nil || strconv.FormatUint(size, 10) != lines[1] {
		return Checkpoint{}, fmt.Errorf("parse checkpoint: size %q is not a decimal number", lines[1])
	}
	root, err := base64.StdEncoding.DecodeString(lines[2])
	if err != nil || len(root) != HashSize {
		return Checkpoint{}, fmt.Errorf("parse checkpoint: root %q is not a base64 %d-byte hash", lines[2], HashSize)
	}
	for _, l := range lines[3:] {
		if l == "" {
			return Checkpoint{}, errors.New("parse checkpoint: empty extension line")
		}
	}
	return Checkpoint{Origin: lines[0], Size: size, Root: root}, nil
}

// Sign signs the checkpoint with every signer (several during a key
// rotation) and returns the signed note.
func Sign(c Checkpoint, signers ...note.Signer) ([]byte, error) {
	if len(signers) == 0 {
		return nil, errors.New("sign checkpoint: no signing key")
	}
	msg, err := note.Sign(&note.Note{Text: string(c.Marshal())}, signers...)
	if err != nil {
		return nil, fmt.Errorf("sign %s: %w", c, err)
	}
	return msg, nil
}

// SignNext signs next only if it extends prev, the last checkpoint signed
// for this log (nil for the first): same origin, not smaller, the same root
// at the same size, and a consistency proof from prev to next that
// verifies. This is the only way the control plane signs, so it can never
// sign two checkpoints that contradict each other.
func SignNext(prev *Checkpoint, next Checkpoint, consistency [][]byte, signers ...note.Signer) ([]byte, error) {
	if err := CheckConsistent(prev, next, consistency); err != nil {
		return nil, fmt.Errorf("refuse to sign %s: %w", next, err)
	}
	return Sign(next, signers...)
}

// CheckConsistent reports whether next may follow prev (nil: anything may
// follow). The error is ErrInconsistent and names both checkpoints.
func CheckConsistent(prev *Checkpoint, next Checkpoint, consistency [][]byte) error {
	if prev == nil {
		return nil
	}
	switch {
	case prev.Origin != next.Origin:
		return fmt.Errorf("%w: %s has origin %q, %s has %q", ErrInconsistent, prev, prev.Origin, next, next.Origin)
	case next.Size < prev.Size:
		return fmt.Errorf("%w: rollback: %s is smaller than the earlier %s", ErrInconsistent, next, prev)
	case next.Size == prev.Size && !bytes.Equal(next.Root, prev.Root):
		return fmt.Errorf("%w: fork: %s and %s have the same size and different roots", ErrInconsistent, prev, next)
	}
	if err := VerifyConsistency(prev.Size, next.Size, consistency, prev.Root, next.Root); err != nil {
		return fmt.Errorf("%w: %s does not extend %s: %v", ErrInconsistent, next, prev, err)
	}
	return nil
}

// Open verifies a signed checkpoint against the trusted keys and parses it.
// One valid signature by any trusted key is enough (key rotation); a
// signature by a trusted key that does not verify is an error, signatures
// by unknown keys are ignored. With origin not empty, the checkpoint must be
// for that log.
func Open(msg []byte, origin string, trusted note.Verifiers) (Checkpoint, error) {
	if len(msg) > MaxCheckpointSize {
		return Checkpoint{}, fmt.Errorf("open checkpoint: %d bytes", len(msg))
	}
	n, err := note.Open(msg, trusted)
	if err != nil {
		var unverified *note.UnverifiedNoteError
		if errors.As(err, &unverified) {
			c, perr := ParseCheckpoint([]byte(unverified.Note.Text))
			if perr == nil {
				return Checkpoint{}, fmt.Errorf("%w: %s is signed only by %s", ErrUntrusted, c, signerNames(unverified.Note.UnverifiedSigs))
			}
			return Checkpoint{}, fmt.Errorf("%w: signed only by %s", ErrUntrusted, signerNames(unverified.Note.UnverifiedSigs))
		}
		var invalid *note.InvalidSignatureError
		if errors.As(err, &invalid) {
			return Checkpoint{}, fmt.Errorf("%w: %v", ErrUntrusted, err)
		}
		return Checkpoint{}, fmt.Errorf("open checkpoint: %w", err)
	}
	c, err := ParseCheckpoint([]byte(n.Text))
	if err != nil {
		return Checkpoint{}, err
	}
	if origin != "" && c.Origin != origin {
		return Checkpoint{}, fmt.Errorf("%w: %s is for origin %q, want %q", ErrUntrusted, c, c.Origin, origin)
	}
	return c, nil
}

// ParseSigned parses a signed checkpoint without checking any signature,
// for tools that have no key and for stores reading back what they wrote.
func ParseSigned(msg []byte) (Checkpoint, error) {
	if len(msg) > MaxCheckpointSize {
		return Checkpoint{}, fmt.Errorf("parse checkpoint: %d bytes", len(msg))
	}
	i := bytes.LastIndex(msg, []byte("\n\n"))
	if i < 0 {
		return Checkpoint{}, errors.New("parse checkpoint: no signature block")
	}
	return ParseCheckpoint(msg[:i+1])
}

func signerNames(sigs []note.Signature) string {
	if len(sigs) == 0 {
		return "no key"
	}
	var names []string
	for _, s := range sigs {
		names = append(names, fmt.Sprintf("%s+%08x", s.Name, s.Hash))
	}
	return "untrusted key " + strings.Join(names, ", ")
}

// GenerateKey returns a new Ed25519 key pair for a log named name, in the
// note key formats: skey "PRIVATE+KEY+name+hash+base64" (secret) and vkey
// "name+hash+base64" (the verifier key to hand to auditors).
func GenerateKey(name string) (skey, vkey string, err error) {
	return note.GenerateKey(rand.Reader, name)
}

// WriteKeyPair writes a new key pair: the signing key at skeyPath (mode
// 0600) and the verifier key at vkeyPath (0644). It refuses to overwrite an
// existing signing key.
func WriteKeyPair(name, skeyPath, vkeyPath string) (vkey string, err error) {
	skey, vkey, err := GenerateKey(name)
	if err != nil {
		return "", fmt.Errorf("generate audit signing key: %w", err)
	}
	f, err := os.OpenFile(skeyPath, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return "", fmt.Errorf("write audit signing key: %w", err)
	}
	if _, err := f.WriteString(skey + "\n"); err != nil {
		f.Close()
		return "", fmt.Errorf("write audit signing key: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return "", fmt.Errorf("write audit signing key: %w", err)
	}
	if err := f.Close(); err != nil {
		return "", fmt.Errorf("write audit signing key: %w", err)
	}
	if err := os.WriteFile(vkeyPath, []byte(vkey+"\n"), 0o644); err != nil {
		return "", fmt.Errorf("write audit verifier key: %w", err)
	}
	return vkey, nil
}

// ParseSigners parses signing keys, one per non-empty line ("#" starts a
// comment). Several keys sign every checkpoint during a rotation.
func ParseSigners(data []byte) ([]note.Signer, error) {
	var out []note.Signer
	for i, l := range keyLines(data) {
		s, err := note.NewSigner(l)
		if err != nil {
			return nil, fmt.Errorf("signing key %d: %w", i+1, err)
		}
		out = append(out, s)
	}
	if len(out) == 0 {
		return nil, errors.New("no signing key")
	}
	return out, nil
}

// ParseVerifiers parses verifier keys, one per non-empty line ("#" starts a
// comment): every key a checkpoint may be signed with.
func ParseVerifiers(data []byte) (note.Verifiers, []note.Verifier, error) {
	var out []note.Verifier
	for i, l := range keyLines(data) {
		v, err := note.NewVerifier(l)
		if err != nil {
			return nil, nil, fmt.Errorf("verifier key %d: %w", i+1, err)
		}
		out = append(out, v)
	}
	if len(out) == 0 {
		return nil, nil, errors.New("no verifier key")
	}
	return note.VerifierList(out...), out, nil
}

// LoadSigners reads ParseSigners' format from a file.
func LoadSigners(path string) ([]note.Signer, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read audit signing key: %w", err)
	}
	s, err := ParseSigners(b)
	if err != nil {
		return nil, fmt.Errorf("audit signing key %s: %w", path, err)
	}
	return s, nil
}

// LoadVerifiers reads ParseVerifiers' format from a file.
func LoadVerifiers(path string) (note.Verifiers, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read audit verifier key: %w", err)
	}
	v, _, err := ParseVerifiers(b)
	if err != nil {
		return nil, fmt.Errorf("audit verifier key %s: %w", path, err)
	}
	return v, nil
}

// VerifierKey is the verifier key (note format) of a signing key line.
func VerifierKey(skey string) (string, error) {
	// PRIVATE+KEY+name+hash+base64(alg || seed)
	parts := strings.SplitN(strings.TrimSpace(skey), "+", 5)
	if len(parts) != 5 || parts[0] != "PRIVATE" || parts[1] != "KEY" {
		return "", errors.New("not a note signing key")
	}
	raw, err := base64.StdEncoding.DecodeString(parts[4])
	if err != nil || len(raw) != 33 || raw[0] != 1 {
		return "", errors.New("not an Ed25519 note signing key")
	}
	return note.NewEd25519VerifierKey(parts[2], ed25519Public(raw[1:]))
}

func keyLines(data []byte) []string {
	var out []string
	for _, l := range strings.Split(string(data), "\n") {
		l = strings.TrimSpace(l)
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		out = append(out, l)
	}
	return out
}

func ed25519Public(seed []byte) ed25519.PublicKey {
	return ed25519.NewKeyFromSeed(seed).Public().(ed25519.PublicKey)
}
