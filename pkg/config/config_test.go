package config

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

type sample struct {
	Listen  string   `yaml:"listen"`
	Tick    Duration `yaml:"tick"`
	Section struct {
		Name string `yaml:"name"`
	} `yaml:"section"`
}

func (s *sample) Validate() error {
	if s.Listen == "" {
		return FieldError("listen", "is required")
	}
	return nil
}

func TestDecodeNamesTheOffendingKey(t *testing.T) {
	cases := map[string]struct{ in, want string }{
		"unknown key":      {"listen: x\nlsten: y\n", "lsten"},
		"unknown nested":   {"listen: x\nsection:\n  nmae: a\n", "nmae"},
		"wrong type":       {"listen: [1]\n", "listen"},
		"bad duration":     {"listen: x\ntick: 5 parsecs\n", "line 2"},
		"missing required": {"tick: 1s\n", "listen"},
		"two documents":    {"listen: x\n---\nlisten: y\n", "more than one"},
		"not yaml":         {"listen: [\n", "yaml"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			var s sample
			err := Decode([]byte(tc.in), &s)
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want ErrInvalid naming %q", err, tc.want)
			}
		})
	}
}

func TestLoad(t *testing.T) {
	p := filepath.Join(t.TempDir(), "c.yaml")
	os.WriteFile(p, []byte("listen: 127.0.0.1:1\ntick: 250ms\n"), 0o600)
	var s sample
	if err := Load(p, &s); err != nil {
		t.Fatal(err)
	}
	if s.Listen != "127.0.0.1:1" || s.Tick.D().Milliseconds() != 250 {
		t.Fatalf("got %+v", s)
	}
	if err := Load(filepath.Join(t.TempDir(), "missing.yaml"), &s); !errors.Is(err, ErrInvalid) {
		t.Fatalf("missing file: %v", err)
	}
	big := filepath.Join(t.TempDir(), "big.yaml")
	os.WriteFile(big, make([]byte, MaxSize+10), 0o600)
	if err := Load(big, &s); !errors.Is(err, ErrInvalid) {
		t.Fatalf("oversized file: %v", err)
	}
}

func FuzzDecode(f *testing.F) {
	f.Add([]byte("listen: x\ntick: 1s\n"))
	f.Add([]byte("section: {name: 1}\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		var s sample
		_ = Decode(b, &s)
	})
}
