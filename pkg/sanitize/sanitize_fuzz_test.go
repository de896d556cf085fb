package sanitize_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/pkg/sanitize"
)

// plant is a secret that must never reach the output, however the fuzzed
// parts around it look. It is made of characters no handler escapes.
var time0 = time.Time{}

const plant = "Zq7PLANTEDx9Kw2"

// FuzzHandler logs fuzzed messages, keys and values through both slog
// handlers, with the planted secret under sensitive keys, inside a JWT,
// a PEM key, a bearer token, an env slice and a sensitive group. No input may
// panic, and the planted secret never appears in the output.
func FuzzHandler(f *testing.F) {
	f.Add("lease started", "node", "n1", "grp")
	f.Add("Bearer", "password", "eyJ", "env")
	f.Add("-----BEGIN PRIVATE KEY-----", "key_id", "=", "")
	f.Add("token=", "kid", "\"", "secret")
	f.Add("\x00\xff", "", "Authorization:", "a.b")
	f.Fuzz(func(t *testing.T, msg, key, val, group string) {
		if strings.Contains(msg+key+val+group, plant) {
			t.Skip()
		}
		jwt := "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0." + plant
		pemKey := "-----BEGIN PRIVATE KEY-----\n" + plant + "\n-----END PRIVATE KEY-----"
		for _, asJSON := range []bool{true, false} {
			var buf bytes.Buffer
			var inner slog.Handler
			if asJSON {
				inner = slog.NewJSONHandler(&buf, nil)
			} else {
				inner = slog.NewTextHandler(&buf, nil)
			}
			l := slog.New(sanitize.NewHandler(inner))
			l = l.With(key, val, "api_key", plant)
			if group != "" {
				l = l.WithGroup(group)
			}
			l.Info(msg+" "+jwt,
				key, val,
				"password", plant,
				"note", val+" Bearer "+plant,
				"body", pemKey,
				"err", errors.New(val+" token="+plant),
				"env", []string{key + "=" + plant, val},
				slog.Group("auth", slog.String(key, val), slog.Group("secret", slog.String("x", plant))),
				slog.Group(key, slog.String("private", plant), slog.String(val, val)),
			)
			l.WithGroup("credentials").Info(msg, key, plant)
			_ = sanitize.NewHandler(inner).WithAttrs([]slog.Attr{slog.String("cookie", plant)}).Handle(context.Background(), slog.NewRecord(
				time0, slog.LevelInfo, msg, 0))
			if bytes.Contains(buf.Bytes(), []byte(plant)) {
				t.Fatalf("planted secret leaked (json %v): %s", asJSON, buf.Bytes())
			}
		}
		_ = sanitize.Scrub(msg)
		_ = sanitize.IsSensitiveKey(key)
		_ = sanitize.ValidateMetadata(map[string]string{key: val})
		_, _ = sanitize.AllowMetadata(map[string]string{key: val}, []string{group, msg + "*"})
	})
}
