package authn

import (
	"bytes"
	"encoding/json"
	"testing"
)

func membersOf(t *testing.T, data string) (map[string]string, error) {
	t.Helper()
	fields, err := objectMembers([]byte(data), nil)
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, f := range fields {
		out[f.key([]byte(data))] = data[f.v0:f.v1]
	}
	return out, nil
}

func TestObjectMembers(t *testing.T) {
	got, err := membersOf(t, " {\"a\" : 1 ,\"b\":\"x\\\"}\",\"c\":{\"d\":[1,{\"e\":\"]\"}]},\"t\\u0065n\":true,\"\u00e9\":null,\"f\":[] }\n")
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"a": "1", "b": `"x\"}"`, "c": `{"d":[1,{"e":"]"}]}`, "ten": "true", "\u00e9": "null", "f": "[]"}
	if len(got) != len(want) {
		t.Fatalf("members = %q, want %q", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Fatalf("member %q = %q, want %q (all: %q)", k, got[k], v, got)
		}
	}
	if got, err := membersOf(t, "{}"); err != nil || len(got) != 0 {
		t.Fatalf("empty object: %v %v", got, err)
	}
	for _, bad := range []string{"", "[]", "null", `"s"`, "{", `{"a":}`, `{"a":1,}`, `{"a" 1}`, `{"a":1}{}`, `{'a':1}`} {
		if _, err := objectMembers([]byte(bad), nil); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
	var many bytes.Buffer
	many.WriteString("{")
	for i := range maxMembers + 1 {
		if i > 0 {
			many.WriteString(",")
		}
		many.WriteString(`"k":0`)
	}
	many.WriteString("}")
	if _, err := objectMembers(many.Bytes(), nil); err == nil {
		t.Error("an object of more than maxMembers members accepted")
	}
}

func TestJSONValueHelpers(t *testing.T) {
	if !equalString([]byte(`"abc"`), "abc") || equalString([]byte(`"abc"`), "abd") || !equalString([]byte(`"a\u0062c"`), "abc") || equalString([]byte(`1`), "1") {
		t.Fatal("equalString")
	}
	if l, err := stringList([]byte(`["a","b\u0021"]`)); err != nil || len(l) != 2 || l[1] != "b!" {
		t.Fatalf("stringList array: %q %v", l, err)
	}
	for _, bad := range []string{`[1]`, `{}`, `null`, `["a",null]`} {
		if _, err := stringList([]byte(bad)); err == nil {
			t.Errorf("stringList(%s) accepted", bad)
		}
	}
	for raw, want := range map[string]int64{"1799999999": 1799999999, "1799999999.9": 1799999999, "1.7e9": 1700000000} {
		ts, ok, err := numericDate([]byte(raw))
		if err != nil || !ok || ts.Unix() != want {
			t.Errorf("numericDate(%s) = %v %v %v, want %d", raw, ts, ok, err, want)
		}
	}
	if _, ok, err := numericDate([]byte("0")); ok || err != nil {
		t.Error("exp 0 is not absent")
	}
	if _, ok, err := numericDate(nil); ok || err != nil {
		t.Error("no claim is not absent")
	}
	for _, bad := range []string{`"1799999999"`, "true", "null", "1e300", "-1e12", "[1]"} {
		if _, _, err := numericDate([]byte(bad)); err == nil {
			t.Errorf("numericDate(%s) accepted", bad)
		}
	}
}

func TestSplitJWS(t *testing.T) {
	h, p, s, signing, ok := splitJWS("aa.bb.cc")
	if !ok || h != "aa" || p != "bb" || s != "cc" || signing != "aa.bb" {
		t.Fatalf("split = %q %q %q %q %v", h, p, s, signing, ok)
	}
	for _, bad := range []string{"", "a", "a.b", ".b.c", "a.b.c.d", "..."} {
		if _, _, _, _, ok := splitJWS(bad); ok {
			t.Errorf("%q split", bad)
		}
	}
}

// FuzzObjectMembers checks the member scanner against encoding/json: on
// any input it accepts, encoding/json must see the same object (the same
// keys, each last occurrence's raw value), and every JSON object that
// encoding/json decodes must be accepted.
func FuzzObjectMembers(f *testing.F) {
	for _, s := range []string{
		`{}`, `{"a":1}`, `{"a":"b","a":"c"}`, `{"a":{"b":[1,"]}"]},"c":-1.5e3}`, ` { "k\u00e9" : "v\"" } `,
		`{"alg":"RS256","kid":"k"}`, `[]`, `null`, `{"a":1,}`, "{\"\xff\":1}", `{"a":"\ud800"}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		fields, err := objectMembers(data, nil)
		var ref map[string]json.RawMessage
		jerr := json.Unmarshal(data, &ref)
		isObject := jerr == nil && ref != nil
		if err != nil {
			if isObject && len(ref) <= maxMembers && bytes.Count(data, []byte(":")) <= maxMembers {
				t.Fatalf("object %q refused: %v", data, err)
			}
			return
		}
		if !isObject {
			t.Fatalf("%q accepted, encoding/json says %v", data, jerr)
		}
		last := map[string][]byte{}
		for _, m := range fields {
			last[m.key(data)] = data[m.v0:m.v1]
		}
		if len(last) != len(ref) {
			t.Fatalf("%q: %d distinct keys, encoding/json %d", data, len(last), len(ref))
		}
		for k, v := range ref {
			if !bytes.Equal(last[k], v) {
				t.Fatalf("%q: member %q = %q, encoding/json %q", data, k, last[k], v)
			}
		}
	})
}
