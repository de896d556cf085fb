package store_test

// These tests run the etcd backend the way a production deployment does:
// etcd serves clients over TLS 1.3 only and requires a client certificate
// (--client-cert-auth maps its common name to an etcd user), auth is
// enabled, and the control plane's user holds one role confined to the
// deployment's key prefix.

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/controlplane/store/storetest"
)

const (
	// prodPrefix is the deployment's key prefix; prodRole may touch only it.
	prodPrefix = "/gpuaas/prod/"
	prodRole   = "gpuaas-prod"
	// cpUser is the control plane's etcd user and its certificate's CN.
	cpUser = "gpuaas-controlplane"
)

// startSecureEtcd starts an etcd secured as in production, with the
// control plane's user confined to prodPrefix. An embedded etcd needs no
// privilege, so failing to start it fails the test, in CI and elsewhere.
func startSecureEtcd(t *testing.T) *storetest.Etcd {
	t.Helper()
	return storetest.NewEtcd(t, storetest.EtcdConfig{Secure: &storetest.EtcdSecurity{
		Roles: []storetest.EtcdRole{{Name: prodRole, Prefix: prodPrefix}},
		Users: []storetest.EtcdUser{{Name: cpUser, Roles: []string{prodRole}}},
	}})
}

// storeConfig is the control plane's store section for e as user, under
// prefix.
func storeConfig(e *storetest.Etcd, cert storetest.CertFiles, prefix string) store.Config {
	return store.Config{Backend: store.BackendEtcd, Etcd: store.EtcdConfig{
		Endpoints: []string{e.Endpoint},
		Prefix:    prefix,
		CertFile:  cert.CertFile,
		KeyFile:   cert.KeyFile,
		CAFile:    e.CA.CAFile,
	}}
}

// rawClient connects to e with TLS config tc, closed at cleanup.
func rawClient(t *testing.T, e *storetest.Etcd, tc *tls.Config) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{e.Endpoint}, TLS: tc, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

func TestEtcdStoreWorksWithConfinedClientCertificate(t *testing.T) {
	e := startSecureEtcd(t)
	ctx := context.Background()
	s, err := store.Open(ctx, storeConfig(e, e.Certs[cpUser], prodPrefix))
	if err != nil {
		t.Fatalf("open the store as %s under %s: %v", cpUser, prodPrefix, err)
	}
	defer s.Close()
	if !strings.HasPrefix(e.Endpoint, "https://") {
		t.Fatalf("the secured etcd serves %s, want https", e.Endpoint)
	}

	// Open recorded the schema under the prefix (read back as root).
	resp, err := e.Client.Get(ctx, prodPrefix+"b/meta/schema_version")
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) != 1 || !bytes.Equal(resp.Kvs[0].Value, store.U64(store.SchemaVersion)) {
		t.Fatalf("schema version under %s: %v, want %d", prodPrefix, resp.Kvs, store.SchemaVersion)
	}

	// One transaction writing several buckets commits atomically.
	if err := s.Update(ctx, func(tx store.Tx) error {
		for i := range 3 {
			if err := tx.Put(store.BucketLeases, fmt.Sprintf("l%d", i), []byte{byte(i)}); err != nil {
				return err
			}
		}
		return tx.Put(store.BucketNodes, "n1", []byte("node"))
	}); err != nil {
		t.Fatalf("multi-key transaction: %v", err)
	}
	// Update reads, scans (range compares and the bucket's delete marker)
	// and deletes under the prefix.
	if err := s.Update(ctx, func(tx store.Tx) error {
		if _, err := tx.Get(store.BucketNodes, "n1"); err != nil {
			return err
		}
		n := 0
		if err := tx.Scan(store.BucketLeases, "l", false, func(string, []byte) error { n++; return nil }); err != nil {
			return err
		}
		if n != 3 {
			return fmt.Errorf("scan in update saw %d leases, want 3", n)
		}
		return tx.Delete(store.BucketLeases, "l0")
	}); err != nil {
		t.Fatalf("update with reads, scan and delete: %v", err)
	}
	var keys []string
	if err := s.View(ctx, func(tx store.Tx) error {
		if v, err := tx.Get(store.BucketNodes, "n1"); err != nil || string(v) != "node" {
			return fmt.Errorf("get nodes/n1: %q, %v", v, err)
		}
		return tx.Scan(store.BucketLeases, "", false, func(k string, _ []byte) error { keys = append(keys, k); return nil })
	}); err != nil {
		t.Fatal(err)
	}
	if strings.Join(keys, ",") != "l1,l2" {
		t.Fatalf("leases after the delete: %v, want l1,l2", keys)
	}

	// Everything the store wrote lies under its prefix.
	all, err := e.Client.Get(ctx, "", clientv3.WithFromKey(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range all.Kvs {
		if !strings.HasPrefix(string(kv.Key), prodPrefix) {
			t.Errorf("key %q outside %s", kv.Key, prodPrefix)
		}
	}
}

func TestEtcdIdentityIsConfinedToItsPrefix(t *testing.T) {
	e := startSecureEtcd(t)
	ctx := context.Background()
	if _, err := e.Client.Put(ctx, "/gpuaas/other/x", "other deployment"); err != nil {
		t.Fatal(err)
	}
	tc, err := storetest.ClientTLS(e.CA.CAFile, e.Certs[cpUser])
	if err != nil {
		t.Fatal(err)
	}
	cli := rawClient(t, e, tc)

	// Inside the prefix the identity may read and write: the denials
	// below are the role's confinement, not a broken connection.
	if _, err := cli.Put(ctx, prodPrefix+"probe", "v"); err != nil {
		t.Fatalf("put inside %s: %v", prodPrefix, err)
	}
	if _, err := cli.Get(ctx, prodPrefix, clientv3.WithPrefix()); err != nil {
		t.Fatalf("range over %s: %v", prodPrefix, err)
	}

	for _, tc := range []struct {
		name string
		op   func() error
	}{
		{"get another deployment's key", func() error { _, err := cli.Get(ctx, "/gpuaas/other/x"); return err }},
		{"put another deployment's key", func() error { _, err := cli.Put(ctx, "/gpuaas/other/x", "mine"); return err }},
		{"delete another deployment's key", func() error { _, err := cli.Delete(ctx, "/gpuaas/other/x"); return err }},
		{"range over every key", func() error { _, err := cli.Get(ctx, "/", clientv3.WithPrefix()); return err }},
		{"range from the prefix onwards", func() error {
			_, err := cli.Get(ctx, prodPrefix, clientv3.WithFromKey())
			return err
		}},
		{"put a sibling of the prefix", func() error { _, err := cli.Put(ctx, "/gpuaas/prodx", "v"); return err }},
		{"put the prefix without its slash", func() error { _, err := cli.Put(ctx, "/gpuaas/prod", "v"); return err }},
		{"transaction writing outside", func() error {
			_, err := cli.Txn(ctx).Then(clientv3.OpPut(prodPrefix+"a", "v"), clientv3.OpPut("/gpuaas/other/y", "v")).Commit()
			return err
		}},
		{"grant itself more", func() error {
			_, err := cli.RoleGrantPermission(ctx, prodRole, "/", clientv3.GetPrefixRangeEnd("/"), clientv3.PermissionType(clientv3.PermReadWrite))
			return err
		}},
		{"enter the root role", func() error { _, err := cli.UserGrantRole(ctx, cpUser, "root"); return err }},
	} {
		if err := tc.op(); !errors.Is(err, rpctypes.ErrPermissionDenied) {
			t.Errorf("%s: %v, want %v", tc.name, err, rpctypes.ErrPermissionDenied)
		}
	}
	// Watches: inside the prefix events arrive; outside, etcd cancels the
	// watch as denied. The client reports that cancellation as an error
	// made from the server's reason text (clientv3 watch.go), which
	// errors.Is cannot match, so the text is checked.
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	inside := cli.Watch(wctx, prodPrefix, clientv3.WithPrefix(), clientv3.WithRev(1))
	select {
	case r := <-inside:
		if r.Err() != nil || len(r.Events) == 0 {
			t.Errorf("watch inside %s: %v, %d events", prodPrefix, r.Err(), len(r.Events))
		}
	case <-wctx.Done():
		t.Errorf("watch inside %s: no event", prodPrefix)
	}
	for _, key := range []string{"/gpuaas/other/", "/"} {
		select {
		case r := <-cli.Watch(wctx, key, clientv3.WithPrefix(), clientv3.WithRev(1)):
			if err := r.Err(); !r.Canceled || err == nil || !strings.Contains(err.Error(), rpctypes.ErrPermissionDenied.Error()) {
				t.Errorf("watch over %s: canceled %v, %v, %d events; want it denied", key, r.Canceled, err, len(r.Events))
			}
		case <-wctx.Done():
			t.Errorf("watch over %s: neither denied nor answered", key)
		}
	}

	// Nothing outside the prefix changed.
	resp, err := e.Client.Get(ctx, "/gpuaas/", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range resp.Kvs {
		k := string(kv.Key)
		if k == "/gpuaas/other/x" && string(kv.Value) == "other deployment" || k == prodPrefix+"probe" {
			continue
		}
		t.Errorf("unexpected key %q = %q", k, kv.Value)
	}
	if len(resp.Kvs) != 2 {
		t.Errorf("%d keys under /gpuaas/, want 2", len(resp.Kvs))
	}

	// The store opened under another deployment's prefix fails, naming
	// the cause.
	s, err := store.Open(ctx, storeConfig(e, e.Certs[cpUser], "/gpuaas/other/"))
	if err == nil {
		s.Close()
		t.Fatal("the confined identity opened a store under /gpuaas/other/")
	}
	if !errors.Is(err, rpctypes.ErrPermissionDenied) || !strings.Contains(err.Error(), "permission denied") || !strings.Contains(err.Error(), "/gpuaas/other/") {
		t.Fatalf("open under /gpuaas/other/: %v, want a permission-denied error naming the prefix", err)
	}

	// A certificate from the right CA grants nothing by itself: a common
	// name that is no etcd user, or one without a role, is denied.
	stranger, err := e.CA.IssueClient("stranger")
	if err != nil {
		t.Fatal(err)
	}
	stc, err := storetest.ClientTLS(e.CA.CAFile, stranger)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rawClient(t, e, stc).Get(ctx, prodPrefix+"probe"); !errors.Is(err, rpctypes.ErrPermissionDenied) {
		t.Errorf("a trusted certificate for no etcd user read %sprobe: %v", prodPrefix, err)
	}
}

func TestEtcdRefusesClientsWithoutItsCertificate(t *testing.T) {
	e := startSecureEtcd(t)
	foreignCA, err := storetest.NewTestCA(filepath.Join(t.TempDir(), "foreign"), "foreign CA")
	if err != nil {
		t.Fatal(err)
	}
	// Same common name as the control plane's user, wrong issuer.
	foreign, err := foreignCA.IssueClient(cpUser)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(e.CA.Cert)
	foreignPair, err := tls.LoadX509KeyPair(foreign.CertFile, foreign.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	presentForeign := func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &foreignPair, nil }
	host := strings.TrimPrefix(e.Endpoint, "https://")

	for _, tc := range []struct {
		name string
		cfg  *tls.Config
		// want is the TLS alert etcd answers with.
		want string
	}{
		// GetClientCertificate presents the certificate even though its
		// issuer is not among those etcd asks for (Go's client would
		// otherwise send none).
		{"certificate from another CA", &tls.Config{RootCAs: pool, GetClientCertificate: presentForeign, MinVersion: tls.VersionTLS13}, "tls: unknown certificate authority"},
		{"no certificate", &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}, "tls: certificate required"},
		{"TLS 1.2", &tls.Config{RootCAs: pool, MaxVersion: tls.VersionTLS12}, "tls: protocol version not supported"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tlsRefusal(host, tc.cfg); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("etcd's answer: %v, want %q", err, tc.want)
			}
		})
	}

	// Through the store, both are refused: Open fails (once its context
	// ends: the client keeps redialling).
	t.Run("store", func(t *testing.T) {
		for name, cert := range map[string]storetest.CertFiles{"certificate from another CA": foreign, "no certificate": {}} {
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
				defer cancel()
				s, err := store.Open(ctx, storeConfig(e, cert, prodPrefix))
				if err == nil {
					s.Close()
					t.Fatal("the store opened")
				}
			})
		}
	})
	resp, err := e.Client.Get(context.Background(), "", clientv3.WithFromKey(), clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	if resp.Count != 0 {
		t.Fatalf("refused clients left %d keys", resp.Count)
	}
}

// tlsRefusal connects to addr with cfg and returns the TLS error the
// server answers with: in TLS 1.3 the server checks the client's
// certificate after the client's side of the handshake completed, so its
// alert arrives on the first read.
func tlsRefusal(addr string, cfg *tls.Config) error {
	d := &net.Dialer{Timeout: 5 * time.Second}
	conn, err := tls.DialWithDialer(d, "tcp", addr, cfg)
	if err != nil {
		return err
	}
	defer conn.Close()
	// Bounds a server that accepted the client: it would wait for the
	// HTTP/2 preface, and the read times out instead of being refused.
	if err := conn.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		return err
	}
	_, err = conn.Read(make([]byte, 1))
	return err
}

// TestEtcdStoreOffersOnlyTLS13 checks the store's side: against a server
// that speaks at most TLS 1.2, the store offers only TLS 1.3 and fails to
// open.
func TestEtcdStoreOffersOnlyTLS13(t *testing.T) {
	dir := t.TempDir()
	ca, err := storetest.NewTestCA(filepath.Join(dir, "pki"), "test CA")
	if err != nil {
		t.Fatal(err)
	}
	srvCert, err := ca.IssueServer("server")
	if err != nil {
		t.Fatal(err)
	}
	client, err := ca.IssueClient(cpUser)
	if err != nil {
		t.Fatal(err)
	}
	pair, err := tls.LoadX509KeyPair(srvCert.CertFile, srvCert.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	offered := make(chan []uint16, 16)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		Certificates: []tls.Certificate{pair},
		MaxVersion:   tls.VersionTLS12,
		GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			select {
			case offered <- hello.SupportedVersions:
			default:
			}
			return nil, nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_ = c.(*tls.Conn).Handshake()
			c.Close()
		}
	}()

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	cfg := store.Config{Backend: store.BackendEtcd, Etcd: store.EtcdConfig{
		Endpoints: []string{(&url.URL{Scheme: "https", Host: ln.Addr().String()}).String()},
		Prefix:    prodPrefix,
		CertFile:  client.CertFile,
		KeyFile:   client.KeyFile,
		CAFile:    ca.CAFile,
	}}
	s, err := store.Open(ctx, cfg)
	if err == nil {
		s.Close()
		t.Fatal("the store opened over TLS 1.2")
	}
	select {
	case versions := <-offered:
		for _, v := range versions {
			if v < tls.VersionTLS13 {
				t.Errorf("the store offered %s", tls.VersionName(v))
			}
		}
		if len(versions) == 0 {
			t.Error("the store offered no TLS version")
		}
	case <-time.After(30 * time.Second):
		// Open dialled before it failed; this only bounds a broken test.
		t.Fatal("the store never connected")
	}

	// A CA file without a certificate is refused before dialling.
	empty := filepath.Join(dir, "empty.pem")
	if err := os.WriteFile(empty, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	cfg.Etcd.CAFile = empty
	if _, err := store.Open(context.Background(), cfg); err == nil || !strings.HasPrefix(err.Error(), "store.etcd.ca_file") {
		t.Fatalf("open with an empty CA file: %v, want an error on store.etcd.ca_file", err)
	}
}
