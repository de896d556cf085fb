// Package telemetry is the agent's view of its GPUs for the outside: the
// agent's own Prometheus metrics, and the Sampler, which reads every GPU
// and MIG device at a fixed interval, serves the last reading on the
// Prometheus endpoint under dcgm-exporter's names and labels, and signs
// each reading into a TelemetryReport for the control plane with the
// attested telemetry key (pkg/attestation).
//
// It only reads, counts and reports; it never decides anything (GPU health
// is agent/gpu/health's). A scrape never calls the driver. Label values are
// bounded by the host: kinds, GPU UUIDs and indexes, GPU instance ids and
// profiles, and the lease and tenant bound to each device; there is at
// most one lease per device at a time, so a busy host cannot grow the
// series set without bound. Nothing here may hold readings without bound
// either: reports are newest-wins, XIDs per device per interval bounded.
package telemetry

import (
	"fmt"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metrics are the agent's metrics.
type Metrics struct {
	reg *prometheus.Registry
	// FenceDenials counts accesses refused by lease fences, by kind
	// (device, connect, sendmsg).
	FenceDenials *prometheus.CounterVec
	// GPUHealthy is 1 for a GPU the health tracker vouches for, else 0.
	GPUHealthy *prometheus.GaugeVec
}

// New registers the agent's metrics (and the Go runtime's) on a fresh
// registry.
func New() *Metrics {
	reg := prometheus.NewRegistry()
	m := &Metrics{
		reg: reg,
		FenceDenials: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "gpuaas", Subsystem: "agent", Name: "fence_denials_total",
			Help: "Accesses refused by lease eBPF fences, by kind.",
		}, []string{"kind"}),
		GPUHealthy: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "gpuaas", Subsystem: "agent", Name: "gpu_healthy",
			Help: "1 when the GPU may take new leases, 0 when its health verdict says it may not.",
		}, []string{"gpu"}),
	}
	reg.MustRegister(m.FenceDenials, m.GPUHealthy, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	// Every kind is present from the start, at zero.
	for _, k := range []string{"device", "connect", "sendmsg"} {
		m.FenceDenials.WithLabelValues(k)
	}
	return m
}

// RegisterSampler serves the sampler's last reading and its counters on
// the metrics endpoint.
func (m *Metrics) RegisterSampler(s *Sampler) error {
	if err := m.reg.Register(s); err != nil {
		return fmt.Errorf("register telemetry sampler: %w", err)
	}
	return nil
}

// Handler serves the metrics in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
}
