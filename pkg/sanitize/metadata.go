package sanitize

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Limits on lease metadata.
const (
	MaxMetadataEntries  = 32
	MaxMetadataKeyLen   = 63
	MaxMetadataValueLen = 256
)

// ErrInvalidMetadata is the class of lease metadata validation errors; every
// one is a *MetadataError.
var ErrInvalidMetadata = errors.New("invalid lease metadata")

// MetadataError says which key of lease metadata is invalid and why. It
// never includes the value, which is tenant data.
type MetadataError struct {
	// Key is the offending key, cut to MaxMetadataKeyLen bytes; empty when
	// the key is empty or the map as a whole is at fault (too many entries).
	Key    string
	Reason string
}

// Error names the key and the reason, never the value.
func (e *MetadataError) Error() string {
	if e.Key == "" {
		return fmt.Sprintf("%s: %s", ErrInvalidMetadata, e.Reason)
	}
	return fmt.Sprintf("%s: key %q: %s", ErrInvalidMetadata, e.Key, e.Reason)
}

// Unwrap makes errors.Is(err, ErrInvalidMetadata) hold.
func (e *MetadataError) Unwrap() error { return ErrInvalidMetadata }

// ValidateMetadata checks lease metadata: at most MaxMetadataEntries
// entries; keys of 1 to MaxMetadataKeyLen bytes from [a-z0-9._/-]; values of
// at most MaxMetadataValueLen bytes of valid UTF-8 without control
// characters (C0, DEL, C1), line or paragraph separators, or bidirectional
// overrides, any of which could forge log lines or mislead a reader. Keys
// are checked in sorted order, so the error is deterministic; it is a
// *MetadataError naming the key.
func ValidateMetadata(md map[string]string) error {
	if len(md) > MaxMetadataEntries {
		return &MetadataError{Reason: fmt.Sprintf("has %d entries, limit %d", len(md), MaxMetadataEntries)}
	}
	keys := make([]string, 0, len(md))
	for k := range md {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		if reason := checkKey(k); reason != "" {
			return &MetadataError{Key: cut(k, MaxMetadataKeyLen), Reason: reason}
		}
		if reason := checkValue(md[k]); reason != "" {
			return &MetadataError{Key: k, Reason: reason}
		}
	}
	return nil
}

func checkKey(k string) string {
	switch {
	case k == "":
		return "empty key"
	case len(k) > MaxMetadataKeyLen:
		return fmt.Sprintf("key is %d bytes, limit %d", len(k), MaxMetadataKeyLen)
	}
	for i := 0; i < len(k); i++ {
		c := k[i]
		if c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '/' || c == '-' {
			continue
		}
		return fmt.Sprintf("key has byte %#02x at %d, allowed are [a-z0-9._/-]", c, i)
	}
	return ""
}

func checkValue(v string) string {
	if len(v) > MaxMetadataValueLen {
		return fmt.Sprintf("value is %d bytes, limit %d", len(v), MaxMetadataValueLen)
	}
	if !utf8.ValidString(v) {
		return "value is not valid utf-8"
	}
	for i, r := range v {
		if unicode.IsControl(r) || isForbiddenFormat(r) {
			return fmt.Sprintf("value has control character %U at byte %d", r, i)
		}
	}
	return ""
}

// isForbiddenFormat reports line/paragraph separators and bidirectional
// embedding, override and isolate characters.
func isForbiddenFormat(r rune) bool {
	return r == '\u2028' || r == '\u2029' ||
		r >= '\u202a' && r <= '\u202e' ||
		r >= '\u2066' && r <= '\u2069'
}

func cut(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// AllowMetadata keeps the entries of md whose key is allowed and reports
// the keys it dropped, sorted. An allowed entry is an exact key, or a prefix
// ending in "*" ("example.com/*" allows "example.com/team"; a lone "*"
// allows every key). kept is never
// nil and never shares storage with md. It does not validate what it keeps:
// call ValidateMetadata on kept.
func AllowMetadata(md map[string]string, allowed []string) (kept map[string]string, dropped []string) {
	kept = make(map[string]string, len(md))
	for k, v := range md {
		if metadataAllowed(k, allowed) {
			kept[k] = v
		} else {
			dropped = append(dropped, k)
		}
	}
	slices.Sort(dropped)
	return kept, dropped
}

func metadataAllowed(k string, allowed []string) bool {
	for _, a := range allowed {
		if prefix, ok := strings.CutSuffix(a, "*"); ok {
			if strings.HasPrefix(k, prefix) {
				return true
			}
		} else if k == a {
			return true
		}
	}
	return false
}
