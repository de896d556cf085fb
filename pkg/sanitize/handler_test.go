package sanitize_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/pkg/sanitize"
)

// dropTime makes output deterministic.
func dropTime(groups []string, a slog.Attr) slog.Attr {
	if len(groups) == 0 && a.Key == slog.TimeKey {
		return slog.Attr{}
	}
	return a
}

func jsonLogger(buf *bytes.Buffer) *slog.Logger {
	return slog.New(sanitize.NewHandler(slog.NewJSONHandler(buf, &slog.HandlerOptions{ReplaceAttr: dropTime})))
}

func decode(t *testing.T, b []byte) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("decode %s: %v", b, err)
	}
	return m
}

// at walks a dotted path through decoded JSON groups.
func at(m map[string]any, path string) any {
	var cur any = m
	for _, p := range strings.Split(path, ".") {
		g, ok := cur.(map[string]any)
		if !ok {
			return nil
		}
		cur = g[p]
	}
	return cur
}

type secretUser struct{ name, password string }

func (u secretUser) LogValue() slog.Value {
	return slog.GroupValue(slog.String("name", u.name), slog.String("password", u.password))
}

type tokenValuer string

func (v tokenValuer) LogValue() slog.Value { return slog.StringValue("Bearer " + string(v)) }

func TestHandlerRedacts(t *testing.T) {
	const s = "hunter2-s3cr3t"
	tests := []struct {
		name string
		log  func(l *slog.Logger)
		// want maps dotted paths to expected values (JSON-decoded).
		want map[string]any
	}{
		{
			name: "sensitive key string",
			log:  func(l *slog.Logger) { l.Info("m", "password", s) },
			want: map[string]any{"password": "[REDACTED]"},
		},
		{
			name: "sensitive key of any kind",
			log:  func(l *slog.Logger) { l.Info("m", "api_key", 12345, "token", []byte(s), "cookie", true) },
			want: map[string]any{"api_key": "[REDACTED]", "token": "[REDACTED]", "cookie": "[REDACTED]"},
		},
		{
			name: "nested groups",
			log: func(l *slog.Logger) {
				l.Info("m", slog.Group("req", slog.String("path", "/v1/leases"),
					slog.Group("headers", slog.String("Authorization", "Bearer "+s), slog.String("Accept", "json"))))
			},
			want: map[string]any{"req.path": "/v1/leases", "req.headers.Authorization": "[REDACTED]", "req.headers.Accept": "json"},
		},
		{
			name: "sensitive group name hides every leaf",
			log: func(l *slog.Logger) {
				l.Info("m", slog.Group("credentials", slog.String("user", "bob"), slog.Int("n", 7), slog.Group("inner", slog.String("x", s))))
			},
			want: map[string]any{"credentials.user": "[REDACTED]", "credentials.n": "[REDACTED]", "credentials.inner.x": "[REDACTED]"},
		},
		{
			name: "WithAttrs",
			log:  func(l *slog.Logger) { l.With("token", s, "node", "n1").Info("m") },
			want: map[string]any{"token": "[REDACTED]", "node": "n1"},
		},
		{
			name: "WithAttrs nested group",
			log:  func(l *slog.Logger) { l.With(slog.Group("tenant", "secret", s, "id", "t1")).Info("m") },
			want: map[string]any{"tenant.secret": "[REDACTED]", "tenant.id": "t1"},
		},
		{
			name: "WithGroup sensitive",
			log:  func(l *slog.Logger) { l.WithGroup("secrets").Info("m", "db", s, "count", 2) },
			want: map[string]any{"secrets.db": "[REDACTED]", "secrets.count": "[REDACTED]"},
		},
		{
			name: "WithGroup sensitive then WithAttrs",
			log:  func(l *slog.Logger) { l.WithGroup("env").With("HOME", s).Info("m") },
			want: map[string]any{"env.HOME": "[REDACTED]"},
		},
		{
			name: "WithGroup ordinary keeps checking keys",
			log:  func(l *slog.Logger) { l.WithGroup("lease").Info("m", "id", "l-1", "private_key", s) },
			want: map[string]any{"lease.id": "l-1", "lease.private_key": "[REDACTED]"},
		},
		{
			name: "env slice keeps names",
			log: func(l *slog.Logger) {
				l.Info("m", "env", []string{"PATH=/usr/bin", "AWS_SECRET_ACCESS_KEY=" + s, "NOEQUALS" + s, "EMPTY="})
			},
			want: map[string]any{"env": []any{"PATH=[REDACTED]", "AWS_SECRET_ACCESS_KEY=[REDACTED]", "[REDACTED]", "EMPTY=[REDACTED]"}},
		},
		{
			name: "env map keeps names",
			log:  func(l *slog.Logger) { l.Info("m", "tenant_env", map[string]string{"DB_URL": s}) },
			want: map[string]any{"tenant_env": map[string]any{"DB_URL": "[REDACTED]"}},
		},
		{
			name: "env string hidden",
			log:  func(l *slog.Logger) { l.Info("m", "env", "A="+s) },
			want: map[string]any{"env": "[REDACTED]"},
		},
		{
			name: "jwt in message",
			log:  func(l *slog.Logger) { l.Info("rejected " + testJWT) },
			want: map[string]any{"msg": "rejected [REDACTED]"},
		},
		{
			name: "jwt in ordinary value",
			log:  func(l *slog.Logger) { l.Info("m", "header", "x "+testJWT) },
			want: map[string]any{"header": "x [REDACTED]"},
		},
		{
			name: "pem key in ordinary value",
			log:  func(l *slog.Logger) { l.Info("m", "body", "data\n"+testPEMKey) },
			want: map[string]any{"body": "data\n[REDACTED]\n"},
		},
		{
			name: "bearer in message",
			log:  func(l *slog.Logger) { l.Info("upstream said Bearer " + s) },
			want: map[string]any{"msg": "upstream said Bearer [REDACTED]"},
		},
		{
			name: "error value",
			log:  func(l *slog.Logger) { l.Info("m", "err", fmt.Errorf("dial upstream: %w", errors.New("password="+s))) },
			want: map[string]any{"err": "dial upstream: password=[REDACTED]"},
		},
		{
			name: "string slice value",
			log:  func(l *slog.Logger) { l.Info("m", "args", []string{"--node=n1", "--token=" + s}) },
			want: map[string]any{"args": []any{"--node=n1", "--token=[REDACTED]"}},
		},
		{
			name: "string map value",
			log:  func(l *slog.Logger) { l.Info("m", "labels", map[string]string{"team": "ml", "api_key": s}) },
			want: map[string]any{"labels": map[string]any{"team": "ml", "api_key": "[REDACTED]"}},
		},
		{
			name: "LogValuer resolving to a group",
			log:  func(l *slog.Logger) { l.Info("m", "user", secretUser{name: "bob", password: s}) },
			want: map[string]any{"user.name": "bob", "user.password": "[REDACTED]"},
		},
		{
			name: "LogValuer resolving to a secret string",
			log:  func(l *slog.Logger) { l.Info("m", "hdr", tokenValuer(s)) },
			want: map[string]any{"hdr": "Bearer [REDACTED]"},
		},
		{
			name: "LogValuer under a sensitive key",
			log:  func(l *slog.Logger) { l.Info("m", "secret", secretUser{name: "bob", password: s}) },
			want: map[string]any{"secret.name": "[REDACTED]", "secret.password": "[REDACTED]"},
		},
		{
			name: "inline group",
			log:  func(l *slog.Logger) { l.Info("m", slog.Group("", slog.String("passwd", s), slog.String("node", "n1"))) },
			want: map[string]any{"passwd": "[REDACTED]", "node": "n1"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var buf bytes.Buffer
			tt.log(jsonLogger(&buf))
			out := buf.Bytes()
			if bytes.Contains(out, []byte(s)) || bytes.Contains(out, []byte("c2lnbmF0dXJl")) || bytes.Contains(out, []byte("SECRETSECRET")) {
				t.Fatalf("secret leaked: %s", out)
			}
			m := decode(t, out)
			for path, want := range tt.want {
				if got := at(m, path); !reflect.DeepEqual(got, want) {
					t.Errorf("%s = %#v, want %#v\n%s", path, got, want, out)
				}
			}
		})
	}
}

// TestHandlerPassesOrdinaryRecordsUnchanged compares the sanitized output
// with the raw handler's, byte for byte, for records without secrets.
func TestHandlerPassesOrdinaryRecordsUnchanged(t *testing.T) {
	when := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	logs := []func(l *slog.Logger){
		func(l *slog.Logger) { l.Info("lease started", "lease_id", "l-1", "node", "n1", "gpu", 3) },
		func(l *slog.Logger) {
			l.Warn("slow", "took", 1500*time.Millisecond, "ok", false, "at", when, "ratio", 0.5)
		},
		func(l *slog.Logger) {
			l.With("component", "fleet").WithGroup("req").Info("m", slog.Group("peer", "spiffe_id", "spiffe://td/gpuaas/agent/n1"), "key_id", "k1", "kid", "k2")
		},
		func(l *slog.Logger) {
			l.Error("failed", "err", errors.New("connection refused"), "args", []string{"-v"})
		},
		func(l *slog.Logger) { l.Info("m", "labels", map[string]string{"team": "ml"}, "public_key", "MFkwEwYH") },
	}
	for i, logf := range logs {
		for _, asJSON := range []bool{true, false} {
			var raw, clean bytes.Buffer
			opts := &slog.HandlerOptions{ReplaceAttr: dropTime}
			var rh, ch slog.Handler
			if asJSON {
				rh, ch = slog.NewJSONHandler(&raw, opts), slog.NewJSONHandler(&clean, opts)
			} else {
				rh, ch = slog.NewTextHandler(&raw, opts), slog.NewTextHandler(&clean, opts)
			}
			logf(slog.New(rh))
			logf(slog.New(sanitize.NewHandler(ch)))
			if raw.String() != clean.String() {
				t.Errorf("record %d (json %v) changed:\n raw  %s\n clean %s", i, asJSON, raw.String(), clean.String())
			}
		}
	}
}

func TestHandlerDoesNotMutateCallerData(t *testing.T) {
	env := []string{"A=1", "B=2"}
	args := []string{"--token=x"}
	attrs := []slog.Attr{slog.String("password", "p"), slog.Any("env", env)}
	var buf bytes.Buffer
	l := jsonLogger(&buf)
	l.LogAttrs(context.Background(), slog.LevelInfo, "m", attrs...)
	l.With("args", args).Info("m")
	if attrs[0].Value.String() != "p" || env[0] != "A=1" || args[0] != "--token=x" {
		t.Errorf("caller data mutated: %v %v %v", attrs, env, args)
	}
}

func TestNewHandlerWrapsOnce(t *testing.T) {
	inner := slog.NewTextHandler(&bytes.Buffer{}, nil)
	h := sanitize.NewHandler(inner)
	if sanitize.NewHandler(h) != h {
		t.Error("wrapping a sanitized handler again should return it")
	}
}

func TestLogger(t *testing.T) {
	for _, asJSON := range []bool{true, false} {
		var buf bytes.Buffer
		l := sanitize.Logger(&buf, slog.LevelInfo, asJSON)
		l.Debug("hidden by level", "x", 1)
		l.Info("visible", "token", "hunter2", "node", "n1")
		out := buf.String()
		if strings.Contains(out, "hidden by level") || strings.Contains(out, "hunter2") {
			t.Errorf("json %v: %s", asJSON, out)
		}
		if !strings.Contains(out, "visible") || !strings.Contains(out, "n1") || !strings.Contains(out, "[REDACTED]") {
			t.Errorf("json %v: missing fields: %s", asJSON, out)
		}
		if asJSON && !json.Valid(bytes.TrimSpace(buf.Bytes())) {
			t.Errorf("not json: %s", out)
		}
	}
}

type nopHandler struct{}

func (nopHandler) Enabled(context.Context, slog.Level) bool  { return true }
func (nopHandler) Handle(context.Context, slog.Record) error { return nil }
func (h nopHandler) WithAttrs([]slog.Attr) slog.Handler      { return h }
func (h nopHandler) WithGroup(string) slog.Handler           { return h }

func TestHandlerCleanRecordDoesNotAllocate(t *testing.T) {
	h := sanitize.NewHandler(nopHandler{})
	r := slog.NewRecord(time.Now(), slog.LevelInfo, "lease l-1 running", 0)
	r.AddAttrs(slog.String("node", "n1"), slog.Int("gpu", 2), slog.String("key_id", "k1"),
		slog.Group("peer", slog.String("spiffe_id", "spiffe://td/gpuaas/agent/n1")))
	ctx := context.Background()
	if n := testing.AllocsPerRun(100, func() { _ = h.Handle(ctx, r) }); n != 0 {
		t.Errorf("Handle allocates %v times for a clean record", n)
	}
}
