package guard

import (
	"fmt"
	"go/ast"
	"go/token"
	"sort"
	"strconv"
	"strings"
	"testing"

	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/descriptorpb"

	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	auditv1 "github.com/gpuaas/gpuaas/proto/gpuaas/audit/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

// protoFiles are the project's generated contracts. A new proto package
// must be added here; TestEveryRPCIsAuthorized fails until it is.
var protoFiles = []protoreflect.FileDescriptor{
	agentv1.File_gpuaas_agent_v1_agent_proto,
	leasev1.File_gpuaas_lease_v1_lease_proto,
	nodev1.File_gpuaas_node_v1_node_proto,
	auditv1.File_gpuaas_audit_v1_audit_proto,
	auditv1.File_gpuaas_audit_v1_options_proto,
}

// externalServices are declared in proto/ but served by someone other than
// the control plane, whose server authorizes its peers itself.
var externalServices = map[string]string{
	"gpuaas.audit.v1.AuditSinkService": "served by the upstream audit sink (controlplane/audit/sink, gpuaasctl audit sink), which admits only allowlisted control plane IDs",
}

const (
	// authzDir holds the control plane's authorization table.
	authzDir = "controlplane/api"
	// authzTable is the table's variable: map[string]Role, full method
	// name to the role that may call it.
	authzTable = "methodRoles"
)

// servedMethods returns every RPC of the descriptors as "/pkg.Service/Method".
func servedMethods(fds []protoreflect.FileDescriptor) map[string]bool {
	out := map[string]bool{}
	for _, fd := range fds {
		svcs := fd.Services()
		for i := 0; i < svcs.Len(); i++ {
			sd := svcs.Get(i)
			if _, ok := externalServices[string(sd.FullName())]; ok {
				continue
			}
			ms := sd.Methods()
			for j := 0; j < ms.Len(); j++ {
				out["/"+string(sd.FullName())+"/"+string(ms.Get(j).Name())] = true
			}
		}
	}
	return out
}

// stringConsts indexes the string constants declared at the top level of
// the non-test files, as "import/path.Name" -> value (the generated
// *_FullMethodName constants among them).
func stringConsts(fs []*srcFile) map[string]string {
	out := map[string]string{}
	for _, f := range fs {
		if f.Test {
			continue
		}
		for _, d := range f.File.Decls {
			gd, ok := d.(*ast.GenDecl)
			if !ok || gd.Tok != token.CONST {
				continue
			}
			for _, spec := range gd.Specs {
				vs := spec.(*ast.ValueSpec)
				for i, n := range vs.Names {
					if i >= len(vs.Values) {
						break
					}
					if lit, ok := vs.Values[i].(*ast.BasicLit); ok && lit.Kind == token.STRING {
						if v, err := strconv.Unquote(lit.Value); err == nil {
							out[f.ImportPath()+"."+n.Name] = v
						}
					}
				}
			}
		}
	}
	return out
}

// tableEntry is one key of the authorization table.
type tableEntry struct {
	Method string
	Pos    string
}

// authorizationTable finds `var methodRoles = map[...]...{...}` in the
// non-test files of dir and returns its keys. A key may be a string
// literal or a string constant (a generated XService_Y_FullMethodName or a
// local one).
func authorizationTable(fs []*srcFile, dir, name string) ([]tableEntry, error) {
	consts := stringConsts(fs)
	var lit *ast.CompositeLit
	var in *srcFile
	for _, f := range fs {
		if f.Test || f.Dir != dir {
			continue
		}
		ast.Inspect(f.File, func(n ast.Node) bool {
			vs, ok := n.(*ast.ValueSpec)
			if !ok {
				return true
			}
			for i, id := range vs.Names {
				if id.Name == name && i < len(vs.Values) {
					if cl, ok := vs.Values[i].(*ast.CompositeLit); ok {
						lit, in = cl, f
					}
				}
			}
			return true
		})
	}
	if lit == nil {
		return nil, fmt.Errorf("no `var %s = map[string]Role{...}` literal in the non-test files of %s/", name, dir)
	}
	imports := in.Imports()
	var out []tableEntry
	for _, elt := range lit.Elts {
		kv, ok := elt.(*ast.KeyValueExpr)
		if !ok {
			return nil, fmt.Errorf("%s: %s is not a key: value map literal", in.Pos(elt.Pos()), name)
		}
		var method string
		var found bool
		switch k := kv.Key.(type) {
		case *ast.BasicLit:
			if k.Kind == token.STRING {
				v, err := strconv.Unquote(k.Value)
				method, found = v, err == nil
			}
		case *ast.Ident:
			method, found = consts[in.ImportPath()+"."+k.Name]
		case *ast.SelectorExpr:
			if x, ok := k.X.(*ast.Ident); ok {
				method, found = consts[imports[x.Name]+"."+k.Sel.Name]
			}
		}
		if !found {
			return nil, fmt.Errorf("%s: a key of %s is neither a string literal nor a string constant of the module; the guard cannot read it (use \"/pkg.Service/Method\" or the generated XService_Y_FullMethodName)", in.Pos(kv.Key.Pos()), name)
		}
		out = append(out, tableEntry{Method: method, Pos: in.Pos(kv.Key.Pos())})
	}
	return out, nil
}

// rpcViolations compares the served methods with the table, both ways.
func rpcViolations(served map[string]bool, table []tableEntry) []string {
	var out []string
	inTable := map[string]bool{}
	for _, e := range table {
		inTable[e.Method] = true
		if !served[e.Method] {
			out = append(out, e.Pos+": "+authzTable+" authorizes "+e.Method+", which no proto service declares (a renamed or removed RPC, or a typo): remove or correct the entry")
		}
	}
	for m := range served {
		if !inTable[m] {
			out = append(out, m+" is declared in proto/ but missing from "+authzDir+"."+authzTable+": every call to it is denied (deny by default); add it with the one role that may call it")
		}
	}
	return out
}

func TestEveryRPCIsAuthorized(t *testing.T) {
	t.Parallel()
	fs := sourceFiles(t)

	// Every generated proto package must be in protoFiles, or its RPCs
	// would escape this guard.
	listed := map[string]bool{}
	for _, fd := range protoFiles {
		gp := fd.Options().(*descriptorpb.FileOptions).GetGoPackage()
		gp, _, _ = strings.Cut(gp, ";")
		listed[gp] = true
	}
	var missing []string
	seen := map[string]bool{}
	for _, f := range fs {
		if under(f.Dir, "proto") && strings.HasSuffix(f.Rel, ".pb.go") && !seen[f.Dir] {
			seen[f.Dir] = true
			if !listed[f.ImportPath()] {
				missing = append(missing, f.ImportPath())
			}
		}
	}
	sort.Strings(missing)
	for _, m := range missing {
		t.Errorf("generated proto package %s is not in test/guard/rpc_test.go's protoFiles; import it there and add its File_..._proto descriptor so its RPCs are checked against the authorization table", m)
	}

	served := servedMethods(protoFiles)
	if len(served) == 0 {
		t.Fatal("the proto descriptors declare no RPC at all; the guard would check nothing")
	}
	table, err := authorizationTable(fs, authzDir, authzTable)
	if err != nil {
		t.Fatalf("read the authorization table: %v\nThe guard parses %s/*.go for the table; if it moved or was renamed, update authzDir/authzTable in test/guard/rpc_test.go", err, authzDir)
	}
	report(t, rpcViolations(served, table),
		"Every RPC the proto contracts declare must be in the control plane's authorization table, and every\n"+
			"table entry must name a real RPC (DESIGN.md contract 3: every RPC authorizes the peer).")
}

// TestRPCGuardCatchesViolations proves the guard reads the table's keys in
// each supported form and reports both directions.
func TestRPCGuardCatchesViolations(t *testing.T) {
	t.Parallel()
	fs := []*srcFile{
		parseSource(t, "proto/x/v1/x_grpc.pb.go", "// Code generated by protoc-gen-go-grpc. DO NOT EDIT.\n\npackage xv1\n\nconst (\n\tXService_A_FullMethodName = \"/x.v1.XService/A\"\n)\n"),
		parseSource(t, "controlplane/api/authz.go", `// Package api is a fixture.
package api

import xv1 "github.com/gpuaas/gpuaas/proto/x/v1"

const localB = "/x.v1.XService/B"

var methodRoles = map[string]Role{
	xv1.XService_A_FullMethodName: RoleAgent,
	localB:                        RoleOperator,
	"/x.v1.XService/Gone":         RoleOperator,
}
`),
	}
	table, err := authorizationTable(fs, "controlplane/api", "methodRoles")
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, e := range table {
		keys = append(keys, e.Method)
	}
	if strings.Join(keys, " ") != "/x.v1.XService/A /x.v1.XService/B /x.v1.XService/Gone" {
		t.Fatalf("table keys = %v", keys)
	}
	got := rpcViolations(map[string]bool{"/x.v1.XService/A": true, "/x.v1.XService/B": true, "/x.v1.XService/C": true}, table)
	sort.Strings(got)
	if len(got) != 2 || !strings.HasPrefix(got[0], "/x.v1.XService/C is declared") || !strings.Contains(got[1], "authorizes /x.v1.XService/Gone") {
		t.Fatalf("violations = %q", got)
	}

	bad := []*srcFile{parseSource(t, "controlplane/api/authz.go", "package api\n\nvar methodRoles = map[string]Role{prefix + \"/A\": RoleAgent}\n")}
	if _, err := authorizationTable(bad, "controlplane/api", "methodRoles"); err == nil {
		t.Fatal("a computed key was accepted; the guard must refuse what it cannot read")
	}
	if _, err := authorizationTable(nil, "controlplane/api", "methodRoles"); err == nil {
		t.Fatal("a missing table was accepted")
	}
}
