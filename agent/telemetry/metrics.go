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
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/common/expfmt"
)

// Metrics are the agent's metrics.
type Metrics struct {
	reg *prometheus.Registry
	// sampler, when registered, is served from its own registry, its
	// exposition encoded once per sample (samplerText).
	cacheMu    sync.Mutex // guards the sampler fields and the cache
	sampler    *Sampler
	samplerReg *prometheus.Registry
	cacheSnap  *snapshot
	cacheText  []byte
	cacheGzip  []byte // cacheText as one gzip member
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
// the metrics endpoint. At most one sampler is registered.
func (m *Metrics) RegisterSampler(s *Sampler) error {
	reg := prometheus.NewRegistry()
	if err := reg.Register(s); err != nil {
		return fmt.Errorf("register telemetry sampler: %w", err)
	}
	m.cacheMu.Lock()
	defer m.cacheMu.Unlock()
	if m.sampler != nil {
		return fmt.Errorf("register telemetry sampler: one is registered already")
	}
	m.sampler, m.samplerReg = s, reg
	return nil
}

// samplerText is the sampler's exposition in the text format, encoded once
// per sample: a 1 s scrape of a fully partitioned 8-GPU host would
// otherwise gather, validate and encode its ~400 series every second for
// readings that change every 10. The sampler's counters are read with the
// sample they come with.
//
// The gzip form is one gzip member, appended as is after the member that
// carries the rest of a scrape: a body of concatenated members is one gzip
// stream (RFC 1952, section 2.2), which Go's reader, and so Prometheus,
// reads whole.
func (m *Metrics) samplerText() (text, gz []byte, err error) {
	m.cacheMu.Lock()
	defer m.cacheMu.Unlock()
	if m.sampler == nil {
		return nil, nil, nil
	}
	snap := m.sampler.snap.Load()
	if m.cacheText != nil && snap == m.cacheSnap {
		return m.cacheText, m.cacheGzip, nil
	}
	fams, err := m.samplerReg.Gather()
	if err != nil && len(fams) == 0 {
		return nil, nil, err
	}
	var buf, zbuf bytes.Buffer
	enc := expfmt.NewEncoder(&buf, expfmt.NewFormat(expfmt.TypeTextPlain))
	for _, f := range fams {
		if err := enc.Encode(f); err != nil {
			return nil, nil, err
		}
	}
	zw, _ := gzip.NewWriterLevel(&zbuf, gzip.DefaultCompression)
	if _, err := zw.Write(buf.Bytes()); err != nil {
		return nil, nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, nil, err
	}
	m.cacheSnap, m.cacheText, m.cacheGzip = snap, buf.Bytes(), zbuf.Bytes()
	return m.cacheText, m.cacheGzip, nil
}

// Handler serves the metrics in the Prometheus text format (gzipped when
// the scraper accepts it), with the sampler's once it is registered (the
// handler may be made before). A family that cannot be gathered is left
// out and the rest served, as promhttp's ContinueOnError does.
func (m *Metrics) Handler() http.Handler {
	format := expfmt.NewFormat(expfmt.TypeTextPlain)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fams, _ := m.reg.Gather()
		dcgm, dcgmGzip, derr := m.samplerText()
		if derr != nil && len(fams) == 0 {
			http.Error(w, "metrics unavailable", http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", string(format))
		if !acceptsGzip(r) {
			enc := expfmt.NewEncoder(w, format)
			for _, f := range fams {
				if err := enc.Encode(f); err != nil {
					return
				}
			}
			_, _ = w.Write(dcgm)
			return
		}
		w.Header().Set("Content-Encoding", "gzip")
		gz := gzipWriters.Get().(*gzip.Writer)
		defer gzipWriters.Put(gz)
		gz.Reset(w)
		enc := expfmt.NewEncoder(gz, format)
		for _, f := range fams {
			if err := enc.Encode(f); err != nil {
				return
			}
		}
		if err := gz.Close(); err != nil {
			return
		}
		_, _ = w.Write(dcgmGzip)
	})
}

// gzipWriters are reused across scrapes (a gzip writer's window is most of
// a scrape's allocations); BestSpeed, as a scrape is CPU on the host that
// runs tenants, and the body goes over a local network.
var gzipWriters = sync.Pool{New: func() any {
	gz, _ := gzip.NewWriterLevel(io.Discard, gzip.BestSpeed)
	return gz
}}

func acceptsGzip(r *http.Request) bool {
	for _, part := range strings.Split(r.Header.Get("Accept-Encoding"), ",") {
		if enc, _, _ := strings.Cut(strings.TrimSpace(part), ";"); strings.EqualFold(enc, "gzip") {
			return true
		}
	}
	return false
}
