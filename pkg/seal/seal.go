// Package seal encrypts secrets at rest: tenant environment values in the
// control plane's store and in the agent's journal. A Keyring holds
// AES-256-GCM keys read from a file: the first seals, every one opens, so a
// key is rotated by putting a new key first and keeping the old one until
// nothing sealed with it is left.
//
// A sealed value is the text "sealed:v1:KID:BASE64" where BASE64 is the
// 12-byte nonce followed by the ciphertext and tag, and the additional
// data binds the value to where it belongs (a lease id and a variable
// name), so a sealed value copied to another lease or variable does not
// open.
//
// Key file: one key a line, "KID BASE64KEY" (KID 1-32 characters of
// [A-Za-z0-9_-], the key 32 random bytes, standard base64); blank lines and
// lines starting with # are ignored. The file must not be readable by
// group or others.
package seal

import (
	"bufio"
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"regexp"
	"strings"
)

// Prefix starts every sealed value.
const Prefix = "sealed:v1:"

// Errors.
var (
	// ErrKeyFile: the key file is missing, unreadable, too open or
	// malformed.
	ErrKeyFile = errors.New("seal: bad key file")
	// ErrOpen: the value is not sealed, was sealed with a key not in the
	// ring, or was changed or moved.
	ErrOpen = errors.New("seal: cannot open value")
)

var kidRE = regexp.MustCompile(`^[A-Za-z0-9_-]{1,32}$`)

type key struct {
	id   string
	aead cipher.AEAD
}

// Keyring seals with its first key and opens with any. Safe for concurrent
// use.
type Keyring struct {
	keys      []key
	digestKey []byte // derived from the first key (Digest)
}

// NewKeyring returns a ring of the given keys (kid -> 32 bytes), in order:
// the first seals.
func NewKeyring(ids []string, secrets [][]byte) (*Keyring, error) {
	if len(ids) == 0 || len(ids) != len(secrets) {
		return nil, fmt.Errorf("%w: no keys", ErrKeyFile)
	}
	r := &Keyring{}
	seen := map[string]bool{}
	for i, id := range ids {
		if !kidRE.MatchString(id) || seen[id] {
			return nil, fmt.Errorf("%w: key id %q is invalid or repeated", ErrKeyFile, id)
		}
		seen[id] = true
		if len(secrets[i]) != 32 {
			return nil, fmt.Errorf("%w: key %s is %d bytes, want 32", ErrKeyFile, id, len(secrets[i]))
		}
		block, err := aes.NewCipher(secrets[i])
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrKeyFile, err)
		}
		aead, err := cipher.NewGCM(block)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrKeyFile, err)
		}
		r.keys = append(r.keys, key{id: id, aead: aead})
		if i == 0 {
			d := sha256.Sum256(append([]byte("gpuaas seal digest v1\x00"), secrets[i]...))
			r.digestKey = d[:]
		}
	}
	return r, nil
}

// LoadKeyring reads a key file.
func LoadKeyring(path string) (*Keyring, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrKeyFile, err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("%w: %s is mode %04o; it must not be readable by group or others", ErrKeyFile, path, st.Mode().Perm())
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrKeyFile, err)
	}
	r, err := ParseKeyring(raw)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return r, nil
}

// ParseKeyring parses the key file format.
func ParseKeyring(raw []byte) (*Keyring, error) {
	var ids []string
	var secrets [][]byte
	sc := bufio.NewScanner(bytes.NewReader(raw))
	line := 0
	for sc.Scan() {
		line++
		t := strings.TrimSpace(sc.Text())
		if t == "" || strings.HasPrefix(t, "#") {
			continue
		}
		id, b64, ok := strings.Cut(t, " ")
		if !ok {
			return nil, fmt.Errorf("%w: line %d: want \"KID BASE64KEY\"", ErrKeyFile, line)
		}
		k, err := base64.StdEncoding.DecodeString(strings.TrimSpace(b64))
		if err != nil {
			return nil, fmt.Errorf("%w: line %d: key is not base64", ErrKeyFile, line)
		}
		ids, secrets = append(ids, id), append(secrets, k)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrKeyFile, err)
	}
	return NewKeyring(ids, secrets)
}

// GenerateKeyLine returns a new key file line for kid.
func GenerateKeyLine(kid string) (string, error) {
	if !kidRE.MatchString(kid) {
		return "", fmt.Errorf("%w: key id %q is invalid", ErrKeyFile, kid)
	}
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		return "", err
	}
	return kid + " " + base64.StdEncoding.EncodeToString(k), nil
}

// ActiveKey is the id of the key that seals.
func (r *Keyring) ActiveKey() string { return r.keys[0].id }

// EnvAAD is the additional data that binds a sealed env value to its lease
// and variable; the control plane and the agent both use it.
func EnvAAD(lease, name string) string { return "lease/" + lease + "/env/" + name }

// IsSealed reports whether v looks sealed.
func IsSealed(v string) bool { return strings.HasPrefix(v, Prefix) }

// Seal seals plaintext for the place aad names.
func (r *Keyring) Seal(plaintext, aad string) (string, error) {
	k := r.keys[0]
	nonce := make([]byte, k.aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return "", err
	}
	out := k.aead.Seal(nonce, nonce, []byte(plaintext), []byte(aad))
	return Prefix + k.id + ":" + base64.RawStdEncoding.EncodeToString(out), nil
}

// Open opens a value sealed for the place aad names. It needs the key
// the value was sealed with.
func (r *Keyring) Open(sealed, aad string) (string, error) {
	rest, ok := strings.CutPrefix(sealed, Prefix)
	if !ok {
		return "", fmt.Errorf("%w: not a sealed value", ErrOpen)
	}
	kid, b64, ok := strings.Cut(rest, ":")
	if !ok {
		return "", fmt.Errorf("%w: malformed", ErrOpen)
	}
	raw, err := base64.RawStdEncoding.DecodeString(b64)
	if err != nil {
		return "", fmt.Errorf("%w: malformed", ErrOpen)
	}
	for _, k := range r.keys {
		if k.id != kid {
			continue
		}
		if len(raw) < k.aead.NonceSize()+k.aead.Overhead() {
			return "", fmt.Errorf("%w: too short", ErrOpen)
		}
		pt, err := k.aead.Open(nil, raw[:k.aead.NonceSize()], raw[k.aead.NonceSize():], []byte(aad))
		if err != nil {
			return "", fmt.Errorf("%w: sealed with key %s but changed, or sealed for another place", ErrOpen, kid)
		}
		return string(pt), nil
	}
	return "", fmt.Errorf("%w: key %q is not in the keyring", ErrOpen, truncate(kid, 32))
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

// Digest is a keyed digest (HMAC-SHA-256 under a key derived from the
// active key) of data, for records that must compare requests without
// keeping a plain hash of their secrets (a low-entropy value could be
// guessed from a plain hash). It changes when the active key does.
func (r *Keyring) Digest(data []byte) []byte {
	m := hmac.New(sha256.New, r.digestKey)
	m.Write(data)
	return m.Sum(nil)
}
