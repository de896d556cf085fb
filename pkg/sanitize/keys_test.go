package sanitize_test

import (
	"testing"

	"github.com/gpuaas/gpuaas/pkg/sanitize"
)

func TestIsSensitiveKey(t *testing.T) {
	tests := []struct {
		key  string
		want bool
	}{
		// Substring classes, any case and separator.
		{"token", true},
		{"access_token", true},
		{"X-Auth-Token", true},
		{"refreshToken", true},
		{"secret", true},
		{"clientSecret", true},
		{"password", true},
		{"db_password", true},
		{"PASSWD", true},
		{"passphrase", true},
		{"authorization", true},
		{"Proxy-Authorization", true},
		{"cookie", true},
		{"set-cookie", true},
		{"credential", true},
		{"credentials", true},
		{"aws_creds", true},
		{"private", true},
		{"private_key", true},
		{"privateKey", true},
		{"bearer", true},
		{"jwt", true},
		{"id_jwt", true},
		// The key word rule.
		{"key", true},
		{"KEY", true},
		{"keys", true},
		{"api_key", true},
		{"apiKey", true},
		{"APIKey", true},
		{"x-api-key", true},
		{"sshKey", true},
		{"accesskey", true},
		{"key2", true},
		{"monkey", true}, // over-match by design
		// Not keys: ids of keys, public keys.
		{"key_id", false},
		{"keyId", false},
		{"keyID", false},
		{"KeyID", false},
		{"key-id", false},
		{"key.ids", false},
		{"keyid", false},
		{"kid", false},
		{"signing_key_id", false},
		{"public_key", false},
		{"publicKey", false},
		{"keyboard", false},
		// Environments.
		{"env", true},
		{"ENV", true},
		{"tenant_env", true},
		{"containerEnv", true},
		{"environment", true},
		{"envVars", true},
		{"envoy", false},
		{"development", false},
		// Ordinary fields.
		{"", false},
		{"node", false},
		{"lease_id", false},
		{"gpu_uuid", false},
		{"msg", false},
		{"duration_ms", false},
		{"spiffe_id", false},
		{"serial", false},
		{"author", false},
	}
	for _, tt := range tests {
		if got := sanitize.IsSensitiveKey(tt.key); got != tt.want {
			t.Errorf("IsSensitiveKey(%q) = %v, want %v", tt.key, got, tt.want)
		}
	}
}

func TestIsEnvKey(t *testing.T) {
	for key, want := range map[string]bool{
		"env": true, "Env": true, "tenant_env": true, "envs": true, "ENVIRONMENT": true,
		"envoy": false, "token": false, "seven": false, "": false,
	} {
		if got := sanitize.IsEnvKey(key); got != want {
			t.Errorf("IsEnvKey(%q) = %v, want %v", key, got, want)
		}
	}
}

func TestIsSensitiveKeyDoesNotAllocate(t *testing.T) {
	keys := []string{"lease_id", "api_key", "signing_key_id", "tenant_env", "X-Auth-Token"}
	if n := testing.AllocsPerRun(100, func() {
		for _, k := range keys {
			sanitize.IsSensitiveKey(k)
		}
	}); n != 0 {
		t.Errorf("IsSensitiveKey allocates %v times", n)
	}
}
