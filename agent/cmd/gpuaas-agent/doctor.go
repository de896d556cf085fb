package main

import (
	"os"
	"path/filepath"

	"github.com/gpuaas/gpuaas/agent/doctor"
	"github.com/gpuaas/gpuaas/agent/runtime"
)

// doctorInputs maps the agent's configuration onto the checks. The GPU
// backend is opened read-only for inventory and MIG mode queries.
func doctorInputs(cfg *Config) doctor.Inputs {
	in := doctor.Inputs{
		GPUBackend: cfg.GPU.Backend, ContainerdAddress: cfg.Containerd.Address,
		Node: cfg.Node, TrustDomain: cfg.TrustDomain, SVID: cfg.SVID, DataDir: cfg.DataDir,
		BPFFS: filepath.Dir(cfg.Isolation.PinRoot),
	}
	if in.GPUBackend == "" {
		in.GPUBackend = "sim"
	}
	// The simulator's state lives in the data dir; doctor must not create
	// it, so a sim host is checked against a throwaway copy of its config.
	probe := *cfg
	if cfg.GPU.Backend != "nvml" {
		dir, err := os.MkdirTemp("", "gpuaas-doctor")
		if err == nil {
			defer os.RemoveAll(dir)
			if b, err := os.ReadFile(filepath.Join(cfg.DataDir, "sim-gpus.json")); err == nil {
				_ = os.WriteFile(filepath.Join(dir, "sim-gpus.json"), b, 0o600)
			}
			probe.DataDir = dir
		}
	}
	in.GPU, in.GPUErr = newBackend(&probe)
	if n := cfg.Network.cfg; n != nil {
		dirs := n.PluginDirs
		if len(dirs) == 0 {
			dirs = runtime.DefaultCNIPluginDirs
		}
		in.CNIPluginDir = dirs[0]
		for _, d := range dirs {
			if _, err := os.Stat(filepath.Join(d, "bridge")); err == nil {
				in.CNIPluginDir = d
				break
			}
		}
		in.CNIPlugins = []string{"bridge", "host-local", "portmap"}
	}
	return in
}
