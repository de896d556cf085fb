package guard

import (
	"go/ast"
	"path"
	"strings"
	"testing"
)

// daemonTrees are the daemons' code; printCLIs print by design.
var (
	daemonTrees = []string{"agent", "controlplane"}
	printCLIs   = []string{"controlplane/cmd/gpuaasctl"}
)

// isCmdMain reports whether a file is a daemon's cmd/NAME/main.go, which
// may print its --version and a configuration error before the logger
// exists.
func isCmdMain(rel string) bool {
	dir, file := path.Split(rel)
	return file == "main.go" && path.Base(path.Dir(strings.TrimSuffix(dir, "/"))) == "cmd"
}

// printViolations returns one line per print call in the daemons' non-test,
// non-generated files: fmt.Print*, fmt.Fprint* to os.Stdout or os.Stderr,
// the standard log package's Print*, Fatal* and Panic*, and the print and
// println builtins. cmd/*/main.go may use fmt.Println and fmt.Fprintln.
func printViolations(fs []*srcFile) []string {
	var out []string
	for _, f := range fs {
		if f.Test || f.Generated || !anyUnder(f.Dir, daemonTrees) || anyUnder(f.Dir, printCLIs) {
			continue
		}
		imports := f.Imports()
		cmdMain := isCmdMain(f.Rel)
		ast.Inspect(f.File, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok {
				return true
			}
			if id, ok := call.Fun.(*ast.Ident); ok && (id.Name == "print" || id.Name == "println") {
				out = append(out, f.Pos(call.Pos())+": "+id.Name+"() writes to stderr unsanitized")
				return true
			}
			pkg, name, ok := calledFunc(call, imports)
			if !ok {
				return true
			}
			switch {
			case pkg == "fmt" && strings.HasPrefix(name, "Print"):
				if !(cmdMain && name == "Println") {
					out = append(out, f.Pos(call.Pos())+": fmt."+name+" prints to stdout")
				}
			case pkg == "fmt" && strings.HasPrefix(name, "Fprint") && len(call.Args) > 0 && isStdStream(call.Args[0], imports):
				if !(cmdMain && name == "Fprintln") {
					out = append(out, f.Pos(call.Pos())+": fmt."+name+" to a standard stream")
				}
			case pkg == "log" && (strings.HasPrefix(name, "Print") || strings.HasPrefix(name, "Fatal") || strings.HasPrefix(name, "Panic")):
				out = append(out, f.Pos(call.Pos())+": log."+name+" (the standard log package) bypasses the sanitizing slog handler")
			}
			return true
		})
	}
	return out
}

// isStdStream reports whether e is os.Stdout or os.Stderr.
func isStdStream(e ast.Expr, imports map[string]string) bool {
	sel, ok := e.(*ast.SelectorExpr)
	if !ok {
		return false
	}
	x, ok := sel.X.(*ast.Ident)
	return ok && imports[x.Name] == "os" && (sel.Sel.Name == "Stdout" || sel.Sel.Name == "Stderr")
}

func TestNoPrintInDaemons(t *testing.T) {
	t.Parallel()
	report(t, printViolations(sourceFiles(t)),
		"The daemons log only through log/slog with the sanitizing handler (pkg/sanitize; DESIGN.md contract 6),\n"+
			"so every line is structured and redacted. Use the component's *slog.Logger with fields instead:\n"+
			"  log.Info(\"lease started\", \"lease\", id)\n"+
			"Only cmd/NAME/main.go may fmt.Println its --version or fmt.Fprintln a configuration error before the logger exists;\n"+
			"gpuaasctl (a CLI) prints by design.")
}

// TestPrintGuardCatchesViolations proves the print guard sees every form
// and leaves the allowed ones alone.
func TestPrintGuardCatchesViolations(t *testing.T) {
	t.Parallel()
	fs := []*srcFile{
		parseSource(t, "agent/lease/bad.go", `package lease

import (
	"fmt"
	stdlog "log"
	"os"
	"strings"
)

func f(b *strings.Builder) {
	fmt.Printf("x")
	fmt.Fprintf(os.Stderr, "x")
	stdlog.Printf("x")
	stdlog.Fatal("x")
	println("x")
	fmt.Fprintf(b, "fine: a builder")
	_ = fmt.Sprintf("fine")
}
`),
		parseSource(t, "agent/cmd/gpuaas-agent/main.go", `package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Println("gpuaas-agent", "v1")
	fmt.Fprintln(os.Stderr, "gpuaas-agent:", "bad config")
	fmt.Printf("not allowed even here")
}
`),
		parseSource(t, "controlplane/cmd/gpuaasctl/main.go", "package main\n\nimport \"fmt\"\n\nfunc main() { fmt.Println(\"ok\") }\n"),
		parseSource(t, "controlplane/api/x_test.go", "package api\n\nimport \"fmt\"\n\nfunc f() { fmt.Println(\"tests may\") }\n"),
		parseSource(t, "pkg/mig/x.go", "package mig\n\nimport \"fmt\"\n\nfunc f() { fmt.Println(\"not a daemon tree\") }\n"),
	}
	got := printViolations(fs)
	want := []string{"agent/cmd/gpuaas-agent/main.go:11", "agent/lease/bad.go:11", "agent/lease/bad.go:12", "agent/lease/bad.go:13", "agent/lease/bad.go:14", "agent/lease/bad.go:15"}
	if len(got) != len(want) {
		t.Fatalf("violations = %q, want at %v", got, want)
	}
	for _, w := range want {
		found := false
		for _, g := range got {
			found = found || strings.HasPrefix(g, w+":")
		}
		if !found {
			t.Errorf("no violation at %s in %q", w, got)
		}
	}
}
