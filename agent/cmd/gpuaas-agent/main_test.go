package main

import (
	"errors"
	"strings"
	"testing"

	"github.com/gpuaas/gpuaas/pkg/config"
)

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
		"no gpus":            {strings.Replace(base, "[{model: H200, mig_enabled: true}]", "[]", 1), "gpu.sim.gpus"},
		"bad backend":        {strings.Replace(base, "backend: sim", "backend: cuda", 1), "gpu.backend"},
		"sim gpus on nvml":   {strings.Replace(base, "backend: sim", "backend: nvml", 1), "gpu.sim"},
		"relative archive":   {base + "image_archives: [img.tar]\n", "image_archives[0]"},
		"relative socket":    {base + "containerd: {address: run/c.sock}\n", "containerd.address"},
		"negative grace":     {base + "stop_grace: -1s\n", "stop_grace"},
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
