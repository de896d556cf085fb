package authn

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"math"
	"strconv"
	"strings"
	"time"
)

// This file splits a compact JWS and reads the members of its header and
// claims objects without building a map per token: the JSON is validated
// by encoding/json (json.Valid), then one pass records each top-level
// member's key and raw value. Keys match exactly (encoding/json's struct
// decoding matches field names case-insensitively, which would let a
// "Tenant" claim stand in for "tenant"), and a member we interpret may
// appear only once (RFC 7519 section 4 allows refusing duplicates).

// b64url is the JWS base64url alphabet without padding, refusing
// non-zero trailing bits (one token, one encoding).
var b64url = base64.RawURLEncoding.Strict()

// splitJWS cuts a compact JWS into its three segments; signing is the
// header and payload segments with the dot between them (the signing
// input).
func splitJWS(token string) (head, payload, sig, signing string, ok bool) {
	i := strings.IndexByte(token, '.')
	if i <= 0 {
		return "", "", "", "", false
	}
	j := strings.IndexByte(token[i+1:], '.')
	if j < 0 {
		return "", "", "", "", false
	}
	j += i + 1
	if strings.IndexByte(token[j+1:], '.') >= 0 {
		return "", "", "", "", false
	}
	return token[:i], token[i+1 : j], token[j+1:], token[:j], true
}

// decodeSegment decodes a base64url segment into buf when it fits (the
// caller's stack buffer), else into a new slice.
func decodeSegment(buf []byte, seg string) ([]byte, error) {
	n := b64url.DecodedLen(len(seg))
	if n > len(buf) {
		buf = make([]byte, n)
	}
	m, err := b64url.Decode(buf[:n], []byte(seg))
	if err != nil {
		return nil, err
	}
	return buf[:m], nil
}

// member is one top-level member of a JSON object, as offsets into the
// object's bytes (so the bytes, often a stack buffer, are not retained):
// the key literal's contents, and the raw value. escaped holds the key
// unescaped when its literal has escapes or non-ASCII bytes.
type member struct {
	k0, k1, v0, v1 int
	escaped        string
	hasEscapes     bool
}

// is reports whether the member's key is name.
func (m member) is(data []byte, name string) bool {
	if m.hasEscapes {
		return m.escaped == name
	}
	return string(data[m.k0:m.k1]) == name
}

// key returns the member's key (for messages).
func (m member) key(data []byte) string {
	if m.hasEscapes {
		return m.escaped
	}
	return string(data[m.k0:m.k1])
}

// maxMembers bounds the members of a header or claims object.
const maxMembers = 256

var errNotObject = errors.New("not a JSON object")

// objectMembers validates data as one JSON object and appends its
// top-level members to dst.
func objectMembers(data []byte, dst []member) ([]member, error) {
	if !json.Valid(data) {
		return dst, errors.New("invalid JSON")
	}
	// data is valid JSON from here on: the scan below only has to find
	// where each key and value ends.
	i := skipSpace(data, 0)
	if i >= len(data) || data[i] != '{' {
		return dst, errNotObject
	}
	i = skipSpace(data, i+1)
	if data[i] == '}' {
		return dst, nil
	}
	for {
		if len(dst) >= maxMembers {
			return dst, errors.New("too many members")
		}
		end := stringEnd(data, i)
		m := member{k0: i + 1, k1: end - 1}
		if !plainASCII(data[m.k0:m.k1]) {
			s, err := unquote(data[i:end])
			if err != nil {
				return dst, err
			}
			m.escaped, m.hasEscapes = s, true
		}
		i = skipSpace(data, end)
		i = skipSpace(data, i+1) // the colon
		m.v0 = i
		m.v1 = valueEnd(data, i)
		dst = append(dst, m)
		i = skipSpace(data, m.v1)
		if data[i] == '}' {
			return dst, nil
		}
		i = skipSpace(data, i+1) // the comma
	}
}

func skipSpace(data []byte, i int) int {
	for i < len(data) && (data[i] == ' ' || data[i] == '\t' || data[i] == '\n' || data[i] == '\r') {
		i++
	}
	return i
}

// stringEnd returns the index just past the string starting at data[i].
func stringEnd(data []byte, i int) int {
	for i++; i < len(data); i++ {
		switch data[i] {
		case '\\':
			i++
		case '"':
			return i + 1
		}
	}
	return len(data)
}

// valueEnd returns the index just past the value starting at data[i].
func valueEnd(data []byte, i int) int {
	switch data[i] {
	case '"':
		return stringEnd(data, i)
	case '{', '[':
		depth := 0
		for ; i < len(data); i++ {
			switch data[i] {
			case '"':
				i = stringEnd(data, i) - 1
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return i + 1
				}
			}
		}
		return len(data)
	}
	for ; i < len(data); i++ {
		switch data[i] {
		case ',', '}', ']', ' ', '\t', '\n', '\r':
			return i
		}
	}
	return i
}

func plainASCII(b []byte) bool {
	for _, c := range b {
		if c == '\\' || c >= 0x80 {
			return false
		}
	}
	return true
}

// unquote returns the string a JSON string literal denotes.
func unquote(raw []byte) (string, error) {
	if len(raw) < 2 || raw[0] != '"' || raw[len(raw)-1] != '"' {
		return "", errors.New("not a JSON string")
	}
	inner := raw[1 : len(raw)-1]
	if !plainASCII(inner) {
		// Escapes, or non-ASCII whose UTF-8 validity encoding/json
		// decides (invalid bytes become U+FFFD there).
		// (A copy: raw, often a stack buffer, is not handed over.)
		var s string
		if err := json.Unmarshal(bytes.Clone(raw), &s); err != nil {
			return "", err
		}
		return s, nil
	}
	return string(inner), nil
}

// isString reports whether raw is a JSON string.
func isString(raw []byte) bool { return len(raw) > 0 && raw[0] == '"' }

// equalString reports whether raw is a JSON string denoting s, without
// allocating in the common case (no escapes, ASCII).
func equalString(raw []byte, s string) bool {
	if len(raw) >= 2 && raw[0] == '"' && plainASCII(raw[1:len(raw)-1]) {
		return string(raw[1:len(raw)-1]) == s
	}
	u, err := unquote(raw)
	return err == nil && u == s
}

// stringList reads a JSON string or an array of strings (aud, scp).
func stringList(raw []byte) ([]string, error) {
	if isString(raw) {
		s, err := unquote(raw)
		if err != nil {
			return nil, err
		}
		return []string{s}, nil
	}
	if len(raw) == 0 || raw[0] != '[' {
		return nil, errors.New("neither a string nor an array")
	}
	var vals []json.RawMessage
	if err := json.Unmarshal(bytes.Clone(raw), &vals); err != nil {
		return nil, err
	}
	out := make([]string, 0, len(vals))
	for _, v := range vals {
		if !isString(v) {
			return nil, errors.New("array holds a non-string")
		}
		s, err := unquote(v)
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}

// maxNumericDate bounds exp, nbf and iat (year 5138): far beyond any real
// token, and small enough that seconds convert to a time.Time exactly.
const maxNumericDate = 1e11

// numericDate reads an RFC 7519 NumericDate: a JSON number of seconds,
// truncated to the second. Zero, and a nil raw (no such claim), count as
// absent, as for golang-jwt.
func numericDate(raw []byte) (t time.Time, present bool, err error) {
	if raw == nil {
		return time.Time{}, false, nil
	}
	if len(raw) == 0 || (raw[0] != '-' && (raw[0] < '0' || raw[0] > '9')) {
		return time.Time{}, false, errors.New("not a number")
	}
	f, err := strconv.ParseFloat(string(raw), 64)
	if err != nil || math.IsNaN(f) || math.Abs(f) > maxNumericDate {
		return time.Time{}, false, errors.New("number out of range")
	}
	if f == 0 {
		return time.Time{}, false, nil
	}
	return time.Unix(int64(math.Floor(f)), 0), true, nil
}
