// Command gpuaas-controlplane is the fleet's control plane: it accepts lease
// requests, places them on nodes, keeps lease state and the audit log, and
// serves agents their desired state over mTLS.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"

	"github.com/gpuaas/gpuaas/controlplane/api"
	"github.com/gpuaas/gpuaas/controlplane/fleet"
	"github.com/gpuaas/gpuaas/controlplane/lease"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/config"
	"github.com/gpuaas/gpuaas/pkg/identity"
	"github.com/gpuaas/gpuaas/pkg/sanitize"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// Config is the control plane's configuration file.
type Config struct {
	// Listen is the gRPC address (host:port).
	Listen string `yaml:"listen"`
	// DataDir holds the state store.
	DataDir     string      `yaml:"data_dir"`
	TrustDomain string      `yaml:"trust_domain"`
	SVID        config.SVID `yaml:"svid"`
	// Operators allowlists operator SPIFFE IDs; empty admits every
	// spiffe://TD/gpuaas/operator/* ID.
	Operators []string   `yaml:"operators"`
	Log       config.Log `yaml:"log"`
	// TickInterval is how often expiry and pending placement run.
	TickInterval config.Duration `yaml:"tick_interval"`

	td        spiffeid.TrustDomain
	operators []spiffeid.ID
	level     slog.Level
}

// Validate implements config.Validator.
func (c *Config) Validate() error {
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		return config.FieldError("listen", "must be host:port: %v", err)
	}
	if c.DataDir == "" || !filepath.IsAbs(c.DataDir) {
		return config.FieldError("data_dir", "must be an absolute path")
	}
	td, err := spiffeid.TrustDomainFromString(c.TrustDomain)
	if err != nil {
		return config.FieldError("trust_domain", "%v", err)
	}
	c.td = td
	if err := c.SVID.Validate(); err != nil {
		return err
	}
	for i, o := range c.Operators {
		id, err := spiffeid.FromString(o)
		if err != nil || !id.MemberOf(td) {
			return config.FieldError(fmt.Sprintf("operators[%d]", i), "must be a SPIFFE ID in %s", td)
		}
		c.operators = append(c.operators, id)
	}
	if c.level, err = c.Log.SlogLevel(); err != nil {
		return err
	}
	if c.TickInterval == 0 {
		c.TickInterval = config.Duration(time.Second)
	}
	if c.TickInterval.D() < 10*time.Millisecond || c.TickInterval.D() > time.Minute {
		return config.FieldError("tick_interval", "must be between 10ms and 1m")
	}
	return nil
}

func main() {
	cfgPath := flag.String("config", "/etc/gpuaas/controlplane.yaml", "configuration file")
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.Parse()
	if *showVersion {
		fmt.Println("gpuaas-controlplane", version)
		return
	}
	var cfg Config
	if err := config.Load(*cfgPath, &cfg); err != nil {
		fmt.Fprintln(os.Stderr, "gpuaas-controlplane:", err)
		os.Exit(2)
	}
	log := sanitize.Logger(os.Stderr, cfg.level, cfg.Log.JSON)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, &cfg, log); err != nil {
		log.Error("control plane stopped", "err", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, cfg *Config, log *slog.Logger) error {
	st, err := store.OpenBolt(filepath.Join(cfg.DataDir, "state.db"), store.BoltOptions{})
	if err != nil {
		return err
	}
	defer st.Close()
	src, err := identity.NewFileSource(ctx, identity.FileSourceConfig{
		CertPath: cfg.SVID.Cert, KeyPath: cfg.SVID.Key, BundlePath: cfg.SVID.Bundle, TrustDomain: cfg.td, Logger: log,
	})
	if err != nil {
		return err
	}
	defer src.Close()

	leases := lease.New(lease.Options{Store: st, Logger: log})
	reg := fleet.New(st, log)
	leases.SetFleet(reg)
	authz := api.Authorizer{TrustDomain: cfg.td, Operators: cfg.operators}
	srv := grpc.NewServer(
		grpc.Creds(identity.ServerCredentials(src, identity.AuthorizeKinds(cfg.td, identity.PeerAgent, identity.PeerOperator))),
		grpc.ChainUnaryInterceptor(authz.Unary(log)),
		grpc.ChainStreamInterceptor(authz.Stream(log)),
		grpc.MaxRecvMsgSize(4<<20),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
	)
	agentv1.RegisterAgentServiceServer(srv, &api.AgentServer{Fleet: reg, Leases: leases, Store: st, Log: log})
	leasev1.RegisterLeaseServiceServer(srv, &api.LeaseServer{Leases: leases})
	nodev1.RegisterNodeServiceServer(srv, &api.NodeServer{Fleet: reg, Leases: leases})

	lis, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen %s: %w", cfg.Listen, err)
	}
	go leases.Run(ctx, cfg.TickInterval.D())
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(lis) }()
	log.Info("control plane serving", "addr", lis.Addr().String(), "trust_domain", cfg.td.Name(), "version", version)
	select {
	case <-ctx.Done():
	case err := <-errc:
		if err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			return err
		}
	}
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		srv.Stop()
	}
	log.Info("control plane stopped")
	return nil
}
