package main

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gpuaas/gpuaas/agent/lease"
	"github.com/gpuaas/gpuaas/agent/runtime"
	"github.com/gpuaas/gpuaas/pkg/config"
)

// The network and logs sections default to a bridge network with
// addresses kept under the data directory, and 10 MiB x 3 log files.
func TestNetworkAndLogsDefaults(t *testing.T) {
	base := "node: node-a\ncontrol_plane: cp:7443\ntrust_domain: example.org\nsvid: {cert: a, key: b, bundle: c}\ndata_dir: /var/lib/a\ngpu:\n  backend: sim\n  sim:\n    gpus: [{model: H200, mig_enabled: true}]\n"
	var c Config
	if err := config.Decode([]byte(base), &c); err != nil {
		t.Fatal(err)
	}
	n := c.Network.cfg
	if n == nil || n.StateDir != "/var/lib/a/network" || n.Bridge != "" || n.Subnet.IsValid() {
		t.Fatalf("network = %+v, want the runtime's defaults with state under data_dir", n)
	}
	if c.Logs.MaxBytes != 10<<20 || c.Logs.MaxFiles != 3 || c.Logs.Driver != "" {
		t.Fatalf("logs = %+v", c.Logs)
	}
	var off Config
	if err := config.Decode([]byte(base+"network: {disabled: true}\n"), &off); err != nil || off.Network.cfg != nil {
		t.Fatalf("disabled network: %v, %+v", err, off.Network.cfg)
	}
	var set Config
	if err := config.Decode([]byte(base+"network: {bridge: gp1, subnet: 10.77.0.0/24, run_dir: /run/x}\nlogs: {driver: /usr/lib/gpuaas/gpuaas-logdriver, max_bytes: 4096, max_files: 1}\n"), &set); err != nil {
		t.Fatal(err)
	}
	if n := set.Network.cfg; n.Bridge != "gp1" || n.Subnet.String() != "10.77.0.0/24" || n.RunDir != "/run/x" {
		t.Fatalf("network = %+v", n)
	}
	// Leases on the bridge are fenced off each other and the gateway,
	// whatever range the subnet is in.
	if got := leaseSubnet(&set); len(got) != 1 || got[0].String() != "10.77.0.0/24" {
		t.Errorf("leaseSubnet = %v", got)
	}
	if got := leaseSubnet(&c); len(got) != 1 || got[0] != runtime.DefaultSubnet {
		t.Errorf("default leaseSubnet = %v", got)
	}
	if got := leaseSubnet(&off); got != nil {
		t.Errorf("leaseSubnet without a network = %v", got)
	}
}

func TestShippedConfigIsValid(t *testing.T) {
	var c Config
	if err := config.Load("../../../packaging/config/agent.yaml", &c); err != nil {
		t.Fatal(err)
	}
	if c.Node != "node-a" || c.StopGrace.D().Seconds() != 10 || c.Containerd.Namespace != "gpuaas" {
		t.Fatalf("parsed %+v", c)
	}
}

func TestBadConfigNamesTheKey(t *testing.T) {
	base := "node: node-a\ncontrol_plane: cp:7443\ntrust_domain: example.org\nsvid: {cert: a, key: b, bundle: c}\ndata_dir: /var/lib/a\ngpu:\n  backend: sim\n  sim:\n    gpus: [{model: H200, mig_enabled: true}]\n"
	cases := map[string]struct{ body, key string }{
		"unknown key":        {base + "nod: x\n", "nod"},
		"unknown nested key": {strings.Replace(base, "mig_enabled", "mig", 1), "mig"},
		"bad node":           {strings.Replace(base, "node-a", "Node_A", 1), "node"},
		"bad control plane":  {strings.Replace(base, "cp:7443", "cp", 1), "control_plane"},
		"bad replica list":   {strings.Replace(base, "cp:7443", "cp:7443,cp", 1), "control_plane"},
		"repeated replica":   {strings.Replace(base, "cp:7443", "cp:7443, cp:7443", 1), "control_plane"},
		"no gpus":            {strings.Replace(base, "[{model: H200, mig_enabled: true}]", "[]", 1), "gpu.sim.gpus"},
		"bad backend":        {strings.Replace(base, "backend: sim", "backend: cuda", 1), "gpu.backend"},
		"sim gpus on nvml":   {strings.Replace(base, "backend: sim", "backend: nvml", 1), "gpu.sim"},
		"relative archive":   {base + "image_archives: [img.tar]\n", "image_archives[0]"},
		"relative socket":    {base + "containerd: {address: run/c.sock}\n", "containerd.address"},
		"relative cdi dir":   {base + "containerd: {cdi_spec_dir: run/cdi}\n", "containerd.cdi_spec_dir"},
		"negative grace":     {base + "stop_grace: -1s\n", "stop_grace"},
		"long bridge name":   {base + "network: {bridge: a-very-long-bridge-name}\n", "network.bridge"},
		"bad subnet":         {base + "network: {subnet: 10.1.2.0}\n", "network.subnet"},
		"ipv6 subnet":        {base + "network: {subnet: fd00::/64}\n", "network.subnet"},
		"host bits":          {base + "network: {subnet: 10.1.2.3/24}\n", "network.subnet"},
		"relative run dir":   {base + "network: {run_dir: run/netns}\n", "network.run_dir"},
		"relative plugins":   {base + "network: {plugin_dirs: [cni]}\n", "network.plugin_dirs"},
		"disabled and set":   {base + "network: {disabled: true, bridge: br0}\n", "network"},
		"unknown network":    {base + "network: {bridge_name: br0}\n", "bridge_name"},
		"relative driver":    {base + "logs: {driver: gpuaas-logdriver}\n", "logs.driver"},
		"tiny log cap":       {base + "logs: {max_bytes: 100}\n", "logs.max_bytes"},
		"too many log files": {base + "logs: {max_files: 1000}\n", "logs.max_files"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			var c Config
			err := config.Decode([]byte(tc.body), &c)
			if !errors.Is(err, config.ErrInvalid) || !strings.Contains(err.Error(), tc.key) {
				t.Fatalf("err = %v, want one naming %s", err, tc.key)
			}
		})
	}
}

const migParted = `version: v1
mig-configs:
  all-disabled:
    - devices: all
      mig-enabled: false
  balanced:
    - devices: all
      mig-enabled: true
      mig-devices:
        "1g.18gb": 2
        "2g.35gb": 1
        "3g.71gb": 1
`

func TestStaticMIGConfig(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "mig.yaml")
	if err := os.WriteFile(file, []byte(migParted), 0o600); err != nil {
		t.Fatal(err)
	}
	base := "node: node-a\ncontrol_plane: cp:7443\ntrust_domain: example.org\nsvid: {cert: a, key: b, bundle: c}\ndata_dir: " + dir + "\ngpu:\n  backend: sim\n  sim:\n    gpus: [{model: H200, mig_enabled: true}]\n"
	var c Config
	if err := config.Decode([]byte(base+"mig:\n  static: {config_file: "+file+", config_name: balanced}\n"), &c); err != nil {
		t.Fatal(err)
	}
	for name, tc := range map[string]struct{ body, key string }{
		"unknown name": {base + "mig:\n  static: {config_file: " + file + ", config_name: nope}\n", "mig.static.config_name"},
		"no name":      {base + "mig:\n  static: {config_file: " + file + "}\n", "mig.static.config_name"},
		"missing file": {base + "mig:\n  static: {config_file: /nonexistent.yaml, config_name: balanced}\n", "mig.static.config_file"},
	} {
		var bad Config
		if err := config.Decode([]byte(tc.body), &bad); !errors.Is(err, config.ErrInvalid) || !strings.Contains(err.Error(), tc.key) {
			t.Errorf("%s: err = %v, want one naming %s", name, err, tc.key)
		}
	}

	// The agent applies the layout at start, and audits what it made.
	backend, err := newBackend(&c)
	if err != nil {
		t.Fatal(err)
	}
	j, err := lease.OpenJournal(filepath.Join(dir, "journal.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	log := slog.New(slog.DiscardHandler)
	if err := reconcilePartitions(context.Background(), &c, backend, j, log); err != nil {
		t.Fatal(err)
	}
	devs, _ := backend.Devices(context.Background())
	gis, err := backend.GPUInstances(context.Background(), devs[0].UUID)
	if err != nil || len(gis) != 4 {
		t.Fatalf("gpu instances after static apply: %v %v", gis, err)
	}
	evs, _ := j.PendingEvents(100)
	if len(evs) != 4 || evs[0].GetAction() != "partition.create" {
		t.Fatalf("audit events: %v", evs)
	}
	// Applying again changes nothing.
	if err := reconcilePartitions(context.Background(), &c, backend, j, log); err != nil {
		t.Fatal(err)
	}
	if evs, _ := j.PendingEvents(100); len(evs) != 4 {
		t.Fatalf("second apply audited %d events", len(evs)-4)
	}
}
