// Package config loads the daemons' YAML configuration files strictly: an
// unknown key, a wrong type or an invalid value stops the daemon at start
// with the offending key named. It never fills in silently what it could
// not parse. Flags (-set key.path=value) and environment variables
// (GPUAAS_<DAEMON>_<KEY_PATH>) override the file before validation (see
// Overrides for the precedence).
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"regexp"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// MaxSize bounds a configuration file.
const MaxSize = 1 << 20

// ErrInvalid is the class of every configuration error.
var ErrInvalid = errors.New("invalid configuration")

// Validator is implemented by configuration structs that check themselves
// after decoding (and fill in defaults).
type Validator interface {
	Validate() error
}

// Load reads the YAML file at path into v, rejecting unknown keys, then
// calls v.Validate if v implements Validator. LoadWith also applies
// flags and environment variables over the file.
func Load(path string, v any) error {
	_, err := LoadWith(path, v, Overrides{})
	return err
}

// Decode parses YAML strictly into v and validates it.
func Decode(data []byte, v any) error {
	if err := decodeStrict(data, v); err != nil {
		return err
	}
	if val, ok := v.(Validator); ok {
		if err := val.Validate(); err != nil {
			return fmt.Errorf("%w: %v", ErrInvalid, err)
		}
	}
	return nil
}

// decodeStrict parses one YAML document strictly into v, naming the key of
// any error; it does not validate.
func decodeStrict(data []byte, v any) error {
	if len(data) > MaxSize {
		return fmt.Errorf("%w: larger than %d bytes", ErrInvalid, MaxSize)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(v); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("%w: %v", ErrInvalid, nameKeys(data, err))
	}
	var extra any
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return fmt.Errorf("%w: more than one YAML document", ErrInvalid)
	}
	return nil
}

var lineRE = regexp.MustCompile(`line (\d+): `)

// nameKeys rewrites yaml's "line N: ..." errors to name the key at that
// line ("line N: key a.b: ..."), so an operator sees which key is wrong.
func nameKeys(data []byte, err error) error {
	var root yaml.Node
	if yaml.Unmarshal(data, &root) != nil {
		return err
	}
	keys := map[int]string{}
	var walk func(n *yaml.Node, path string)
	walk = func(n *yaml.Node, path string) {
		switch n.Kind {
		case yaml.DocumentNode, yaml.SequenceNode:
			for _, c := range n.Content {
				walk(c, path)
			}
		case yaml.MappingNode:
			for i := 0; i+1 < len(n.Content); i += 2 {
				p := n.Content[i].Value
				if path != "" {
					p = path + "." + p
				}
				if _, seen := keys[n.Content[i+1].Line]; !seen {
					keys[n.Content[i+1].Line] = p
				}
				walk(n.Content[i+1], p)
			}
		}
	}
	walk(&root, "")
	msg := lineRE.ReplaceAllStringFunc(err.Error(), func(m string) string {
		line, _ := strconv.Atoi(lineRE.FindStringSubmatch(m)[1])
		if k, ok := keys[line]; ok {
			return m + "key " + k + ": "
		}
		return m
	})
	return errors.New(msg)
}

// Duration is a time.Duration written as "1s", "5m" in YAML.
type Duration time.Duration

// UnmarshalYAML parses a Go duration string.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	var s string
	if err := n.Decode(&s); err != nil {
		return fmt.Errorf("line %d: duration must be a string like \"10s\"", n.Line)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("line %d: %v", n.Line, err)
	}
	*d = Duration(v)
	return nil
}

// MarshalYAML writes the duration as a string.
func (d Duration) MarshalYAML() (any, error) { return time.Duration(d).String(), nil }

// D returns the time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// FieldError names the key that is wrong.
func FieldError(key, format string, args ...any) error {
	return fmt.Errorf("%s: %s", key, fmt.Sprintf(format, args...))
}

// SVID says where a daemon's X.509 SVID comes from: the SPIFFE Workload
// API (SPIRE's agent socket), or files (certificate chain, key and the
// trust bundle) that pkg/identity watches and reloads. Exactly one.
type SVID struct {
	// WorkloadAPI is the Workload API socket address, "unix:///path".
	WorkloadAPI string `yaml:"workload_api"`
	Cert        string `yaml:"cert"`
	Key         string `yaml:"key"`
	Bundle      string `yaml:"bundle"`
}

// Validate checks that exactly one source is named, fully (under the key
// "svid").
func (s SVID) Validate() error {
	files := s.Cert != "" || s.Key != "" || s.Bundle != ""
	if s.WorkloadAPI != "" {
		if files {
			return FieldError("svid", "set either workload_api or cert, key and bundle, not both")
		}
		if !strings.HasPrefix(s.WorkloadAPI, "unix:///") {
			return FieldError("svid.workload_api", "must be a unix socket address, unix:///path")
		}
		return nil
	}
	for _, f := range []struct{ key, v string }{{"svid.cert", s.Cert}, {"svid.key", s.Key}, {"svid.bundle", s.Bundle}} {
		if f.v == "" {
			return FieldError(f.key, "is required (or set svid.workload_api)")
		}
	}
	return nil
}

// Log configures a daemon's (sanitized) logger.
type Log struct {
	Level string `yaml:"level"` // debug, info (default), warn, error
	JSON  bool   `yaml:"json"`
}

// SlogLevel parses Level (under the key "log.level").
func (l Log) SlogLevel() (slog.Level, error) {
	lvl := l.Level
	if lvl == "" {
		lvl = "info"
	}
	var v slog.Level
	if err := v.UnmarshalText([]byte(lvl)); err != nil {
		return 0, FieldError("log.level", "must be debug, info, warn or error")
	}
	return v, nil
}
