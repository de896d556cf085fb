package main

import (
	"context"
	"fmt"
	"log/slog"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/identity"
)

// startAudit starts the checkpointer and the forwarder as configured
// (their metrics in reg), and returns what stops them.
func startAudit(ctx context.Context, cfg *Config, st store.Store, src identity.Source, reg prometheus.Registerer, log *slog.Logger) (func(), error) {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	var closers []func()
	stop := func() {
		cancel()
		wg.Wait()
		for _, c := range closers {
			c()
		}
	}
	fail := func(err error) (func(), error) { stop(); return nil, err }
	a := cfg.Audit
	if a.SigningKey == "" {
		log.Warn("audit checkpoints disabled: no audit.signing_key; the log is kept but nothing signs it")
	} else {
		signers, err := auditlog.LoadSigners(a.SigningKey)
		if err != nil {
			return fail(err)
		}
		cp, err := audit.NewCheckpointer(audit.CheckpointerOptions{Store: st, Signers: signers, Origin: a.Origin,
			Every: a.CheckpointEvery, Interval: a.CheckpointInterval.D(), Logger: log})
		if err != nil {
			return fail(err)
		}
		// A checkpoint of what the log holds now, so a refusal (a log that
		// does not extend its last checkpoint) stops the start.
		if _, _, err := cp.Checkpoint(ctx); err != nil {
			return fail(err)
		}
		wg.Add(1)
		go func() { defer wg.Done(); cp.Run(ctx) }()
	}
	if f := a.Forward; f != nil {
		conn, err := grpc.NewClient(f.Address, grpc.WithTransportCredentials(identity.ClientCredentials(src, tlsconfig.AuthorizeID(f.sinkID))),
			grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(64<<20)))
		if err != nil {
			return fail(fmt.Errorf("audit forward to %s: %w", f.Address, err))
		}
		closers = append(closers, func() { conn.Close() })
		fw, err := audit.NewForwarder(audit.ForwarderOptions{Store: st, Sink: audit.NewGRPCSink(conn), Origin: a.Origin,
			MaxBatch: f.MaxBatch, Logger: log, Registerer: reg})
		if err != nil {
			return fail(err)
		}
		wg.Add(1)
		go func() { defer wg.Done(); fw.Run(ctx) }()
		log.Info("audit forwarding", "sink", f.Address, "sink_id", f.sinkID.String(), "origin", a.Origin)
	}
	return stop, nil
}
