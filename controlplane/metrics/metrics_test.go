package metrics

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/errs"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

func openStore(t *testing.T) store.Store {
	t.Helper()
	st, err := store.OpenBolt(filepath.Join(t.TempDir(), "state.db"), store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

func seed(t *testing.T, st store.Store, phases ...leasev1.Phase) {
	t.Helper()
	err := st.Update(context.Background(), func(tx store.Tx) error {
		for i, p := range phases {
			b, err := proto.Marshal(&leasev1.Lease{Id: "l" + string(rune('a'+i)), Phase: p})
			if err != nil {
				return err
			}
			if err := tx.Put(store.BucketLeases, "l"+string(rune('a'+i)), b); err != nil {
				return err
			}
		}
		if err := tx.Put(store.BucketNodes, "node-a", []byte{}); err != nil {
			return err
		}
		for range 3 {
			if _, err := store.NextU64(tx, "audit_seq"); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestStateCollectorReportsTheStore(t *testing.T) {
	st := openStore(t)
	seed(t, st, leasev1.Phase_PHASE_RUNNING, leasev1.Phase_PHASE_RUNNING, leasev1.Phase_PHASE_PENDING, leasev1.Phase_PHASE_LOST)
	c := NewStateCollector(st, func() int { return 5 })
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(c)

	want := `
# HELP gpuaas_controlplane_agent_sessions Agents connected to this control plane.
# TYPE gpuaas_controlplane_agent_sessions gauge
gpuaas_controlplane_agent_sessions 5
# HELP gpuaas_controlplane_audit_entries Entries in the audit log (its tree size).
# TYPE gpuaas_controlplane_audit_entries gauge
gpuaas_controlplane_audit_entries 3
# HELP gpuaas_controlplane_nodes Nodes known to the store.
# TYPE gpuaas_controlplane_nodes gauge
gpuaas_controlplane_nodes 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want),
		"gpuaas_controlplane_agent_sessions", "gpuaas_controlplane_audit_entries", "gpuaas_controlplane_nodes"); err != nil {
		t.Error(err)
	}
	got := map[string]float64{}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "gpuaas_controlplane_leases" {
			continue
		}
		for _, m := range mf.GetMetric() {
			got[m.GetLabel()[0].GetValue()] = m.GetGauge().GetValue()
		}
	}
	for phase, n := range map[string]float64{"running": 2, "pending": 1, "lost": 1, "terminated": 0, "failed": 0} {
		if v, ok := got[phase]; !ok || v != n {
			t.Errorf("leases{phase=%q} = %v (present %v), want %v", phase, v, ok, n)
		}
	}
	if _, ok := got["unspecified"]; ok {
		t.Error("the unspecified phase is reported")
	}
}

func TestStateCollectorCountsScrapeErrors(t *testing.T) {
	st := openStore(t)
	c := NewStateCollector(st, nil)
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(c)
	if _, err := reg.Gather(); err != nil {
		t.Fatal(err)
	}
	if v := testutil.ToFloat64(c.scrapeErrors); v != 1 {
		t.Errorf("scrape errors = %v after reading a closed store, want 1", v)
	}
}

func TestInstrumentedStoreTimesTransactions(t *testing.T) {
	reg := prometheus.NewPedanticRegistry()
	st, err := InstrumentStore(openStore(t), reg)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	_ = st.Update(ctx, func(tx store.Tx) error { return tx.Put(store.BucketMeta, "k", []byte("v")) })
	_ = st.Update(ctx, func(tx store.Tx) error { return errors.New("boom") })
	_ = st.View(ctx, func(tx store.Tx) error { _, err := tx.Get(store.BucketMeta, "k"); return err })
	counts := map[string]uint64{}
	mfs, _ := reg.Gather()
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			counts[labels(m)] = m.GetHistogram().GetSampleCount()
		}
	}
	for k, n := range map[string]uint64{"update/ok": 1, "update/error": 1, "view/ok": 1} {
		if counts[k] != n {
			t.Errorf("%s: %d samples, want %d (all: %v)", k, counts[k], n, counts)
		}
	}
}

func labels(m *dto.Metric) string {
	var kind, outcome string
	for _, l := range m.GetLabel() {
		switch l.GetName() {
		case "kind":
			kind = l.GetValue()
		case "outcome":
			outcome = l.GetValue()
		}
	}
	return kind + "/" + outcome
}

func TestRPCInterceptorsCountByCanonicalCode(t *testing.T) {
	reg := prometheus.NewPedanticRegistry()
	r, err := NewRPC(reg)
	if err != nil {
		t.Fatal(err)
	}
	info := &grpc.UnaryServerInfo{FullMethod: "/gpuaas.lease.v1.LeaseService/GetLease"}
	ok := func(context.Context, any) (any, error) { return "x", nil }
	notFound := func(context.Context, any) (any, error) { return nil, errs.NotFound("lease_not_found", "no lease") }
	for _, h := range []grpc.UnaryHandler{ok, ok, notFound} {
		_, _ = r.Unary(context.Background(), nil, info, h)
	}
	_ = r.Stream(nil, nil, &grpc.StreamServerInfo{FullMethod: "/gpuaas.lease.v1.LeaseService/WatchLeases"},
		func(any, grpc.ServerStream) error { time.Sleep(time.Millisecond); return nil })
	for code, n := range map[string]float64{"OK": 2, "NotFound": 1} {
		if v := testutil.ToFloat64(r.requests.WithLabelValues(info.FullMethod, code)); v != n {
			t.Errorf("GetLease %s = %v, want %v", code, v, n)
		}
	}
	if v := testutil.ToFloat64(r.requests.WithLabelValues("/gpuaas.lease.v1.LeaseService/WatchLeases", "OK")); v != 1 {
		t.Errorf("stream counted %v times", v)
	}
}

// TestMetricsPassPromlint is `promtool check metrics` in process: names,
// units, help and types follow Prometheus' conventions.
func TestMetricsPassPromlint(t *testing.T) {
	reg := prometheus.NewPedanticRegistry()
	st := openStore(t)
	seed(t, st, leasev1.Phase_PHASE_RUNNING)
	reg.MustRegister(NewStateCollector(st, func() int { return 1 }))
	ist, err := InstrumentStore(st, reg)
	if err != nil {
		t.Fatal(err)
	}
	_ = ist.View(context.Background(), func(store.Tx) error { return nil })
	r, err := NewRPC(reg)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = r.Unary(context.Background(), nil, &grpc.UnaryServerInfo{FullMethod: "/x/Y"}, func(context.Context, any) (any, error) { return nil, nil })
	problems, err := testutil.GatherAndLint(reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
}
