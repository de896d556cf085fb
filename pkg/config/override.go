package config

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"reflect"
	"sort"
	"strings"

	"go.yaml.in/yaml/v3"
)

// Overrides are settings given outside the configuration file. They are
// applied over the file, before validation, so an overridden value meets
// exactly the checks (and error messages) a value in the file meets.
//
// Precedence, highest first:
//
//  1. -set key.path=value flags (Set), in order: a later one wins
//  2. environment variables EnvPrefix + KEY_PATH (Environ)
//  3. the configuration file
//  4. the defaults the daemon's Validate fills in
//
// A key path names a YAML key as written in the file, sections joined by
// dots ("log.level", "containerd.namespace"). Its environment variable is
// the path upper-cased with dots and dashes turned into underscores, after
// the prefix: GPUAAS_AGENT_LOG_LEVEL, GPUAAS_CONTROLPLANE_LISTEN. An
// override of a key the configuration does not have is an error naming it,
// as is every environment variable with the prefix that names no key.
//
// A value is a YAML scalar decoded into the key's type ("debug", "10s",
// "true", "8"); a key whose type is a list, a map or a section takes a
// YAML flow value ("[a, b]", "{k: v}"); an empty value resets the key to
// its zero value (and so to its default).
type Overrides struct {
	// EnvPrefix selects the environment variables, e.g. "GPUAAS_AGENT_";
	// empty: the environment is not read.
	EnvPrefix string
	// Environ is the environment ("KEY=value" strings, as os.Environ
	// returns them); nil reads none.
	Environ []string
	// Set are the -set flags' "key.path=value" assignments, in order.
	Set []string
}

// Override is one applied override: the key and where its value came from
// (never the value, which may be sensitive).
type Override struct {
	Key    string
	Source string
}

// String is "key (source)".
func (o Override) String() string { return o.Key + " (" + o.Source + ")" }

// EnvPrefix is a daemon's environment variable prefix: "GPUAAS_" plus the
// daemon's name upper-cased, e.g. EnvPrefix("agent") == "GPUAAS_AGENT_".
func EnvPrefix(daemon string) string {
	return "GPUAAS_" + envName(daemon) + "_"
}

// SetFlags collects repeated -set key.path=value flags (a flag.Value).
type SetFlags []string

var _ flag.Value = (*SetFlags)(nil)

// String lists the assignments.
func (s *SetFlags) String() string {
	if s == nil {
		return ""
	}
	return strings.Join(*s, ",")
}

// Set adds one assignment; it must be key.path=value.
func (s *SetFlags) Set(v string) error {
	if _, _, err := splitAssignment(v); err != nil {
		return err
	}
	*s = append(*s, v)
	return nil
}

func splitAssignment(v string) (key, value string, err error) {
	key, value, ok := strings.Cut(v, "=")
	key = strings.TrimSpace(key)
	if !ok || key == "" {
		return "", "", fmt.Errorf("%q is not key.path=value", v)
	}
	return key, value, nil
}

// LoadWith is Load with overrides: it reads the file at path strictly into
// v, applies o over it, then validates. It returns the overrides applied,
// in the order they were applied.
func LoadWith(path string, v any, o Overrides) ([]Override, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxSize+1))
	if err != nil {
		return nil, fmt.Errorf("%w: read %s: %v", ErrInvalid, path, err)
	}
	applied, err := DecodeWith(data, v, o)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return applied, nil
}

// DecodeWith is Decode with overrides (see Overrides and LoadWith).
func DecodeWith(data []byte, v any, o Overrides) ([]Override, error) {
	if err := decodeStrict(data, v); err != nil {
		return nil, err
	}
	applied, err := applyOverrides(v, o)
	if err != nil {
		return nil, err
	}
	if val, ok := v.(Validator); ok {
		if err := val.Validate(); err != nil {
			return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
		}
	}
	return applied, nil
}

// pending is an override resolved to its key path, not yet applied.
type pending struct {
	path   []string
	value  string
	source string
}

// applyOverrides resolves every override against v's type (an unknown key
// is an error naming it), then decodes each, lowest precedence first, over
// what v holds.
func applyOverrides(v any, o Overrides) ([]Override, error) {
	rt := reflect.TypeOf(v)
	if rt == nil || rt.Kind() != reflect.Pointer {
		return nil, fmt.Errorf("%w: overrides need a pointer, got %T", ErrInvalid, v)
	}
	var todo []pending
	if o.EnvPrefix != "" {
		// The environment in a stable order: a failure names the same
		// variable every time.
		env := append([]string(nil), o.Environ...)
		sort.Strings(env)
		for _, kv := range env {
			name, value, _ := strings.Cut(kv, "=")
			if !strings.HasPrefix(name, o.EnvPrefix) {
				continue
			}
			paths := resolveEnv(rt, strings.TrimPrefix(name, o.EnvPrefix))
			switch len(paths) {
			case 0:
				return nil, fmt.Errorf("%w: environment variable %s names no configuration key", ErrInvalid, name)
			case 1:
			default:
				var alts []string
				for _, p := range paths {
					alts = append(alts, strings.Join(p, "."))
				}
				return nil, fmt.Errorf("%w: environment variable %s is ambiguous (%s); use -set", ErrInvalid, name, strings.Join(alts, " or "))
			}
			todo = append(todo, pending{path: paths[0], value: value, source: "environment " + name})
		}
	}
	for _, s := range o.Set {
		key, value, err := splitAssignment(s)
		if err != nil {
			return nil, fmt.Errorf("%w: -set: %v", ErrInvalid, err)
		}
		path := strings.Split(key, ".")
		if _, err := resolvePath(rt, path); err != nil {
			return nil, fmt.Errorf("%w: -set %s: %v", ErrInvalid, key, err)
		}
		todo = append(todo, pending{path: path, value: value, source: "-set " + key})
	}
	var applied []Override
	for _, p := range todo {
		key := strings.Join(p.path, ".")
		if err := applyOne(v, rt, p); err != nil {
			return nil, fmt.Errorf("%w: %s (%s): %v", ErrInvalid, key, p.source, err)
		}
		applied = append(applied, Override{Key: key, Source: p.source})
	}
	return applied, nil
}

// applyOne decodes a document holding only the override's key, strictly,
// over v: keys absent from it keep what the file (or an earlier override)
// set.
func applyOne(v any, rt reflect.Type, p pending) error {
	ft, err := resolvePath(rt, p.path)
	if err != nil {
		return err
	}
	var val *yaml.Node
	if isScalar(ft) {
		// A plain scalar with the usual implicit typing ("8" is an int,
		// "true" a bool); a string field takes the text as written.
		val = &yaml.Node{Kind: yaml.ScalarNode, Value: p.value}
	} else {
		var doc yaml.Node
		if err := yaml.Unmarshal([]byte(p.value), &doc); err != nil {
			return fmt.Errorf("not a YAML value: %v", stripLines(err))
		}
		if len(doc.Content) == 0 {
			val = &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!null", Value: ""}
		} else {
			val = doc.Content[0]
		}
	}
	if val.Kind == yaml.ScalarNode && val.ShortTag() == "!!null" {
		// An empty value resets the key: zero it here, since decoding a
		// null leaves some types (a list, a section) as they were.
		zeroPath(reflect.ValueOf(v).Elem(), p.path)
		return nil
	}
	for i := len(p.path) - 1; i >= 0; i-- {
		val = &yaml.Node{Kind: yaml.MappingNode, Content: []*yaml.Node{{Kind: yaml.ScalarNode, Value: p.path[i]}, val}}
	}
	text, err := yaml.Marshal(val)
	if err != nil {
		return err
	}
	dec := yaml.NewDecoder(bytes.NewReader(text))
	dec.KnownFields(true)
	if err := dec.Decode(v); err != nil {
		return stripLines(err)
	}
	return nil
}

// zeroPath sets the field at path to its zero value, allocating nothing
// that is not already there.
func zeroPath(rv reflect.Value, path []string) {
	for i, seg := range path {
		for rv.Kind() == reflect.Pointer {
			if rv.IsNil() {
				return
			}
			rv = rv.Elem()
		}
		switch rv.Kind() {
		case reflect.Struct:
			f, ok := fieldByKey(rv, seg)
			if !ok {
				return
			}
			rv = f
		case reflect.Map:
			if i == len(path)-1 {
				rv.SetMapIndex(reflect.ValueOf(seg).Convert(rv.Type().Key()), reflect.Value{})
			}
			// Entries of a map are not addressable; a deeper reset
			// clears the whole entry's key path above instead.
			return
		default:
			return
		}
	}
	rv.SetZero()
}

// fieldByKey finds the field of struct value rv whose YAML key is key,
// looking through inline fields.
func fieldByKey(rv reflect.Value, key string) (reflect.Value, bool) {
	for i := 0; i < rv.NumField(); i++ {
		sf := rv.Type().Field(i)
		name, inline, ok := yamlKey(sf)
		if !ok {
			continue
		}
		if inline {
			inner := rv.Field(i)
			if inner.Kind() == reflect.Pointer {
				if inner.IsNil() {
					continue
				}
				inner = inner.Elem()
			}
			if inner.Kind() == reflect.Struct {
				if f, ok := fieldByKey(inner, key); ok {
					return f, true
				}
			}
			continue
		}
		if name == key {
			return rv.Field(i), true
		}
	}
	return reflect.Value{}, false
}

var yamlUnmarshaler = reflect.TypeFor[yaml.Unmarshaler]()

// isScalar reports whether a value of t is written as one YAML scalar.
func isScalar(t reflect.Type) bool {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.String, reflect.Bool, reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Float32, reflect.Float64:
		return true
	}
	return false
}

// leaf reports whether t has no YAML keys below it (a scalar, a list, or
// a type that parses itself).
func leaf(t reflect.Type) bool {
	if reflect.PointerTo(t).Implements(yamlUnmarshaler) || t.Implements(yamlUnmarshaler) {
		return true
	}
	switch t.Kind() {
	case reflect.Struct, reflect.Map:
		return false
	}
	return true
}

// fields lists a struct type's YAML keys and their types, looking through
// inline fields.
func fields(t reflect.Type) map[string]reflect.Type {
	out := map[string]reflect.Type{}
	for i := 0; i < t.NumField(); i++ {
		sf := t.Field(i)
		name, inline, ok := yamlKey(sf)
		if !ok {
			continue
		}
		if inline {
			it := sf.Type
			for it.Kind() == reflect.Pointer {
				it = it.Elem()
			}
			if it.Kind() == reflect.Struct {
				for k, v := range fields(it) {
					out[k] = v
				}
			}
			continue
		}
		out[name] = sf.Type
	}
	return out
}

// yamlKey is the key a struct field has in YAML, as yaml.v3 names it: the
// tag's name, else the field name lower-cased; ok is false for fields the
// decoder ignores.
func yamlKey(sf reflect.StructField) (name string, inline, ok bool) {
	if !sf.IsExported() {
		return "", false, false
	}
	tag := sf.Tag.Get("yaml")
	if tag == "-" {
		return "", false, false
	}
	name, opts, _ := strings.Cut(tag, ",")
	for _, o := range strings.Split(opts, ",") {
		if o == "inline" {
			return "", true, true
		}
	}
	if name == "" {
		name = strings.ToLower(sf.Name)
	}
	return name, false, true
}

// resolvePath checks that the key path exists in type t and returns the
// type of the value it names.
func resolvePath(t reflect.Type, path []string) (reflect.Type, error) {
	for i, seg := range path {
		for t.Kind() == reflect.Pointer {
			t = t.Elem()
		}
		if seg == "" {
			return nil, errors.New("empty key in the path")
		}
		where := "the top level"
		if i > 0 {
			where = strings.Join(path[:i], ".")
		}
		if leaf(t) {
			return nil, fmt.Errorf("no key %q: %s has no keys below it", strings.Join(path[:i+1], "."), where)
		}
		switch t.Kind() {
		case reflect.Struct:
			fs := fields(t)
			ft, ok := fs[seg]
			if !ok {
				return nil, fmt.Errorf("no such key %q (%s has %s)", strings.Join(path[:i+1], "."), where, strings.Join(sortedKeys(fs), ", "))
			}
			t = ft
		case reflect.Map:
			if t.Key().Kind() != reflect.String {
				return nil, fmt.Errorf("no such key %q", strings.Join(path[:i+1], "."))
			}
			t = t.Elem()
		}
	}
	return t, nil
}

// resolveEnv finds the key paths whose environment name is name (after the
// prefix): each section's key upper-cased, joined by underscores. Keys may
// hold underscores themselves, so every split is tried; more than one
// result is an ambiguity.
func resolveEnv(t reflect.Type, name string) [][]string {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if name == "" || t.Kind() != reflect.Struct || leaf(t) {
		return nil
	}
	var out [][]string
	for key, ft := range fields(t) {
		k := envName(key)
		if name == k {
			out = append(out, []string{key})
			continue
		}
		if rest, ok := strings.CutPrefix(name, k+"_"); ok {
			for _, p := range resolveEnv(ft, rest) {
				out = append(out, append([]string{key}, p...))
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return strings.Join(out[i], ".") < strings.Join(out[j], ".") })
	return out
}

// envName is a key's environment variable spelling.
func envName(key string) string {
	return strings.NewReplacer(".", "_", "-", "_").Replace(strings.ToUpper(key))
}

func sortedKeys(m map[string]reflect.Type) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// stripLines drops yaml's "line N:" positions from an override's error:
// they count lines of a document the operator never wrote.
func stripLines(err error) error {
	var te *yaml.TypeError
	msgs := []string{err.Error()}
	if errors.As(err, &te) {
		msgs = te.Errors
	}
	for i, m := range msgs {
		m = strings.TrimPrefix(m, "yaml: ")
		msgs[i] = lineRE.ReplaceAllString(m, "")
	}
	return errors.New(strings.Join(msgs, "; "))
}
