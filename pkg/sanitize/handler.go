package sanitize

import (
	"context"
	"io"
	"log/slog"
	"strings"
)

// handler is the redacting slog.Handler; see NewHandler.
type handler struct {
	next slog.Handler
	// hideAll is set inside a group whose name is sensitive (WithGroup):
	// every value below it is redacted, keys are kept.
	hideAll bool
}

// NewHandler returns a handler that redacts records and attributes before
// passing them to next:
//
//   - a value whose key IsSensitiveKey becomes Redacted, whatever its kind;
//     a group under such a key keeps its keys but every value in it becomes
//     Redacted, and so does everything logged under a sensitive WithGroup;
//   - under an env key (IsEnvKey) a []string of KEY=VALUE pairs keeps the
//     names ("PATH=[REDACTED]"), a map[string]string keeps its keys, and
//     any other value becomes Redacted;
//   - the message, every other string value, the text of error values and
//     the elements of []string and map[string]string values pass through
//     Scrub, and map[string]string values under sensitive map keys are
//     hidden;
//   - LogValuer values are resolved first, so what they return is checked.
//
// The same applies to attributes given to WithAttrs and at every level of
// nested groups. Values of other types (structs, []byte) are passed on as
// they are: do not log them if they can hold secrets. A record that needs no
// change is passed on without copying.
func NewHandler(next slog.Handler) slog.Handler {
	if h, ok := next.(*handler); ok {
		return h
	}
	return &handler{next: next}
}

// Logger returns the sanitized logger the daemons use: slog's JSON (json
// true) or text handler writing to w at level and above, wrapped by
// NewHandler.
func Logger(w io.Writer, level slog.Level, json bool) *slog.Logger {
	opts := &slog.HandlerOptions{Level: level}
	var h slog.Handler
	if json {
		h = slog.NewJSONHandler(w, opts)
	} else {
		h = slog.NewTextHandler(w, opts)
	}
	return slog.New(NewHandler(h))
}

func (h *handler) Enabled(ctx context.Context, level slog.Level) bool {
	return h.next.Enabled(ctx, level)
}

func (h *handler) WithAttrs(attrs []slog.Attr) slog.Handler {
	if len(attrs) == 0 {
		return h
	}
	return &handler{next: h.next.WithAttrs(redactAttrs(attrs, h.hideAll)), hideAll: h.hideAll}
}

func (h *handler) WithGroup(name string) slog.Handler {
	if name == "" {
		return h
	}
	return &handler{next: h.next.WithGroup(name), hideAll: h.hideAll || IsSensitiveKey(name)}
}

func (h *handler) Handle(ctx context.Context, r slog.Record) error {
	msg, changed := scrub(r.Message)
	if !changed {
		r.Attrs(func(a slog.Attr) bool {
			changed = needsWork(a, h.hideAll)
			return !changed
		})
	}
	if !changed {
		return h.next.Handle(ctx, r)
	}
	out := slog.NewRecord(r.Time, r.Level, msg, r.PC)
	r.Attrs(func(a slog.Attr) bool {
		out.AddAttrs(redactAttr(a, h.hideAll))
		return true
	})
	return h.next.Handle(ctx, out)
}

// needsWork is a conservative, allocation-free check of whether redactAttr
// could change a.
func needsWork(a slog.Attr, hideAll bool) bool {
	if hideAll || IsSensitiveKey(a.Key) {
		return true
	}
	switch a.Value.Kind() {
	case slog.KindString:
		return mayHoldSecret(a.Value.String())
	case slog.KindLogValuer:
		return true
	case slog.KindGroup:
		for _, ga := range a.Value.Group() {
			if needsWork(ga, false) {
				return true
			}
		}
		return false
	case slog.KindAny:
		switch a.Value.Any().(type) {
		case error, []string, map[string]string:
			return true
		}
	}
	return false
}

// redactAttrs returns attrs redacted, sharing the input slice when nothing
// changes.
func redactAttrs(attrs []slog.Attr, hideAll bool) []slog.Attr {
	var out []slog.Attr
	for i, a := range attrs {
		if out == nil && !needsWork(a, hideAll) {
			continue
		}
		if out == nil {
			out = make([]slog.Attr, i, len(attrs))
			copy(out, attrs[:i])
		}
		out = append(out, redactAttr(a, hideAll))
	}
	if out == nil {
		return attrs
	}
	return out
}

func redactAttr(a slog.Attr, hideAll bool) slog.Attr {
	v := a.Value.Resolve()
	if v.Kind() == slog.KindGroup {
		return slog.Attr{Key: a.Key, Value: slog.GroupValue(redactAttrs(v.Group(), hideAll || IsSensitiveKey(a.Key))...)}
	}
	switch {
	case hideAll:
		return slog.String(a.Key, Redacted)
	case IsEnvKey(a.Key):
		return slog.Attr{Key: a.Key, Value: redactEnv(v)}
	case IsSensitiveKey(a.Key):
		return slog.String(a.Key, Redacted)
	}
	return slog.Attr{Key: a.Key, Value: scrubValue(v)}
}

// redactEnv keeps the variable names of an environment and hides values.
func redactEnv(v slog.Value) slog.Value {
	if v.Kind() == slog.KindAny {
		switch x := v.Any().(type) {
		case []string:
			out := make([]string, len(x))
			for i, kv := range x {
				if name, _, ok := strings.Cut(kv, "="); ok {
					out[i] = name + "=" + Redacted
				} else {
					out[i] = Redacted
				}
			}
			return slog.AnyValue(out)
		case map[string]string:
			out := make(map[string]string, len(x))
			for k := range x {
				out[k] = Redacted
			}
			return slog.AnyValue(out)
		}
	}
	return slog.StringValue(Redacted)
}

// scrubValue scrubs the text of values that are not under a sensitive key.
func scrubValue(v slog.Value) slog.Value {
	switch v.Kind() {
	case slog.KindString:
		if s, changed := scrub(v.String()); changed {
			return slog.StringValue(s)
		}
	case slog.KindAny:
		switch x := v.Any().(type) {
		case error:
			if s, changed := scrub(x.Error()); changed {
				return slog.StringValue(s)
			}
		case []string:
			var out []string
			for i, s := range x {
				s2, changed := scrub(s)
				if changed && out == nil {
					out = make([]string, len(x))
					copy(out, x[:i])
				}
				if out != nil {
					out[i] = s2
				}
			}
			if out != nil {
				return slog.AnyValue(out)
			}
		case map[string]string:
			var out map[string]string
			for k, s := range x {
				s2, changed := scrub(s)
				if IsSensitiveKey(k) {
					s2, changed = Redacted, s != Redacted
				}
				if changed && out == nil {
					out = make(map[string]string, len(x))
					for k2, s3 := range x {
						out[k2] = s3
					}
				}
				if out != nil {
					out[k] = s2
				}
			}
			if out != nil {
				return slog.AnyValue(out)
			}
		}
	}
	return v
}
