package telemetry

import (
	"io"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestMetricsAreExposed(t *testing.T) {
	m := New()
	m.FenceDenials.WithLabelValues("connect").Add(3)
	m.GPUHealthy.WithLabelValues("GPU-1").Set(0)
	if got := testutil.ToFloat64(m.FenceDenials.WithLabelValues("connect")); got != 3 {
		t.Fatalf("connect denials = %v", got)
	}
	srv := httptest.NewServer(m.Handler())
	defer srv.Close()
	resp, err := srv.Client().Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		`gpuaas_agent_fence_denials_total{kind="connect"} 3`,
		`gpuaas_agent_fence_denials_total{kind="device"} 0`,
		`gpuaas_agent_gpu_healthy{gpu="GPU-1"} 0`,
		`go_goroutines`,
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}
