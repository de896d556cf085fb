package telemetry_test

import (
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/agent/gpu/sim"
	"github.com/gpuaas/gpuaas/agent/telemetry"
	"github.com/gpuaas/gpuaas/pkg/attestation"
	"github.com/gpuaas/gpuaas/pkg/mig"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
)

// host is a simulated host: H200s with MIG enabled, each split into
// devicesPerGPU 1g.18gb MIG devices through the backend.
type host struct {
	sim  *sim.Sim
	gpus []gpu.Device
	migs map[string][]gpu.MIGDevice // by GPU UUID
}

func newHost(t testing.TB, gpus, devicesPerGPU int) *host {
	t.Helper()
	cfg := sim.Config{HostID: "telemetry-test", EventBuffer: 4 * telemetry.MaxXIDsPerDevice, Now: func() time.Time { return time.Unix(1_800_000_000, 0) }}
	for range gpus {
		cfg.GPUs = append(cfg.GPUs, sim.GPUConfig{Model: "H200", MIGEnabled: true})
	}
	s, err := sim.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	h := &host{sim: s, migs: map[string][]gpu.MIGDevice{}}
	if h.gpus, err = s.Devices(ctx); err != nil {
		t.Fatal(err)
	}
	for _, d := range h.gpus {
		for range devicesPerGPU {
			pls, err := s.PossiblePlacements(ctx, d.UUID, mig.Profile1g)
			if err != nil || len(pls) == 0 {
				t.Fatalf("placements on %s: %v %v", d.UUID, pls, err)
			}
			gi, err := s.CreateGPUInstance(ctx, d.UUID, mig.Profile1g, pls[0])
			if err != nil {
				t.Fatal(err)
			}
			if _, err := s.CreateComputeInstance(ctx, d.UUID, gi.ID); err != nil {
				t.Fatal(err)
			}
		}
		if h.migs[d.UUID], err = s.MIGDevices(ctx, d.UUID); err != nil {
			t.Fatal(err)
		}
	}
	return h
}

// leases attributes devices to leases; safe for concurrent use.
type leases struct {
	mu sync.Mutex
	m  map[string]telemetry.Attribution
}

func (l *leases) set(uuid, lease, tenant string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.m == nil {
		l.m = map[string]telemetry.Attribution{}
	}
	l.m[uuid] = telemetry.Attribution{LeaseID: lease, Tenant: tenant}
}

func (l *leases) get() map[string]telemetry.Attribution {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make(map[string]telemetry.Attribution, len(l.m))
	for k, v := range l.m {
		out[k] = v
	}
	return out
}

// running is a sampler under Run, with its metrics endpoint.
type running struct {
	s       *telemetry.Sampler
	key     *attestation.TelemetryKey
	metrics *telemetry.Metrics
}

// start runs a sampler whose interval is far longer than any test, so
// every sample after the first is one the test asks for (SampleNow).
func start(t *testing.T, h *host, l *leases, withKey bool) *running {
	t.Helper()
	o := telemetry.Options{Backend: h.sim, Node: "node-a", Interval: time.Hour, Attribution: l.get}
	var key *attestation.TelemetryKey
	if withKey {
		var err error
		if key, err = attestation.NewTelemetryKey(); err != nil {
			t.Fatal(err)
		}
		o.Key = key
	}
	s, err := telemetry.NewSampler(o)
	if err != nil {
		t.Fatal(err)
	}
	m := telemetry.New()
	if err := m.RegisterSampler(s); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return &running{s: s, key: key, metrics: m}
}

// sample asks for a sample and verifies its report.
func (r *running) sample(t *testing.T) *agentv1.TelemetryPayload {
	t.Helper()
	rep, err := r.s.SampleNow(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	p, err := attestation.VerifyTelemetry(rep, r.key.Public())
	if err != nil {
		t.Fatalf("report does not verify with the sampler's key: %v", err)
	}
	return p
}

func (r *running) scrape(t *testing.T) string {
	t.Helper()
	srv := httptest.NewServer(r.metrics.Handler())
	defer srv.Close()
	resp, err := srv.Client().Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func sampleOf(t *testing.T, p *agentv1.TelemetryPayload, uuid string) *agentv1.DeviceSample {
	t.Helper()
	for _, d := range p.GetDevices() {
		if d.GetUuid() == uuid {
			return d
		}
	}
	t.Fatalf("report has no sample of %s", uuid)
	return nil
}

// series is the exposition line prefix of a device series.
func series(name string, h *host, gpuIdx int, m *gpu.MIGDevice, lease, tenant string) string {
	d := h.gpus[gpuIdx]
	profile, gi := "", ""
	if m != nil {
		profile, gi = "1g.18gb", fmt.Sprint(m.GPUInstanceID)
	}
	return fmt.Sprintf(`%s{GPU_I_ID=%q,GPU_I_PROFILE=%q,Hostname="node-a",UUID=%q,device="nvidia%d",gpu="%d",lease=%q,modelName=%q,tenant=%q}`,
		name, gi, profile, d.UUID, gpuIdx, gpuIdx, lease, d.Name, tenant)
}

// A partition's sample carries its lease and tenant in the signed report
// and on the scrape; MIG devices report GR engine activity and memory but
// no power or temperature; the GPU reports power and temperature but no
// utilization while MIG is on.
func TestSamplesAreAttributedToTheirLease(t *testing.T) {
	h := newHost(t, 2, 7)
	leased := h.migs[h.gpus[1].UUID][3]
	if err := h.sim.AttachProcess(leased.UUID, 4242); err != nil {
		t.Fatal(err)
	}
	var l leases
	l.set(leased.UUID, "l-abc", "tenant-a")
	r := start(t, h, &l, true)

	p := r.sample(t)
	if p.GetNodeId() != "node-a" || p.GetInterval().AsDuration() != time.Hour || p.GetTime() == nil {
		t.Errorf("payload header: node %q, interval %v, time %v", p.GetNodeId(), p.GetInterval().AsDuration(), p.GetTime())
	}
	if n := len(p.GetDevices()); n != 2+14 {
		t.Fatalf("%d samples, want 2 GPUs + 14 MIG devices", n)
	}
	d := sampleOf(t, p, leased.UUID)
	if d.GetLeaseId() != "l-abc" || d.GetTenant() != "tenant-a" || d.GetGpuUuid() != h.gpus[1].UUID || d.GetGpuIndex() != 1 ||
		d.GetGpuInstanceId() != uint32(leased.GPUInstanceID) || d.GetProfile() != "1g.18gb" {
		t.Errorf("leased sample identity: %v", d)
	}
	if d.GrEngineActivePct == nil || d.GetGrEngineActivePct() < 60 || d.MemoryUsedMib == nil || d.GetMemoryUsedMib() == 0 || d.MemoryFreeMib == nil {
		t.Errorf("busy MIG device lacks GR engine activity or memory: %v", d)
	}
	if d.UtilizationPct != nil || d.PowerMilliwatt != nil || d.TemperatureC != nil || d.SmClockMhz != nil || d.EccCorrectedVolatile != nil {
		t.Errorf("MIG device reports fields it has not: %v", d)
	}
	for _, o := range p.GetDevices() {
		if o.GetUuid() != leased.UUID && (o.GetLeaseId() != "" || o.GetTenant() != "") {
			t.Errorf("idle device %s attributed to %q/%q", o.GetUuid(), o.GetLeaseId(), o.GetTenant())
		}
	}
	g := sampleOf(t, p, h.gpus[1].UUID)
	if g.UtilizationPct != nil || g.GrEngineActivePct != nil || g.PowerMilliwatt == nil || g.TemperatureC == nil ||
		g.SmClockMhz == nil || g.MemoryClockMhz == nil || g.ThrottleReasons == nil || g.EccCorrectedVolatile == nil ||
		g.RemappedRowsUncorrectable == nil || g.RemapFailed == nil || g.GetProfile() != "" || g.GetGpuInstanceId() != 0 {
		t.Errorf("GPU sample fields: %v", g)
	}

	body := r.scrape(t)
	for _, want := range []string{
		series("DCGM_FI_PROF_GR_ENGINE_ACTIVE", h, 1, &leased, "l-abc", "tenant-a") + " 0.",
		series("DCGM_FI_DEV_FB_USED", h, 1, &leased, "l-abc", "tenant-a") + fmt.Sprintf(" %d\n", d.GetMemoryUsedMib()),
		series("DCGM_FI_DEV_FB_FREE", h, 1, &leased, "l-abc", "tenant-a") + fmt.Sprintf(" %d\n", d.GetMemoryFreeMib()),
		series("DCGM_FI_DEV_POWER_USAGE", h, 1, nil, "", "") + fmt.Sprintf(" %g\n", float64(g.GetPowerMilliwatt())/1000),
		series("DCGM_FI_DEV_GPU_TEMP", h, 1, nil, "", "") + fmt.Sprintf(" %d\n", g.GetTemperatureC()),
		series("DCGM_FI_DEV_SM_CLOCK", h, 1, nil, "", "") + fmt.Sprintf(" %d\n", g.GetSmClockMhz()),
		series("DCGM_FI_DEV_MEM_CLOCK", h, 1, nil, "", "") + fmt.Sprintf(" %d\n", g.GetMemoryClockMhz()),
		series("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", h, 1, nil, "", "") + fmt.Sprintf(" %d\n", g.GetThrottleReasons()),
		series("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", h, 1, nil, "", "") + " 0\n",
		series("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", h, 1, nil, "", "") + " 0\n",
		series("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", h, 1, nil, "", "") + " 0\n",
		series("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", h, 1, nil, "", "") + " 0\n",
		series("DCGM_FI_DEV_ROW_REMAP_FAILURE", h, 1, nil, "", "") + " 0\n",
		series("DCGM_FI_PROF_GR_ENGINE_ACTIVE", h, 0, &h.migs[h.gpus[0].UUID][0], "", "") + " 0\n",
		`gpuaas_agent_fence_denials_total{kind="device"} 0`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("scrape lacks %s", want)
		}
	}
	// No made-up zeros: a MIG device has no power series, a MIG-enabled GPU
	// no utilization series.
	for _, absent := range []string{
		series("DCGM_FI_DEV_POWER_USAGE", h, 1, &leased, "l-abc", "tenant-a"),
		series("DCGM_FI_DEV_GPU_TEMP", h, 1, &leased, "l-abc", "tenant-a"),
		"DCGM_FI_DEV_GPU_UTIL{",
	} {
		if strings.Contains(body, absent) {
			t.Errorf("scrape has %s", absent)
		}
	}
}

// A GPU without MIG reports plain utilization and no GR engine activity.
func TestPlainGPUReportsUtilization(t *testing.T) {
	s, err := sim.New(sim.Config{HostID: "plain", GPUs: []sim.GPUConfig{{Model: "H200"}}})
	if err != nil {
		t.Fatal(err)
	}
	devs, err := s.Devices(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	var l leases
	l.set(devs[0].UUID, "l-whole", "tenant-w")
	h := &host{sim: s, gpus: devs}
	r := start(t, h, &l, true)
	p := r.sample(t)
	if n := len(p.GetDevices()); n != 1 {
		t.Fatalf("%d samples, want 1", n)
	}
	d := p.GetDevices()[0]
	if d.UtilizationPct == nil || d.GrEngineActivePct != nil || d.GetLeaseId() != "l-whole" {
		t.Errorf("plain GPU sample: %v", d)
	}
	if body := r.scrape(t); !strings.Contains(body, series("DCGM_FI_DEV_GPU_UTIL", h, 0, nil, "l-whole", "tenant-w")+" 0\n") {
		t.Errorf("scrape lacks the GPU's utilization:\n%s", body)
	}
}

// XIDs injected into the driver appear in the next report, on the device
// they name and oldest first, and only once; DCGM_FI_DEV_XID_ERRORS shows
// the last one.
func TestXIDsReachTheNextReportForTheirDevice(t *testing.T) {
	h := newHost(t, 2, 7)
	r := start(t, h, &leases{}, true)
	g1 := h.gpus[1]
	m := h.migs[g1.UUID][2]
	r.sample(t) // subscribed and listed

	for _, x := range []uint64{13, 43} {
		if err := h.sim.InjectXID(g1.UUID, x, uint32(m.GPUInstanceID), uint32(m.ComputeInstanceID)); err != nil {
			t.Fatal(err)
		}
	}
	if err := h.sim.InjectXID(g1.UUID, 79, gpu.WholeGPU, gpu.WholeGPU); err != nil {
		t.Fatal(err)
	}
	p := r.sample(t)
	if got := sampleOf(t, p, m.UUID).GetXids(); !slices.Equal(got, []uint64{13, 43}) {
		t.Errorf("MIG device xids %v, want [13 43]", got)
	}
	if got := sampleOf(t, p, g1.UUID).GetXids(); !slices.Equal(got, []uint64{79}) {
		t.Errorf("GPU xids %v, want [79]", got)
	}
	for _, d := range p.GetDevices() {
		if d.GetUuid() != m.UUID && d.GetUuid() != g1.UUID && len(d.GetXids()) > 0 {
			t.Errorf("%s got xids %v", d.GetUuid(), d.GetXids())
		}
	}
	body := r.scrape(t)
	for _, want := range []string{
		series("DCGM_FI_DEV_XID_ERRORS", h, 1, &m, "", "") + " 43\n",
		series("DCGM_FI_DEV_XID_ERRORS", h, 1, nil, "", "") + " 79\n",
		series("DCGM_FI_DEV_XID_ERRORS", h, 0, nil, "", "") + " 0\n",
	} {
		if !strings.Contains(body, want) {
			t.Errorf("scrape lacks %s", want)
		}
	}

	// Reported once: the next report has none, the gauge keeps the last.
	p = r.sample(t)
	for _, d := range p.GetDevices() {
		if len(d.GetXids()) > 0 {
			t.Errorf("%s reported xids %v again", d.GetUuid(), d.GetXids())
		}
	}
	if body := r.scrape(t); !strings.Contains(body, series("DCGM_FI_DEV_XID_ERRORS", h, 1, &m, "", "")+" 43\n") {
		t.Error("the last XID gauge was reset by a report without XIDs")
	}
}

// An XID storm on one device is bounded per report, oldest kept, and the
// rest counted.
func TestXIDsPerDeviceAreBounded(t *testing.T) {
	h := newHost(t, 1, 1)
	r := start(t, h, &leases{}, true)
	g := h.gpus[0]
	r.sample(t)
	const n = telemetry.MaxXIDsPerDevice + 36
	for x := range uint64(n) {
		if err := h.sim.InjectXID(g.UUID, x+1, gpu.WholeGPU, gpu.WholeGPU); err != nil {
			t.Fatal(err)
		}
	}
	if h.sim.Dropped() != 0 {
		t.Fatalf("the simulator dropped %d events; the test needs all delivered", h.sim.Dropped())
	}
	got := sampleOf(t, r.sample(t), g.UUID).GetXids()
	if len(got) != telemetry.MaxXIDsPerDevice || got[0] != 1 || got[len(got)-1] != telemetry.MaxXIDsPerDevice {
		t.Fatalf("xids %v, want 1..%d", got, telemetry.MaxXIDsPerDevice)
	}
	if !strings.Contains(r.scrape(t), "gpuaas_agent_telemetry_xids_dropped_total 36\n") {
		t.Error("dropped xids not counted")
	}
}

// Sequence numbers increase strictly, and every report verifies.
func TestSequencesIncreaseStrictly(t *testing.T) {
	h := newHost(t, 1, 7)
	r := start(t, h, &leases{}, true)
	var last uint64
	for range 5 {
		p := r.sample(t)
		if p.GetSequence() <= last {
			t.Fatalf("sequence %d after %d", p.GetSequence(), last)
		}
		last = p.GetSequence()
	}
}

// A report nobody takes is replaced by the newer one: the channel never
// holds more than the newest.
func TestUntakenReportIsReplacedByTheNewest(t *testing.T) {
	h := newHost(t, 1, 7)
	r := start(t, h, &leases{}, true)
	var newest *agentv1.TelemetryReport
	for range 4 {
		rep, err := r.s.SampleNow(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		newest = rep
	}
	if n := len(r.s.Reports()); n != 1 {
		t.Fatalf("%d reports queued, want 1", n)
	}
	got := <-r.s.Reports()
	if got != newest {
		t.Fatal("the queued report is not the newest")
	}
	p, err := attestation.VerifyTelemetry(got, r.key.Public())
	if err != nil {
		t.Fatal(err)
	}
	if p.GetSequence() < 5 { // the first sample (Run's own) and four asked for
		t.Errorf("newest sequence %d, want at least 5", p.GetSequence())
	}
	if !strings.Contains(r.scrape(t), "gpuaas_agent_telemetry_reports_superseded_total 4") {
		t.Error("superseded reports not counted")
	}
}

// Without a key the sampler serves metrics and sends no reports.
func TestWithoutAKeyThereAreNoReports(t *testing.T) {
	h := newHost(t, 1, 2)
	r := start(t, h, &leases{}, false)
	rep, err := r.s.SampleNow(t.Context())
	if err != nil || rep != nil {
		t.Fatalf("SampleNow = %v, %v; want no report", rep, err)
	}
	if n := len(r.s.Reports()); n != 0 {
		t.Fatalf("%d reports queued without a key", n)
	}
	if !strings.Contains(r.scrape(t), "DCGM_FI_DEV_FB_FREE{") {
		t.Error("no device metrics without a key")
	}
}

// flaky fails the telemetry of chosen devices.
type flaky struct {
	gpu.Backend
	fail map[string]bool
}

func (f flaky) DeviceTelemetry(ctx context.Context, uuid string) (gpu.Telemetry, error) {
	if f.fail[uuid] {
		return gpu.Telemetry{}, fmt.Errorf("read %s: %w", uuid, gpu.ErrNotFound)
	}
	return f.Backend.DeviceTelemetry(ctx, uuid)
}

func (f flaky) MIGTelemetry(ctx context.Context, uuid string) (gpu.Telemetry, error) {
	if f.fail[uuid] {
		return gpu.Telemetry{}, fmt.Errorf("read %s: %w", uuid, gpu.ErrNotFound)
	}
	return f.Backend.MIGTelemetry(ctx, uuid)
}

// One device that cannot be read is reported without readings and
// counted; the others are unaffected.
func TestOneUnreadableDeviceLosesNoOther(t *testing.T) {
	h := newHost(t, 2, 2)
	bad := h.migs[h.gpus[0].UUID][1].UUID
	key, err := attestation.NewTelemetryKey()
	if err != nil {
		t.Fatal(err)
	}
	s, err := telemetry.NewSampler(telemetry.Options{
		Backend: flaky{h.sim, map[string]bool{bad: true, h.gpus[1].UUID: true}},
		Node:    "node-a", Interval: time.Hour, Key: key,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	defer func() { cancel(); <-done }()

	rep, err := s.SampleNow(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	p, err := attestation.VerifyTelemetry(rep, key.Public())
	if err != nil {
		t.Fatal(err)
	}
	if n := len(p.GetDevices()); n != 6 {
		t.Fatalf("%d samples, want all 6 devices", n)
	}
	for _, d := range p.GetDevices() {
		unreadable := d.GetUuid() == bad || d.GetUuid() == h.gpus[1].UUID
		if got := d.MemoryFreeMib != nil; got == unreadable {
			t.Errorf("%s: has readings %v, unreadable %v", d.GetUuid(), got, unreadable)
		}
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(s)
	for what, want := range map[string]float64{"gpu": 2, "mig_device": 2} { // two samples: Run's first and ours
		if got := counterOf(t, reg, "gpuaas_agent_telemetry_read_errors_total", what); got != want {
			t.Errorf("read errors of %s = %v, want %v", what, got, want)
		}
	}
}

// counterOf is the value of a counter with the label what.
func counterOf(t *testing.T, g prometheus.Gatherer, name, what string) float64 {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if lp.GetName() == "what" && lp.GetValue() == what {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	t.Fatalf("no %s{what=%q}", name, what)
	return 0
}

func TestNewSamplerRefusesBadOptions(t *testing.T) {
	s, err := sim.New(sim.Config{GPUs: []sim.GPUConfig{{Model: "H200"}}})
	if err != nil {
		t.Fatal(err)
	}
	for name, o := range map[string]telemetry.Options{
		"no backend":        {Node: "n"},
		"no node":           {Backend: s},
		"negative interval": {Backend: s, Node: "n", Interval: -time.Second},
	} {
		if _, err := telemetry.NewSampler(o); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestRunTwiceIsRefused(t *testing.T) {
	h := newHost(t, 1, 0)
	r := start(t, h, &leases{}, false)
	if _, err := r.s.SampleNow(t.Context()); err != nil { // Run is serving
		t.Fatal(err)
	}
	if err := r.s.Run(t.Context()); err == nil {
		t.Fatal("a second Run started")
	}
}

// SampleNow without Run gives up with its context.
func TestSampleNowWithoutRunEndsWithItsContext(t *testing.T) {
	s, err := telemetry.NewSampler(telemetry.Options{Backend: newHost(t, 1, 0).sim, Node: "n"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := s.SampleNow(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("SampleNow = %v, want context.Canceled", err)
	}
}

// noEvents is a backend whose event stream cannot be opened.
type noEvents struct{ gpu.Backend }

func (noEvents) Events(context.Context) (<-chan gpu.Event, error) {
	return nil, fmt.Errorf("subscribe: %w", gpu.ErrNotSupported)
}

// Without an event stream there is no XID series (not a made-up 0), the
// failure is counted, and sampling goes on.
func TestWithoutEventsThereIsNoXIDSeries(t *testing.T) {
	h := newHost(t, 1, 1)
	s, err := telemetry.NewSampler(telemetry.Options{Backend: noEvents{h.sim}, Node: "node-a", Interval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	defer func() { cancel(); <-done }()
	if _, err := s.SampleNow(t.Context()); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(s)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, mf := range mfs {
		names = append(names, mf.GetName())
	}
	if slices.Contains(names, "DCGM_FI_DEV_XID_ERRORS") || !slices.Contains(names, "DCGM_FI_DEV_FB_FREE") {
		t.Errorf("families %v: want device metrics and no XID series", names)
	}
	if got := counterOf(t, reg, "gpuaas_agent_telemetry_read_errors_total", "events"); got < 2 {
		t.Errorf("event stream failures counted %v, want one per sample (2)", got)
	}
}

// An XID of a MIG device that is destroyed before the next report is
// reported on its GPU, not lost.
func TestXIDOfAVanishedMIGDeviceGoesToItsGPU(t *testing.T) {
	h := newHost(t, 1, 2)
	r := start(t, h, &leases{}, true)
	g := h.gpus[0]
	m := h.migs[g.UUID][1]
	r.sample(t)
	if err := h.sim.InjectXID(g.UUID, 31, uint32(m.GPUInstanceID), uint32(m.ComputeInstanceID)); err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	if err := h.sim.DestroyComputeInstance(ctx, g.UUID, m.GPUInstanceID, m.ComputeInstanceID); err != nil {
		t.Fatal(err)
	}
	if err := h.sim.DestroyGPUInstance(ctx, g.UUID, m.GPUInstanceID); err != nil {
		t.Fatal(err)
	}
	p := r.sample(t)
	if n := len(p.GetDevices()); n != 2 {
		t.Fatalf("%d samples, want the GPU and its remaining MIG device", n)
	}
	if got := sampleOf(t, p, g.UUID).GetXids(); !slices.Equal(got, []uint64{31}) {
		t.Errorf("GPU xids %v, want [31]", got)
	}
}

// TestScrapeServesTheLastSampleWholeInBothEncodings: the endpoint's body
// parses as one exposition (plain, and gzip made of two members), with the
// agent's own families and the sampler's; a new sample replaces the
// sampler's part on the next scrape.
func TestScrapeServesTheLastSampleWholeInBothEncodings(t *testing.T) {
	h := newHost(t, 1, 2)
	var l leases
	m := h.migs[h.gpus[0].UUID][0]
	l.set(m.UUID, "l-first", "tenant-a")
	r := start(t, h, &l, true)
	r.sample(t)
	srv := httptest.NewServer(r.metrics.Handler())
	defer srv.Close()
	get := func(gz bool) map[string]*dto.MetricFamily {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, srv.URL, nil)
		tr := &http.Transport{DisableCompression: true}
		if gz {
			req.Header.Set("Accept-Encoding", "gzip")
		}
		resp, err := (&http.Client{Transport: tr}).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var body io.Reader = resp.Body
		if gz {
			if resp.Header.Get("Content-Encoding") != "gzip" {
				t.Fatal("asked for gzip, got none")
			}
			zr, err := gzip.NewReader(resp.Body)
			if err != nil {
				t.Fatal(err)
			}
			body = zr
		}
		p := expfmt.NewTextParser(model.UTF8Validation)
		fams, err := p.TextToMetricFamilies(body)
		if err != nil {
			t.Fatalf("the scrape does not parse as one exposition (gzip %v): %v", gz, err)
		}
		return fams
	}
	leaseOf := func(fams map[string]*dto.MetricFamily) string {
		for _, mt := range fams["DCGM_FI_PROF_GR_ENGINE_ACTIVE"].GetMetric() {
			for _, lp := range mt.GetLabel() {
				if lp.GetName() == "lease" && lp.GetValue() != "" {
					return lp.GetValue()
				}
			}
		}
		return ""
	}
	for _, gz := range []bool{false, true} {
		fams := get(gz)
		if fams["gpuaas_agent_fence_denials_total"] == nil || fams["go_goroutines"] == nil || leaseOf(fams) != "l-first" {
			t.Fatalf("gzip %v: families %d, lease %q", gz, len(fams), leaseOf(fams))
		}
	}
	l.set(m.UUID, "l-second", "tenant-a")
	r.sample(t)
	if got := leaseOf(get(true)); got != "l-second" {
		t.Fatalf("after a new sample the scrape shows lease %q", got)
	}
}

// TestHandlerMadeBeforeTheSamplerServesIt: the agent mounts /metrics before
// it starts its sampler; the sampler's series must still be served.
func TestHandlerMadeBeforeTheSamplerServesIt(t *testing.T) {
	h := newHost(t, 1, 1)
	m := telemetry.New()
	srv := httptest.NewServer(m.Handler())
	defer srv.Close()
	s, err := telemetry.NewSampler(telemetry.Options{Backend: h.sim, Node: "node-a", Interval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.RegisterSampler(s); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	defer func() { cancel(); <-done }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := srv.Client().Get(srv.URL)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if strings.Contains(string(b), "DCGM_FI_DEV_FB_USED{") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no sampler series on a handler made before the sampler:\n%.2000s", b)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
