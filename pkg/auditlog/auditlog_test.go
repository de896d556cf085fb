package auditlog

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"golang.org/x/mod/sumdb/note"
)

func entry(seq uint64) Entry {
	return Entry{Seq: seq, Time: time.Unix(int64(1700000000+seq), 5).In(time.FixedZone("x", 3600)),
		Actor: "spiffe://example.org/gpuaas/operator/alice", Tenant: "t1", Action: "lease.create",
		Resource: fmt.Sprintf("lease/l%d", seq), Outcome: OutcomeSuccess, RequestID: "r",
		Details: map[string]string{"b": "2", "a": "<1>"}}
}

func TestCanonicalEncodingIsStable(t *testing.T) {
	// The encoding predates trace ids: without one, an entry must encode
	// byte for byte as it always did, or old checkpoints stop verifying.
	e := entry(3)
	want := `{"seq":3,"time":"2023-11-14T22:13:23.000000005Z","actor":"spiffe://example.org/gpuaas/operator/alice","tenant":"t1","action":"lease.create","resource":"lease/l3","outcome":"success","reason":"","request_id":"r","details":{"a":"\u003c1\u003e","b":"2"}}`
	if got := string(e.Canonical()); got != want {
		t.Fatalf("canonical =\n%s\nwant\n%s", got, want)
	}
	e.TraceID = "4bf92f3577b34da6a3ce929d0e0e4736"
	if got := string(e.Canonical()); !strings.Contains(got, `"request_id":"r","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","details"`) {
		t.Fatalf("trace id not encoded after request_id: %s", got)
	}
	d, err := Decode(Encode(e))
	if err != nil || d.TraceID != e.TraceID || !d.Time.Equal(e.Time) || d.Details["a"] != "<1>" {
		t.Fatalf("round trip = %+v, %v", d, err)
	}
}

func TestDecodeRejectsNonCanonicalAndUnknown(t *testing.T) {
	good := string(entry(1).Canonical())
	for name, raw := range map[string]string{
		"reordered fields": `{"time":"2023-11-14T22:13:21.000000005Z","seq":1` + good[strings.Index(good, `,"actor"`):],
		"extra space":      strings.Replace(good, `"seq":1`, `"seq": 1`, 1),
		"unknown field":    strings.Replace(good, `{"seq":1`, `{"seq":1,"hash":"00"`, 1),
		"trailing data":    good + `{}`,
		"local time":       strings.Replace(good, "22:13:21.000000005Z", "23:13:21.000000005+01:00", 1),
		"legacy chain":     strings.TrimSuffix(good, "}") + `,"prev_hash":"00","hash":"00"}`,
	} {
		if _, err := Decode([]byte(raw)); err == nil {
			t.Errorf("%s: accepted %s", name, raw)
		}
	}
}

// refRoot is RFC 6962 section 2.1 written out directly.
func refRoot(leaves [][]byte) []byte {
	switch len(leaves) {
	case 0:
		h := sha256.Sum256(nil)
		return h[:]
	case 1:
		return LeafHash(leaves[0])
	}
	k := 1
	for k*2 < len(leaves) {
		k *= 2
	}
	return NodeHash(refRoot(leaves[:k]), refRoot(leaves[k:]))
}

func TestTreeIsRFC6962AndProofsVerify(t *testing.T) {
	var leaves [][]byte
	m := NewMemTree()
	var trees []*Tree
	trees = append(trees, m.Tree())
	for i := uint64(1); i <= 70; i++ {
		raw := entry(i).Canonical()
		leaves = append(leaves, raw)
		m.Append(LeafHash(raw))
		trees = append(trees, m.Tree())
		if !bytes.Equal(m.Root(), refRoot(leaves)) {
			t.Fatalf("size %d: root differs from the RFC 6962 definition", i)
		}
	}
	if !bytes.Equal(trees[0].Root(), refRoot(nil)) {
		t.Fatal("empty root is not SHA-256 of nothing")
	}
	for size := uint64(1); size <= 70; size++ {
		root := trees[size].Root()
		for idx := uint64(0); idx < size; idx++ {
			p, err := InclusionProof(idx, size, m.Node)
			if err != nil {
				t.Fatal(err)
			}
			if err := VerifyInclusion(idx, size, LeafHash(leaves[idx]), p, root); err != nil {
				t.Fatalf("inclusion %d in %d: %v", idx, size, err)
			}
			if err := VerifyInclusion(idx, size, LeafHash(leaves[(idx+1)%size]), p, root); size > 1 && !errors.Is(err, ErrTampered) {
				t.Fatalf("inclusion of the wrong leaf %d in %d accepted", idx, size)
			}
		}
		for s1 := uint64(0); s1 <= size; s1++ {
			p, err := ConsistencyProof(s1, size, m.Node)
			if err != nil {
				t.Fatal(err)
			}
			if err := VerifyConsistency(s1, size, p, trees[s1].Root(), root); err != nil {
				t.Fatalf("consistency %d -> %d: %v", s1, size, err)
			}
			if s1 > 0 && s1 < size {
				if err := VerifyConsistency(s1, size, p, trees[s1-1].Root(), root); err == nil {
					t.Fatalf("consistency %d -> %d accepted a wrong first root", s1, size)
				}
			}
		}
	}
	// The stored form of the compact range round-trips.
	for _, tr := range trees {
		b, _ := tr.MarshalBinary()
		back, err := UnmarshalTree(b)
		if err != nil || !bytes.Equal(back.Root(), tr.Root()) || back.Size() != tr.Size() {
			t.Fatalf("tree %d round trip: %v", tr.Size(), err)
		}
	}
	if _, err := UnmarshalTree([]byte{0, 0, 0, 0, 0, 0, 0, 3, 1}); err == nil {
		t.Fatal("a truncated tree was accepted")
	}
}

func testKeys(t testing.TB, name string) (note.Signer, note.Verifier, string) {
	t.Helper()
	skey, vkey, err := GenerateKey(name)
	if err != nil {
		t.Fatal(err)
	}
	s, err := note.NewSigner(skey)
	if err != nil {
		t.Fatal(err)
	}
	v, err := note.NewVerifier(vkey)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := VerifierKey(skey); err != nil || got != vkey {
		t.Fatalf("VerifierKey = %q, %v; want %q", got, err, vkey)
	}
	return s, v, vkey
}

func TestCheckpointSignatures(t *testing.T) {
	const origin = "gpuaas.test/audit"
	oldS, oldV, _ := testKeys(t, origin)
	newS, newV, _ := testKeys(t, origin)
	_, otherV, _ := testKeys(t, "mallory")
	c := Checkpoint{Origin: origin, Size: 7, Root: bytes.Repeat([]byte{1}, 32)}

	// Rotation: signed by both keys, accepted by a verifier that trusts
	// either one alone.
	both, err := Sign(c, oldS, newS)
	if err != nil {
		t.Fatal(err)
	}
	for _, vs := range [][]note.Verifier{{oldV}, {newV}, {oldV, newV}} {
		got, err := Open(both, origin, note.VerifierList(vs...))
		if err != nil || got.Size != 7 || !bytes.Equal(got.Root, c.Root) {
			t.Fatalf("open with %d trusted keys: %+v, %v", len(vs), got, err)
		}
	}
	if !strings.HasPrefix(string(both), origin+"\n7\n"+base64.StdEncoding.EncodeToString(c.Root)+"\n\n— "+origin+" ") {
		t.Fatalf("not a C2SP checkpoint note:\n%s", both)
	}
	if _, err := Open(both, origin, note.VerifierList(otherV)); !errors.Is(err, ErrUntrusted) || !strings.Contains(err.Error(), "checkpoint 7") {
		t.Fatalf("untrusted signer: %v", err)
	}
	if _, err := Open(both, "other/log", note.VerifierList(oldV)); !errors.Is(err, ErrUntrusted) {
		t.Fatalf("wrong origin: %v", err)
	}
	// A trusted key's signature over a changed body.
	forged := bytes.Replace(both, []byte("\n7\n"), []byte("\n8\n"), 1)
	if _, err := Open(forged, origin, note.VerifierList(oldV)); !errors.Is(err, ErrUntrusted) {
		t.Fatalf("altered checkpoint: %v", err)
	}
	if got, err := ParseSigned(both); err != nil || got.Size != 7 {
		t.Fatalf("ParseSigned = %+v, %v", got, err)
	}
}

func TestSignNextNeverSignsInconsistent(t *testing.T) {
	const origin = "o"
	s, v, _ := testKeys(t, origin)
	m := NewMemTree()
	var roots [][]byte
	roots = append(roots, m.Root())
	for i := uint64(1); i <= 10; i++ {
		m.Append(LeafHash(entry(i).Canonical()))
		roots = append(roots, m.Root())
	}
	cp := func(n uint64) Checkpoint { return Checkpoint{Origin: origin, Size: n, Root: roots[n]} }
	prev := cp(4)
	p, _ := ConsistencyProof(4, 10, m.Node)
	msg, err := SignNext(&prev, cp(10), p, s)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Open(msg, origin, note.VerifierList(v)); err != nil {
		t.Fatal(err)
	}
	if _, err := SignNext(nil, cp(3), nil, s); err != nil {
		t.Fatalf("first checkpoint: %v", err)
	}
	fork := cp(4)
	fork.Root = roots[5]
	for name, tc := range map[string]struct {
		next  Checkpoint
		proof [][]byte
		want  string
	}{
		"fork":        {fork, nil, "fork"},
		"rollback":    {cp(3), nil, "rollback"},
		"bad proof":   {cp(10), p[1:], "does not extend"},
		"other root":  {Checkpoint{Origin: origin, Size: 10, Root: roots[9]}, p, "does not extend"},
		"other log":   {Checkpoint{Origin: "x", Size: 10, Root: roots[10]}, p, "origin"},
		"no proof at": {cp(9), nil, "does not extend"},
	} {
		_, err := SignNext(&prev, tc.next, tc.proof, s)
		if !errors.Is(err, ErrInconsistent) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestVerifierNamesTheBadEntry(t *testing.T) {
	raws := make([][]byte, 6)
	for i := range raws {
		raws[i] = entry(uint64(i + 1)).Canonical()
	}
	good := NewVerifier()
	for _, r := range raws {
		if _, err := good.Add(r); err != nil {
			t.Fatal(err)
		}
	}
	cp := Checkpoint{Origin: "o", Size: 6, Root: good.Root()}
	flipped := bytes.Clone(raws[3])
	flipped[bytes.Index(flipped, []byte("alice"))] = 'A'
	for name, tc := range map[string]struct {
		raws [][]byte
		want string
	}{
		"flip a byte":      {[][]byte{raws[0], raws[1], raws[2], bytes.Replace(raws[3], []byte("lease/l4"), []byte("lease/l5"), 1), raws[4], raws[5]}, "checkpoint 6"},
		"flip in actor":    {[][]byte{raws[0], raws[1], raws[2], flipped, raws[4], raws[5]}, "checkpoint 6"},
		"delete":           {[][]byte{raws[0], raws[1], raws[3], raws[4], raws[5]}, "entry 3: found sequence 4"},
		"reorder":          {[][]byte{raws[0], raws[2], raws[1], raws[3], raws[4], raws[5]}, "entry 2: found sequence 3"},
		"not canonical":    {[][]byte{raws[0], bytes.Replace(raws[1], []byte(`"seq":2`), []byte(`"seq": 2`), 1)}, "entry 2"},
		"truncated before": {raws[:5], "at size 5"},
	} {
		v := NewVerifier()
		var err error
		for _, r := range tc.raws {
			if _, err = v.Add(r); err != nil {
				break
			}
		}
		if err == nil {
			err = v.Check(cp)
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error naming %q", name, err, tc.want)
		}
		// The parallel path finds the same first error.
		v = NewVerifier()
		if err = v.AddAll(tc.raws); err == nil {
			err = v.Check(cp)
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s (AddAll): %v, want an error naming %q", name, err, tc.want)
		}
	}
}

func TestInclusionBundle(t *testing.T) {
	const origin = "o"
	s, v, _ := testKeys(t, origin)
	_, otherV, _ := testKeys(t, origin)
	m := NewMemTree()
	var raws [][]byte
	for i := uint64(1); i <= 13; i++ {
		raws = append(raws, entry(i).Canonical())
		m.Append(LeafHash(raws[i-1]))
	}
	signed, err := Sign(Checkpoint{Origin: origin, Size: 13, Root: m.Root()}, s)
	if err != nil {
		t.Fatal(err)
	}
	path, err := InclusionProof(4, 13, m.Node)
	if err != nil {
		t.Fatal(err)
	}
	b := NewInclusionBundle(raws[4], 5, 13, path, signed)
	js, _ := json.MarshalIndent(b, "", "  ")
	back, err := ParseInclusionBundle(js)
	if err != nil {
		t.Fatal(err)
	}
	e, c, err := back.Verify(origin, note.VerifierList(v))
	if err != nil || e.Seq != 5 || c.Size != 13 {
		t.Fatalf("verify = %+v %v %v", e, c, err)
	}
	mutate := map[string]func(*InclusionBundle){
		"entry changed":     func(b *InclusionBundle) { b.Entry = strings.Replace(b.Entry, "alice", "alicf", 1) },
		"other entry":       func(b *InclusionBundle) { b.Entry = string(raws[5]) },
		"path changed":      func(b *InclusionBundle) { b.Hashes[0] = b.Hashes[1] },
		"size changed":      func(b *InclusionBundle) { b.TreeSize = 12 },
		"index changed":     func(b *InclusionBundle) { b.LeafIndex = 3 },
		"checkpoint forged": func(b *InclusionBundle) { b.Checkpoint = strings.Replace(b.Checkpoint, "\n13\n", "\n14\n", 1) },
	}
	for name, f := range mutate {
		bb, _ := ParseInclusionBundle(js)
		f(&bb)
		if _, _, err := bb.Verify(origin, note.VerifierList(v)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, _, err := back.Verify(origin, note.VerifierList(otherV)); !errors.Is(err, ErrUntrusted) {
		t.Errorf("untrusted key: %v", err)
	}
}

func TestKeyFiles(t *testing.T) {
	dir := t.TempDir()
	vkey, err := WriteKeyPair("o", dir+"/k", dir+"/k.pub")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := WriteKeyPair("o", dir+"/k", dir+"/k2.pub"); err == nil {
		t.Fatal("overwrote a signing key")
	}
	ss, err := LoadSigners(dir + "/k")
	if err != nil || len(ss) != 1 {
		t.Fatal(err)
	}
	vs, err := LoadVerifiers(dir + "/k.pub")
	if err != nil {
		t.Fatal(err)
	}
	msg, _ := Sign(Checkpoint{Origin: "o", Size: 1, Root: make([]byte, 32)}, ss...)
	if _, err := Open(msg, "o", vs); err != nil {
		t.Fatalf("key files do not pair (%s): %v", vkey, err)
	}
	if _, _, err := ParseVerifiers([]byte("# only a comment\n")); err == nil {
		t.Fatal("an empty key list was accepted")
	}
}

func FuzzParseCheckpoint(f *testing.F) {
	f.Add([]byte("o\n1\n" + base64.StdEncoding.EncodeToString(make([]byte, 32)) + "\n"))
	f.Add([]byte("o\n01\nAAAA\n"))
	f.Add([]byte("o\n1\n" + base64.StdEncoding.EncodeToString(make([]byte, 32)) + "\next\n\n— o AAAAAAAA\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := ParseCheckpoint(b)
		if err == nil {
			if c2, err := ParseCheckpoint(c.Marshal()); err != nil || c2.Size != c.Size || !bytes.Equal(c2.Root, c.Root) {
				t.Fatalf("re-parse of %q: %v", c.Marshal(), err)
			}
		}
		_, _ = ParseSigned(b)
		_, _ = Open(b, "", nil)
	})
}

func FuzzDecode(f *testing.F) {
	f.Add(entry(1).Canonical())
	f.Add([]byte(`{"seq":1}`))
	withTrace := entry(2)
	withTrace.TraceID = "t"
	withTrace.Reason = "a \"quoted\" <reason>\u2028é"
	f.Add(withTrace.Canonical())
	f.Add(Entry{Seq: 7}.Canonical())
	f.Fuzz(func(t *testing.T, b []byte) {
		e, err := Decode(b)
		if err == nil && !bytes.Equal(e.Canonical(), b) {
			t.Fatalf("decoded a non-canonical entry %q", b)
		}
		// The hand parser accepts only what the definition accepts, with
		// the same result.
		if seq, ok := fastCheck(b); ok && (err != nil || seq != e.Seq) {
			t.Fatalf("fast check accepted %q as entry %d; definition: %v", b, seq, err)
		}
		if fe, ok := fastDecode(b); ok {
			if err != nil || !bytes.Equal(fe.Canonical(), b) || fe.Seq != e.Seq || fe.Actor != e.Actor || len(fe.Details) != len(e.Details) {
				t.Fatalf("fast path accepted %q as %+v; definition: %+v, %v", b, fe, e, err)
			}
		}
	})
}

func FuzzParseInclusionBundle(f *testing.F) {
	m := NewMemTree()
	m.Append(LeafHash(entry(1).Canonical()))
	js, _ := json.Marshal(NewInclusionBundle(entry(1).Canonical(), 1, 1, nil, []byte("o\n1\nx\n\n— o AAAA\n")))
	f.Add(js)
	f.Add([]byte(`{"seq":1,"hashes":["AA=="]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		bb, err := ParseInclusionBundle(b)
		if err == nil {
			_, _, _ = bb.Verify("", nil)
		}
	})
}

func FuzzCanonical(f *testing.F) {
	f.Add(uint64(1), int64(1700000000), "spiffe://x/gpuaas/operator/a", "lease/l-1", "a <b> & \"c\"", "k", "v\u2028", "trace")
	f.Add(uint64(0), int64(-5), "", "", "", "", "", "")
	f.Add(uint64(1<<63), int64(1<<40), "é\x00", "\xff", "\\", "z", "y", "")
	f.Fuzz(func(t *testing.T, seq uint64, sec int64, actor, resource, reason, k, v, trace string) {
		e := Entry{Seq: seq, Time: time.Unix(sec%(1<<35), sec%1e9), Actor: actor, Resource: resource, Reason: reason,
			TraceID: trace, Details: map[string]string{k: v, "a": "b"}}
		want := e.canonicalJSON()
		if got := e.Canonical(); !bytes.Equal(got, want) {
			t.Fatalf("fast encoding\n%s\ndiffers from encoding/json\n%s", got, want)
		}
	})
}
