package telemetry_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/agent/telemetry"
	"github.com/gpuaas/gpuaas/pkg/attestation"
)

// recorded is a backend that answers telemetry reads with readings taken
// once, so a benchmark measures the sampler rather than the simulator
// (whose MIGTelemetry hashes every MIG UUID of the host on each call).
type recorded struct {
	gpu.Backend
	readings map[string]gpu.Telemetry
}

func record(b *testing.B, h *host) *recorded {
	b.Helper()
	ctx := context.Background()
	r := &recorded{Backend: h.sim, readings: map[string]gpu.Telemetry{}}
	for _, g := range h.gpus {
		t, err := h.sim.DeviceTelemetry(ctx, g.UUID)
		if err != nil {
			b.Fatal(err)
		}
		r.readings[g.UUID] = t
		for _, m := range h.migs[g.UUID] {
			if r.readings[m.UUID], err = h.sim.MIGTelemetry(ctx, m.UUID); err != nil {
				b.Fatal(err)
			}
		}
	}
	return r
}

func (r *recorded) DeviceTelemetry(_ context.Context, uuid string) (gpu.Telemetry, error) {
	return r.readings[uuid], nil
}

func (r *recorded) MIGTelemetry(_ context.Context, uuid string) (gpu.Telemetry, error) {
	return r.readings[uuid], nil
}

// benchSampler runs a sampler over 8 fully partitioned H200s (56 1g.18gb
// MIG devices), every MIG device leased and busy; with replay, over
// recorded readings of them.
func benchSampler(b *testing.B, replay bool) (*telemetry.Sampler, *host) {
	b.Helper()
	h := newHost(b, 8, 7)
	var l leases
	pid := 1000
	for _, g := range h.gpus {
		for i, m := range h.migs[g.UUID] {
			pid++
			if err := h.sim.AttachProcess(m.UUID, pid); err != nil {
				b.Fatal(err)
			}
			l.set(m.UUID, "l-"+m.UUID[4:24], "tenant-"+string(rune('a'+i)))
		}
	}
	key, err := attestation.NewTelemetryKey()
	if err != nil {
		b.Fatal(err)
	}
	var backend gpu.Backend = h.sim
	if replay {
		backend = record(b, h)
	}
	s, err := telemetry.NewSampler(telemetry.Options{Backend: backend, Node: "gpu-node-0042", Interval: time.Hour, Key: key, Attribution: l.get})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	b.Cleanup(func() { cancel(); <-done })
	if _, err := s.SampleNow(ctx); err != nil {
		b.Fatal(err)
	}
	return s, h
}

// BenchmarkSampleAndSign is one sampling round of 8 fully partitioned
// H200s: 64 device reads, the attribution, the XIDs, the snapshot for the
// scrape, the encoding and the Ed25519 signature. "sim" reads the
// simulator; "recorded" replays readings, leaving the sampler's own cost.
func BenchmarkSampleAndSign(b *testing.B) {
	for _, bc := range []struct {
		name   string
		replay bool
	}{{"sim", false}, {"recorded", true}} {
		b.Run(bc.name, func(b *testing.B) {
			s, _ := benchSampler(b, bc.replay)
			ctx := context.Background()
			b.ReportAllocs()
			var size int
			for b.Loop() {
				r, err := s.SampleNow(ctx)
				if err != nil {
					b.Fatal(err)
				}
				size = len(r.GetPayload())
			}
			b.ReportMetric(float64(size), "payload-bytes")
		})
	}
}

// BenchmarkScrape is one scrape of the sampler's metrics (about 600
// series for 8 fully partitioned H200s) through promhttp: it serves the
// last sample and never reads the driver.
// BenchmarkScrape: one scrape of the agent's endpoint (the agent's own
// metrics, the Go and process collectors, and the sampler's ~460 series,
// served from the exposition encoded at the last sample), as Prometheus
// asks for it (gzip); /uncached gathers and encodes the sampler every time,
// as a plain promhttp handler would.
func BenchmarkScrape(b *testing.B) {
	s, _ := benchSampler(b, true)
	m := telemetry.New()
	if err := m.RegisterSampler(s); err != nil {
		b.Fatal(err)
	}
	b.Run("agent", func(b *testing.B) { benchHandler(b, m.Handler()) })
	reg := prometheus.NewRegistry()
	reg.MustRegister(s)
	b.Run("uncached", func(b *testing.B) { benchHandler(b, promhttp.HandlerFor(reg, promhttp.HandlerOpts{})) })
}

func benchHandler(b *testing.B, h http.Handler) {
	req := httptest.NewRequest(http.MethodGet, "/metrics", nil)
	req.Header.Set("Accept-Encoding", "gzip")
	b.ReportAllocs()
	var size int
	for b.Loop() {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if w.Code != http.StatusOK {
			b.Fatalf("status %d", w.Code)
		}
		size = w.Body.Len()
	}
	b.SetBytes(int64(size))
}
