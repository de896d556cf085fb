package footprint

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
	"github.com/gpuaas/gpuaas/test/cluster"
	"github.com/gpuaas/gpuaas/test/harness"
)

// The host under measurement: 8 simulated H200s, each cut into its 7
// smallest partitions by a static mig-parted layout, 56 in all.
const (
	node      = "footprint"
	gpuModel  = "H200"
	gpuCount  = 8
	profile   = "1g.18gb"
	perGPU    = 7
	instances = gpuCount * perGPU
	// layoutName is the mig-parted config the agent applies at start.
	layoutName = "all-" + profile
	// telemetryInterval is the agent's sampling interval under test.
	telemetryInterval = 10 * time.Second
)

// The targets. 40 MB is read as 40,000,000 bytes, the stricter of
// MB and MiB.
const (
	targetRSSMiB     = 40e6 / (1 << 20)
	targetCPUPercent = 1.0
)

// sampleEvery is how often the agent's /proc files are read; scrapeEvery
// how often phase 2 scrapes /metrics (Prometheus's tightest usual interval).
const (
	sampleEvery = time.Second
	scrapeEvery = time.Second
	// cpuWindow is the span of the busiest-window CPU figure: one telemetry
	// interval.
	cpuWindow = telemetryInterval
)

// migPartedConfig cuts every GPU into seven 1g.18gb instances.
const migPartedConfig = `version: v1
mig-configs:
  ` + layoutName + `:
    - devices: all
      mig-enabled: true
      mig-devices:
        "` + profile + `": 7
`

// Report is what GPUAAS_FOOTPRINT_OUT receives.
type Report struct {
	Date   string `json:"date"`
	Kernel string `json:"kernel"`
	CPUs   int    `json:"cpus"`
	// Agent is what was measured.
	Agent struct {
		GPUs      int    `json:"gpus"`
		Model     string `json:"model"`
		Profile   string `json:"profile"`
		Instances int    `json:"instances"`
		// TelemetryInterval is the agent's sampling interval.
		TelemetryInterval string `json:"telemetry_interval"`
	} `json:"agent"`
	WarmupSeconds float64       `json:"warmup_s"`
	ClockTicks    int           `json:"clock_ticks"`
	Phases        []PhaseReport `json:"phases"`
	Targets       []Target      `json:"targets"`
}

// PhaseReport is one measured phase.
type PhaseReport struct {
	Name string `json:"name"`
	Summary
	Scrape *ScrapeStats `json:"scrape,omitempty"`
	// Load is the host's 1-minute load average at the phase's start and
	// end (the machine is shared: read the figures against it).
	LoadStart string `json:"loadavg_start"`
	LoadEnd   string `json:"loadavg_end"`
}

// Target is one figure against the target.
type Target struct {
	Phase string  `json:"phase"`
	What  string  `json:"what"`
	Got   float64 `json:"got"`
	Limit float64 `json:"limit"`
	Met   bool    `json:"met"`
}

// TestAgentFootprint runs the real control plane and agent, the agent on 8
// simulated H200s fully partitioned (56 instances), and measures the
// agent's resident memory and CPU over two phases: idle (its own sampling
// every 10 s only) and while /metrics is scraped every second. It fails if
// the agent stops or a scrape fails; the figures themselves are recorded
// (log, GPUAAS_FOOTPRINT_OUT), not asserted.
func TestAgentFootprint(t *testing.T) {
	if os.Getenv("GPUAAS_FOOTPRINT") != "1" {
		t.Skip("takes minutes: run with GPUAAS_FOOTPRINT=1 (make bench does); GPUAAS_FOOTPRINT_DURATION sets each phase (default 5m), GPUAAS_FOOTPRINT_WARMUP the unmeasured start (default 30s), GPUAAS_FOOTPRINT_OUT a JSON report file")
	}
	harness.RequireRoot(t, harness.ContainerdComponents...)
	phase := envDuration(t, "GPUAAS_FOOTPRINT_DURATION", 5*time.Minute)
	warmup := envDuration(t, "GPUAAS_FOOTPRINT_WARMUP", 30*time.Second)
	if need := warmup + 2*phase + 3*time.Minute; hasLess(t, need) {
		t.Fatalf("the test needs about %s: run go test with -timeout %s or more", need.Round(time.Minute), (need + 5*time.Minute).Round(time.Minute))
	}

	var binDir string
	for _, pkg := range []string{"./agent/cmd/gpuaas-agent", "./controlplane/cmd/gpuaas-controlplane", "./controlplane/cmd/gpuaasctl"} {
		binDir = filepath.Dir(harness.BuildBinary(t, pkg))
	}
	ctx := t.Context()
	models := make([]string, gpuCount)
	for i := range models {
		models[i] = gpuModel
	}
	layout := filepath.Join(t.TempDir(), "mig-parted.yaml")
	if err := os.WriteFile(layout, []byte(migPartedConfig), 0o600); err != nil {
		t.Fatal(err)
	}
	static := fmt.Sprintf("mig:\n  static:\n    config_file: %q\n    config_name: %s\n", layout, layoutName)
	startCtx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	c, err := cluster.Start(startCtx, cluster.Options{BinDir: binDir, Agents: map[string][]string{node: models}, StopGrace: time.Second,
		TelemetryInterval: telemetryInterval, AgentConfig: func(string) string { return static }})
	if err != nil {
		t.Fatalf("start cluster: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, f := range []string{"controlplane.log", "agent-" + node + ".log"} {
				b, _ := os.ReadFile(filepath.Join(c.Dir, f))
				t.Logf("%s:\n%s", f, tail(b, 8<<10))
			}
		}
		if err := c.Close(); err != nil {
			t.Errorf("close cluster: %v", err)
		}
	})
	agent := c.Agent(node)

	nodes, err := c.Nodes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	waitInventory(t, ctx, nodes, agent)
	t.Logf("agent pid %d: %d %s GPUs, %d %s instances, telemetry interval %s; warm-up %s, then two phases of %s", agent.Pid(), gpuCount, gpuModel, instances, profile, telemetryInterval, warmup, phase)

	hz := ClockTicks()
	if err := sleep(ctx, agent, warmup); err != nil {
		t.Fatal(err)
	}
	rep := &Report{Date: time.Now().UTC().Format(time.RFC3339), Kernel: kernel(), CPUs: runtime.NumCPU(), WarmupSeconds: warmup.Seconds(), ClockTicks: hz}
	rep.Agent.GPUs, rep.Agent.Model, rep.Agent.Profile, rep.Agent.Instances, rep.Agent.TelemetryInterval = gpuCount, gpuModel, profile, instances, telemetryInterval.String()

	idle, err := measure(ctx, agent, phase, hz, nil)
	if err != nil {
		t.Fatalf("idle phase: %v", err)
	}
	idle.Name = "idle"
	s := &scraper{url: "http://" + c.MetricsAddr[node] + "/metrics", client: &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{}}}
	defer s.client.CloseIdleConnections()
	scraped, err := measure(ctx, agent, phase, hz, s)
	if err != nil {
		t.Fatalf("scrape phase: %v", err)
	}
	scraped.Name = "scrape-1s"
	rep.Phases = []PhaseReport{idle, scraped}
	for _, p := range rep.Phases {
		rep.Targets = append(rep.Targets,
			Target{Phase: p.Name, What: "rss_max_mib", Got: p.RSSMaxMiB, Limit: targetRSSMiB, Met: p.RSSMaxMiB < targetRSSMiB},
			Target{Phase: p.Name, What: "cpu_pct_one_core", Got: p.CPUPercent, Limit: targetCPUPercent, Met: p.CPUPercent < targetCPUPercent})
	}
	logReport(t, rep)
	if out := os.Getenv("GPUAAS_FOOTPRINT_OUT"); out != "" {
		b, err := json.MarshalIndent(rep, "", "  ")
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(out, append(b, '\n'), 0o644); err != nil {
			t.Fatalf("write report: %v", err)
		}
		t.Logf("report written to %s", out)
	}
}

// waitInventory waits until the control plane sees the node connected with
// every GPU fully partitioned.
func waitInventory(t *testing.T, ctx context.Context, nodes nodev1.NodeServiceClient, agent *cluster.Proc) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	last := "no answer"
	for {
		if !agent.Running() {
			t.Fatalf("before reporting its partitions: %v", exited(agent))
		}
		resp, err := nodes.GetNode(ctx, &nodev1.GetNodeRequest{Id: node})
		if err == nil {
			n, inst := resp.GetNode(), 0
			for _, g := range n.GetInventory().GetGpus() {
				inst += len(g.GetInstances())
			}
			if n.GetConnected() && len(n.GetInventory().GetGpus()) == gpuCount && inst == instances {
				return
			}
			last = fmt.Sprintf("connected %v, %d GPUs, %d instances", n.GetConnected(), len(n.GetInventory().GetGpus()), inst)
		} else {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			t.Fatalf("node %s never reported %d GPUs with %d instances: %s", node, gpuCount, instances, last)
		}
		if err := sleep(ctx, agent, 200*time.Millisecond); err != nil {
			t.Fatal(err)
		}
	}
}

// measure samples the agent every sampleEvery for d, with s scraping its
// endpoint meanwhile if not nil. It fails when the agent exits, a sample
// cannot be read, or a scrape fails.
func measure(ctx context.Context, agent *cluster.Proc, d time.Duration, hz int, s *scraper) (PhaseReport, error) {
	rep := PhaseReport{LoadStart: loadavg()}
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	scrapeErr := make(chan error, 1)
	if s != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.run(ctx); err != nil {
				scrapeErr <- err
			}
		}()
	}
	var samples []Sample
	tick := time.NewTicker(sampleEvery)
	defer tick.Stop()
	end := time.Now().Add(d)
	for {
		if !agent.Running() {
			return rep, exited(agent)
		}
		x, err := ReadSample(agent.Pid())
		if err != nil {
			return rep, err
		}
		samples = append(samples, x)
		if !x.Time.Before(end) {
			break
		}
		select {
		case <-ctx.Done():
			return rep, ctx.Err()
		case err := <-scrapeErr:
			return rep, err
		case <-agent.Done():
			return rep, exited(agent)
		case <-tick.C:
		}
	}
	cancel()
	wg.Wait()
	select {
	case err := <-scrapeErr:
		return rep, err
	default:
	}
	rep.Summary = Summarize(samples, hz, cpuWindow)
	rep.LoadEnd = loadavg()
	if s != nil {
		st := s.stats()
		rep.Scrape = &st
	}
	return rep, nil
}

// scraper GETs a Prometheus endpoint every scrapeEvery, as Prometheus does
// (text format, gzip), and checks every answer.
type scraper struct {
	url    string
	client *http.Client

	mu            sync.Mutex
	latencies     []time.Duration
	bytes, series int
}

// run scrapes until ctx ends; the first failed scrape ends it with an error.
func (s *scraper) run(ctx context.Context) error {
	tick := time.NewTicker(scrapeEvery)
	defer tick.Stop()
	for {
		if err := s.scrape(ctx); err != nil {
			if ctx.Err() != nil {
				return nil // cut short by the phase's end
			}
			return err
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

func (s *scraper) scrape(ctx context.Context) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.url, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", "text/plain;version=0.0.4;q=1,*/*;q=0.1")
	start := time.Now()
	resp, err := s.client.Do(req)
	if err != nil {
		return fmt.Errorf("scrape %s: %w", s.url, err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	took := time.Since(start)
	if err != nil {
		return fmt.Errorf("scrape %s: read body: %w", s.url, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("scrape %s: %s: %s", s.url, resp.Status, tail(body, 512))
	}
	all, healthy := CountSeries(body, "gpuaas_agent_gpu_healthy")
	if healthy != gpuCount {
		return fmt.Errorf("scrape %s: %d gpuaas_agent_gpu_healthy series, want one per GPU (%d)", s.url, healthy, gpuCount)
	}
	s.mu.Lock()
	s.latencies = append(s.latencies, took)
	s.bytes, s.series = len(body), all
	s.mu.Unlock()
	return nil
}

func (s *scraper) stats() ScrapeStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return SummarizeScrapes(s.latencies, s.bytes, s.series)
}

// sleep waits d, and fails early if the agent exits or ctx ends.
func sleep(ctx context.Context, agent *cluster.Proc, d time.Duration) error {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-agent.Done():
		return exited(agent)
	}
}

// exited is the error of an agent that stopped (see its log).
func exited(agent *cluster.Proc) error {
	return fmt.Errorf("agent exited: %v (log: %s)", agent.Err(), agent.LogPath)
}

// logReport logs one table line per phase and one PASS/MISS line per
// target.
func logReport(t *testing.T, r *Report) {
	t.Helper()
	t.Logf("%-10s %8s %9s %8s %6s %10s %7s %7s %7s %6s %10s %s", "phase", "rss max", "rss mean", "rss hwm", "cpu %", "cpu % max", "threads", "scrapes", "bytes", "series", "scrape p99", "load")
	for _, p := range r.Phases {
		scr := fmt.Sprintf("%7s %7s %6s %10s", "-", "-", "-", "-")
		if p.Scrape != nil {
			scr = fmt.Sprintf("%7d %7d %6d %8.1fms", p.Scrape.Scrapes, p.Scrape.Bytes, p.Scrape.Series, p.Scrape.LatencyP99Ms)
		}
		t.Logf("%-10s %5.1fMiB %6.1fMiB %5.1fMiB %6.2f %5.2f/%3.0fs %7d %s %s-%s",
			p.Name, p.RSSMaxMiB, p.RSSMeanMiB, p.HWMMiB, p.CPUPercent, p.CPUMaxWindowPercent, p.Window, p.ThreadsMax, scr, p.LoadStart, p.LoadEnd)
	}
	for _, g := range r.Targets {
		verdict := "MISS"
		if g.Met {
			verdict = "PASS"
		}
		t.Logf("%s %-10s %-17s %.2f (target < %.2f)", verdict, g.Phase, g.What, g.Got, g.Limit)
	}
}

func envDuration(t *testing.T, key string, def time.Duration) time.Duration {
	t.Helper()
	v := os.Getenv(key)
	if v == "" {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		t.Fatalf("%s=%q: want a positive duration such as 5m", key, v)
	}
	return d
}

// hasLess reports whether the test's deadline (go test -timeout) leaves
// less than d.
func hasLess(t *testing.T, d time.Duration) bool {
	dl, ok := t.Deadline()
	return ok && time.Until(dl) < d
}

// loadavg is the host's 1-minute load average.
func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return "?"
	}
	return f[0]
}

func kernel() string {
	b, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(string(b))
}

// tail is the last n bytes of b.
func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}
