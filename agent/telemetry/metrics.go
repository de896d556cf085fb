// Package telemetry holds the agent's Prometheus metrics. It only counts
// and exposes; it never decides anything. Labels are bounded (kinds, GPU
// UUIDs), never lease ids, so a busy host cannot grow the series set
// without bound.
package telemetry

import (
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

// Handler serves the metrics in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
}
