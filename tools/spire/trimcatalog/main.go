// Command trimcatalog shortens, in a writable copy of SPIRE's source, the
// catalogs of spire-server's and spire-agent's built-in plugins to the ones
// the gpuaas tests configure (test/spire), leaving out the cloud,
// Kubernetes, Vault, Docker and TPM plugins and their SDKs. The plugins
// kept are the pinned release's source unchanged; only the catalogs' lists
// of built-ins are shorter.
//
//	trimcatalog DIR
//
// rewrites DIR/pkg/{server,agent}/catalog/*.go. It fails, changing
// nothing, if a catalog no longer looks as it did (a SPIRE upgrade that
// moved things) or if a plugin the tests need is missing.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
)

// keep names the built-ins the tests configure (test/spire), per side,
// as plugin kind/name (the directory under pkg/<side>/plugin).
var keep = map[string]map[string]bool{
	"server": {"nodeattestor/jointoken": true, "keymanager/memory": true, "keymanager/disk": true, "credentialcomposer/uniqueid": true},
	"agent":  {"nodeattestor/jointoken": true, "keymanager/memory": true, "keymanager/disk": true, "workloadattestor/unix": true},
}

// need is what the test configuration cannot run without.
var need = map[string][]string{
	"server": {"nodeattestor/jointoken", "keymanager/memory"},
	"agent":  {"nodeattestor/jointoken", "keymanager/memory", "workloadattestor/unix"},
}

var (
	importRE  = regexp.MustCompile(`^\t(?:(\w+) )?"github\.com/spiffe/spire/pkg/(?:server|agent)/plugin/(\w+/(\w+))"$`)
	builtInRE = regexp.MustCompile(`^\t\t(\w+)\.BuiltIn\(\),$`)
	oneLineRE = regexp.MustCompile(`^\treturn \[\]catalog\.BuiltIn\{(\w+)\.BuiltIn\(\)\}$`)
)

func main() {
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: trimcatalog SPIRE-SOURCE-DIR")
		os.Exit(2)
	}
	if err := run(flag.Arg(0)); err != nil {
		fmt.Fprintln(os.Stderr, "trimcatalog:", err)
		os.Exit(1)
	}
}

func run(spire string) error {
	trimmed := map[string]string{}
	for _, side := range []string{"server", "agent"} {
		files, err := filepath.Glob(filepath.Join(spire, "pkg", side, "catalog", "*.go"))
		if err != nil {
			return err
		}
		kept := map[string]bool{}
		for _, f := range files {
			base := filepath.Base(f)
			if base == "catalog.go" || strings.HasSuffix(base, "_test.go") {
				continue
			}
			src, names, err := trim(f, keep[side])
			if err != nil {
				return err
			}
			for _, n := range names {
				kept[n] = true
			}
			trimmed[f] = src
		}
		for _, n := range need[side] {
			if !kept[n] {
				return fmt.Errorf("%s catalog: built-in %s not found (has SPIRE's layout changed?)", side, n)
			}
		}
	}
	for f, src := range trimmed {
		if err := os.WriteFile(f, []byte(src), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// trim returns file f without the imports and BuiltIn() entries of the
// plugins not in keep, and the kind/names of the built-ins it kept. Every
// plugin import must be matched by a BuiltIn() entry and back.
func trim(f string, keep map[string]bool) (string, []string, error) {
	src, err := os.ReadFile(f)
	if err != nil {
		return "", nil, err
	}
	var b strings.Builder
	plugin := map[string]string{} // import name -> kind/name
	listed := map[string]bool{}
	var kept []string
	// entry reports whether the BuiltIn() entry of the package imported
	// as name stays.
	entry := func(name string) (bool, error) {
		p, ok := plugin[name]
		if !ok {
			return false, fmt.Errorf("%s: built-in %s listed but its import not recognized", f, name)
		}
		listed[name] = true
		if keep[p] {
			kept = append(kept, p)
		}
		return keep[p], nil
	}
	sc := bufio.NewScanner(strings.NewReader(string(src)))
	for sc.Scan() {
		line := sc.Text()
		if m := importRE.FindStringSubmatch(line); m != nil {
			name := m[1]
			if name == "" {
				name = m[3]
			}
			plugin[name] = m[2]
			if !keep[m[2]] {
				continue
			}
		}
		if m := builtInRE.FindStringSubmatch(line); m != nil {
			ok, err := entry(m[1])
			if err != nil {
				return "", nil, err
			}
			if !ok {
				continue
			}
		}
		if m := oneLineRE.FindStringSubmatch(line); m != nil {
			ok, err := entry(m[1])
			if err != nil {
				return "", nil, err
			}
			if !ok {
				line = "\treturn nil"
			}
		}
		b.WriteString(line)
		b.WriteByte('\n')
	}
	for name, p := range plugin {
		if !listed[name] {
			return "", nil, fmt.Errorf("%s: plugin %s imported but its BuiltIn() entry not recognized", f, p)
		}
	}
	return b.String(), kept, nil
}
