package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/gpuaas/gpuaas/controlplane/api"
	"github.com/gpuaas/gpuaas/controlplane/fleet"
	"github.com/gpuaas/gpuaas/pkg/authn"
	"github.com/gpuaas/gpuaas/pkg/config"
)

// OIDCConfig admits platform callers with OIDC bearer tokens on the lease
// and node services, besides allowlisted operator SVIDs.
type OIDCConfig struct {
	Issuer   string `yaml:"issuer"`
	Audience string `yaml:"audience"`
	// The JWKS: from issuer discovery when both are empty, else a URL
	// (https) or a file.
	JWKSURL  string `yaml:"jwks_url"`
	JWKSFile string `yaml:"jwks_file"`
	// Algorithms allowed (RS256, ES256, EdDSA); default all three.
	Algorithms []string `yaml:"algorithms"`
	// Leeway is the clock skew allowed on exp, nbf and iat (at most 5m).
	Leeway config.Duration `yaml:"leeway"`
	// TenantClaim names the claim that confines a caller to one tenant.
	TenantClaim string `yaml:"tenant_claim"`
	// AdminScope or AdminClaim mark a platform admin (all tenants).
	AdminScope string `yaml:"admin_scope"`
	AdminClaim string `yaml:"admin_claim"`
	// JWKSCacheTTL is how long keys are used before a refresh;
	// JWKSMinRefresh the least time between refreshes an unknown kid may
	// trigger.
	JWKSCacheTTL   config.Duration `yaml:"jwks_cache_ttl"`
	JWKSMinRefresh config.Duration `yaml:"jwks_min_refresh"`
}

// EdgeConfig bounds what one caller or connection may cost.
type EdgeConfig struct {
	MaxRecvBytes         int             `yaml:"max_recv_bytes"`
	MaxConcurrentStreams uint32          `yaml:"max_concurrent_streams"`
	UnaryTimeout         config.Duration `yaml:"unary_timeout"`
	// RatePerSecond and RateBurst: each identity's token bucket.
	RatePerSecond float64 `yaml:"rate_per_second"`
	RateBurst     int     `yaml:"rate_burst"`
	MaxIdentities int     `yaml:"max_identities"`
	// Refusals audited one by one per identity and per minute overall;
	// the rest are summarised.
	DenialsPerIdentityPerMinute int `yaml:"denials_per_identity_per_minute"`
	DenialsPerMinute            int `yaml:"denials_per_minute"`
	// ReadBufferBytes is each connection's read buffer (default 8 KiB;
	// gRPC's own default is 32 KiB).
	ReadBufferBytes int `yaml:"read_buffer_bytes"`
}

func (e *EdgeConfig) validate() error {
	if e.MaxRecvBytes < 0 || e.MaxRecvBytes > 64<<20 {
		return config.FieldError("edge.max_recv_bytes", "must be between 0 (default 4 MiB) and 64 MiB")
	}
	if e.UnaryTimeout == 0 {
		e.UnaryTimeout = config.Duration(api.DefaultUnaryTimeout)
	}
	if e.UnaryTimeout.D() < time.Second || e.UnaryTimeout.D() > 10*time.Minute {
		return config.FieldError("edge.unary_timeout", "must be between 1s and 10m")
	}
	if e.ReadBufferBytes != 0 && (e.ReadBufferBytes < 4<<10 || e.ReadBufferBytes > 1<<20) {
		return config.FieldError("edge.read_buffer_bytes", "must be between 4096 and 1048576 (0: 8 KiB)")
	}
	if e.RatePerSecond < 0 || e.RateBurst < 0 || e.MaxIdentities < 0 || e.DenialsPerIdentityPerMinute < 0 || e.DenialsPerMinute < 0 {
		return config.FieldError("edge", "limits must not be negative (0 takes the default)")
	}
	return nil
}

// verifier builds the OIDC token verifier; nil when OIDC is not configured.
// It fetches nothing: keys are loaded on first use.
func (o *OIDCConfig) verifier() (*authn.Verifier, error) {
	if o == nil {
		return nil, nil
	}
	v, err := authn.NewVerifier(authn.Config{
		Issuer: o.Issuer, Audience: o.Audience, JWKSURL: o.JWKSURL, JWKSFile: o.JWKSFile,
		Algorithms: o.Algorithms, Leeway: o.Leeway.D(), TenantClaim: o.TenantClaim,
		AdminScope: o.AdminScope, AdminClaim: o.AdminClaim,
		CacheTTL: o.JWKSCacheTTL.D(), MinRefresh: o.JWKSMinRefresh.D(),
	})
	if err != nil {
		return nil, config.FieldError("oidc", "%v", err)
	}
	return v, nil
}

// serveHTTP serves /metrics (reg), /healthz (the process answers) and
// /readyz (ready() is nil) until ctx ends.
func serveHTTP(ctx context.Context, addr string, reg *prometheus.Registry, ready func(context.Context) error, log *slog.Logger) (net.Addr, error) {
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics listen %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		if err := ready(ctx); err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := hs.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server stopped", "err", err)
		}
	}()
	go func() { <-ctx.Done(); hs.Close() }()
	return lis.Addr(), nil
}

// newRegistry is the process's metrics registry, with the Go runtime and
// process collectors.
func newRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// LivenessConfig is how long an agent may stay silent (fleet.Liveness).
type LivenessConfig struct {
	// MinTTL is the shortest heartbeat TTL (default 10s); the TTL grows
	// with the fleet so the heartbeat rate stays under
	// MaxHeartbeatsPerSecond (default 50).
	MinTTL                 config.Duration `yaml:"min_ttl"`
	MaxHeartbeatsPerSecond float64         `yaml:"max_heartbeats_per_second"`
	// Grace is added to the TTL before a node is declared down (default
	// 10s); FailoverTTL is every known node's TTL after a control plane
	// restart (default 5m).
	Grace       config.Duration `yaml:"grace"`
	FailoverTTL config.Duration `yaml:"failover_ttl"`
}

func (l *LivenessConfig) validate() error {
	if l.MinTTL != 0 && (l.MinTTL.D() < time.Second || l.MinTTL.D() > time.Hour) {
		return config.FieldError("liveness.min_ttl", "must be between 1s and 1h")
	}
	if l.MaxHeartbeatsPerSecond < 0 {
		return config.FieldError("liveness.max_heartbeats_per_second", "must not be negative")
	}
	if l.Grace < 0 || l.FailoverTTL < 0 {
		return config.FieldError("liveness", "durations must not be negative")
	}
	return nil
}

func (l LivenessConfig) fleet() fleet.Liveness {
	return fleet.Liveness{MinTTL: l.MinTTL.D(), MaxHeartbeatsPerSecond: l.MaxHeartbeatsPerSecond, Grace: l.Grace.D(), FailoverTTL: l.FailoverTTL.D()}
}
