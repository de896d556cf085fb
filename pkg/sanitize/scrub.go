package sanitize

import (
	"regexp"
	"strings"
)

// Patterns for secrets inside free text. RE2 runs in linear time, so hostile
// input cannot stall logging.
var (
	// PEM private key blocks of any flavour (PKCS#8, RSA, EC, OPENSSH,
	// ENCRYPTED), up to the END line or, if truncated, to the end of text.
	pemKeyRE = regexp.MustCompile(`-----BEGIN[A-Z0-9 ]*PRIVATE KEY-----(?s:.*?)(?:-----END[A-Z0-9 ]*PRIVATE KEY-----|\z)`)
	// JWTs (JWS compact form): base64url of '{"' for header and payload.
	jwtRE = regexp.MustCompile(`eyJ[A-Za-z0-9_\-+/=]*\.eyJ[A-Za-z0-9_\-+/=]*\.[A-Za-z0-9_\-+/=]*`)
	// Bearer credentials, as in an Authorization header.
	bearerRE = regexp.MustCompile(`(?i)(\bbearer(?:\s+|%20|\+))[A-Za-z0-9._~+/=\-]+`)
	// Authorization headers of any scheme: everything to the end of the line.
	authHeaderRE = regexp.MustCompile(`(?i)(\b(?:proxy-)?authorization"?\s*[:=]\s*)[^\r\n]+`)
	// key=value or key: value where the key names a secret, as in query
	// strings, DSNs, JSON and flag dumps.
	secretKVRE = regexp.MustCompile(`(?i)([a-z0-9_.\-]*(?:password|passwd|passphrase|secret|token|api[_\-]?key|access[_\-]?key|credential)[a-z0-9_.\-]*"?\s*[:=]\s*)(\[REDACTED\]|"[^"]*"|'[^']*'|[^\s&,;"'}\]]+)`)
)

// Scrub returns s with secret-looking text replaced by Redacted: PEM private
// key blocks, JWTs, "Bearer <token>", the value of Authorization headers and
// the value in key=value / key: value pairs whose key names a secret
// (password, secret, token, api_key, ...). Text without any trigger word is
// returned as is, without allocating.
func Scrub(s string) string {
	out, _ := scrub(s)
	return out
}

// scrub is Scrub that also reports whether anything changed.
func scrub(s string) (string, bool) {
	if !mayHoldSecret(s) {
		return s, false
	}
	out := s
	if strings.Contains(out, "PRIVATE KEY") {
		out = pemKeyRE.ReplaceAllLiteralString(out, Redacted)
	}
	if strings.Contains(out, "eyJ") {
		out = jwtRE.ReplaceAllLiteralString(out, Redacted)
	}
	if containsFold(out, "bearer") {
		out = bearerRE.ReplaceAllString(out, "${1}"+Redacted)
	}
	if containsFold(out, "authorization") {
		out = authHeaderRE.ReplaceAllString(out, "${1}"+Redacted)
	}
	if hasKVTrigger(out) {
		out = secretKVRE.ReplaceAllString(out, "${1}"+Redacted)
	}
	return out, out != s
}

// mayHoldSecret is the cheap pre-check that keeps ordinary text off the
// regular expressions.
func mayHoldSecret(s string) bool {
	return strings.Contains(s, "PRIVATE KEY") ||
		strings.Contains(s, "eyJ") ||
		containsFold(s, "bearer") ||
		containsFold(s, "authorization") ||
		hasKVTrigger(s)
}

func hasKVTrigger(s string) bool {
	if strings.IndexByte(s, '=') < 0 && strings.IndexByte(s, ':') < 0 {
		return false
	}
	return containsFold(s, "pass") || containsFold(s, "secret") || containsFold(s, "token") ||
		containsFold(s, "key") || containsFold(s, "credential")
}

// containsFold reports whether s contains the lower-case ASCII needle,
// ignoring ASCII case, without allocating.
func containsFold(s, needle string) bool {
	n := len(needle)
	if n == 0 {
		return true
	}
	first := needle[0]
	for i := 0; i+n <= len(s); i++ {
		if c := s[i] | 0x20; c != first {
			continue
		}
		j := 1
		for ; j < n; j++ {
			if s[i+j]|0x20 != needle[j] {
				break
			}
		}
		if j == n {
			return true
		}
	}
	return false
}
