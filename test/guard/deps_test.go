package guard

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"slices"
	"sort"
	"strings"
	"testing"
)

// listedPackage is the part of `go list -json` the dependency guard reads.
type listedPackage struct {
	ImportPath   string
	Imports      []string
	TestImports  []string
	XTestImports []string
	Error        *struct{ Err string }
}

// inCI reports whether the tests run in CI (CI=true), where a guard must
// fail rather than skip. It mirrors test/harness.InCI without importing the
// harness (and so containerd) into the guards.
func inCI() bool {
	v := strings.ToLower(os.Getenv("CI"))
	return v == "true" || v == "1"
}

// goTool finds the go command: on PATH, else in Go's standard install
// location.
func goTool() (string, error) {
	if p, err := exec.LookPath("go"); err == nil {
		return p, nil
	}
	p := "/usr/local/go/bin/go"
	if _, err := os.Stat(p); err == nil {
		return p, nil
	}
	return "", errors.New("go command not found on PATH or in /usr/local/go/bin")
}

// goList runs `go list -e -deps -json ./...` at the root and indexes the
// module's packages by import path.
func goList(t *testing.T, root string) map[string]*listedPackage {
	t.Helper()
	goBin, err := goTool()
	if err != nil {
		if inCI() {
			t.Fatalf("%v: CI=true, so the dependency guard must run; put the go tool on PATH", err)
		}
		t.Skipf("%v: skipping the dependency guard (it never skips in CI)", err)
	}
	cmd := exec.Command(goBin, "list", "-e", "-deps", "-json=ImportPath,Imports,TestImports,XTestImports,Error", "./...")
	cmd.Dir = root
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list -deps -json ./... in %s: %v\n%s", root, err, stderr.String())
	}
	pkgs := map[string]*listedPackage{}
	dec := json.NewDecoder(bytes.NewReader(out))
	for {
		p := &listedPackage{}
		if err := dec.Decode(p); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatalf("decode go list output: %v", err)
		}
		if !inModule(p.ImportPath) {
			continue
		}
		if p.Error != nil {
			t.Fatalf("go list reports an error in %s: %s; fix the package so it builds", p.ImportPath, p.Error.Err)
		}
		pkgs[p.ImportPath] = p
	}
	if len(pkgs) == 0 {
		t.Fatalf("go list found no packages of %s in %s", module, root)
	}
	return pkgs
}

// inModule reports whether an import path belongs to this module.
func inModule(p string) bool { return p == module || strings.HasPrefix(p, module+"/") }

// rel is an import path of the module relative to the module root.
func rel(p string) string {
	if p == module {
		return ""
	}
	return strings.TrimPrefix(p, module+"/")
}

// depRule forbids packages under From (but not under NotFrom) to reach
// packages under one of Forbidden, directly or transitively. Exempt lists
// trees under Forbidden that are allowed after all. With Tests, the
// package's test files' imports (and everything they reach) count too.
// Module-relative paths; "" is the whole module.
type depRule struct {
	From      string
	NotFrom   string
	Forbidden []string
	Exempt    []string
	Tests     bool
	Why       string
}

// depRules is DESIGN.md's dependency rule, and the ones that keep test and
// generated code in their lanes.
var depRules = []depRule{
	{From: "agent", Forbidden: []string{"controlplane"}, Tests: true,
		Why: "agent and controlplane never import each other; move what both need to pkg/"},
	{From: "controlplane", Forbidden: []string{"agent"}, Tests: true,
		Why: "agent and controlplane never import each other; move what both need to pkg/"},
	{From: "pkg", Forbidden: []string{"agent", "controlplane"}, Tests: true,
		Why: "pkg/ is shared by both sides and imports neither; move the code into pkg/ or invert the dependency with an interface"},
	{From: "", NotFrom: "test", Forbidden: []string{"test"},
		Why: "product code never depends on test code; only _test.go files may use test/ helpers"},
	{From: "proto", Forbidden: []string{""}, Exempt: []string{"proto"}, Tests: true,
		Why: "proto/ packages are contracts: they import other proto packages and nothing else of the project"},
}

// anyUnder reports whether the module-relative path p is one of the trees.
// "" is the whole module.
func anyUnder(p string, trees []string) bool {
	for _, d := range trees {
		if d == "" || under(p, d) {
			return true
		}
	}
	return false
}

// dependencyViolations applies the rules to the package graph and returns
// one line per forbidden package a package reaches, with the import chain.
func dependencyViolations(pkgs map[string]*listedPackage, rules []depRule) []string {
	var out []string
	paths := make([]string, 0, len(pkgs))
	for p := range pkgs {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	for _, r := range rules {
		for _, p := range paths {
			if !anyUnder(rel(p), []string{r.From}) || (r.NotFrom != "" && under(rel(p), r.NotFrom)) {
				continue
			}
			seeds := slices.Clone(pkgs[p].Imports)
			if r.Tests {
				seeds = append(seeds, pkgs[p].TestImports...)
				seeds = append(seeds, pkgs[p].XTestImports...)
			}
			// Breadth first over the module's packages, remembering how each
			// was reached, so the message shows the chain to the offender.
			via := map[string]string{p: ""}
			queue := []string{}
			for _, s := range seeds {
				if inModule(s) && s != p {
					if _, seen := via[s]; !seen {
						via[s] = p
						queue = append(queue, s)
					}
				}
			}
			for len(queue) > 0 {
				q := queue[0]
				queue = queue[1:]
				rq := rel(q)
				if anyUnder(rq, r.Forbidden) && !anyUnder(rq, r.Exempt) {
					var chain []string
					first := q
					for c := q; c != ""; c = via[c] {
						chain = append(chain, rel(c))
						if via[c] == p {
							first = c
						}
					}
					slices.Reverse(chain)
					kind := "imports"
					if !slices.Contains(pkgs[p].Imports, first) {
						kind = "imports (from a _test.go file)"
					}
					out = append(out, rel(p)+" "+kind+" "+rq+": "+strings.Join(chain, " -> ")+" ("+r.Why+")")
					continue // do not look further through a forbidden package
				}
				if lp := pkgs[q]; lp != nil {
					for _, n := range lp.Imports {
						if _, seen := via[n]; !seen && inModule(n) {
							via[n] = q
							queue = append(queue, n)
						}
					}
				}
			}
		}
	}
	return out
}

func TestDependencyDirection(t *testing.T) {
	t.Parallel()
	root := repoRoot(t)
	pkgs := goList(t, root)
	for _, want := range []string{"agent", "controlplane", "pkg", "proto"} {
		found := false
		for p := range pkgs {
			found = found || under(rel(p), want)
		}
		if !found {
			t.Errorf("go list found no package under %s/; the dependency guard would check nothing there (has the tree moved? update depRules)", want)
		}
	}
	report(t, dependencyViolations(pkgs, depRules),
		"DESIGN.md: agent and controlplane never import each other; pkg/ imports neither (nor test/); only test code imports test/;\n"+
			"proto/ imports only proto/. Remove the import, or move the shared code into pkg/.")
}

// TestDependencyGuardCatchesViolations proves the rule engine fails on the
// graphs it must refuse, including transitive and test-only imports.
func TestDependencyGuardCatchesViolations(t *testing.T) {
	t.Parallel()
	m := func(s string) string { return module + "/" + s }
	pkgs := map[string]*listedPackage{
		m("agent/lease"):        {ImportPath: m("agent/lease"), Imports: []string{m("pkg/mig"), "fmt"}},
		m("agent/session"):      {ImportPath: m("agent/session"), Imports: []string{m("pkg/helper")}},
		m("agent/runtime"):      {ImportPath: m("agent/runtime"), TestImports: []string{m("test/harness")}},
		m("pkg/mig"):            {ImportPath: m("pkg/mig")},
		m("pkg/helper"):         {ImportPath: m("pkg/helper"), Imports: []string{m("controlplane/store")}},
		m("controlplane/api"):   {ImportPath: m("controlplane/api"), XTestImports: []string{m("agent/lease")}},
		m("controlplane/store"): {ImportPath: m("controlplane/store")},
		m("test/harness"):       {ImportPath: m("test/harness"), Imports: []string{m("controlplane/store")}},
		m("proto/x/v1"):         {ImportPath: m("proto/x/v1"), Imports: []string{m("proto/y/v1"), m("pkg/mig")}},
		m("proto/y/v1"):         {ImportPath: m("proto/y/v1")},
		m("pkg/identity"):       {ImportPath: m("pkg/identity"), Imports: []string{m("test/ociimage")}},
		m("test/ociimage"):      {ImportPath: m("test/ociimage")},
	}
	got := dependencyViolations(pkgs, depRules)
	want := []string{
		"agent/session imports controlplane/store: agent/session -> pkg/helper -> controlplane/store",
		"agent/runtime imports (from a _test.go file) controlplane/store: agent/runtime -> test/harness -> controlplane/store",
		"controlplane/api imports (from a _test.go file) agent/lease: controlplane/api -> agent/lease",
		"pkg/helper imports controlplane/store: pkg/helper -> controlplane/store",
		"proto/x/v1 imports pkg/mig: proto/x/v1 -> pkg/mig",
		"pkg/identity imports test/ociimage: pkg/identity -> test/ociimage",
	}
	for _, w := range want {
		if !slices.ContainsFunc(got, func(g string) bool { return strings.HasPrefix(g, w+" (") }) {
			t.Errorf("missing violation %q in:\n%s", w, strings.Join(got, "\n"))
		}
	}
	for _, g := range got {
		if strings.HasPrefix(g, "agent/lease ") || strings.HasPrefix(g, "agent/runtime imports (from a _test.go file) test/") {
			t.Errorf("false violation: %s", g)
		}
	}
	if len(got) != len(want) {
		t.Errorf("got %d violations, want %d:\n%s", len(got), len(want), strings.Join(got, "\n"))
	}
}
