package security

import (
	"bytes"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/pkg/authn/authntest"
	"github.com/gpuaas/gpuaas/pkg/sanitize"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// lockedBuffer is an io.Writer the servers' goroutines share.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestSecretsNeverReachTheLogs pushes every kind of secret the edge sees
// through the control plane's log paths, at debug level, through the
// sanitizing handler the daemons use: valid and forged bearer tokens
// (refused ones are logged as refusals), a tenant's secret environment
// value (created, read back, listed, cancelled), a malformed authorization
// header. None of them may appear in the output.
func TestSecretsNeverReachTheLogs(t *testing.T) {
	var out lockedBuffer
	r := newRig(t, rigOptions{log: sanitize.Logger(&out, slog.LevelDebug, true)})
	lc := leasev1.NewLeaseServiceClient(r.dialNoCert(t))
	const envSecret = "s3cr3t-env-value-0x5eed"
	good := r.token("carol", "acme", "lease:read", "lease:write")
	forgedNone := authntest.Raw(map[string]any{"alg": "none", "kid": "rsa-1", "typ": "JWT"}, r.claims("mallory", map[string]any{"tenant": "acme"}), nil)
	forgedHS := authntest.HS256(map[string]any{"kid": "rsa-1", "typ": "JWT"}, r.claims("mallory", map[string]any{"tenant": "acme"}), r.key.PublicPEM())
	expired := r.key.Sign(r.claims("mallory", map[string]any{"tenant": "acme", "exp": time.Now().Add(-time.Hour).Unix()}))

	req := createReq("logs-1", "acme")
	req.Spec.Workload.Env = map[string]string{"API_TOKEN": envSecret}
	created, err := lc.CreateLease(bearer(ctxT(t), good), req)
	if err != nil {
		t.Fatal(err)
	}
	id := created.GetLease().GetId()
	if _, err := lc.GetLease(bearer(ctxT(t), good), &leasev1.GetLeaseRequest{Id: id}); err != nil {
		t.Fatal(err)
	}
	if _, err := lc.ListLeases(bearer(ctxT(t), good), &leasev1.ListLeasesRequest{}); err != nil {
		t.Fatal(err)
	}
	for _, tok := range []string{forgedNone, forgedHS, expired, "not-a-jwt." + envSecret} {
		if _, err := lc.GetLease(bearer(ctxT(t), tok), &leasev1.GetLeaseRequest{Id: id}); err == nil {
			t.Fatal("a forged token was accepted")
		}
	}
	if _, err := lc.CancelLease(bearer(ctxT(t), good), &leasev1.CancelLeaseRequest{Id: id}); err != nil {
		t.Fatal(err)
	}
	if err := r.denials.Flush(ctxT(t)); err != nil {
		t.Fatal(err)
	}

	logs := out.String()
	if !strings.Contains(logs, "refused") && !strings.Contains(logs, "denied") {
		t.Fatalf("no refusal was logged at all; the test proves nothing:\n%s", logs)
	}
	secrets := map[string]string{"tenant env value": envSecret, "valid token": good, "alg:none token": forgedNone, "HS256 token": forgedHS, "expired token": expired}
	for what, s := range secrets {
		if strings.Contains(logs, s) {
			t.Errorf("%s reached the logs", what)
		}
		// Nor any of the token's parts (a JWT's signature, a header).
		for _, part := range strings.Split(s, ".") {
			if len(part) >= 24 && strings.Contains(logs, part) {
				t.Errorf("part of the %s reached the logs", what)
			}
		}
	}
	if strings.Contains(logs, "-----BEGIN") {
		t.Error("a PEM block reached the logs")
	}
}
