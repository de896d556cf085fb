package nvml

import (
	"fmt"
	"strings"
	"testing"

	"github.com/gpuaas/gpuaas/agent/gpu/sim"
)

// procDevices is /proc/devices as a host with the NVIDIA driver shows it.
const procDevices = `Character devices:
  1 mem
  4 /dev/vc/0
  4 tty
  5 /dev/tty
 10 misc
195 nvidia-frontend
195 nvidia
226 drm
234 nvidia-nvswitch
237 nvidia-nvlink
506 nvidia-caps
508 nvidia-uvm

Block devices:
  7 loop
  8 sd
259 blkext
508 nvidia-uvm
`

func TestParseProcDevices(t *testing.T) {
	got, err := parseProcDevices(strings.NewReader(procDevices))
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]uint32{"nvidia-uvm": 508, "nvidia-caps": 506, "nvidia": 195, "tty": 4, "/dev/vc/0": 4} {
		if got[name] != want {
			t.Errorf("major of %s = %d, want %d", name, got[name], want)
		}
	}
	if _, ok := got["sd"]; ok {
		t.Error("a block device was read as a character device")
	}

	for name, in := range map[string]string{
		"major not a number":  "Character devices:\nx nvidia\n",
		"major out of range":  "Character devices:\n4096 nvidia\n",
		"negative major":      "Character devices:\n-1 nvidia\n",
		"three fields":        "Character devices:\n195 nvidia extra\n",
		"name missing":        "Character devices:\n195\n",
		"too large":           "Character devices:\n" + strings.Repeat("1 a\n", maxProcFileBytes/4+1),
		"huge number, signed": "Character devices:\n+195 nvidia\n",
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := parseProcDevices(strings.NewReader(in)); err == nil {
				t.Errorf("parsed %.60q without error", in)
			}
		})
	}

	t.Run("first major of a name wins", func(t *testing.T) {
		got, err := parseProcDevices(strings.NewReader("Character devices:\n180 usb\n189 usb\n"))
		if err != nil || got["usb"] != 180 {
			t.Errorf("got %v, %v; want usb 180", got, err)
		}
	})
	t.Run("block section is not validated", func(t *testing.T) {
		if _, err := parseProcDevices(strings.NewReader("Block devices:\nwhatever here is\n")); err != nil {
			t.Errorf("error %v for a malformed block line", err)
		}
	})
}

func TestParseMIGMinors(t *testing.T) {
	t.Run("the driver's whole table", func(t *testing.T) {
		// sim.MIGMinors renders the table as nv-caps.c numbers it; every
		// minor must come back as the documented formula gives it.
		got, err := parseMIGMinors(strings.NewReader(sim.MIGMinors()))
		if err != nil {
			t.Fatal(err)
		}
		if !got.HasConfig || got.Config != 1 || !got.HasMonitor || got.Monitor != 2 {
			t.Errorf("config %d (%t), monitor %d (%t); want 1 and 2", got.Config, got.HasConfig, got.Monitor, got.HasMonitor)
		}
		if want := sim.MaxGPUs * 15 * 9; len(got.Caps) != want {
			t.Errorf("%d capabilities, want %d", len(got.Caps), want)
		}
		for _, c := range []struct{ gpu, gi, ci int }{{0, 0, 0}, {0, 14, 7}, {3, 7, 0}, {31, 14, 7}} {
			if m := got.Caps[migCap{c.gpu, c.gi, -1}]; m != sim.GIAccessMinor(c.gpu, c.gi) {
				t.Errorf("gpu%d/gi%d/access = %d, want %d", c.gpu, c.gi, m, sim.GIAccessMinor(c.gpu, c.gi))
			}
			if m := got.Caps[migCap{c.gpu, c.gi, c.ci}]; m != sim.CIAccessMinor(c.gpu, c.gi, c.ci) {
				t.Errorf("gpu%d/gi%d/ci%d/access = %d, want %d", c.gpu, c.gi, c.ci, m, sim.CIAccessMinor(c.gpu, c.gi, c.ci))
			}
		}
	})

	t.Run("blank lines, spacing and unknown capabilities", func(t *testing.T) {
		in := "\nconfig 1\n  monitor   2  \nfabric-imex-mgmt 4096\ngpu0/gi1/access 12\ngpu0/gi1/ci0/access 13\ngpu0/gi1/other 99\n"
		got, err := parseMIGMinors(strings.NewReader(in))
		if err != nil {
			t.Fatal(err)
		}
		want := map[migCap]uint32{{0, 1, -1}: 12, {0, 1, 0}: 13}
		if fmt.Sprint(got.Caps) != fmt.Sprint(want) || got.Config != 1 || got.Monitor != 2 {
			t.Errorf("got %+v, want caps %v", got, want)
		}
	})

	for name, in := range map[string]string{
		"one field":            "config\n",
		"three fields":         "gpu0/gi0/access 3 4\n",
		"minor not a number":   "gpu0/gi0/access x\n",
		"negative minor":       "gpu0/gi0/access -3\n",
		"minor past 20 bits":   "gpu0/gi0/access 1048576\n",
		"gpu not a number":     "gpux/gi0/access 3\n",
		"gi prefix wrong":      "gpu0/g0/access 3\n",
		"ci prefix wrong":      "gpu0/gi0/c0/access 4\n",
		"gi index huge":        "gpu0/gi99999999/access 3\n",
		"duplicate capability": "gpu0/gi0/access 3\ngpu0/gi0/access 3\n",
		"duplicate config":     "config 1\nconfig 1\n",
		"duplicate monitor":    "monitor 2\nmonitor 2\n",
		"too large":            strings.Repeat("config 1\n", maxProcFileBytes/9+1),
		"overlong line":        "gpu0/gi0/access " + strings.Repeat("1", maxProcFileBytes) + "\n",
	} {
		t.Run(name, func(t *testing.T) {
			if got, err := parseMIGMinors(strings.NewReader(in)); err == nil {
				t.Errorf("parsed %.60q without error: %+v", in, got.Caps)
			}
		})
	}
}

// FuzzParseMIGMinors: any input gives a table or an error, never a panic,
// and every capability in a table is in range and renders back to a line
// that parses to itself.
func FuzzParseMIGMinors(f *testing.F) {
	f.Add(sim.MIGMinors()[:4000])
	f.Add("config 1\nmonitor 2\ngpu0/gi0/access 3\ngpu0/gi0/ci0/access 4\n")
	f.Add("gpu0/gi0/ci0/access 4\ngpu0/gi0/ci0/access 4\n")
	f.Add("gpu18446744073709551616/gi0/access 1\n")
	f.Fuzz(func(t *testing.T, in string) {
		got, err := parseMIGMinors(strings.NewReader(in))
		if err != nil {
			return
		}
		for c, minor := range got.Caps {
			if minor > maxMinor || c.GPU < 0 || c.GI < 0 || c.CI < -1 {
				t.Fatalf("%s = %d out of range", c, minor)
			}
			again, err := parseMIGMinors(strings.NewReader(fmt.Sprintf("%s %d\n", c, minor)))
			if err != nil || again.Caps[c] != minor || len(again.Caps) != 1 {
				t.Fatalf("%s %d does not round-trip: %+v, %v", c, minor, again.Caps, err)
			}
		}
	})
}

// FuzzParseProcDevices: any input gives majors or an error, never a panic,
// and every major is in range.
func FuzzParseProcDevices(f *testing.F) {
	f.Add(procDevices)
	f.Add("Character devices:\n195 nvidia\nBlock devices:\n")
	f.Add("Character devices:\n99999999999 x\n")
	f.Fuzz(func(t *testing.T, in string) {
		got, err := parseProcDevices(strings.NewReader(in))
		if err != nil {
			return
		}
		for name, major := range got {
			if major > maxMajor || name == "" {
				t.Fatalf("%q = %d out of range", name, major)
			}
		}
	})
}
