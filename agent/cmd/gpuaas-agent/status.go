package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/gpuaas/gpuaas/agent/status"
	"github.com/gpuaas/gpuaas/pkg/config"
)

// statusMain runs `gpuaas-agent status`: it asks the running agent over
// its status socket and prints the control-plane link, leases, partitions,
// fences and the last attestation and telemetry. Exit code 0: connected;
// 1: running but not connected; 2: the agent could not be asked.
func statusMain(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfgPath := fs.String("config", "/etc/gpuaas/agent.yaml", "configuration file (for status_socket)")
	socket := fs.String("socket", "", "the agent's status socket (default: status_socket of the configuration)")
	asJSON := fs.Bool("json", false, "print the status as JSON")
	timeout := fs.Duration("timeout", 15*time.Second, "how long to wait for the agent")
	var sets config.SetFlags
	fs.Var(&sets, "set", "override a configuration key, `key.path=value` (repeatable)")
	if err := fs.Parse(args); err != nil {
		return status.ExitUnreachable
	}
	sock := *socket
	if sock == "" {
		cfg, _, err := loadConfig(*cfgPath, sets)
		if err != nil {
			fmt.Fprintln(stderr, "gpuaas-agent status:", err)
			return status.ExitUnreachable
		}
		if cfg.StatusSocket == "none" {
			fmt.Fprintln(stderr, "gpuaas-agent status: the status socket is off (status_socket: none in", *cfgPath+")")
			return status.ExitUnreachable
		}
		sock = cfg.StatusSocket
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	snap, err := status.Fetch(ctx, sock)
	if err != nil {
		fmt.Fprintln(stderr, "gpuaas-agent status:", err)
		return status.ExitUnreachable
	}
	if err := status.Write(stdout, snap, *asJSON); err != nil {
		fmt.Fprintln(stderr, "gpuaas-agent status:", err)
		return status.ExitUnreachable
	}
	return status.ExitCode(snap)
}
