package footprint

import (
	"testing"

	"go.yaml.in/yaml/v3"
)

func TestPartitionedConfigSetsTheLayoutAndIntervalAndKeepsTheRest(t *testing.T) {
	base := []byte(`node: footprint
metrics_listen: "127.0.0.1:9400"
telemetry:
  interval: 2s
log:
  level: warn
`)
	out, err := partitionedConfig(base, "/tmp/x/mig-parted.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		Node          string `yaml:"node"`
		MetricsListen string `yaml:"metrics_listen"`
		Telemetry     struct {
			Interval string `yaml:"interval"`
		} `yaml:"telemetry"`
		MIG struct {
			Static struct {
				ConfigFile string `yaml:"config_file"`
				ConfigName string `yaml:"config_name"`
			} `yaml:"static"`
		} `yaml:"mig"`
		Log struct {
			Level string `yaml:"level"`
		} `yaml:"log"`
	}
	if err := yaml.Unmarshal(out, &got); err != nil {
		t.Fatalf("%v:\n%s", err, out)
	}
	if got.Node != "footprint" || got.MetricsListen != "127.0.0.1:9400" || got.Log.Level != "warn" {
		t.Errorf("the rest of the configuration changed:\n%s", out)
	}
	if got.Telemetry.Interval != "10s" || got.MIG.Static.ConfigFile != "/tmp/x/mig-parted.yaml" || got.MIG.Static.ConfigName != layoutName {
		t.Errorf("layout or interval not set:\n%s", out)
	}
}

func TestPartitionedConfigRefusesWhatItCannotMerge(t *testing.T) {
	for name, base := range map[string]string{
		"not yaml":           "node: [",
		"empty":              "",
		"telemetry a scalar": "telemetry: 2s\n",
		"mig a list":         "mig: [static]\n",
	} {
		t.Run(name, func(t *testing.T) {
			if out, err := partitionedConfig([]byte(base), "/l.yaml"); err == nil {
				t.Fatalf("merged into %q:\n%s", base, out)
			}
		})
	}
}
