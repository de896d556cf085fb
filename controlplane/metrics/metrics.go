// Package metrics exposes the control plane's Prometheus metrics: state
// gauges read from the store at scrape time (leases by phase, nodes, audit
// log size), the store's transaction latency (an instrumented Store), and
// per-RPC request counts and latency (gRPC interceptors). Every metric is
// named gpuaas_controlplane_* and passes Prometheus' own lint (promlint, what
// `promtool check metrics` runs).
package metrics

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/errs"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

const namespace = "gpuaas_controlplane"

// latencyBuckets span 100 µs to 10 s.
var latencyBuckets = prometheus.ExponentialBucketsRange(0.0001, 10, 16)

// StateCollector reads lease and audit state from the store at scrape time,
// so the figures are the store's truth even after a restart or on a
// replica that did not serve the writes.
type StateCollector struct {
	st       store.Store
	sessions func() int

	leases, nodes, auditEntries, sessionsDesc *prometheus.Desc
	scrapeErrors                              prometheus.Counter
}

// NewStateCollector returns a collector over st; sessions (optional) counts
// the agents connected to this control plane.
func NewStateCollector(st store.Store, sessions func() int) *StateCollector {
	c := &StateCollector{
		st: st, sessions: sessions,
		leases:       prometheus.NewDesc(namespace+"_leases", "Leases in the store by phase.", []string{"phase"}, nil),
		nodes:        prometheus.NewDesc(namespace+"_nodes", "Nodes known to the store.", nil, nil),
		auditEntries: prometheus.NewDesc(namespace+"_audit_entries", "Entries in the audit log (its tree size).", nil, nil),
		sessionsDesc: prometheus.NewDesc(namespace+"_agent_sessions", "Agents connected to this control plane.", nil, nil),
	}
	c.scrapeErrors = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: namespace, Name: "state_scrape_errors_total",
		Help: "Scrapes that could not read the store.",
	})
	return c
}

// Describe implements prometheus.Collector.
func (c *StateCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.leases
	ch <- c.nodes
	ch <- c.auditEntries
	if c.sessions != nil {
		ch <- c.sessionsDesc
	}
	c.scrapeErrors.Describe(ch)
}

// Collect implements prometheus.Collector.
func (c *StateCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	phases := map[leasev1.Phase]int{}
	var nodes int
	var auditSize uint64
	err := c.st.View(ctx, func(tx store.Tx) error {
		var l leasev1.Lease
		if err := tx.Scan(store.BucketLeases, "", false, func(_ string, v []byte) error {
			if err := proto.Unmarshal(v, &l); err != nil {
				return err
			}
			phases[l.GetPhase()]++
			return nil
		}); err != nil {
			return err
		}
		if err := tx.Scan(store.BucketNodes, "", false, func(string, []byte) error { nodes++; return nil }); err != nil {
			return err
		}
		var err error
		auditSize, err = store.GetU64(tx, "audit_seq")
		return err
	})
	if err != nil {
		c.scrapeErrors.Inc()
	} else {
		// Every phase is reported, zeros included, so rates and alerts
		// never see a series vanish.
		for p, name := range leasev1.Phase_name {
			if p == int32(leasev1.Phase_PHASE_UNSPECIFIED) {
				continue
			}
			ch <- prometheus.MustNewConstMetric(c.leases, prometheus.GaugeValue, float64(phases[leasev1.Phase(p)]), phaseLabel(name))
		}
		ch <- prometheus.MustNewConstMetric(c.nodes, prometheus.GaugeValue, float64(nodes))
		ch <- prometheus.MustNewConstMetric(c.auditEntries, prometheus.GaugeValue, float64(auditSize))
	}
	if c.sessions != nil {
		ch <- prometheus.MustNewConstMetric(c.sessionsDesc, prometheus.GaugeValue, float64(c.sessions()))
	}
	c.scrapeErrors.Collect(ch)
}

func phaseLabel(enumName string) string {
	const prefix = "PHASE_"
	if len(enumName) > len(prefix) {
		enumName = enumName[len(prefix):]
	}
	b := []byte(enumName)
	for i, ch := range b {
		if 'A' <= ch && ch <= 'Z' {
			b[i] = ch + 'a' - 'A'
		}
	}
	return string(b)
}

// instrumentedStore times every transaction.
type instrumentedStore struct {
	store.Store
	latency *prometheus.HistogramVec
}

// InstrumentStore wraps st so that every View and Update is timed into
// gpuaas_controlplane_store_transaction_seconds{kind, outcome}; Update's
// time includes the durable commit (and group-commit waiting).
func InstrumentStore(st store.Store, reg prometheus.Registerer) (store.Store, error) {
	h := prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: namespace, Name: "store_transaction_seconds",
		Help:    "Store transaction latency, commit included, by kind (view, update) and outcome (ok, error).",
		Buckets: latencyBuckets,
	}, []string{"kind", "outcome"})
	if err := reg.Register(h); err != nil {
		return nil, err
	}
	return &instrumentedStore{Store: st, latency: h}, nil
}

func (s *instrumentedStore) View(ctx context.Context, fn func(store.Tx) error) error {
	start := time.Now()
	err := s.Store.View(ctx, fn)
	s.latency.WithLabelValues("view", outcome(err)).Observe(time.Since(start).Seconds())
	return err
}

func (s *instrumentedStore) Update(ctx context.Context, fn func(store.Tx) error) error {
	start := time.Now()
	err := s.Store.Update(ctx, fn)
	s.latency.WithLabelValues("update", outcome(err)).Observe(time.Since(start).Seconds())
	return err
}

// UpdateReading passes the read-ahead keys on (store.UpdateReading).
func (s *instrumentedStore) UpdateReading(ctx context.Context, keys []store.Key, fn func(store.Tx) error) error {
	start := time.Now()
	err := store.UpdateReading(ctx, s.Store, keys, fn)
	s.latency.WithLabelValues("update", outcome(err)).Observe(time.Since(start).Seconds())
	return err
}

func outcome(err error) string {
	if err != nil {
		return "error"
	}
	return "ok"
}

// RPC holds the gRPC server metrics.
type RPC struct {
	requests *prometheus.CounterVec
	latency  *prometheus.HistogramVec
}

// NewRPC registers the per-RPC metrics: requests by method and canonical
// code, and latency by method (for streams, the stream's lifetime).
func NewRPC(reg prometheus.Registerer) (*RPC, error) {
	r := &RPC{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "grpc_requests_total",
			Help: "RPCs handled, by full method and gRPC status code.",
		}, []string{"method", "code"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "grpc_request_seconds",
			Help:    "RPC latency by full method (stream lifetime for streaming RPCs).",
			Buckets: latencyBuckets,
		}, []string{"method"}),
	}
	for _, c := range []prometheus.Collector{r.requests, r.latency} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return r, nil
}

func (r *RPC) observe(method string, start time.Time, err error) {
	r.requests.WithLabelValues(method, errs.Code(err).String()).Inc()
	r.latency.WithLabelValues(method).Observe(time.Since(start).Seconds())
}

// Unary is the unary server interceptor. Install it outermost, so that
// rejected calls (authentication, rate limits) are counted too.
func (r *RPC) Unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	start := time.Now()
	resp, err := h(ctx, req)
	r.observe(info.FullMethod, start, err)
	return resp, err
}

// Stream is the stream server interceptor.
func (r *RPC) Stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	start := time.Now()
	err := h(srv, ss)
	r.observe(info.FullMethod, start, err)
	return err
}

// NewAttestationCounts registers the attestation counters and returns the
// function the agent server counts with: kind "attestation" counts
// verdicts by status, kind "telemetry" telemetry reports by result
// ("accepted" or the failed check).
func NewAttestationCounts(reg prometheus.Registerer) (func(kind, result string), error) {
	verdicts := prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "attestation_verdicts_total",
		Help: "Attestation reports judged, by verdict (PASS, FAIL, STALE).",
	}, []string{"status"})
	reports := prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "telemetry_reports_total",
		Help: "Signed telemetry reports received, by result: accepted, or the check that refused the report.",
	}, []string{"result"})
	for _, c := range []prometheus.Collector{verdicts, reports} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return func(kind, result string) {
		switch kind {
		case "attestation":
			verdicts.WithLabelValues(result).Inc()
		case "telemetry":
			reports.WithLabelValues(result).Inc()
		}
	}, nil
}

// NewReplicaGauges registers, for replicated mode, whether this replica
// leads (1 or 0) and how many leadership terms it has begun; it returns the
// function that counts a new term.
func NewReplicaGauges(reg prometheus.Registerer, leader func() bool) (func(), error) {
	lead := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: namespace, Name: "replica_leader",
		Help: "1 while this control-plane replica is the elected leader (runs placement retries, expiry, failover TTLs, drains and audit checkpoints), else 0.",
	}, func() float64 {
		if leader() {
			return 1
		}
		return 0
	})
	terms := prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: namespace, Name: "replica_leader_terms_total",
		Help: "Leadership terms this control-plane replica has begun.",
	})
	for _, c := range []prometheus.Collector{lead, terms} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return terms.Inc, nil
}
