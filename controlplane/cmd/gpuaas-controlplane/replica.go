package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"

	"github.com/gpuaas/gpuaas/controlplane/fleet"
	"github.com/gpuaas/gpuaas/controlplane/lease"
	"github.com/gpuaas/gpuaas/controlplane/metrics"
	"github.com/gpuaas/gpuaas/controlplane/replica"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/config"
)

// ReplicaConfig is this control plane's part in replicated mode, which the
// etcd backend always runs (a single replica simply always leads): several
// control planes share the store, agents and platform callers may use any,
// and the elected leader runs the fleet-wide timers.
type ReplicaConfig struct {
	// ID names the replica (default: host name and process id); unique.
	ID string `yaml:"id"`
	// TTL is how long a dead replica keeps its leadership and its agents'
	// presence before another takes over (default 10s, 2s to 1m).
	TTL config.Duration `yaml:"ttl"`
}

func (r *ReplicaConfig) validate(s store.Config) error {
	if s.Backend != store.BackendEtcd {
		if r.ID != "" || r.TTL != 0 {
			return config.FieldError("replica", "needs store.backend: etcd (replicas share one etcd store)")
		}
		return nil
	}
	if r.ID == "" {
		host, err := os.Hostname()
		if err != nil {
			host = "controlplane"
		}
		r.ID = fmt.Sprintf("%s-%d", host, os.Getpid())
	}
	if strings.ContainsAny(r.ID, "/\n ") || len(r.ID) > 128 {
		return config.FieldError("replica.id", "must be at most 128 characters without '/', spaces or newlines")
	}
	if r.TTL != 0 && (r.TTL.D() < 2*time.Second || r.TTL.D() > time.Minute) {
		return config.FieldError("replica.ttl", "must be between 2s and 1m")
	}
	return nil
}

// leaderWork is what only the leader runs; it returns when ctx ends, or
// early with an error that must stop the process (the audit log refused
// its checkpoint).
type leaderWork func(ctx context.Context) error

// runReplicated joins the replica set over es and runs work whenever this
// replica leads, until ctx ends. Lease records committed by other replicas
// reach this one's watchers and agents. It returns the replica to close
// after the server stopped, and a channel that delivers a fatal error.
func runReplicated(ctx context.Context, cfg *Config, es *store.Etcd, fl *fleet.Registry, leases *lease.Service, reg prometheus.Registerer, log *slog.Logger, work leaderWork) (*replica.Replica, <-chan error, error) {
	rep, err := replica.New(ctx, replica.Options{Client: es.Client(), Prefix: es.Prefix(), ID: cfg.Replica.ID, TTL: cfg.Replica.TTL.D(), Logger: log})
	if err != nil {
		return nil, nil, err
	}
	term, err := metrics.NewReplicaGauges(reg, rep.IsLeader)
	if err != nil {
		rep.Close()
		return nil, nil, err
	}
	fl.SetPresence(rep)
	fatal := make(chan error, 1)
	go rep.Run(ctx, func(lctx context.Context) {
		term()
		if err := work(lctx); err != nil && lctx.Err() == nil {
			select {
			case fatal <- err:
			default:
			}
		}
	})
	go func() {
		for ctx.Err() == nil {
			err := es.WatchBucket(ctx, store.BucketLeases, func(c store.Change) {
				if c.Value == nil {
					return
				}
				if err := leases.Committed(c.Value); err != nil {
					log.Warn("undecodable lease record in the change feed", "lease", c.Key, "err", err)
				}
			})
			if ctx.Err() != nil {
				return
			}
			// Changes were missed: lease watchers resume from their last
			// revision, and every agent here reads its desired state.
			log.Warn("lease change feed restarted", "err", err)
			if errors.Is(err, rpctypes.ErrCompacted) {
				leases.Resync()
				fl.NotifyAll()
			}
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}()
	log.Info("replica joined", "replica", rep.ID(), "prefix", es.Prefix())
	return rep, fatal, nil
}

// scopedRegisterer registers collectors for one leadership term and
// unregisters them all when it ends, so the next term can register again.
type scopedRegisterer struct {
	prometheus.Registerer
	mu sync.Mutex
	cs []prometheus.Collector
}

func (s *scopedRegisterer) Register(c prometheus.Collector) error {
	if err := s.Registerer.Register(c); err != nil {
		return err
	}
	s.mu.Lock()
	s.cs = append(s.cs, c)
	s.mu.Unlock()
	return nil
}

func (s *scopedRegisterer) MustRegister(cs ...prometheus.Collector) {
	for _, c := range cs {
		if err := s.Register(c); err != nil {
			panic(err)
		}
	}
}

func (s *scopedRegisterer) unregisterAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.cs {
		s.Registerer.Unregister(c)
	}
	s.cs = nil
}
