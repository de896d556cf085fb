package sanitize_test

import (
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"

	"github.com/gpuaas/gpuaas/pkg/sanitize"
)

func TestValidateMetadata(t *testing.T) {
	many := map[string]string{}
	for i := range sanitize.MaxMetadataEntries + 1 {
		many[fmt.Sprintf("k%02d", i)] = "v"
	}
	full := map[string]string{}
	for i := range sanitize.MaxMetadataEntries {
		full[fmt.Sprintf("k%02d", i)] = "v"
	}
	tests := []struct {
		name    string
		md      map[string]string
		wantKey string // "" with wantErr for map-level errors
		wantErr bool
		reason  string
	}{
		{name: "nil", md: nil},
		{name: "empty", md: map[string]string{}},
		{name: "ordinary", md: map[string]string{"team": "ml-research", "example.com/cost-center": "42", "ticket_id": "OPS-1", "note": "ünïcode ok"}},
		{name: "limits exactly", md: map[string]string{strings.Repeat("k", 63): strings.Repeat("v", 256)}},
		{name: "32 entries", md: full},
		{name: "33 entries", md: many, wantErr: true, reason: "33 entries"},
		{name: "empty key", md: map[string]string{"": "v"}, wantErr: true, reason: "empty key"},
		{name: "long key", md: map[string]string{strings.Repeat("k", 64): "v"}, wantKey: strings.Repeat("k", 63) + "...", wantErr: true, reason: "64 bytes"},
		{name: "upper case key", md: map[string]string{"Team": "v"}, wantKey: "Team", wantErr: true, reason: "0x54"},
		{name: "space in key", md: map[string]string{"a b": "v"}, wantKey: "a b", wantErr: true, reason: "0x20"},
		{name: "control char in key", md: map[string]string{"a\nb": "v"}, wantKey: "a\nb", wantErr: true},
		{name: "long value", md: map[string]string{"note": strings.Repeat("v", 257)}, wantKey: "note", wantErr: true, reason: "257 bytes"},
		{name: "newline in value", md: map[string]string{"note": "a\nlevel=ERROR msg=forged"}, wantKey: "note", wantErr: true, reason: "U+000A"},
		{name: "nul in value", md: map[string]string{"note": "a\x00"}, wantKey: "note", wantErr: true},
		{name: "del in value", md: map[string]string{"note": "a\x7f"}, wantKey: "note", wantErr: true},
		{name: "c1 in value", md: map[string]string{"note": "a\u0085"}, wantKey: "note", wantErr: true},
		{name: "bidi override in value", md: map[string]string{"note": "a\u202eb"}, wantKey: "note", wantErr: true},
		{name: "line separator in value", md: map[string]string{"note": "a\u2028b"}, wantKey: "note", wantErr: true},
		{name: "invalid utf-8", md: map[string]string{"note": "a\xffb"}, wantKey: "note", wantErr: true, reason: "utf-8"},
		{name: "first bad key in sorted order", md: map[string]string{"b": "\x01", "a": "\x01", "c": "ok"}, wantKey: "a", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := sanitize.ValidateMetadata(tt.md)
			if !tt.wantErr {
				if err != nil {
					t.Fatalf("ValidateMetadata: %v", err)
				}
				return
			}
			if !errors.Is(err, sanitize.ErrInvalidMetadata) {
				t.Fatalf("err = %v, want ErrInvalidMetadata", err)
			}
			var me *sanitize.MetadataError
			if !errors.As(err, &me) {
				t.Fatalf("err %T is not a *MetadataError", err)
			}
			if me.Key != tt.wantKey {
				t.Errorf("Key = %q, want %q", me.Key, tt.wantKey)
			}
			if tt.wantKey != "" && !strings.Contains(err.Error(), fmt.Sprintf("%q", tt.wantKey)) {
				t.Errorf("error %q does not name key %q", err, tt.wantKey)
			}
			if !strings.Contains(err.Error(), tt.reason) {
				t.Errorf("error %q does not say %q", err, tt.reason)
			}
			for _, v := range tt.md {
				if len(v) > 3 && strings.Contains(err.Error(), v) {
					t.Errorf("error %q echoes the value", err)
				}
			}
		})
	}
}

func TestAllowMetadata(t *testing.T) {
	md := map[string]string{
		"team":                "ml",
		"example.com/cost":    "42",
		"example.com/owner":   "bob",
		"examplexcom/spoof":   "x",
		"password":            "hunter2",
		"example.org/unknown": "y",
	}
	kept, dropped := sanitize.AllowMetadata(md, []string{"team", "example.com/*"})
	wantKept := map[string]string{"team": "ml", "example.com/cost": "42", "example.com/owner": "bob"}
	if !reflect.DeepEqual(kept, wantKept) {
		t.Errorf("kept = %v, want %v", kept, wantKept)
	}
	wantDropped := []string{"example.org/unknown", "examplexcom/spoof", "password"}
	if !reflect.DeepEqual(dropped, wantDropped) {
		t.Errorf("dropped = %v, want %v", dropped, wantDropped)
	}
	kept["team"] = "changed"
	if md["team"] != "ml" {
		t.Error("kept shares storage with the input")
	}

	kept, dropped = sanitize.AllowMetadata(nil, []string{"team"})
	if kept == nil || len(kept) != 0 || dropped != nil {
		t.Errorf("nil input: kept %v, dropped %v", kept, dropped)
	}
	kept, dropped = sanitize.AllowMetadata(map[string]string{"team": "ml"}, nil)
	if len(kept) != 0 || !reflect.DeepEqual(dropped, []string{"team"}) {
		t.Errorf("empty allowlist: kept %v, dropped %v", kept, dropped)
	}
	kept, _ = sanitize.AllowMetadata(map[string]string{"a": "1", "b/c": "2"}, []string{"*"})
	if len(kept) != 2 {
		t.Errorf("lone * should allow everything, kept %v", kept)
	}
}
