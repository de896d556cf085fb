package store_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/controlplane/store/storetest"
)

func TestBoltConformance(t *testing.T) {
	storetest.Run(t, storetest.Suite{Open: func(t *testing.T) store.Store { return storetest.OpenBoltStore(t) }})
}

func TestEtcdConformance(t *testing.T) {
	e := storetest.NewEtcd(t, storetest.EtcdConfig{})
	storetest.Run(t, storetest.Suite{
		Open: func(t *testing.T) store.Store {
			return storetest.OpenEtcdStore(t, e, store.EtcdOptions{Backoff: 100 * time.Microsecond, MaxAttempts: 5})
		},
		Replica: func(t *testing.T, s store.Store) store.Store {
			return storetest.OpenEtcdStore(t, e, store.EtcdOptions{Prefix: s.(*store.Etcd).Prefix()})
		},
	})
}

func TestEtcdDeploymentsAreSeparatedByPrefix(t *testing.T) {
	e := storetest.NewEtcd(t, storetest.EtcdConfig{})
	ctx := context.Background()
	a := storetest.OpenEtcdStore(t, e, store.EtcdOptions{Prefix: "/gpuaas/a"})
	b := storetest.OpenEtcdStore(t, e, store.EtcdOptions{Prefix: "/gpuaas/b"})
	if err := a.Update(ctx, func(tx store.Tx) error { return tx.Put(store.BucketLeases, "l1", []byte("a")) }); err != nil {
		t.Fatal(err)
	}
	err := b.View(ctx, func(tx store.Tx) error { _, err := tx.Get(store.BucketLeases, "l1"); return err })
	if !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("deployment b sees a's lease: %v", err)
	}
	resp, err := e.Client.Get(ctx, "/gpuaas/a/b/leases/l1")
	if err != nil || len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "a" {
		t.Fatalf("raw layout: %v, %v; want the record at /gpuaas/a/b/leases/l1", resp, err)
	}
}

func TestEtcdRefusesAFutureSchema(t *testing.T) {
	e := storetest.NewEtcd(t, storetest.EtcdConfig{})
	ctx := context.Background()
	if _, err := e.Client.Put(ctx, "/gpuaas/x/b/meta/schema_version", string(store.U64(store.SchemaVersion+1))); err != nil {
		t.Fatal(err)
	}
	if _, err := store.OpenEtcd(ctx, e.Client, store.EtcdOptions{Prefix: "/gpuaas/x/"}); !errors.Is(err, store.ErrSchema) {
		t.Fatalf("open = %v, want ErrSchema", err)
	}
	resp, err := e.Client.Get(ctx, "/gpuaas/x/b/meta/schema_version")
	if err != nil || string(resp.Kvs[0].Value) != string(store.U64(store.SchemaVersion+1)) {
		t.Fatalf("the refused store was changed: %v %v", resp, err)
	}
	s := storetest.OpenEtcdStore(t, e, store.EtcdOptions{Prefix: "/gpuaas/new/"})
	s.View(ctx, func(tx store.Tx) error {
		if v, err := store.GetU64(tx, "schema_version"); v != store.SchemaVersion || err != nil {
			t.Errorf("new deployment schema_version = %d, %v", v, err)
		}
		return nil
	})
}

func TestEtcdTransactionOverTheOpLimitIsRefusedWhole(t *testing.T) {
	e := storetest.NewEtcd(t, storetest.EtcdConfig{})
	s := storetest.OpenEtcdStore(t, e, store.EtcdOptions{})
	ctx := context.Background()
	err := s.Update(ctx, func(tx store.Tx) error {
		for i := 0; i < 129; i++ {
			if err := tx.Put(store.BucketAudit, fmt.Sprintf("%020d", i), []byte("x")); err != nil {
				return err
			}
		}
		return nil
	})
	if !errors.Is(err, store.ErrTooLarge) {
		t.Fatalf("129 writes: %v, want ErrTooLarge", err)
	}
	n := 0
	s.View(ctx, func(tx store.Tx) error {
		return tx.Scan(store.BucketAudit, "", false, func(string, []byte) error { n++; return nil })
	})
	if n != 0 {
		t.Fatalf("%d of the refused writes were stored", n)
	}
	// A server with a higher limit, told to the store, takes it.
	e2 := storetest.NewEtcd(t, storetest.EtcdConfig{MaxTxnOps: 1024})
	s2 := storetest.OpenEtcdStore(t, e2, store.EtcdOptions{MaxTxnOps: 1024})
	err = s2.Update(ctx, func(tx store.Tx) error {
		for i := 0; i < 500; i++ {
			if err := tx.Put(store.BucketAudit, fmt.Sprintf("%020d", i), []byte("x")); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("500 writes with max-txn-ops 1024: %v", err)
	}
}

func TestEtcdDeadline(t *testing.T) {
	e := storetest.NewEtcd(t, storetest.EtcdConfig{})
	s := storetest.OpenEtcdStore(t, e, store.EtcdOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Nanosecond)
	defer cancel()
	<-ctx.Done()
	err := s.Update(ctx, func(tx store.Tx) error { return tx.Put(store.BucketLeases, "k", nil) })
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("update past its deadline: %v", err)
	}
	s.Close()
	if err := s.View(context.Background(), func(store.Tx) error { return nil }); err == nil {
		t.Fatal("view on a closed store succeeded")
	}
}

func TestEtcdRerunsAnUpdateWhoseRevisionWasCompacted(t *testing.T) {
	e := storetest.NewEtcd(t, storetest.EtcdConfig{})
	s := storetest.OpenEtcdStore(t, e, store.EtcdOptions{})
	ctx := context.Background()
	if err := s.Update(ctx, func(tx store.Tx) error {
		if err := tx.Put(store.BucketMeta, "k1", []byte("1")); err != nil {
			return err
		}
		return tx.Put(store.BucketMeta, "k2", []byte("2"))
	}); err != nil {
		t.Fatal(err)
	}
	calls := 0
	err := s.Update(ctx, func(tx store.Tx) error {
		calls++
		if _, err := tx.Get(store.BucketMeta, "k1"); err != nil {
			return err
		}
		if calls == 1 {
			resp, err := e.Client.Put(ctx, "/elsewhere", "x")
			if err != nil {
				return err
			}
			if _, err := e.Client.Compact(ctx, resp.Header.Revision); err != nil {
				return err
			}
		}
		if _, err := tx.Get(store.BucketMeta, "k2"); err != nil {
			return err
		}
		return tx.Put(store.BucketMeta, "k3", []byte("3"))
	})
	if err != nil || calls != 2 {
		t.Fatalf("update: %v after %d calls; want success on the second", err, calls)
	}
}
