package runtime

import (
	"bufio"
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// memoryCgroup says where the host's memory controller is: a cgroup v2
// tree whose root enables it (a pure v2 host), else a v1 hierarchy with
// the memory controller (a hybrid or v1 host), found in mountinfo.
type memoryCgroup struct {
	root string // mount point; "" when the host has no memory controller
	v2   bool
}

func detectMemoryCgroup(v2Root string) memoryCgroup {
	if v2Root != "" {
		if b, err := os.ReadFile(filepath.Join(v2Root, "cgroup.controllers")); err == nil &&
			slices.Contains(strings.Fields(string(b)), "memory") {
			return memoryCgroup{root: v2Root, v2: true}
		}
	}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return memoryCgroup{}
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// ID parent major:minor root mountpoint opts [optional...] - fstype source superopts
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		pf, qf := strings.Fields(pre), strings.Fields(post)
		if len(pf) < 5 || len(qf) < 3 || qf[0] != "cgroup" {
			continue
		}
		if slices.Contains(strings.Split(qf[2], ","), "memory") {
			return memoryCgroup{root: unescapeOctal(pf[4])}
		}
	}
	return memoryCgroup{}
}

// oomKills returns how many processes the kernel's OOM killer has killed
// in the cgroup rel (a cgroupsPath such as /<namespace>/<id>): the
// oom_kill counter of cgroup v2 memory.events or v1 memory.oom_control
// (kernel 4.13 and later). ok is false when it cannot tell (no memory
// controller, the cgroup is gone).
func (m memoryCgroup) oomKills(rel string) (n uint64, ok bool) {
	if m.root == "" || !filepath.IsAbs(rel) {
		return 0, false
	}
	file := "memory.oom_control"
	if m.v2 {
		file = "memory.events"
	}
	b, err := os.ReadFile(filepath.Join(m.root, rel, file))
	if err != nil {
		return 0, false
	}
	return parseOOMKill(b)
}

// parseOOMKill reads the "oom_kill N" line of a memory.events or
// memory.oom_control file.
func parseOOMKill(b []byte) (uint64, bool) {
	for line := range bytes.Lines(b) {
		k, v, ok := strings.Cut(strings.TrimSpace(string(line)), " ")
		if !ok || k != "oom_kill" {
			continue
		}
		n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
		if err != nil {
			return 0, false
		}
		return n, true
	}
	return 0, false
}

// unescapeOctal undoes mountinfo's \NNN escapes.
func unescapeOctal(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
