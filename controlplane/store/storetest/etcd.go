// Package storetest is for tests of code built on controlplane/store: an
// embedded etcd server that tests start and stop themselves, helpers that
// open either backend, and the conformance suite every backend must pass.
// It is imported only by tests.
package storetest

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"

	"github.com/gpuaas/gpuaas/controlplane/store"
)

// Etcd is an embedded single-member etcd listening on loopback ports the
// kernel chose.
type Etcd struct {
	server *embed.Etcd
	// Endpoint is the client URL.
	Endpoint string
	// Client is connected to Endpoint; Close closes it.
	Client *clientv3.Client
}

// EtcdConfig tunes StartEtcd.
type EtcdConfig struct {
	// MaxTxnOps is the server's --max-txn-ops (default 128, etcd's).
	MaxTxnOps uint
	// UnsafeNoFsync makes benchmarks of many commits cheaper; never for
	// tests of durability.
	UnsafeNoFsync bool
}

// StartEtcd starts an embedded etcd with its data in dir. Its logs are
// discarded. Close stops it.
func StartEtcd(ctx context.Context, dir string, cfg EtcdConfig) (*Etcd, error) {
	ec := embed.NewConfig()
	ec.Name = "test"
	ec.Dir = dir
	ec.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	ec.UnsafeNoFsync = cfg.UnsafeNoFsync
	if cfg.MaxTxnOps > 0 {
		ec.MaxTxnOps = cfg.MaxTxnOps
	}
	loop := url.URL{Scheme: "http", Host: "127.0.0.1:0"}
	ec.ListenClientUrls = []url.URL{loop}
	ec.AdvertiseClientUrls = []url.URL{loop}
	ec.ListenPeerUrls = []url.URL{loop}
	ec.AdvertisePeerUrls = []url.URL{loop}
	ec.InitialCluster = ec.InitialClusterFromName(ec.Name)
	ec.Metrics = "basic"
	srv, err := embed.StartEtcd(ec)
	if err != nil {
		return nil, fmt.Errorf("start embedded etcd: %w", err)
	}
	select {
	case <-srv.Server.ReadyNotify():
	case err := <-srv.Err():
		srv.Close()
		return nil, fmt.Errorf("start embedded etcd: %w", err)
	case <-ctx.Done():
		srv.Close()
		return nil, fmt.Errorf("start embedded etcd: %w", ctx.Err())
	}
	ep := "http://" + srv.Clients[0].Addr().String()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{ep}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		srv.Close()
		return nil, fmt.Errorf("connect to embedded etcd: %w", err)
	}
	return &Etcd{server: srv, Endpoint: ep, Client: cli}, nil
}

// Close stops the client and the server.
func (e *Etcd) Close() error {
	err := e.Client.Close()
	e.server.Close()
	return err
}

// NewEtcd starts an embedded etcd for the test and stops it at cleanup. An
// embedded etcd needs no privilege, so failing to start it fails the test.
func NewEtcd(tb testing.TB, cfg EtcdConfig) *Etcd {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e, err := StartEtcd(ctx, filepath.Join(tb.TempDir(), "etcd"), cfg)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { e.Close() })
	return e
}

var prefixSeq atomic.Int64

// OpenEtcdStore opens a store under a fresh key prefix of e, closed at
// cleanup. opts.Prefix, if empty, is chosen unique to the test.
func OpenEtcdStore(tb testing.TB, e *Etcd, opts store.EtcdOptions) *store.Etcd {
	tb.Helper()
	if opts.Prefix == "" {
		name := strings.NewReplacer("/", "_", " ", "_").Replace(tb.Name())
		opts.Prefix = fmt.Sprintf("/gpuaas-test/%s-%d/", name, prefixSeq.Add(1))
	}
	s, err := store.OpenEtcd(context.Background(), e.Client, opts)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { s.Close() })
	return s
}

// OpenBoltStore opens a bbolt store in a temporary directory, closed at
// cleanup.
func OpenBoltStore(tb testing.TB) *store.Bolt {
	tb.Helper()
	s, err := store.OpenBolt(filepath.Join(tb.TempDir(), "state.db"), store.BoltOptions{})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { s.Close() })
	return s
}

// Backend names a store backend for tests that run against each.
type Backend string

// The backends.
const (
	Bolt   Backend = "bolt"
	EtcdKV Backend = "etcd"
)

// Backends is every backend, in the order tests run them.
var Backends = []Backend{Bolt, EtcdKV}

// Open opens a fresh store of backend b for the test, starting an embedded
// etcd if b is EtcdKV.
func Open(tb testing.TB, b Backend) store.Store {
	tb.Helper()
	switch b {
	case Bolt:
		return OpenBoltStore(tb)
	case EtcdKV:
		return OpenEtcdStore(tb, NewEtcd(tb, EtcdConfig{}), store.EtcdOptions{})
	}
	tb.Fatal(errors.New("unknown backend " + string(b)))
	return nil
}

var shared struct {
	mu  sync.Mutex
	e   *Etcd
	dir string
}

// SharedEtcd returns one embedded etcd for the whole test binary, started
// on first use, so that packages running many tests against etcd start it
// once; each store on it gets its own prefix (OpenEtcdStore). The package's
// TestMain calls StopSharedEtcd after the tests.
func SharedEtcd(tb testing.TB) *Etcd {
	tb.Helper()
	shared.mu.Lock()
	defer shared.mu.Unlock()
	if shared.e != nil {
		return shared.e
	}
	dir, err := os.MkdirTemp("", "gpuaas-etcd-")
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e, err := StartEtcd(ctx, dir, EtcdConfig{})
	if err != nil {
		os.RemoveAll(dir)
		tb.Fatal(err)
	}
	shared.e, shared.dir = e, dir
	return e
}

// StopSharedEtcd stops the shared etcd, if started, and removes its data.
func StopSharedEtcd() {
	shared.mu.Lock()
	defer shared.mu.Unlock()
	if shared.e != nil {
		shared.e.Close()
		os.RemoveAll(shared.dir)
		shared.e = nil
	}
}

// BackendOf is the backend a test named by Each runs against: the
// subtest name "etcd" anywhere in its path selects etcd.
func BackendOf(tb testing.TB) Backend {
	if strings.Contains(tb.Name()+"/", "/"+string(EtcdKV)+"/") {
		return EtcdKV
	}
	return Bolt
}

// Each runs fn as one subtest per backend, named after it; helpers find
// the backend with BackendOf.
func Each(t *testing.T, fn func(t *testing.T)) {
	for _, b := range Backends {
		t.Run(string(b), fn)
	}
}

// OpenFor opens a fresh store of the test's backend (BackendOf), on the
// shared etcd for etcd.
func OpenFor(tb testing.TB) store.Store {
	tb.Helper()
	if BackendOf(tb) == EtcdKV {
		return OpenEtcdStore(tb, SharedEtcd(tb), store.EtcdOptions{})
	}
	return OpenBoltStore(tb)
}
