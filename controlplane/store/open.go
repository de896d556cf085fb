package store

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Backends a Config may name.
const (
	BackendBolt = "bbolt"
	BackendEtcd = "etcd"
)

// Config selects and configures the backend: the daemon's store section.
type Config struct {
	// Backend is "bbolt" (the default) or "etcd".
	Backend string `yaml:"backend"`
	// Path is the bbolt file.
	Path string `yaml:"path"`
	// Etcd configures the etcd backend.
	Etcd EtcdConfig `yaml:"etcd"`
}

// EtcdConfig is how the control plane reaches etcd. With CertFile and
// KeyFile it authenticates with its own client certificate (TLS 1.3);
// etcd's RBAC should confine that identity to Prefix.
type EtcdConfig struct {
	Endpoints []string `yaml:"endpoints"`
	// Prefix is the deployment's key prefix, e.g. /gpuaas/prod/.
	Prefix   string `yaml:"prefix"`
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
	// CAFile verifies the etcd servers; required with TLS.
	CAFile string `yaml:"ca_file"`
	// DialTimeout bounds the first connection (default 5s).
	DialTimeout time.Duration `yaml:"dial_timeout"`
	// MaxTxnOps must equal the servers' --max-txn-ops (default 128).
	MaxTxnOps int `yaml:"max_txn_ops"`
}

// Validate reports the first bad field, named as in the config file.
func (c Config) Validate() error {
	switch c.Backend {
	case "", BackendBolt:
		if c.Path == "" {
			return errors.New("store.path: required for the bbolt backend")
		}
	case BackendEtcd:
		e := c.Etcd
		if len(e.Endpoints) == 0 {
			return errors.New("store.etcd.endpoints: at least one endpoint is required")
		}
		if e.Prefix == "" || e.Prefix[0] != '/' {
			return errors.New("store.etcd.prefix: must start with /")
		}
		if (e.CertFile == "") != (e.KeyFile == "") {
			return errors.New("store.etcd.cert_file and key_file: give both or neither")
		}
		if e.CertFile != "" && e.CAFile == "" {
			return errors.New("store.etcd.ca_file: required with a client certificate")
		}
		if e.MaxTxnOps < 0 {
			return errors.New("store.etcd.max_txn_ops: must not be negative")
		}
	default:
		return fmt.Errorf("store.backend: %q is not bbolt or etcd", c.Backend)
	}
	return nil
}

// Open opens the configured backend. For etcd it dials the cluster and
// the store owns the client: Close closes it.
func Open(ctx context.Context, c Config) (Store, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	if c.Backend != BackendEtcd {
		return OpenBolt(c.Path, BoltOptions{})
	}
	e := c.Etcd
	cc := clientv3.Config{Endpoints: e.Endpoints, DialTimeout: e.DialTimeout, Logger: zap.NewNop(), Context: ctx}
	if cc.DialTimeout == 0 {
		cc.DialTimeout = 5 * time.Second
	}
	if e.CAFile != "" {
		tc, err := etcdTLS(e)
		if err != nil {
			return nil, err
		}
		cc.TLS = tc
	}
	cli, err := clientv3.New(cc)
	if err != nil {
		return nil, fmt.Errorf("connect to etcd %v: %w", e.Endpoints, err)
	}
	s, err := OpenEtcd(ctx, cli, EtcdOptions{Prefix: e.Prefix, MaxTxnOps: e.MaxTxnOps})
	if err != nil {
		cli.Close()
		return nil, err
	}
	s.ownsClient = true
	return s, nil
}

func etcdTLS(e EtcdConfig) (*tls.Config, error) {
	ca, err := os.ReadFile(e.CAFile)
	if err != nil {
		return nil, fmt.Errorf("store.etcd.ca_file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return nil, fmt.Errorf("store.etcd.ca_file: no PEM certificate in %s", e.CAFile)
	}
	tc := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}
	if e.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(e.CertFile, e.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("store.etcd.cert_file: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	return tc, nil
}
