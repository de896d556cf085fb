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
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"

	"github.com/gpuaas/gpuaas/controlplane/api"
	"github.com/gpuaas/gpuaas/controlplane/fleet"
	"github.com/gpuaas/gpuaas/controlplane/lease"
	"github.com/gpuaas/gpuaas/controlplane/metrics"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/attestation"
	"github.com/gpuaas/gpuaas/pkg/config"
	"github.com/gpuaas/gpuaas/pkg/heapfloor"
	"github.com/gpuaas/gpuaas/pkg/identity"
	"github.com/gpuaas/gpuaas/pkg/sanitize"
	"github.com/gpuaas/gpuaas/pkg/sdnotify"
	"github.com/gpuaas/gpuaas/pkg/seal"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	auditv1 "github.com/gpuaas/gpuaas/proto/gpuaas/audit/v1"
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
	// MetricsListen, if set, serves Prometheus metrics on http://ADDR/metrics.
	MetricsListen string      `yaml:"metrics_listen"`
	Audit         AuditConfig `yaml:"audit"`
	// OIDC, if set, admits platform callers with bearer tokens.
	OIDC *OIDCConfig `yaml:"oidc"`
	Edge EdgeConfig  `yaml:"edge"`
	// Store is the state store: bbolt in data_dir (the default) or etcd.
	Store store.Config `yaml:"store"`
	// Liveness sets the agents' heartbeat TTLs.
	Liveness LivenessConfig `yaml:"liveness"`
	// Tracing exports the RPC spans (OpenTelemetry); every call has a
	// trace id and a request id either way.
	Tracing api.TracingConfig `yaml:"tracing"`
	// Attestation decides which nodes may take leases.
	Attestation AttestationConfig `yaml:"attestation"`
	// Secrets seals tenant env values at rest with the keys in key_file
	// (pkg/seal; `gpuaasctl secrets keygen`); without it they are stored
	// in plain text, protected by file permissions only (a warning).
	Secrets SecretsConfig `yaml:"secrets"`
	// Replica is this control plane's part in replicated mode (etcd
	// backend only).
	Replica ReplicaConfig `yaml:"replica"`
	// GCHeapFloorMiB keeps the Go heap goal at or above this many MiB
	// (pkg/heapfloor): a small heap is not collected over and over under
	// load, for up to this much garbage held between collections. 0: the
	// default, 128; negative: off (GOGC alone, as does GOGC=off).
	GCHeapFloorMiB int `yaml:"gc_heap_floor_mib"`

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
	if c.GCHeapFloorMiB == 0 {
		c.GCHeapFloorMiB = heapfloor.DefaultMiB
	}
	if c.GCHeapFloorMiB > 64<<10 {
		return config.FieldError("gc_heap_floor_mib", "must be at most 65536 (64 GiB), or negative for off")
	}
	if c.MetricsListen != "" {
		if _, _, err := net.SplitHostPort(c.MetricsListen); err != nil {
			return config.FieldError("metrics_listen", "must be host:port: %v", err)
		}
	}
	if err := c.Edge.validate(); err != nil {
		return err
	}
	if c.Store.Backend == "" || c.Store.Backend == store.BackendBolt {
		if c.Store.Path == "" {
			c.Store.Path = filepath.Join(c.DataDir, "state.db")
		}
	}
	if err := c.Store.Validate(); err != nil {
		return err
	}
	if err := c.Replica.validate(c.Store); err != nil {
		return err
	}
	if err := c.Liveness.validate(); err != nil {
		return err
	}
	if err := c.Tracing.Validate(); err != nil {
		return err
	}
	if _, err := c.OIDC.verifier(); err != nil {
		return err
	}
	if err := c.Attestation.validate(); err != nil {
		return err
	}
	if err := c.Secrets.validate(); err != nil {
		return err
	}
	return c.Audit.validate(td)
}

// SecretsConfig is the key file sealing secrets at rest.
type SecretsConfig struct {
	KeyFile string `yaml:"key_file"`

	ring *seal.Keyring
}

func (s *SecretsConfig) validate() error {
	if s.KeyFile == "" {
		return nil
	}
	if !filepath.IsAbs(s.KeyFile) {
		return config.FieldError("secrets.key_file", "must be an absolute path")
	}
	ring, err := seal.LoadKeyring(s.KeyFile)
	if err != nil {
		return config.FieldError("secrets.key_file", "%v", err)
	}
	s.ring = ring
	return nil
}

// AttestationConfig is node attestation: the policy every node's reports
// are judged by, and how often agents are challenged.
type AttestationConfig struct {
	// PolicyFile is the attestation policy (JSON, pkg/attestation.Policy):
	// required unless Disabled.
	PolicyFile string `yaml:"policy_file"`
	// Disabled lets every connected node take leases without attestation
	// (development only; a warning at start).
	Disabled bool `yaml:"disabled"`
	// Interval is how often each agent is challenged (default: a third of
	// the policy's max_age); NonceTTL how long a challenge may go
	// unanswered (default 30s).
	Interval config.Duration `yaml:"interval"`
	NonceTTL config.Duration `yaml:"nonce_ttl"`

	policy *attestation.Policy
}

func (a *AttestationConfig) validate() error {
	if a.Disabled {
		if a.PolicyFile != "" {
			return config.FieldError("attestation.disabled", "cannot be set with attestation.policy_file")
		}
		return nil
	}
	if a.PolicyFile == "" || !filepath.IsAbs(a.PolicyFile) {
		return config.FieldError("attestation.policy_file", "an absolute path is required (or attestation.disabled: true, for development only)")
	}
	raw, err := os.ReadFile(a.PolicyFile)
	if err != nil {
		return config.FieldError("attestation.policy_file", "%v", err)
	}
	if a.policy, err = attestation.ParsePolicy(raw); err != nil {
		return config.FieldError("attestation.policy_file", "%v", err)
	}
	maxAge := time.Duration(a.policy.MaxAge)
	if maxAge <= 0 {
		maxAge = attestation.DefaultMaxAge
	}
	if a.Interval != 0 && (a.Interval.D() < time.Second || a.Interval.D() >= maxAge) {
		return config.FieldError("attestation.interval", "must be at least 1s and shorter than the policy's max_age (%s)", maxAge)
	}
	if a.NonceTTL != 0 && (a.NonceTTL.D() < time.Second || a.NonceTTL.D() > 10*time.Minute) {
		return config.FieldError("attestation.nonce_ttl", "must be between 1s and 10m")
	}
	return nil
}

// AuditConfig is the audit log's signing and forwarding.
type AuditConfig struct {
	// Origin names the log in its checkpoints; default TRUST_DOMAIN/audit.
	Origin string `yaml:"origin"`
	// SigningKey is the checkpoint signing key file (`gpuaasctl audit
	// keygen`), one note signing key a line; several sign together during
	// a rotation. Without it no checkpoint is signed (a warning at start).
	SigningKey string `yaml:"signing_key"`
	// CheckpointEvery and CheckpointInterval: a checkpoint is signed every
	// so many entries or so often, whichever comes first (1000, 10s).
	CheckpointEvery    uint64          `yaml:"checkpoint_every"`
	CheckpointInterval config.Duration `yaml:"checkpoint_interval"`
	// Forward, if set, delivers signed batches to an upstream sink.
	Forward *AuditForwardConfig `yaml:"forward"`
	// AllowUnsignedAgentEvents admits audit events without an agent
	// signature (recorded with agent_sig=absent), for a rolling upgrade
	// from agents that do not sign. Off: unsigned events are refused and
	// the refusal is audited.
	AllowUnsignedAgentEvents bool `yaml:"allow_unsigned_agent_events"`
}

// AuditForwardConfig is the upstream audit sink.
type AuditForwardConfig struct {
	// Address is the sink's gRPC address (host:port).
	Address string `yaml:"address"`
	// SinkID is the sink's SPIFFE ID; the connection is refused to any
	// other peer.
	SinkID string `yaml:"sink_id"`
	// MaxBatch is the preferred most entries a batch (default
	// checkpoint_every).
	MaxBatch int `yaml:"max_batch"`

	sinkID spiffeid.ID
}

func (a *AuditConfig) validate(td spiffeid.TrustDomain) error {
	if a.Origin == "" {
		a.Origin = td.Name() + "/audit"
	}
	if strings.ContainsAny(a.Origin, "\n+ ") {
		return config.FieldError("audit.origin", "must be one line without spaces or '+'")
	}
	if a.CheckpointEvery == 0 {
		a.CheckpointEvery = 1000
	}
	if a.CheckpointInterval == 0 {
		a.CheckpointInterval = config.Duration(10 * time.Second)
	}
	if a.CheckpointInterval.D() < 100*time.Millisecond || a.CheckpointInterval.D() > time.Hour {
		return config.FieldError("audit.checkpoint_interval", "must be between 100ms and 1h")
	}
	if a.SigningKey != "" && !filepath.IsAbs(a.SigningKey) {
		return config.FieldError("audit.signing_key", "must be an absolute path")
	}
	if f := a.Forward; f != nil {
		if a.SigningKey == "" {
			return config.FieldError("audit.forward", "needs audit.signing_key: only signed batches are forwarded")
		}
		if _, _, err := net.SplitHostPort(f.Address); err != nil {
			return config.FieldError("audit.forward.address", "must be host:port: %v", err)
		}
		id, err := spiffeid.FromString(f.SinkID)
		if err != nil {
			return config.FieldError("audit.forward.sink_id", "must be a SPIFFE ID: %v", err)
		}
		f.sinkID = id
		if f.MaxBatch == 0 {
			f.MaxBatch = int(a.CheckpointEvery)
		}
		if f.MaxBatch < 0 || uint64(f.MaxBatch) < a.CheckpointEvery {
			return config.FieldError("audit.forward.max_batch", "must be at least audit.checkpoint_every (%d)", a.CheckpointEvery)
		}
	}
	return nil
}

func main() {
	cfgPath := flag.String("config", "/etc/gpuaas/controlplane.yaml", "configuration file")
	showVersion := flag.Bool("version", false, "print the version and exit")
	checkConfig := flag.Bool("check-config", false, "validate the configuration (file, environment and -set) and exit (0: valid)")
	var sets config.SetFlags
	flag.Var(&sets, "set", "override a configuration key, `key.path=value` (repeatable; over GPUAAS_CONTROLPLANE_* variables, over the file)")
	flag.Parse()
	if *showVersion {
		fmt.Println("gpuaas-controlplane", version)
		return
	}
	var cfg Config
	applied, err := config.LoadWith(*cfgPath, &cfg, config.Overrides{EnvPrefix: config.EnvPrefix("controlplane"), Environ: os.Environ(), Set: sets})
	if err != nil {
		fmt.Fprintln(os.Stderr, "gpuaas-controlplane:", err)
		os.Exit(2)
	}
	if *checkConfig {
		fmt.Println("gpuaas-controlplane: configuration", *cfgPath, "is valid")
		for _, o := range applied {
			fmt.Println("  overridden:", o)
		}
		return
	}
	// Every line logged with a call's context carries its request and
	// trace ids.
	log := slog.New(api.CorrelatedHandler(sanitize.Logger(os.Stderr, cfg.level, cfg.Log.JSON).Handler()))
	for _, o := range applied {
		log.Info("configuration key overridden", "key", o.Key, "source", o.Source)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, &cfg, log); err != nil {
		log.Error("control plane stopped", "err", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, cfg *Config, log *slog.Logger) error {
	if cfg.GCHeapFloorMiB > 0 {
		defer heapfloor.Start(uint64(cfg.GCHeapFloorMiB) << 20).Stop()
	}
	reg := newRegistry()
	raw, err := store.Open(ctx, cfg.Store)
	if err != nil {
		return err
	}
	defer raw.Close()
	st, err := metrics.InstrumentStore(raw, reg)
	if err != nil {
		return err
	}
	rpcMetrics, err := metrics.NewRPC(reg)
	if err != nil {
		return err
	}
	src, err := identity.Open(ctx, cfg.SVID, cfg.td, log)
	if err != nil {
		return err
	}
	defer src.Close()

	if cfg.Secrets.ring == nil {
		log.Warn("secrets.key_file is not set: tenant env values are stored in plain text, protected by file permissions only")
	}
	leases := lease.New(lease.Options{Store: st, Logger: log, Sealer: cfg.Secrets.ring})
	fl := fleet.NewRegistry(st, fleet.Options{Logger: log, Leases: leases, Liveness: cfg.Liveness.fleet()})
	leases.SetFleet(fl)
	reg.MustRegister(metrics.NewStateCollector(st, func() int { return len(fl.ConnectedNodes()) }))

	verifier, err := cfg.OIDC.verifier()
	if err != nil {
		return err
	}
	var tokens api.TokenVerifier
	if verifier != nil {
		tokens = verifier
	}
	denials := api.NewDenialAuditor(st, api.DenialOptions{
		PerIdentity: cfg.Edge.DenialsPerIdentityPerMinute, MaxPerWindow: cfg.Edge.DenialsPerMinute, Window: time.Minute, Log: log,
	})
	denialsCtx, stopDenials := context.WithCancel(context.WithoutCancel(ctx))
	defer stopDenials()
	go denials.Run(denialsCtx)
	tp, err := api.NewTracerProvider(ctx, cfg.Tracing, "gpuaas-controlplane")
	if err != nil {
		return err
	}
	defer tp.Shutdown(context.WithoutCancel(ctx))
	authz := api.Authorizer{
		Tracer: tp, TrustTraceParent: cfg.Tracing.TrustTraceParent,
		TrustDomain: cfg.td, Operators: cfg.operators, Tokens: tokens, Denials: denials,
		Limiter:      api.NewRateLimiter(api.RateLimitOptions{PerSecond: cfg.Edge.RatePerSecond, Burst: cfg.Edge.RateBurst, MaxIdentities: cfg.Edge.MaxIdentities}),
		UnaryTimeout: cfg.Edge.UnaryTimeout.D(),
	}
	opts := []grpc.ServerOption{
		grpc.Creds(api.ServerCredentials(src, identity.AuthorizeKinds(cfg.td, identity.PeerAgent, identity.PeerOperator),
			api.TLSOptions{TrustDomain: cfg.td, ClientCertOptional: verifier != nil, Denials: denials})),
		// Outermost, so refused calls are counted too.
		grpc.ChainUnaryInterceptor(rpcMetrics.Unary),
		grpc.ChainStreamInterceptor(rpcMetrics.Stream),
	}
	opts = append(opts, authz.ServerOptions(log)...)
	opts = append(opts, api.Limits{MaxRecvMsgSize: cfg.Edge.MaxRecvBytes, MaxConcurrentStreams: cfg.Edge.MaxConcurrentStreams, ReadBufferSize: cfg.Edge.ReadBufferBytes}.ServerOptions()...)
	srv := grpc.NewServer(opts...)
	logs := &api.LogRelay{}
	var attest *fleet.Attestor
	if cfg.Attestation.Disabled {
		log.Warn("attestation is disabled: every connected node may take leases unattested (development only)")
	} else {
		attest, err = fl.EnableAttestation(fleet.AttestOptions{Policy: cfg.Attestation.policy, Verifier: attestation.NewVerifier(src, cfg.td, 0),
			Interval: cfg.Attestation.Interval.D(), NonceTTL: cfg.Attestation.NonceTTL.D(), Actor: identity.ControlPlaneID(cfg.td).String(), Leases: leases.LiveOn})
		if err != nil {
			return err
		}
	}
	counts, err := metrics.NewAttestationCounts(reg)
	if err != nil {
		return err
	}
	agentv1.RegisterAgentServiceServer(srv, &api.AgentServer{Fleet: fl, Leases: leases, Store: st, Log: log, Logs: logs,
		Bundle: src, RequireAgentSignatures: !cfg.Audit.AllowUnsignedAgentEvents, Attest: attest, Counts: counts})
	leasev1.RegisterLeaseServiceServer(srv, &api.LeaseServer{Leases: leases, Store: st, Logs: logs, Log: log})
	nodev1.RegisterNodeServiceServer(srv, &api.NodeServer{Fleet: fl, Leases: leases, Attest: attest})
	auditv1.RegisterAuditLogServiceServer(srv, &api.AuditLogServer{Store: st})

	// Placement retries, expiry and audit checkpoints run here, or with
	// the etcd backend only while this replica leads.
	var fatal <-chan error
	if es, ok := raw.(*store.Etcd); ok {
		rep, f, err := runReplicated(ctx, cfg, es, fl, leases, reg, log, func(lctx context.Context) error {
			scoped := &scopedRegisterer{Registerer: reg}
			defer scoped.unregisterAll()
			stopAudit, err := startAudit(lctx, cfg, st, src, scoped, log)
			if err != nil {
				return err
			}
			defer stopAudit()
			leases.Run(lctx, cfg.TickInterval.D())
			return nil
		})
		if err != nil {
			return err
		}
		defer rep.Close()
		fatal = f
	} else {
		stopAudit, err := startAudit(ctx, cfg, st, src, reg, log)
		if err != nil {
			return err
		}
		defer stopAudit()
		go leases.Run(ctx, cfg.TickInterval.D())
	}

	var serving atomic.Bool
	storeAlive := func(ctx context.Context) error {
		return st.View(ctx, func(tx store.Tx) error { _, err := store.GetU64(tx, "revision"); return err })
	}
	if cfg.MetricsListen != "" {
		addr, err := serveHTTP(ctx, cfg.MetricsListen, reg, func(ctx context.Context) error {
			if !serving.Load() {
				return errors.New("not serving yet")
			}
			return storeAlive(ctx)
		}, log)
		if err != nil {
			return err
		}
		log.Info("metrics serving", "addr", addr.String())
	}

	lis, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen %s: %w", cfg.Listen, err)
	}
	go fl.RunLiveness(ctx, time.Second)
	// The watchdog is fed by a loop that proves the store still answers:
	// a wedged store (or process) stops the pings and systemd restarts us.
	var live sdnotify.Liveness
	go func() {
		t := time.NewTicker(5 * time.Second)
		defer t.Stop()
		for {
			vctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			if storeAlive(vctx) == nil {
				live.Beat()
			}
			cancel()
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	go sdnotify.Watchdog(ctx, &live, 20*time.Second, log)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(lis) }()
	serving.Store(true)
	log.Info("control plane serving", "addr", lis.Addr().String(), "trust_domain", cfg.td.Name(), "version", version, "oidc", verifier != nil)
	sdnotify.Ready("serving on " + lis.Addr().String())
	select {
	case <-ctx.Done():
	case err := <-errc:
		if err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			return err
		}
	case err := <-fatal:
		srv.Stop()
		return fmt.Errorf("leader work: %w", err)
	}
	serving.Store(false)
	sdnotify.Stopping()
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		srv.Stop()
	}
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if err := denials.Flush(fctx); err != nil {
		log.Warn("audit of refused calls not flushed", "err", err)
	}
	log.Info("control plane stopped")
	return nil
}
