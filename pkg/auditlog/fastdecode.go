package auditlog

import (
	"bytes"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// fastDecode parses the common case of a canonical entry without
// reflection: the fixed field order, strings that need no escape. It
// reports false for anything else (an escape, a control or HTML character,
// non-canonical time or number), and Decode then takes the encoding/json
// path, which is the definition. Whatever it accepts re-encodes to exactly
// b (FuzzDecode checks both paths agree). Verification of large logs spends
// most of its time here, hence the hand parser.
func fastDecode(b []byte) (Entry, bool) {
	var e Entry
	_, ok := fastScan(b, &e)
	return e, ok
}

// fastCheck is fastDecode without building the entry, for verification:
// it returns the sequence number of a canonical entry.
func fastCheck(b []byte) (uint64, bool) { return fastScan(b, nil) }

// fastScan parses b, filling e unless it is nil.
func fastScan(b []byte, e *Entry) (uint64, bool) {
	p := parser{b: b}
	if !p.lit(`{"seq":`) {
		return 0, false
	}
	seq, ok := p.uint()
	if !ok || !p.lit(`,"time":`) {
		return 0, false
	}
	ts, ok := p.str()
	if !ok {
		return 0, false
	}
	t, err := time.Parse(time.RFC3339Nano, string(ts))
	if err != nil || string(t.UTC().AppendFormat(make([]byte, 0, 40), time.RFC3339Nano)) != string(ts) {
		return 0, false
	}
	var fields [7]*string
	if e != nil {
		e.Seq, e.Time = seq, t.UTC()
		fields = [7]*string{&e.Actor, &e.Tenant, &e.Action, &e.Resource, &e.Outcome, &e.Reason, &e.RequestID}
	}
	for i, name := range [7]string{`,"actor":`, `,"tenant":`, `,"action":`, `,"resource":`, `,"outcome":`, `,"reason":`, `,"request_id":`} {
		if !p.lit(name) {
			return 0, false
		}
		v, ok := p.str()
		if !ok {
			return 0, false
		}
		if e != nil {
			*fields[i] = string(v)
		}
	}
	if p.lit(`,"trace_id":`) {
		v, ok := p.str()
		if !ok || len(v) == 0 {
			return 0, false
		}
		if e != nil {
			e.TraceID = string(v)
		}
	}
	if !p.lit(`,"details":{`) {
		return 0, false
	}
	if e != nil {
		e.Details = map[string]string{}
	}
	var prev []byte
	for i := 0; !p.lit(`}`); i++ {
		if i > 0 && !p.lit(`,`) {
			return 0, false
		}
		k, ok := p.str()
		if !ok || (i > 0 && bytes.Compare(k, prev) <= 0) || !p.lit(`:`) {
			return 0, false
		}
		v, ok := p.str()
		if !ok {
			return 0, false
		}
		if e != nil {
			e.Details[string(k)] = string(v)
		}
		prev = k
	}
	if !p.lit(`}`) || p.i != len(b) {
		return 0, false
	}
	return seq, true
}

type parser struct {
	b []byte
	i int
}

func (p *parser) lit(s string) bool {
	if bytes.HasPrefix(p.b[p.i:], []byte(s)) {
		p.i += len(s)
		return true
	}
	return false
}

func (p *parser) uint() (uint64, bool) {
	j := p.i
	for j < len(p.b) && p.b[j] >= '0' && p.b[j] <= '9' {
		j++
	}
	s := p.b[p.i:j]
	if len(s) == 0 || (len(s) > 1 && s[0] == '0') {
		return 0, false
	}
	v, err := strconv.ParseUint(string(s), 10, 64)
	if err != nil {
		return 0, false
	}
	p.i = j
	return v, true
}

// str reads a JSON string that encoding/json would write unescaped: no
// quote, backslash, control character, <, >, &, U+2028, U+2029 or invalid
// UTF-8 inside.
func (p *parser) str() ([]byte, bool) {
	if p.i >= len(p.b) || p.b[p.i] != '"' {
		return nil, false
	}
	start := p.i + 1
	j := start
	ascii := true
	for ; j < len(p.b); j++ {
		c := p.b[j]
		if c == '"' {
			break
		}
		if c < 0x20 || c == '\\' || c == '<' || c == '>' || c == '&' {
			return nil, false
		}
		if c >= utf8.RuneSelf {
			ascii = false
		}
	}
	if j >= len(p.b) {
		return nil, false
	}
	s := p.b[start:j]
	if !ascii {
		if !utf8.Valid(s) || bytes.Contains(s, []byte("\u2028")) || bytes.Contains(s, []byte("\u2029")) {
			return nil, false
		}
	}
	p.i = j + 1
	return s, true
}

// plain reports whether encoding/json writes s as is between quotes (no
// escape, HTML-safe): the strings of almost every entry.
func plain(s string) bool {
	ascii := true
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < 0x20 || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			return false
		}
		if c >= utf8.RuneSelf {
			ascii = false
		}
	}
	return ascii || (utf8.ValidString(s) && !strings.Contains(s, "\u2028") && !strings.Contains(s, "\u2029"))
}

// appendCanonicalFast writes the canonical encoding without reflection
// when every string is plain; it reports false otherwise (Canonical then
// uses encoding/json).
func (e Entry) appendCanonicalFast(b []byte) ([]byte, bool) {
	strs := [...]string{e.Actor, e.Tenant, e.Action, e.Resource, e.Outcome, e.Reason, e.RequestID, e.TraceID}
	for _, s := range strs {
		if !plain(s) {
			return nil, false
		}
	}
	for k, v := range e.Details {
		if !plain(k) || !plain(v) {
			return nil, false
		}
	}
	b = append(b, `{"seq":`...)
	b = strconv.AppendUint(b, e.Seq, 10)
	b = append(b, `,"time":"`...)
	b = e.Time.UTC().AppendFormat(b, time.RFC3339Nano)
	b = append(b, '"')
	for i, name := range [...]string{`,"actor":"`, `,"tenant":"`, `,"action":"`, `,"resource":"`, `,"outcome":"`, `,"reason":"`, `,"request_id":"`} {
		b = append(b, name...)
		b = append(b, strs[i]...)
		b = append(b, '"')
	}
	if e.TraceID != "" {
		b = append(b, `,"trace_id":"`...)
		b = append(b, e.TraceID...)
		b = append(b, '"')
	}
	b = append(b, `,"details":{`...)
	for i, k := range slices.Sorted(maps.Keys(e.Details)) {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, '"')
		b = append(b, k...)
		b = append(b, `":"`...)
		b = append(b, e.Details[k]...)
		b = append(b, '"')
	}
	return append(b, "}}"...), true
}
