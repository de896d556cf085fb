package guard

import (
	"errors"
	"go/ast"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
)

// controlsDoc is the table of security controls and the tests that verify
// them.
const controlsDoc = "docs/security/controls.md"

// testRef is one backticked test name in the controls table: `TestFoo`,
// `FuzzBar`, `BenchmarkBaz`, optionally qualified by the package directory
// (`pkg/errs.TestFoo`, or the full import path) and followed by a subtest
// (`TestFoo/bad_input`).
var testRef = regexp.MustCompile("`(?:([A-Za-z0-9_./-]+)\\.)?((?:Test|Fuzz|Benchmark)[A-Za-z0-9_]*)(?:/[^`]*)?`")

// controlRef is a test named in one row of the table.
type controlRef struct {
	Line int
	Dir  string // module-relative directory, "" if unqualified
	Name string
	Raw  string
}

// controlRow is one data row of a table in the document.
type controlRow struct {
	Table int // which table of the document, from 1
	Line  int
	Text  string
	Refs  []controlRef
}

var tableSeparator = regexp.MustCompile(`^\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?$`)

// parseControls returns the data rows of every markdown table in doc (the
// rows after a header's |---| separator).
func parseControls(doc string) []controlRow {
	var rows []controlRow
	lines := strings.Split(doc, "\n")
	inTable, table := false, 0
	for i, l := range lines {
		l = strings.TrimSpace(l)
		if !strings.HasPrefix(l, "|") {
			inTable = false
			continue
		}
		if tableSeparator.MatchString(l) {
			inTable = true
			table++
			continue
		}
		if !inTable {
			continue // a header row
		}
		row := controlRow{Table: table, Line: i + 1, Text: l}
		for _, m := range testRef.FindAllStringSubmatch(l, -1) {
			dir := strings.TrimPrefix(strings.TrimPrefix(m[1], module), "/")
			row.Refs = append(row.Refs, controlRef{Line: i + 1, Dir: dir, Name: m[2], Raw: strings.Trim(m[0], "`")})
		}
		rows = append(rows, row)
	}
	return rows
}

// testFuncs indexes the top-level Test/Fuzz/Benchmark functions of every
// _test.go file by name, with the directories that declare them.
func testFuncs(fs []*srcFile) map[string][]string {
	out := map[string][]string{}
	for _, f := range fs {
		if !f.Test {
			continue
		}
		for _, d := range f.File.Decls {
			fd, ok := d.(*ast.FuncDecl)
			if !ok || fd.Recv != nil {
				continue
			}
			n := fd.Name.Name
			if strings.HasPrefix(n, "Test") || strings.HasPrefix(n, "Fuzz") || strings.HasPrefix(n, "Benchmark") {
				out[n] = append(out[n], f.Dir)
			}
		}
	}
	return out
}

// controlViolations checks that the document has table rows that name
// tests, that every row of a table that names tests names at least one (a
// table that names none, a glossary say, is left alone), and that each
// named test exists (in the named directory, if qualified).
func controlViolations(rows []controlRow, funcs map[string][]string) []string {
	var out []string
	if len(rows) == 0 {
		return []string{controlsDoc + ": no table rows found; list each control as `| control | ... | tests |` with the tests that verify it in backticks"}
	}
	tested, anyTested := map[int]bool{}, false
	for _, r := range rows {
		tested[r.Table] = tested[r.Table] || len(r.Refs) > 0
		anyTested = anyTested || len(r.Refs) > 0
	}
	if !anyTested {
		return []string{controlsDoc + ": no row names a test; name the tests that verify each control in backticks, e.g. `TestAgentMaySpeakOnlyForItsOwnNode`"}
	}
	for _, r := range rows {
		if len(r.Refs) == 0 && tested[r.Table] {
			out = append(out, controlsDoc+":"+strconv.Itoa(r.Line)+": the control names no test (`TestX`, `FuzzX`, or `pkg/dir.TestX`): "+r.Text)
		}
		for _, ref := range r.Refs {
			dirs := funcs[ref.Name]
			switch {
			case len(dirs) == 0:
				out = append(out, controlsDoc+":"+strconv.Itoa(ref.Line)+": `"+ref.Raw+"` names no function in any _test.go file of the repository; write the test or correct the name")
			case ref.Dir != "" && !contains(dirs, ref.Dir):
				out = append(out, controlsDoc+":"+strconv.Itoa(ref.Line)+": `"+ref.Raw+"`: "+ref.Name+" exists in "+strings.Join(dirs, ", ")+", not in "+ref.Dir+"/; correct the package")
			}
		}
	}
	return out
}

func contains(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}

func TestSecurityControlsAreTested(t *testing.T) {
	t.Parallel()
	root := repoRoot(t)
	raw, err := os.ReadFile(filepath.Join(root, filepath.FromSlash(controlsDoc)))
	if errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("%s does not exist. It is the list of the product's security controls, each with the tests that verify it:\n"+
			"  | Control | Threat | Verified by |\n  |---|---|---|\n  | an agent may speak only for its own node | spoofing | `TestAgentMaySpeakOnlyForItsOwnNode` |\n"+
			"Write it (docs/security/ is owned by the security lead); this guard then checks every named test exists.", controlsDoc)
	}
	if err != nil {
		t.Fatalf("read %s: %v", controlsDoc, err)
	}
	rows := parseControls(string(raw))
	funcs := testFuncs(sourceFiles(t))
	report(t, controlViolations(rows, funcs),
		"Every security control must be verified by a test that exists (STYLE.md, \"Guard rails are tests\").\n"+
			"Write the missing test, or fix the name in "+controlsDoc+"; a control that is not tested yet is not a control.")
	n := 0
	for _, r := range rows {
		n += len(r.Refs)
	}
	t.Logf("%s: %d controls, %d test references", controlsDoc, len(rows), n)
}

// TestControlsGuardCatchesViolations proves the parser reads the table and
// the guard reports missing tests, wrong packages and untested controls.
func TestControlsGuardCatchesViolations(t *testing.T) {
	t.Parallel()
	doc := "# Controls\n\nSome `TestNotInATable` prose.\n\n" +
		"| Control | Verified by |\n" +
		"|:--|---|\n" +
		"| mTLS | `TestA`, `pkg/errs.TestB` |\n" +
		"| canonical errors | `github.com/gpuaas/gpuaas/pkg/errs.TestB/sub case` and `FuzzC` |\n" +
		"| missing | `TestMissing` |\n" +
		"| wrong package | `agent/lease.TestA` |\n" +
		"| untested | none yet |\n" +
		"\n| Term | Meaning |\n| - | - |\n| SVID | an X.509 identity document |\n"
	rows := parseControls(doc)
	if len(rows) != 6 {
		t.Fatalf("rows = %d, want 6: %+v", len(rows), rows)
	}
	if r := rows[1].Refs; len(r) != 2 || r[0].Dir != "pkg/errs" || r[0].Name != "TestB" || r[1].Name != "FuzzC" {
		t.Fatalf("row 2 refs = %+v", r)
	}
	funcs := testFuncs([]*srcFile{
		parseSource(t, "controlplane/api/a_test.go", "package api\n\nfunc TestA(t *testing.T) {}\n\nfunc FuzzC(f *testing.F) {}\n"),
		parseSource(t, "pkg/errs/b_test.go", "package errs\n\nfunc TestB(t *testing.T) {}\n\nfunc (x) TestMissing() {}\n"),
		parseSource(t, "pkg/errs/c.go", "package errs\n\nfunc TestMissing() {}\n"),
	})
	got := controlViolations(rows, funcs)
	sort.Strings(got)
	want := []string{ // sorted as strings
		"docs/security/controls.md:10: `agent/lease.TestA`: TestA exists in controlplane/api, not in agent/lease/",
		"docs/security/controls.md:11: the control names no test",
		"docs/security/controls.md:9: `TestMissing` names no function",
	}
	if len(got) != len(want) {
		t.Fatalf("violations = %q, want %d", got, len(want))
	}
	for i := range want {
		if !strings.HasPrefix(got[i], want[i]) {
			t.Errorf("violation %d = %q, want prefix %q", i, got[i], want[i])
		}
	}
	if got := controlViolations(nil, funcs); len(got) != 1 {
		t.Errorf("an empty document passed: %q", got)
	}
}
