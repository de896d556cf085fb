package main

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gpuaas/gpuaas/agent/status"
	"github.com/gpuaas/gpuaas/pkg/config"
)

const overrideBase = "node: node-a\ncontrol_plane: cp:7443\ntrust_domain: example.org\nsvid: {cert: a, key: b, bundle: c}\ndata_dir: /var/lib/a\ngpu:\n  backend: sim\n  sim:\n    gpus: [{model: H200, mig_enabled: true}]\nlog: {level: info}\n"

// The agent's configuration takes -set over GPUAAS_AGENT_* over the file,
// and an overridden value meets the same validation as one in the file.
func TestAgentConfigOverrides(t *testing.T) {
	path := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(path, []byte(overrideBase), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("GPUAAS_AGENT_LOG_LEVEL", "warn")
	t.Setenv("GPUAAS_AGENT_STOP_GRACE", "3s")
	cfg, applied, err := loadConfig(path, config.SetFlags{"log.level=debug", "containerd.namespace=tenant-x"})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Log.Level != "debug" || cfg.StopGrace.D().Seconds() != 3 || cfg.Containerd.Namespace != "tenant-x" || cfg.path != path {
		t.Fatalf("log.level %q stop_grace %v namespace %q", cfg.Log.Level, cfg.StopGrace.D(), cfg.Containerd.Namespace)
	}
	if len(applied) != 4 {
		t.Fatalf("applied %v", applied)
	}
	// Defaults still fill what nothing set.
	if cfg.StatusSocket != status.DefaultSocket || cfg.Isolation.PinRoot != "/sys/fs/bpf/gpuaas" {
		t.Fatalf("defaults: status_socket %q pin_root %q", cfg.StatusSocket, cfg.Isolation.PinRoot)
	}

	for name, tc := range map[string]struct {
		env, set, want string
	}{
		"invalid value from the environment": {env: "GPUAAS_AGENT_LOG_LEVEL=loud", want: "log.level: must be debug, info, warn or error"},
		"invalid value from a flag":          {set: "stop_grace=-1s", want: "stop_grace: must be between 0 and 10m"},
		"unknown key from the environment":   {env: "GPUAAS_AGENT_LOG_LEVLE=debug", want: "GPUAAS_AGENT_LOG_LEVLE"},
		"unknown key from a flag":            {set: "containerd.adress=/x", want: `no such key "containerd.adress"`},
		"relative status socket":             {set: "status_socket=run/agent.sock", want: "status_socket: must be an absolute path"},
		"allow list without a socket":        {set: "status_allow_gids=[10]", env: "GPUAAS_AGENT_STATUS_SOCKET=none", want: "status_socket"},
	} {
		t.Run(name, func(t *testing.T) {
			t.Setenv("GPUAAS_AGENT_LOG_LEVEL", "")
			os.Unsetenv("GPUAAS_AGENT_LOG_LEVEL")
			os.Unsetenv("GPUAAS_AGENT_STOP_GRACE")
			if k, v, ok := strings.Cut(tc.env, "="); ok {
				t.Setenv(k, v)
			}
			var sets config.SetFlags
			if tc.set != "" {
				sets = append(sets, tc.set)
			}
			_, _, err := loadConfig(path, sets)
			if !errors.Is(err, config.ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want one containing %q", err, tc.want)
			}
		})
	}
}
