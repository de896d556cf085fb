package nvml

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// Limits on what the procfs parsers accept. The driver's mig-minors table
// is about 4,300 lines (110 KB) for 32 GPUs; /proc/devices is a few KB.
const (
	maxProcFileBytes = 1 << 20
	// maxMinor is the largest Linux minor number (20 bits).
	maxMinor = 1<<20 - 1
	// maxMajor is the largest Linux major number (12 bits).
	maxMajor = 1<<12 - 1
)

// migCap names one MIG access capability in
// /proc/driver/nvidia-caps/mig-minors: a GPU instance's (CI < 0) or a
// compute instance's. GPU is the GPU's minor number (/dev/nvidia<GPU>).
type migCap struct {
	GPU, GI, CI int
}

// String renders the capability as the driver names it.
func (c migCap) String() string {
	if c.CI < 0 {
		return fmt.Sprintf("gpu%d/gi%d/access", c.GPU, c.GI)
	}
	return fmt.Sprintf("gpu%d/gi%d/ci%d/access", c.GPU, c.GI, c.CI)
}

// migMinors is the parsed /proc/driver/nvidia-caps/mig-minors: the minor of
// /dev/nvidia-caps/nvidia-cap<minor> for each capability.
type migMinors struct {
	// Config and Monitor are the mig/config and mig/monitor capabilities;
	// HasConfig and HasMonitor say whether the file listed them.
	Config, Monitor       uint32
	HasConfig, HasMonitor bool
	Caps                  map[migCap]uint32
}

// parseMIGMinors parses the driver's mig-minors table: one capability per
// line, "NAME MINOR", where NAME is "config", "monitor",
// "gpu%d/gi%d/access" or "gpu%d/gi%d/ci%d/access". Lines naming other
// capabilities are skipped (a newer driver may add some); a malformed line
// of a known kind, a duplicate, a minor out of range or a file over 1 MiB is
// an error, never a panic.
func parseMIGMinors(r io.Reader) (migMinors, error) {
	out := migMinors{Caps: map[migCap]uint32{}}
	err := scanLines(r, func(n int, line string) error {
		fields := strings.Fields(line)
		if len(fields) == 0 {
			return nil
		}
		if len(fields) != 2 {
			return fmt.Errorf("line %d: want \"NAME MINOR\", got %q", n, line)
		}
		name := fields[0]
		known := name == "config" || name == "monitor" || strings.HasPrefix(name, "gpu")
		if !known {
			return nil
		}
		minor, err := parseNumber(fields[1], maxMinor)
		if err != nil {
			return fmt.Errorf("line %d: minor of %s: %w", n, name, err)
		}
		switch name {
		case "config":
			if out.HasConfig {
				return fmt.Errorf("line %d: config listed twice", n)
			}
			out.Config, out.HasConfig = minor, true
			return nil
		case "monitor":
			if out.HasMonitor {
				return fmt.Errorf("line %d: monitor listed twice", n)
			}
			out.Monitor, out.HasMonitor = minor, true
			return nil
		}
		c, ok, err := parseMIGCapName(name)
		if err != nil {
			return fmt.Errorf("line %d: %w", n, err)
		}
		if !ok {
			return nil
		}
		if _, dup := out.Caps[c]; dup {
			return fmt.Errorf("line %d: %s listed twice", n, c)
		}
		out.Caps[c] = minor
		return nil
	})
	if err != nil {
		return migMinors{}, fmt.Errorf("parse mig-minors: %w", err)
	}
	return out, nil
}

// parseMIGCapName parses "gpu%d/gi%d/access" or "gpu%d/gi%d/ci%d/access".
// ok is false for another gpu capability (not an access capability); err
// is set when a known shape carries a malformed number.
func parseMIGCapName(name string) (c migCap, ok bool, err error) {
	parts := strings.Split(name, "/")
	if parts[len(parts)-1] != "access" || (len(parts) != 3 && len(parts) != 4) {
		return migCap{}, false, nil
	}
	num := func(part, prefix string) (int, error) {
		s, found := strings.CutPrefix(part, prefix)
		if !found {
			return 0, fmt.Errorf("%q: %q does not start with %q", name, part, prefix)
		}
		n, err := parseNumber(s, maxCapIndex)
		return int(n), err
	}
	c.CI = -1
	if c.GPU, err = num(parts[0], "gpu"); err != nil {
		return migCap{}, false, err
	}
	if c.GI, err = num(parts[1], "gi"); err != nil {
		return migCap{}, false, err
	}
	if len(parts) == 4 {
		if c.CI, err = num(parts[2], "ci"); err != nil {
			return migCap{}, false, err
		}
	}
	return c, true, nil
}

// maxCapIndex bounds the gpu, gi and ci numbers of a capability name, far
// above what the driver uses (32 GPUs, 15 GIs, 8 CIs), so ids stay small
// ints.
const maxCapIndex = 1 << 16

// parseProcDevices parses /proc/devices and returns the character devices'
// majors by driver name. When a name is registered twice the first major
// wins, as the kernel lists majors in ascending order. Block devices are
// ignored. A malformed character device line or a file over 1 MiB is an
// error.
func parseProcDevices(r io.Reader) (map[string]uint32, error) {
	out := map[string]uint32{}
	section := ""
	err := scanLines(r, func(n int, line string) error {
		t := strings.TrimSpace(line)
		switch {
		case t == "":
			return nil
		case strings.HasSuffix(t, ":") && !strings.ContainsAny(t[:len(t)-1], "0123456789"):
			section = t
			return nil
		case section != "Character devices:":
			return nil
		}
		fields := strings.Fields(t)
		if len(fields) != 2 {
			return fmt.Errorf("line %d: want \"MAJOR NAME\", got %q", n, line)
		}
		major, err := parseNumber(fields[0], maxMajor)
		if err != nil {
			return fmt.Errorf("line %d: major of %s: %w", n, fields[1], err)
		}
		if _, seen := out[fields[1]]; !seen {
			out[fields[1]] = major
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("parse /proc/devices: %w", err)
	}
	return out, nil
}

// scanLines calls fn for each line of r (numbered from 1), reading at most
// maxProcFileBytes.
func scanLines(r io.Reader, fn func(n int, line string) error) error {
	data, err := io.ReadAll(io.LimitReader(r, maxProcFileBytes+1))
	if err != nil {
		return err
	}
	if len(data) > maxProcFileBytes {
		return fmt.Errorf("more than %d bytes", maxProcFileBytes)
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 4096), maxProcFileBytes)
	for n := 1; sc.Scan(); n++ {
		if err := fn(n, sc.Text()); err != nil {
			return err
		}
	}
	return sc.Err()
}

// parseNumber parses a plain decimal number (digits only, no sign) no
// larger than limit.
func parseNumber(s string, limit uint64) (uint32, error) {
	if s == "" || len(s) > 10 || strings.TrimLeft(s, "0123456789") != "" {
		return 0, fmt.Errorf("%q is not a decimal number", s)
	}
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil || v > limit {
		return 0, fmt.Errorf("%q is out of range (at most %d)", s, limit)
	}
	return uint32(v), nil
}
