package sanitize_test

import (
	"strings"
	"testing"

	"github.com/gpuaas/gpuaas/pkg/sanitize"
)

const (
	testJWT    = "eyJhbGciOiJFUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJhbGljZSIsInNjb3BlIjoibGVhc2VzIn0.c2lnbmF0dXJlLXNlY3JldC1ieXRlcw"
	testPEMKey = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgSECRETSECRET\n-----END PRIVATE KEY-----\n"
)

func TestScrub(t *testing.T) {
	tests := []struct {
		name   string
		in     string
		want   string
		hidden string // must not survive
	}{
		{name: "plain text unchanged", in: "lease l-1 started on node n1", want: "lease l-1 started on node n1"},
		{name: "empty", in: "", want: ""},
		{name: "jwt", in: "token " + testJWT + " rejected", want: "token [REDACTED] rejected", hidden: "c2lnbmF0dXJl"},
		{name: "unsigned jwt", in: "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", want: "[REDACTED]", hidden: "eyJzdWIi"},
		{name: "pem private key", in: "key:\n" + testPEMKey + "done", want: "key:\n[REDACTED]\ndone", hidden: "SECRETSECRET"},
		{name: "ec private key", in: "-----BEGIN EC PRIVATE KEY-----\nSECRETSECRET\n-----END EC PRIVATE KEY-----", want: "[REDACTED]", hidden: "SECRETSECRET"},
		{name: "truncated pem key", in: "oops -----BEGIN OPENSSH PRIVATE KEY-----\nSECRETSECRET", want: "oops [REDACTED]", hidden: "SECRETSECRET"},
		{name: "certificate kept", in: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----", want: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"},
		{name: "bearer", in: "sent Bearer abc.def-ghi_jkl", want: "sent Bearer [REDACTED]", hidden: "abc.def"},
		{name: "bearer lower case", in: "bearer   s3cr3tvalue", want: "bearer   [REDACTED]", hidden: "s3cr3t"},
		{name: "authorization header", in: "Authorization: Basic dXNlcjpwYXNz\nHost: x", want: "Authorization: [REDACTED]\nHost: x", hidden: "dXNlcjpwYXNz"},
		{name: "query string", in: "GET /cb?code=1&access_token=hunter2&x=1", want: "GET /cb?code=1&access_token=[REDACTED]&x=1", hidden: "hunter2"},
		{name: "dsn", in: "host=db password=hunter2 sslmode=disable", want: "host=db password=[REDACTED] sslmode=disable", hidden: "hunter2"},
		{name: "json pair", in: `{"client_secret": "hunter2", "id": 1}`, want: `{"client_secret": [REDACTED], "id": 1}`, hidden: "hunter2"},
		{name: "api key flag", in: "--api-key=hunter2", want: "--api-key=[REDACTED]", hidden: "hunter2"},
		{name: "key id kept", in: "kid=k1 key_id=k2", want: "kid=k1 key_id=k2"},
		{name: "idempotent", in: "password=[REDACTED]", want: "password=[REDACTED]"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := sanitize.Scrub(tt.in)
			if got != tt.want {
				t.Errorf("Scrub(%q)\n got %q\nwant %q", tt.in, got, tt.want)
			}
			if tt.hidden != "" && strings.Contains(got, tt.hidden) {
				t.Errorf("Scrub leaked %q", tt.hidden)
			}
		})
	}
}

func TestScrubCleanTextDoesNotAllocate(t *testing.T) {
	s := "lease l-17 on node gpu-node-03 moved to RUNNING after 42ms (key_id k1)"
	if n := testing.AllocsPerRun(100, func() { _ = sanitize.Scrub(s) }); n != 0 {
		t.Errorf("Scrub allocates %v times on clean text", n)
	}
}
