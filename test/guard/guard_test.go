// Package guard holds the project's guard rails as tests, in the manner of
// Tailscale's and Nomad's: the dependency direction between agent,
// controlplane, pkg, proto and test; a doc comment on every package; every
// RPC in the authorization table; every control in docs/security/controls.md
// verified by a test that exists; no printing from the daemons; no gRPC
// status made outside pkg/errs.
//
// The guards read the source (go/parser, go list), never run the product,
// need no root and take well under a second each. Each failure says what is
// wrong and how to fix it. The package has no non-test code and must never
// be imported.
package guard

import (
	"bufio"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// module is the project's module path.
const module = "github.com/gpuaas/gpuaas"

// srcFile is one parsed Go file of the module.
type srcFile struct {
	Rel       string // slash-separated path from the repository root, e.g. "agent/lease/lease.go"
	Dir       string // slash-separated directory from the root, "" for the root
	Test      bool   // a _test.go file
	Generated bool   // carries a "Code generated ... DO NOT EDIT." comment
	File      *ast.File
	Fset      *token.FileSet
}

// Pos renders a position in f as "path:line".
func (f *srcFile) Pos(p token.Pos) string {
	return f.Rel + ":" + strconv.Itoa(f.Fset.Position(p).Line)
}

// ImportPath is the import path of the file's directory.
func (f *srcFile) ImportPath() string {
	if f.Dir == "" {
		return module
	}
	return module + "/" + f.Dir
}

// Imports maps the names a file uses for its imports to their paths. A
// blank or dot import is left out; an unnamed import is keyed by the last
// element of its path (good enough for the packages the guards look for,
// whose names match their last element).
func (f *srcFile) Imports() map[string]string {
	m := map[string]string{}
	for _, imp := range f.File.Imports {
		p, err := strconv.Unquote(imp.Path.Value)
		if err != nil {
			continue
		}
		name := path.Base(p)
		if imp.Name != nil {
			name = imp.Name.Name
		}
		if name == "_" || name == "." {
			continue
		}
		m[name] = p
	}
	return m
}

var (
	rootOnce sync.Once
	rootDir  string
	rootErr  error

	filesOnce sync.Once
	files     []*srcFile
	filesErr  error
)

// repoRoot is the directory of the module's go.mod, found by walking up
// from the test's working directory.
func repoRoot(t testing.TB) string {
	t.Helper()
	rootOnce.Do(func() {
		dir, err := os.Getwd()
		if err != nil {
			rootErr = err
			return
		}
		for {
			if modulePathOf(filepath.Join(dir, "go.mod")) == module {
				rootDir = dir
				return
			}
			parent := filepath.Dir(dir)
			if parent == dir {
				rootErr = os.ErrNotExist
				return
			}
			dir = parent
		}
	})
	if rootErr != nil {
		t.Fatalf("cannot find the go.mod of %s above the working directory: %v; run the guards with go test from inside the repository", module, rootErr)
	}
	return rootDir
}

// modulePathOf returns the module path declared by a go.mod file, or "".
func modulePathOf(gomod string) string {
	f, err := os.Open(gomod)
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "module "); ok {
			return strings.Trim(strings.TrimSpace(rest), `"`)
		}
	}
	return ""
}

// skipDir reports whether a directory under the root holds no code of this
// module: hidden and underscore directories, testdata, vendor, and nested
// modules (tools/ has its own go.mod).
func skipDir(root, dir, name string) bool {
	if dir == root {
		return false
	}
	if strings.HasPrefix(name, ".") || strings.HasPrefix(name, "_") || name == "testdata" || name == "vendor" || name == "node_modules" {
		return true
	}
	_, err := os.Stat(filepath.Join(dir, "go.mod"))
	return err == nil
}

// sourceFiles parses every Go file of the module once, with comments.
func sourceFiles(t testing.TB) []*srcFile {
	t.Helper()
	root := repoRoot(t)
	filesOnce.Do(func() {
		filesErr = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if d.IsDir() {
				if skipDir(root, p, d.Name()) {
					return filepath.SkipDir
				}
				return nil
			}
			if !strings.HasSuffix(p, ".go") || !d.Type().IsRegular() {
				return nil
			}
			rel, err := filepath.Rel(root, p)
			if err != nil {
				return err
			}
			rel = filepath.ToSlash(rel)
			fset := token.NewFileSet()
			f, err := parser.ParseFile(fset, p, nil, parser.ParseComments|parser.SkipObjectResolution)
			if err != nil {
				return err
			}
			dir := path.Dir(rel)
			if dir == "." {
				dir = ""
			}
			files = append(files, &srcFile{Rel: rel, Dir: dir, Test: strings.HasSuffix(rel, "_test.go"),
				Generated: ast.IsGenerated(f), File: f, Fset: fset})
			return nil
		})
		sort.Slice(files, func(i, j int) bool { return files[i].Rel < files[j].Rel })
	})
	if filesErr != nil {
		t.Fatalf("parse the module's Go files: %v; the guards need every file to parse (go build would fail too)", filesErr)
	}
	if len(files) == 0 {
		t.Fatalf("no Go files found under %s; the guards would check nothing", root)
	}
	return files
}

// under reports whether a slash path (relative to the root) is dir or
// inside it.
func under(rel, dir string) bool {
	return rel == dir || strings.HasPrefix(rel, dir+"/")
}

// calledFunc returns the package path and name of a call of the form
// pkg.Name(...), resolving pkg through the file's imports.
func calledFunc(call *ast.CallExpr, imports map[string]string) (pkgPath, name string, ok bool) {
	sel, isSel := call.Fun.(*ast.SelectorExpr)
	if !isSel {
		return "", "", false
	}
	id, isID := sel.X.(*ast.Ident)
	if !isID {
		return "", "", false
	}
	p, known := imports[id.Name]
	if !known {
		return "", "", false
	}
	return p, sel.Sel.Name, true
}

// report fails t with one line per violation, sorted, under a heading that
// says how to fix them.
func report(t *testing.T, violations []string, howToFix string) {
	t.Helper()
	if len(violations) == 0 {
		return
	}
	sort.Strings(violations)
	t.Errorf("%d violation(s):\n  %s\n\n%s", len(violations), strings.Join(violations, "\n  "), howToFix)
}

// parseSource parses a Go source text for the guards' self-tests.
func parseSource(t *testing.T, rel, src string) *srcFile {
	t.Helper()
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, rel, src, parser.ParseComments|parser.SkipObjectResolution)
	if err != nil {
		t.Fatalf("parse fixture %s: %v", rel, err)
	}
	dir := path.Dir(rel)
	if dir == "." {
		dir = ""
	}
	return &srcFile{Rel: rel, Dir: dir, Test: strings.HasSuffix(rel, "_test.go"), Generated: ast.IsGenerated(f), File: f, Fset: fset}
}
