// Package storetest is for tests of code built on controlplane/store: an
// embedded etcd server that tests start and stop themselves, helpers that
// open either backend, and the conformance suite every backend must pass.
// It is imported only by tests.
package storetest

import (
	"context"
	"crypto/tls"
	"crypto/x509"
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
	// Client is connected to Endpoint; Close closes it. On a secured etcd
	// (EtcdConfig.Secure) it authenticates as the root user.
	Client *clientv3.Client
	// CA issued the certificates of a secured etcd, server's and users';
	// nil otherwise. Its CAFile verifies the server.
	CA *TestCA
	// Certs holds, on a secured etcd, each user's client certificate (its
	// common name is the user's name), root included.
	Certs map[string]CertFiles
}

// EtcdConfig tunes StartEtcd.
type EtcdConfig struct {
	// MaxTxnOps is the server's --max-txn-ops (default 128, etcd's).
	MaxTxnOps uint
	// UnsafeNoFsync makes benchmarks of many commits cheaper; never for
	// tests of durability.
	UnsafeNoFsync bool
	// Secure, if set, starts etcd secured as in production; see
	// EtcdSecurity. Without it etcd serves plain HTTP with auth off.
	Secure *EtcdSecurity
}

// EtcdSecurity makes StartEtcd secure etcd as a production cluster is:
// the client URL speaks TLS 1.3 only and requires a client certificate
// from a fresh test CA (--client-cert-auth, which also maps the
// certificate's common name to the etcd user), and authentication is
// enabled with a root user, Roles and Users. Every user gets a client
// certificate (Etcd.Certs); none has a password.
type EtcdSecurity struct {
	Roles []EtcdRole
	Users []EtcdUser
}

// EtcdRole is an etcd role granted readwrite on the range of keys that
// start with Prefix, and nothing else.
type EtcdRole struct {
	Name   string
	Prefix string
}

// EtcdUser is an etcd user holding Roles. It authenticates with a client
// certificate whose common name is Name.
type EtcdUser struct {
	Name  string
	Roles []string
}

// rootUser is etcd's superuser, which must exist before auth is enabled.
const rootUser = "root"

// StartEtcd starts an embedded etcd with its data in dir. Its logs are
// discarded. Close stops it. A secured etcd (cfg.Secure) keeps its data in
// dir/data and its PKI in dir/pki.
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
	clientURL := loop
	var ca *TestCA
	if cfg.Secure != nil {
		ec.Dir = filepath.Join(dir, "data")
		var err error
		if ca, err = NewTestCA(filepath.Join(dir, "pki"), "gpuaas test etcd CA"); err != nil {
			return nil, fmt.Errorf("start embedded etcd: %w", err)
		}
		server, err := ca.IssueServer("etcd-server")
		if err != nil {
			return nil, fmt.Errorf("start embedded etcd: %w", err)
		}
		ec.ClientTLSInfo.CertFile = server.CertFile
		ec.ClientTLSInfo.KeyFile = server.KeyFile
		ec.ClientTLSInfo.TrustedCAFile = ca.CAFile
		ec.ClientTLSInfo.ClientCertAuth = true
		ec.TlsMinVersion = "TLS1.3"
		clientURL.Scheme = "https"
	}
	ec.ListenClientUrls = []url.URL{clientURL}
	ec.AdvertiseClientUrls = []url.URL{clientURL}
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
	ep := clientURL.Scheme + "://" + srv.Clients[0].Addr().String()
	cc := clientv3.Config{Endpoints: []string{ep}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()}
	e := &Etcd{server: srv, Endpoint: ep, CA: ca}
	if cfg.Secure != nil {
		e.Certs = make(map[string]CertFiles)
		root, err := ca.IssueClient(rootUser)
		if err != nil {
			srv.Close()
			return nil, fmt.Errorf("start embedded etcd: %w", err)
		}
		e.Certs[rootUser] = root
		if cc.TLS, err = ClientTLS(ca.CAFile, root); err != nil {
			srv.Close()
			return nil, fmt.Errorf("start embedded etcd: %w", err)
		}
	}
	if e.Client, err = clientv3.New(cc); err != nil {
		srv.Close()
		return nil, fmt.Errorf("connect to embedded etcd: %w", err)
	}
	if cfg.Secure != nil {
		if err := e.enableAuth(ctx, *cfg.Secure); err != nil {
			e.Close()
			return nil, fmt.Errorf("start embedded etcd: %w", err)
		}
	}
	return e, nil
}

// enableAuth creates the root user, sec's roles and users, issues the
// users' certificates and turns authentication on.
func (e *Etcd) enableAuth(ctx context.Context, sec EtcdSecurity) error {
	auth := e.Client.Auth
	for _, r := range sec.Roles {
		if r.Prefix == "" {
			return fmt.Errorf("etcd role %s: empty prefix would grant every key", r.Name)
		}
		if _, err := auth.RoleAdd(ctx, r.Name); err != nil {
			return fmt.Errorf("add etcd role %s: %w", r.Name, err)
		}
		if _, err := auth.RoleGrantPermission(ctx, r.Name, r.Prefix, clientv3.GetPrefixRangeEnd(r.Prefix), clientv3.PermissionType(clientv3.PermReadWrite)); err != nil {
			return fmt.Errorf("grant etcd role %s readwrite on %s: %w", r.Name, r.Prefix, err)
		}
	}
	users := append([]EtcdUser{{Name: rootUser, Roles: []string{rootUser}}}, sec.Users...)
	for _, u := range users {
		if u.Name != rootUser {
			if _, dup := e.Certs[u.Name]; dup {
				return fmt.Errorf("etcd user %s: given twice", u.Name)
			}
			cert, err := e.CA.IssueClient(u.Name)
			if err != nil {
				return err
			}
			e.Certs[u.Name] = cert
		}
		if _, err := auth.UserAddWithOptions(ctx, u.Name, "", &clientv3.UserAddOptions{NoPassword: true}); err != nil {
			return fmt.Errorf("add etcd user %s: %w", u.Name, err)
		}
		for _, r := range u.Roles {
			if _, err := auth.UserGrantRole(ctx, u.Name, r); err != nil {
				return fmt.Errorf("grant etcd user %s role %s: %w", u.Name, r, err)
			}
		}
	}
	if _, err := auth.AuthEnable(ctx); err != nil {
		return fmt.Errorf("enable etcd auth: %w", err)
	}
	return nil
}

// ClientTLS is the TLS configuration of a client of a secured etcd: TLS
// 1.3, the server verified against caFile, cert presented.
func ClientTLS(caFile string, cert CertFiles) (*tls.Config, error) {
	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("no PEM certificate in %s", caFile)
	}
	kp, err := tls.LoadX509KeyPair(cert.CertFile, cert.KeyFile)
	if err != nil {
		return nil, err
	}
	return &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{kp}, MinVersion: tls.VersionTLS13}, nil
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
