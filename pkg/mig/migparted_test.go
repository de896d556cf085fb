package mig_test

import (
	"errors"
	"maps"
	"strings"
	"testing"

	"github.com/gpuaas/gpuaas/pkg/mig"
)

// sampleConfig is written in the format of mig-parted's shipped configs:
// shared named configs with one entry per GPU model, selected by
// device-filter, and a per-index custom config.
const sampleConfig = `version: v1
mig-configs:
  all-disabled:
    - devices: all
      mig-enabled: false

  all-enabled:
    - devices: all
      mig-enabled: true
      mig-devices: {}

  all-1g.18gb:
    - devices: all
      mig-enabled: true
      mig-devices:
        "1g.18gb": 7

  all-balanced:
    # H200 141GB, H200 NVL
    - device-filter: ["0x233510DE", "0x233B10DE"]
      devices: all
      mig-enabled: true
      mig-devices:
        "1g.18gb": 2
        "2g.35gb": 1
        "3g.71gb": 1
    # H100 80GB
    - device-filter: "0x233010DE"
      devices: all
      mig-enabled: true
      mig-devices:
        "1g.10gb": 2
        "2g.20gb": 1
        "3g.40gb": 1

  custom:
    - devices: [0, 1]
      mig-enabled: false
    - devices: [2]
      mig-enabled: true
      mig-devices:
        "1g.18gb+me": 1
        "1g.18gb": 6
    - devices:
        - 3
      mig-enabled: true
      mig-devices:
        "3c.3g.71gb": 1
        "4g.71gb": 1
`

// host is n H200s at indices 0..n-1.
func host(n int) []mig.DeviceInfo {
	out := make([]mig.DeviceInfo, n)
	for i := range out {
		out[i] = mig.DeviceInfo{Index: i, PCIDeviceID: 0x233510DE}
	}
	return out
}

func TestParseMigParted_Sample(t *testing.T) {
	cfg, err := mig.ParseMigParted([]byte(sampleConfig))
	if err != nil {
		t.Fatalf("ParseMigParted: %v", err)
	}
	if got := strings.Join(cfg.Names(), ","); got != "all-disabled,all-enabled,all-1g.18gb,all-balanced,custom" {
		t.Errorf("Names = %s", got)
	}
	bal, ok := cfg.Config("all-balanced")
	if !ok || len(bal.Entries) != 2 {
		t.Fatalf("all-balanced = %+v", bal)
	}
	e := bal.Entries[0]
	if !e.AllDevices || !e.MIGEnabled || len(e.DeviceFilter) != 2 || e.DeviceFilter[0].ID != 0x233510DE ||
		len(e.MIGDevices) != 3 || e.MIGDevices[2] != (mig.ProfileCount{Name: "3g.71gb", Count: 1, Line: 26}) {
		t.Errorf("first all-balanced entry = %+v", e)
	}
	if e.Line != 20 || e.MIGDevicesLine != 23 || bal.Entries[1].DeviceFilter[0].Line != 28 {
		t.Errorf("lines: entry %d, mig-devices %d, second filter %d; want 20, 23, 28", e.Line, e.MIGDevicesLine, bal.Entries[1].DeviceFilter[0].Line)
	}
}

func TestMigPartedLayout(t *testing.T) {
	cfg, err := mig.ParseMigParted([]byte(sampleConfig))
	if err != nil {
		t.Fatal(err)
	}
	h100, _ := mig.ModelByName("NVIDIA H100 80GB HBM3")
	balancedH200 := []mig.Instance{in(mig.Profile2g, 0, 2), in(mig.Profile1g, 2, 1), in(mig.Profile1g, 3, 1), in(mig.Profile3g, 4, 4)}
	tests := []struct {
		name    string
		config  string
		devices []mig.DeviceInfo
		want    []mig.DeviceLayout
	}{
		{"all-disabled", "all-disabled", host(2), []mig.DeviceLayout{{Index: 0, Line: 4}, {Index: 1, Line: 4}}},
		{"all-enabled: MIG on, no instances", "all-enabled", host(1), []mig.DeviceLayout{
			{Index: 0, Line: 8, MIGEnabled: true, Counts: map[mig.ProfileID]int{}, Instances: []mig.Instance{}},
		}},
		{"all-balanced on H200s", "all-balanced", host(2), []mig.DeviceLayout{
			{Index: 0, Line: 20, MIGEnabled: true, Counts: map[mig.ProfileID]int{19: 2, 14: 1, 9: 1}, Instances: balancedH200},
			{Index: 1, Line: 20, MIGEnabled: true, Counts: map[mig.ProfileID]int{19: 2, 14: 1, 9: 1}, Instances: balancedH200},
		}},
		{"all-balanced on a mixed host: each GPU its model's entry", "all-balanced", []mig.DeviceInfo{
			{Index: 1, PCIDeviceID: 0x2330}, // bare id: NVIDIA's
			{Index: 0, PCIDeviceID: 0x233510DE},
		}, []mig.DeviceLayout{
			{Index: 0, Line: 20, MIGEnabled: true, Counts: map[mig.ProfileID]int{19: 2, 14: 1, 9: 1}, Instances: balancedH200},
			{Index: 1, Line: 28, MIGEnabled: true, Counts: map[mig.ProfileID]int{19: 2, 14: 1, 9: 1}, Instances: balancedH200},
		}},
		{"all-balanced skips a GPU no entry is for", "all-balanced", []mig.DeviceInfo{
			{Index: 0, PCIDeviceID: 0x233510DE}, {Index: 1, PCIDeviceID: 0x20B010DE},
		}, []mig.DeviceLayout{
			{Index: 0, Line: 20, MIGEnabled: true, Counts: map[mig.ProfileID]int{19: 2, 14: 1, 9: 1}, Instances: balancedH200},
		}},
		{"a model passed in, as the driver reports it", "all-balanced", []mig.DeviceInfo{
			{Index: 0, PCIDeviceID: 0x233010DE, Model: &h100},
		}, []mig.DeviceLayout{
			{Index: 0, Line: 28, MIGEnabled: true, Counts: map[mig.ProfileID]int{19: 2, 14: 1, 9: 1}, Instances: balancedH200},
		}},
		{"custom by index, +me and a c.g name", "custom", host(4), []mig.DeviceLayout{
			{Index: 0, Line: 37},
			{Index: 1, Line: 37},
			{Index: 2, Line: 39, MIGEnabled: true, Counts: map[mig.ProfileID]int{20: 1, 19: 6}, Instances: []mig.Instance{
				in(19, 0, 1), in(19, 1, 1), in(19, 2, 1), in(19, 3, 1), in(19, 4, 1), in(19, 5, 1), in(20, 6, 1)}},
			{Index: 3, Line: 44, MIGEnabled: true, Counts: map[mig.ProfileID]int{9: 1, 5: 1}, Instances: []mig.Instance{
				in(mig.Profile4g, 0, 4), in(mig.Profile3g, 4, 4)}},
		}},
		{"a GPU without MIG is skipped by devices: all", "all-1g.18gb", []mig.DeviceInfo{
			{Index: 0, PCIDeviceID: 0x27B810DE, NoMIG: true}, {Index: 1, PCIDeviceID: 0x233510DE},
		}, []mig.DeviceLayout{
			{Index: 1, Line: 13, MIGEnabled: true, Counts: map[mig.ProfileID]int{19: 7}, Instances: []mig.Instance{
				in(19, 0, 1), in(19, 1, 1), in(19, 2, 1), in(19, 3, 1), in(19, 4, 1), in(19, 5, 1), in(19, 6, 1)}},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := cfg.Layout(tt.config, tt.devices)
			if err != nil {
				t.Fatalf("Layout: %v", err)
			}
			if len(got) != len(tt.want) {
				t.Fatalf("Layout = %+v, want %+v", got, tt.want)
			}
			for i := range got {
				g, w := got[i], tt.want[i]
				if g.Index != w.Index || g.Line != w.Line || g.MIGEnabled != w.MIGEnabled ||
					!maps.Equal(g.Counts, w.Counts) || len(g.Instances) != len(w.Instances) {
					t.Fatalf("device %d: %+v, want %+v", i, g, w)
				}
				for j := range g.Instances {
					if g.Instances[j] != w.Instances[j] {
						t.Fatalf("device %d: instances %v, want %v", i, g.Instances, w.Instances)
					}
				}
			}
		})
	}
}

// lineOf is the 1-based line on which the first occurrence of marker (which
// may span lines) starts.
func lineOf(t *testing.T, text, marker string) int {
	t.Helper()
	i := strings.Index(text, marker)
	if i < 0 {
		t.Fatalf("marker %q not in the config", marker)
	}
	return strings.Count(text[:i], "\n") + 1
}

func TestParseMigParted_Errors(t *testing.T) {
	entry := func(body string) string {
		return "version: v1\nmig-configs:\n  c:\n    - " + body + "\n"
	}
	tests := []struct {
		name   string
		config string
		line   string // a marker on the line the error must name; "" for line 0
		reason string // a fragment the message must contain
	}{
		{"empty file", "", "", "empty config"},
		{"not yaml", "version: v1\nmig-configs: [\n", "", "yaml"},
		{"syntax error with a line", "version: v1\nmig-configs:\n  c:\n    - devices: all\n   bad: [x\n", "", "yaml"},
		{"not a mapping", "- v1\n", "- v1", "want a mapping"},
		{"wrong version", "version: v2\nmig-configs: {}\n", "version: v2", `want "v1"`},
		{"numeric version", "version: 1\nmig-configs: {}\n", "version: 1", `want "v1"`},
		{"missing version", "mig-configs:\n  c:\n    - devices: all\n      mig-enabled: false\n", "mig-configs", "missing version"},
		{"missing mig-configs", "version: v1\n", "version", "missing mig-configs"},
		{"unknown top-level key", "version: v1\nmig-config: {}\n", "mig-config:", `unknown key "mig-config"`},
		{"duplicate key", "version: v1\nversion: v1\nmig-configs: {}\n", "version: v1\nmig-configs", "already defined"},
		{"no configs", "version: v1\nmig-configs: {}\n", "mig-configs", "empty"},
		{"a config with no entries", "version: v1\nmig-configs:\n  c: []\n", "c: []", "is an empty list, want a non-empty list"},
		{"an entry that is not a mapping", "version: v1\nmig-configs:\n  c:\n    - all\n", "- all", "want a mapping"},
		{"unknown entry key", entry("devices: all\n      mig-enable: true"), "mig-enable:", `unknown key "mig-enable"`},
		{"devices missing", entry("mig-enabled: false"), "mig-enabled", "lacks devices"},
		{"mig-enabled missing", entry("devices: all"), "devices", "lacks mig-enabled"},
		{"devices neither all nor a list", entry("devices: some\n      mig-enabled: false"), "some", "want all or a list"},
		{"devices empty list", entry("devices: []\n      mig-enabled: false"), "[]", "selects no GPU"},
		{"device index negative", entry("devices: [0, -1]\n      mig-enabled: false"), "-1", "device index"},
		{"device index a string", entry("devices: [zero]\n      mig-enabled: false"), "zero", "device index"},
		{"device index twice", entry("devices: [1, 1]\n      mig-enabled: false"), "[1, 1]", "listed twice"},
		{"mig-enabled not a bool", entry("devices: all\n      mig-enabled: maybe"), "maybe", "want true or false"},
		{"mig-devices missing", entry("devices: all\n      mig-enabled: true"), "devices: all", "mig-devices is missing"},
		{"mig-devices null", entry("devices: all\n      mig-enabled: true\n      mig-devices:"), "mig-devices", "mig-devices is empty"},
		{"mig-devices while disabled", entry("devices: all\n      mig-enabled: false\n      mig-devices:\n        \"1g.18gb\": 1"), "mig-devices", "while mig-enabled is false"},
		{"mig-devices not a mapping", entry("devices: all\n      mig-enabled: true\n      mig-devices: [1g.18gb]"), "[1g.18gb]", "want a mapping"},
		{"bad profile name", entry("devices: all\n      mig-enabled: true\n      mig-devices:\n        big: 1"), "big", "not a MIG profile name"},
		{"negative count", entry("devices: all\n      mig-enabled: true\n      mig-devices:\n        \"1g.18gb\": -1"), "-1", "count of"},
		{"count not a number", entry("devices: all\n      mig-enabled: true\n      mig-devices:\n        \"1g.18gb\": two"), "two", "count of"},
		{"profile twice", entry("devices: all\n      mig-enabled: true\n      mig-devices:\n        \"1g.18gb\": 1\n        \"1g.18gb\": 2"), `"1g.18gb": 2`, "already defined"},
		{"device-filter not an id", entry("device-filter: \"0xZZ\"\n      devices: all\n      mig-enabled: false"), "0xZZ", "not a PCI id"},
		{"device-filter without vendor", entry("device-filter: [\"0x2335\"]\n      devices: all\n      mig-enabled: false"), "0x2335", "lacks the vendor id"},
		{"device-filter empty list", entry("device-filter: []\n      devices: all\n      mig-enabled: false"), "device-filter", "empty list"},
		{"device-filter a mapping", entry("device-filter: {a: b}\n      devices: all\n      mig-enabled: false"), "device-filter", "want a PCI id"},
		{"bad subsystem id", entry("device-filter: \"0x233510DE:zz\"\n      devices: all\n      mig-enabled: false"), "0x233510DE:zz", "subsystem"},
		{"an alias cycle is not followed", "version: v1\nmig-configs: &a\n  c: *a\n", "mig-configs: &a", "want a non-empty list"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := mig.ParseMigParted([]byte(tt.config))
			if !errors.Is(err, mig.ErrInvalidConfig) {
				t.Fatalf("ParseMigParted = %v, want ErrInvalidConfig", err)
			}
			t.Log(err)
			var ce *mig.ConfigError
			if !errors.As(err, &ce) {
				t.Fatalf("%v is not a *ConfigError", err)
			}
			if tt.line != "" {
				if want := lineOf(t, tt.config, tt.line); ce.Line != want {
					t.Errorf("error %q names line %d, want %d", err, ce.Line, want)
				}
			}
			if !strings.Contains(err.Error(), tt.reason) {
				t.Errorf("error %q does not say %q", err, tt.reason)
			}
			if ce.Line > 0 && !strings.Contains(err.Error(), "line ") {
				t.Errorf("error %q does not name its line", err)
			}
		})
	}
}

func TestMigPartedLayout_Errors(t *testing.T) {
	const config = `version: v1
mig-configs:
  a100-only:
    - device-filter: "0x20B010DE"
      devices: all
      mig-enabled: true
      mig-devices:
        "1g.5gb": 7
  wrong-profile:
    - devices: all
      mig-enabled: true
      mig-devices:
        "1g.5gb": 1
  too-many:
    - devices: all
      mig-enabled: true
      mig-devices:
        "1g.18gb": 8
  no-arrangement:
    - devices: all
      mig-enabled: true
      mig-devices:
        "4g.71gb": 1
        "1g.35gb": 3
  small-ci:
    - devices: all
      mig-enabled: true
      mig-devices:
        "1c.3g.71gb": 1
  index-9:
    - devices: [0, 9]
      mig-enabled: false
  twice:
    - devices: all
      mig-enabled: false
    - devices: [1]
      mig-enabled: true
      mig-devices: {}
  filter-excludes-listed:
    - device-filter: "0x233010DE"
      devices: [0]
      mig-enabled: false
    - devices: [1]
      mig-enabled: false
  enable-all:
    - devices: all
      mig-enabled: true
      mig-devices: {}
  enable-0:
    - devices: [0]
      mig-enabled: true
      mig-devices: {}
`
	cfg, err := mig.ParseMigParted([]byte(config))
	if err != nil {
		t.Fatal(err)
	}
	unknownGPU := []mig.DeviceInfo{{Index: 0, PCIDeviceID: 0x27B810DE}}
	noMIG := []mig.DeviceInfo{{Index: 0, PCIDeviceID: 0x27B810DE, NoMIG: true}}
	tests := []struct {
		name    string
		config  string
		devices []mig.DeviceInfo
		line    string
		class   error
		reason  string
	}{
		{"unknown config name", "nope", host(1), "", mig.ErrUnknownConfig, `no mig-config "nope"`},
		{"device filter matches no GPU of the host", "a100-only", host(2), "a100-only:", nil, "selects no device"},
		{"profile of another model", "wrong-profile", host(1), `"1g.5gb": 1`, mig.ErrUnknownProfile, `has no profile "1g.5gb"`},
		{"more instances than fit", "too-many", host(1), "mig-devices:\n        \"1g.18gb\": 8", mig.ErrNoCapacity, "at most 7"},
		{"no arrangement of memory", "no-arrangement", host(1), "mig-devices:\n        \"4g.71gb\"", mig.ErrNoCapacity, "no arrangement"},
		{"a compute instance smaller than its GPU instance", "small-ci", host(1), "1c.3g.71gb", mig.ErrUnknownProfile, "smaller than its GPU instance"},
		{"a device index the host lacks", "index-9", host(2), "[0, 9]", nil, "device index 9"},
		{"two entries select one GPU", "twice", host(2), "- devices: [1]", nil, "selected by this entry and by the entry at line"},
		{"a filter that excludes the listed devices", "filter-excludes-listed", host(2), `"0x233010DE"`, nil, "matches none of the devices the entry lists"},
		{"MIG on an unknown model", "enable-all", unknownGPU, "- devices: all\n      mig-enabled: true\n      mig-devices: {}\n  enable-0", mig.ErrUnknownModel, "not a known MIG model"},
		{"MIG by index on a GPU without it", "enable-0", noMIG, "- devices: [0]\n      mig-enabled: true", nil, "does not support MIG"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := cfg.Layout(tt.config, tt.devices)
			if !errors.Is(err, mig.ErrInvalidConfig) {
				t.Fatalf("Layout = %+v, %v; want ErrInvalidConfig", got, err)
			}
			if tt.class != nil && !errors.Is(err, tt.class) {
				t.Errorf("Layout = %v, want class %v too", err, tt.class)
			}
			t.Log(err)
			var ce *mig.ConfigError
			if !errors.As(err, &ce) {
				t.Fatalf("%v is not a *ConfigError", err)
			}
			if tt.line != "" {
				if want := lineOf(t, config, tt.line); ce.Line != want {
					t.Errorf("error %q names line %d, want %d", err, ce.Line, want)
				}
			}
			if !strings.Contains(err.Error(), tt.reason) {
				t.Errorf("error %q does not say %q", err, tt.reason)
			}
		})
	}
}

func TestMigPartedLayout_DuplicateDeviceIndex(t *testing.T) {
	cfg, err := mig.ParseMigParted([]byte(sampleConfig))
	if err != nil {
		t.Fatal(err)
	}
	_, err = cfg.Layout("all-disabled", []mig.DeviceInfo{{Index: 0}, {Index: 0}})
	if !errors.Is(err, mig.ErrInvalidConfig) {
		t.Errorf("Layout with device 0 twice = %v, want ErrInvalidConfig", err)
	}
}
