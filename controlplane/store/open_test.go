package store_test

import (
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/controlplane/store/storetest"
)

func TestConfigNamesTheBadField(t *testing.T) {
	for _, tc := range []struct {
		cfg   store.Config
		field string
	}{
		{store.Config{}, "store.path"},
		{store.Config{Backend: "sqlite", Path: "/x"}, "store.backend"},
		{store.Config{Backend: "etcd", Etcd: store.EtcdConfig{Prefix: "/g/"}}, "store.etcd.endpoints"},
		{store.Config{Backend: "etcd", Etcd: store.EtcdConfig{Endpoints: []string{"https://e:2379"}, Prefix: "g"}}, "store.etcd.prefix"},
		{store.Config{Backend: "etcd", Etcd: store.EtcdConfig{Endpoints: []string{"https://e:2379"}, Prefix: "/g/", CertFile: "c"}}, "store.etcd.cert_file"},
		{store.Config{Backend: "etcd", Etcd: store.EtcdConfig{Endpoints: []string{"https://e:2379"}, Prefix: "/g/", CertFile: "c", KeyFile: "k"}}, "store.etcd.ca_file"},
	} {
		err := tc.cfg.Validate()
		if err == nil || !strings.HasPrefix(err.Error(), tc.field) {
			t.Errorf("%+v: %v, want an error on %s", tc.cfg, err, tc.field)
		}
		if _, oerr := store.Open(context.Background(), tc.cfg); oerr == nil {
			t.Errorf("%+v: Open accepted a bad config", tc.cfg)
		}
	}
}

func TestOpenEachBackendFromConfig(t *testing.T) {
	ctx := context.Background()
	e := storetest.NewEtcd(t, storetest.EtcdConfig{})
	for _, cfg := range []store.Config{
		{Path: filepath.Join(t.TempDir(), "state.db")},
		{Backend: store.BackendEtcd, Etcd: store.EtcdConfig{Endpoints: []string{e.Endpoint}, Prefix: "/gpuaas/cfg/"}},
	} {
		s, err := store.Open(ctx, cfg)
		if err != nil {
			t.Fatalf("%+v: %v", cfg, err)
		}
		if err := s.Update(ctx, func(tx store.Tx) error { return tx.Put(store.BucketNodes, "n", []byte("v")) }); err != nil {
			t.Fatal(err)
		}
		if err := s.Close(); err != nil {
			t.Fatalf("close %+v: %v", cfg, err)
		}
	}
	if _, err := e.Client.Get(ctx, "/gpuaas/cfg/b/nodes/n"); err != nil {
		t.Fatalf("the test's own client was closed by the store's Close: %v", err)
	}
}
