// Command fleetsim runs simulated agents against a running development
// control plane: each agent gets an SVID from the development PKI's CA
// (gpuaasctl pki / identity.WriteDevPKI: the directory with ca-key.pem and
// bundle.pem), holds one mTLS session with heartbeats, inventory of
// simulated GPUs and attestation answers, until interrupted. The control
// plane's attestation policy must allow fleetsim.AgentSHA256.
//
// It is test tooling for load experiments; never point it at a production
// control plane.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/gpuaas/gpuaas/pkg/identity"
	"github.com/gpuaas/gpuaas/test/fleetsim"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:7443", "the control plane's gRPC address")
	pki := flag.String("pki", "", "the development PKI directory (bundle.pem, ca-key.pem)")
	td := flag.String("trust-domain", fleetsim.TrustDomain, "the trust domain")
	agents := flag.Int("agents", 100, "how many agents to run")
	first := flag.Int("first", 0, "the index of the first node (nodes are sim-NNNNN)")
	heartbeat := flag.Duration("heartbeat", 5*time.Second, "each agent's heartbeat interval")
	telemetry := flag.Duration("telemetry", 0, "each agent's signed telemetry interval (0: none)")
	parallel := flag.Int("parallel", 64, "sessions opened at once")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if err := run(log, *addr, *pki, *td, *agents, *first, *heartbeat, *telemetry, *parallel); err != nil {
		log.Error("fleetsim stopped", "err", err)
		os.Exit(1)
	}
}

func run(log *slog.Logger, addr, pki, tdName string, agents, first int, heartbeat, telemetry time.Duration, parallel int) error {
	if pki == "" {
		return fmt.Errorf("-pki is required")
	}
	td, err := spiffeid.TrustDomainFromString(tdName)
	if err != nil {
		return fmt.Errorf("trust domain %q: %w", tdName, err)
	}
	ca, err := identity.LoadCA(td, filepath.Join(pki, identity.BundleFile), filepath.Join(pki, identity.CAKeyFile))
	if err != nil {
		return err
	}
	if err := fleetsim.RaiseNoFile(uint64(agents) + 1024); err != nil {
		return err
	}
	f, err := fleetsim.New(fleetsim.Options{Addr: addr, CA: ca, Heartbeat: heartbeat, Telemetry: telemetry, Parallel: parallel})
	if err != nil {
		return err
	}
	defer f.Close()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	nodes := make([]string, 0, agents)
	for i := first; i < first+agents; i++ {
		nodes = append(nodes, fleetsim.NodeName(i))
	}
	start := time.Now()
	if err := f.Add(ctx, nodes); err != nil {
		return err
	}
	log.Info("fleet connected", "agents", agents, "took", time.Since(start).Round(time.Millisecond))
	t := time.NewTicker(10 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			s := f.Stats()
			log.Info("fleet", "agents", s.Agents, "attested", s.Attested, "heartbeats", s.Heartbeats,
				"max_heartbeat_gap", s.MaxHeartbeatGap.Round(time.Millisecond), "ended", s.EndedSummary())
		}
	}
}
