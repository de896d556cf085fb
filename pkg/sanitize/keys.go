package sanitize

import (
	"bytes"
	"maps"
	"strings"
	"sync"
	"sync/atomic"
)

// Redacted replaces every value this package hides.
const Redacted = "[REDACTED]"

// keyNeedles are matched against the key lower-cased with everything but
// letters and digits removed, so "API-Token", "x_auth_token" and
// "clientSecret" all match.
var keyNeedles = [][]byte{
	[]byte("token"),
	[]byte("secret"),
	[]byte("password"),
	[]byte("passwd"),
	[]byte("passphrase"),
	[]byte("authorization"),
	[]byte("cookie"),
	[]byte("credential"),
	[]byte("creds"),
	[]byte("private"),
	[]byte("bearer"),
	[]byte("jwt"),
}

// IsSensitiveKey reports whether values under key are hidden. The rule:
//
//  1. Normalize the key: lower-case it and drop every character that is not
//     a letter or a digit. If the result contains token, secret, password,
//     passwd, passphrase, authorization, cookie, credential, creds, private,
//     bearer or jwt, the key is sensitive ("db_password", "X-Auth-Token",
//     "privateKey", "set-cookie").
//  2. Otherwise split the key into words at non-alphanumeric characters,
//     lower-to-upper case changes and letter/digit changes ("apiKeyID" is
//     api, Key, ID). The key is sensitive if a word is "key" or "keys" or
//     ends in "key" ("api_key", "sshKey", "accesskey") unless the next word
//     is "id" or "ids" ("key_id", "keyId", "signing-key-id") or the previous
//     word is "public" ("public_key"). "kid" and "keyid" are single words
//     that do not end in "key", so they are not sensitive.
//  3. It is also sensitive if a word is an environment word (env, envs,
//     environ, environment, environments, envvar, envvars), see IsEnvKey.
//
// The rule over-matches on purpose ("monkey", "token_count"): hiding a
// harmless value is cheap, leaking a secret is not. It does not allocate for
// keys up to 64 bytes once it has seen them.
func IsSensitiveKey(key string) bool {
	if m := keyMemo.Load(); m != nil {
		if v, ok := (*m)[key]; ok {
			return v
		}
	}
	v := isSensitiveKey(key)
	rememberKey(key, v)
	return v
}

// keyMemo holds IsSensitiveKey's answers (copied on write, read without a
// lock): the keys a daemon logs are a small set of constants, checked on
// every record. It is bounded, so keys built from input cannot grow it;
// past the bound, keys are decided each time.
var (
	keyMemo   atomic.Pointer[map[string]bool]
	keyMemoMu sync.Mutex
)

const maxMemoKeys = 512

func rememberKey(key string, v bool) {
	if len(key) > 64 {
		return
	}
	keyMemoMu.Lock()
	defer keyMemoMu.Unlock()
	var old map[string]bool
	if m := keyMemo.Load(); m != nil {
		old = *m
	}
	if len(old) >= maxMemoKeys {
		return
	}
	if _, ok := old[key]; ok {
		return
	}
	m := make(map[string]bool, len(old)+1)
	maps.Copy(m, old)
	m[strings.Clone(key)] = v
	keyMemo.Store(&m)
}

func isSensitiveKey(key string) bool {
	if key == "" {
		return false
	}
	var buf [64]byte
	norm := normalizeKey(buf[:0], key)
	for _, n := range keyNeedles {
		if bytes.Contains(norm, n) {
			return true
		}
	}
	sensitive := false
	var prev string
	forEachWord(key, func(w, next string) bool {
		switch {
		case isEnvWord(w):
			sensitive = true
		case isKeyWord(w) && !strings.EqualFold(prev, "public") && !isIDWord(next):
			sensitive = true
		}
		prev = w
		return !sensitive
	})
	return sensitive
}

// IsEnvKey reports whether key names environment variables (a word of it is
// env, envs, environ, environment, environments, envvar or envvars). Values
// under such keys keep variable names but lose values: []string{"A=1"}
// logs as [A=[REDACTED]].
func IsEnvKey(key string) bool {
	env := false
	forEachWord(key, func(w, _ string) bool {
		env = isEnvWord(w)
		return !env
	})
	return env
}

func normalizeKey(dst []byte, key string) []byte {
	for i := 0; i < len(key); i++ {
		c := key[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
			dst = append(dst, c)
		case c >= 'A' && c <= 'Z':
			dst = append(dst, c+('a'-'A'))
		}
	}
	return dst
}

func isEnvWord(w string) bool {
	switch len(w) {
	case 3, 4, 6, 7, 11, 12:
	default:
		return false
	}
	for _, e := range [...]string{"env", "envs", "environ", "environment", "environments", "envvar", "envvars"} {
		if strings.EqualFold(w, e) {
			return true
		}
	}
	return false
}

func isKeyWord(w string) bool {
	n := len(w)
	return n >= 3 && strings.EqualFold(w[n-3:], "key") ||
		n >= 4 && strings.EqualFold(w[n-4:], "keys")
}

func isIDWord(w string) bool {
	return strings.EqualFold(w, "id") || strings.EqualFold(w, "ids")
}

// forEachWord calls fn with each word of key and the word after it ("" at
// the end) until fn returns false. Words are maximal runs of letters or of
// digits, further split before an upper-case letter that follows a
// lower-case one or that starts a capitalized word after an acronym
// ("APIKey" is API, Key).
func forEachWord(key string, fn func(w, next string) bool) {
	start, end := nextWord(key, 0)
	for start < len(key) {
		ns, ne := nextWord(key, end)
		next := ""
		if ns < len(key) {
			next = key[ns:ne]
		}
		if !fn(key[start:end], next) {
			return
		}
		start, end = ns, ne
	}
}

type class uint8

const (
	other class = iota
	lower
	upper
	digit
)

func classOf(c byte) class {
	switch {
	case c >= 'a' && c <= 'z':
		return lower
	case c >= 'A' && c <= 'Z':
		return upper
	case c >= '0' && c <= '9':
		return digit
	}
	return other
}

// nextWord returns the bounds of the first word at or after i, or
// (len(s), len(s)) if there is none.
func nextWord(s string, i int) (int, int) {
	for i < len(s) && classOf(s[i]) == other {
		i++
	}
	if i == len(s) {
		return i, i
	}
	start := i
	i++
	for ; i < len(s); i++ {
		p, c := classOf(s[i-1]), classOf(s[i])
		switch {
		case c == other:
			return start, i
		case (p == digit) != (c == digit):
			return start, i
		case p == lower && c == upper:
			return start, i
		case p == upper && c == upper && i+1 < len(s) && classOf(s[i+1]) == lower:
			return start, i
		}
	}
	return start, i
}
