// Command gpuaas-agent runs on every GPU host: it carves GPUs into MIG
// partitions, runs each lease's workload in a containerd container bound to
// its partition, and reports to the control plane over mTLS.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/gpuaas/gpuaas/agent/doctor"
	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/agent/gpu/health"
	"github.com/gpuaas/gpuaas/agent/gpu/nvml"
	"github.com/gpuaas/gpuaas/agent/gpu/sim"
	"github.com/gpuaas/gpuaas/agent/isolation"
	"github.com/gpuaas/gpuaas/agent/lease"
	"github.com/gpuaas/gpuaas/agent/partition"
	"github.com/gpuaas/gpuaas/agent/runtime"
	"github.com/gpuaas/gpuaas/agent/session"
	"github.com/gpuaas/gpuaas/agent/status"
	"github.com/gpuaas/gpuaas/agent/telemetry"
	"github.com/gpuaas/gpuaas/pkg/attestation"
	"github.com/gpuaas/gpuaas/pkg/auditsig"
	"github.com/gpuaas/gpuaas/pkg/config"
	"github.com/gpuaas/gpuaas/pkg/endpoint"
	"github.com/gpuaas/gpuaas/pkg/identity"
	"github.com/gpuaas/gpuaas/pkg/mig"
	"github.com/gpuaas/gpuaas/pkg/sanitize"
	"github.com/gpuaas/gpuaas/pkg/sdnotify"
	"github.com/gpuaas/gpuaas/pkg/seal"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// Config is the agent's configuration file.
type Config struct {
	// Node is this host's node name; it must match the SVID.
	Node string `yaml:"node"`
	// ControlPlane is the control plane's host:port, or its replicas'
	// addresses separated by commas (the agent uses the first that
	// answers and fails over to the others).
	ControlPlane string      `yaml:"control_plane"`
	TrustDomain  string      `yaml:"trust_domain"`
	SVID         config.SVID `yaml:"svid"`
	DataDir      string      `yaml:"data_dir"`
	Containerd   struct {
		Address   string `yaml:"address"`
		Namespace string `yaml:"namespace"`
		// CDISpecDir, if set, makes the agent write a CDI spec per
		// partition there and inject the partition through it (the path
		// the NVIDIA container toolkit uses), e.g. /var/run/cdi.
		CDISpecDir string `yaml:"cdi_spec_dir"`
	} `yaml:"containerd"`
	GPU struct {
		// Backend is "sim" (simulated GPUs) or "nvml".
		Backend string `yaml:"backend"`
		Sim     struct {
			GPUs []struct {
				Model      string `yaml:"model"`
				MIGEnabled bool   `yaml:"mig_enabled"`
			} `yaml:"gpus"`
		} `yaml:"sim"`
	} `yaml:"gpu"`
	// Images is the registry policy: only these registries ("host[:port]",
	// "*.domain", or "*"), and, with require_digest, only references
	// pinned by digest. Empty allows none (fail closed).
	Images struct {
		AllowedRegistries []string `yaml:"allowed_registries"`
		RequireDigest     bool     `yaml:"require_digest"`
	} `yaml:"images"`
	// ImageArchives are OCI archives imported at start (air-gapped hosts).
	Isolation struct {
		// Disabled turns eBPF fencing off (development only: leases then
		// run with only the runtime's device cgroup).
		Disabled bool `yaml:"disabled"`
		// PinRoot is where fences are pinned in bpffs.
		PinRoot string `yaml:"pin_root"`
	} `yaml:"isolation"`
	// MIG chooses how partitions are made: per lease (default), or a
	// static mig-parted layout applied at start for operators who
	// pre-partition.
	MIG struct {
		Static struct {
			ConfigFile string `yaml:"config_file"`
			ConfigName string `yaml:"config_name"`
		} `yaml:"static"`
	} `yaml:"mig"`
	// Network is the CNI bridge network leases join (each in a network
	// namespace of its own; a lease may ask for none instead).
	Network struct {
		// Disabled turns bridge networking off: leases asking for a
		// network (the default) then fail; NETWORK_MODE_NONE leases run.
		Disabled bool `yaml:"disabled"`
		// Bridge is the host's bridge device (default gpuaas0) and Subnet
		// the IPv4 prefix leases take addresses from (default
		// 10.213.0.0/16; the first address is the bridge's).
		Bridge string `yaml:"bridge"`
		Subnet string `yaml:"subnet"`
		// PluginDirs hold the CNI plugins (bridge, host-local, portmap,
		// loopback); default /usr/lib/cni, /opt/cni/bin.
		PluginDirs []string `yaml:"plugin_dirs"`
		// RunDir holds the leases' network namespace files (default
		// /run/gpuaas/netns). Address allocations live under
		// data_dir/network.
		RunDir string `yaml:"run_dir"`

		cfg *runtime.NetworkConfig
	} `yaml:"network"`
	// Logs bounds each lease's stdout and stderr log: max_files files of
	// at most max_bytes, written by the log driver the shim runs.
	Logs struct {
		// Driver is the gpuaas-logdriver binary (absolute path). Default:
		// gpuaas-logdriver next to the agent's executable; without one
		// there, the shim writes an uncapped log (with a warning).
		Driver   string `yaml:"driver"`
		MaxBytes int64  `yaml:"max_bytes"`
		MaxFiles int    `yaml:"max_files"`
	} `yaml:"logs"`
	// MetricsListen serves Prometheus metrics at /metrics (host:port);
	// empty turns it off.
	MetricsListen string `yaml:"metrics_listen"`
	// StatusSocket is the unix socket `gpuaas-agent status` reads (default
	// /run/gpuaas/agent.sock; "none" turns it off). Only root may read it,
	// and the uids and groups in StatusAllowUIDs/GIDs.
	StatusSocket    string   `yaml:"status_socket"`
	StatusAllowUIDs []uint32 `yaml:"status_allow_uids"`
	StatusAllowGIDs []uint32 `yaml:"status_allow_gids"`
	// Telemetry samples every GPU and MIG device every interval (default
	// 10s), for /metrics and, signed, for the control plane.
	Telemetry struct {
		Interval config.Duration `yaml:"interval"`
	} `yaml:"telemetry"`
	// Secrets seals tenant env values in the journal with the keys in
	// key_file (pkg/seal; `gpuaasctl secrets keygen`); without it they are
	// journaled in plain text, protected by file permissions only.
	Secrets struct {
		KeyFile string `yaml:"key_file"`
	} `yaml:"secrets"`
	// Attestation: the TPM to quote (default: /dev/tpmrm0 when present;
	// "none": never) and the PCRs (default 0-7).
	Attestation struct {
		TPMDevice string `yaml:"tpm_device"`
		PCRs      []int  `yaml:"pcrs"`
	} `yaml:"attestation"`
	ImageArchives []string        `yaml:"image_archives"`
	StopGrace     config.Duration `yaml:"stop_grace"`
	Log           config.Log      `yaml:"log"`

	controlPlanes []string
	td            spiffeid.TrustDomain
	level         slog.Level
	path          string // the file it was loaded from, hashed into attestation reports
	sealer        *seal.Keyring
	migParted     *mig.MigPartedConfig
}

// Validate implements config.Validator.
func (c *Config) Validate() error {
	if err := identity.ValidateNodeName(c.Node); err != nil {
		return config.FieldError("node", "%v", err)
	}
	if c.Telemetry.Interval == 0 {
		c.Telemetry.Interval = config.Duration(10 * time.Second)
	}
	if c.Telemetry.Interval.D() < time.Second || c.Telemetry.Interval.D() > 10*time.Minute {
		return config.FieldError("telemetry.interval", "must be between 1s and 10m")
	}
	if k := c.Secrets.KeyFile; k != "" {
		if !filepath.IsAbs(k) {
			return config.FieldError("secrets.key_file", "must be an absolute path")
		}
		ring, err := seal.LoadKeyring(k)
		if err != nil {
			return config.FieldError("secrets.key_file", "%v", err)
		}
		c.sealer = ring
	}
	if d := c.Attestation.TPMDevice; d != "" && d != "none" && !filepath.IsAbs(d) {
		return config.FieldError("attestation.tpm_device", "must be an absolute path or \"none\"")
	}
	for i, p := range c.Attestation.PCRs {
		if p < 0 || p > attestation.MaxPCR {
			return config.FieldError(fmt.Sprintf("attestation.pcrs[%d]", i), "must be between 0 and %d", attestation.MaxPCR)
		}
	}
	cps, err := endpoint.Parse(c.ControlPlane)
	if err != nil {
		return config.FieldError("control_plane", "must be host:port, or several separated by commas: %v", err)
	}
	c.controlPlanes = cps
	td, err := spiffeid.TrustDomainFromString(c.TrustDomain)
	if err != nil {
		return config.FieldError("trust_domain", "%v", err)
	}
	c.td = td
	if err := c.SVID.Validate(); err != nil {
		return err
	}
	if c.DataDir == "" || !filepath.IsAbs(c.DataDir) {
		return config.FieldError("data_dir", "must be an absolute path")
	}
	if c.Containerd.Address == "" {
		c.Containerd.Address = "/run/containerd/containerd.sock"
	}
	if !filepath.IsAbs(c.Containerd.Address) {
		return config.FieldError("containerd.address", "must be an absolute socket path")
	}
	if d := c.Containerd.CDISpecDir; d != "" && !filepath.IsAbs(d) {
		return config.FieldError("containerd.cdi_spec_dir", "must be an absolute path")
	}
	if c.Containerd.Namespace == "" {
		c.Containerd.Namespace = "gpuaas"
	}
	switch c.GPU.Backend {
	case "sim":
		if len(c.GPU.Sim.GPUs) == 0 {
			return config.FieldError("gpu.sim.gpus", "at least one simulated GPU is required")
		}
	case "nvml":
		if len(c.GPU.Sim.GPUs) > 0 {
			return config.FieldError("gpu.sim", "only for the sim backend")
		}
	default:
		return config.FieldError("gpu.backend", "must be sim or nvml")
	}
	for i, p := range c.ImageArchives {
		if !filepath.IsAbs(p) {
			return config.FieldError(fmt.Sprintf("image_archives[%d]", i), "must be an absolute path")
		}
	}
	if st := c.MIG.Static; st.ConfigFile != "" || st.ConfigName != "" {
		if st.ConfigFile == "" || !filepath.IsAbs(st.ConfigFile) {
			return config.FieldError("mig.static.config_file", "must be an absolute path")
		}
		if st.ConfigName == "" {
			return config.FieldError("mig.static.config_name", "is required with mig.static.config_file")
		}
		data, err := os.ReadFile(st.ConfigFile)
		if err != nil {
			return config.FieldError("mig.static.config_file", "%v", err)
		}
		mp, err := mig.ParseMigParted(data)
		if err != nil {
			return config.FieldError("mig.static.config_file", "%v", err)
		}
		if _, ok := mp.Config(st.ConfigName); !ok {
			return config.FieldError("mig.static.config_name", "no config %q in %s (it has %s)", st.ConfigName, st.ConfigFile, strings.Join(mp.Names(), ", "))
		}
		c.migParted = mp
	}
	if err := (runtime.ImagePolicy{AllowedRegistries: c.Images.AllowedRegistries, RequireDigest: c.Images.RequireDigest}).Validate(); err != nil {
		return config.FieldError("images.allowed_registries", "%v", err)
	}
	if c.MetricsListen != "" {
		if _, _, err := net.SplitHostPort(c.MetricsListen); err != nil {
			return config.FieldError("metrics_listen", "must be host:port: %v", err)
		}
	}
	if c.StatusSocket == "" {
		c.StatusSocket = status.DefaultSocket
	}
	if c.StatusSocket != "none" {
		if err := c.statusConfig(nil).Validate(); err != nil {
			return config.FieldError("status_socket", "%v", err)
		}
	} else if len(c.StatusAllowUIDs) > 0 || len(c.StatusAllowGIDs) > 0 {
		return config.FieldError("status_socket", "is \"none\" but status_allow_uids or status_allow_gids is set")
	}
	if c.Isolation.PinRoot == "" {
		c.Isolation.PinRoot = "/sys/fs/bpf/gpuaas"
	}
	if !filepath.IsAbs(c.Isolation.PinRoot) {
		return config.FieldError("isolation.pin_root", "must be an absolute path")
	}
	if err := c.validateNetwork(); err != nil {
		return err
	}
	if err := c.validateLogs(); err != nil {
		return err
	}
	if c.StopGrace == 0 {
		c.StopGrace = config.Duration(10 * time.Second)
	}
	if c.StopGrace.D() < 0 || c.StopGrace.D() > 10*time.Minute {
		return config.FieldError("stop_grace", "must be between 0 and 10m")
	}
	if c.level, err = c.Log.SlogLevel(); err != nil {
		return err
	}
	return nil
}

// validateNetwork checks the network section and builds the runtime's
// network configuration from it (nil when disabled).
func (c *Config) validateNetwork() error {
	n := &c.Network
	if n.Disabled {
		if n.Bridge != "" || n.Subnet != "" || len(n.PluginDirs) > 0 || n.RunDir != "" {
			return config.FieldError("network", "settings given with disabled: true")
		}
		return nil
	}
	nc := runtime.NetworkConfig{Bridge: n.Bridge, PluginDirs: n.PluginDirs, RunDir: n.RunDir, StateDir: filepath.Join(c.DataDir, "network")}
	if n.Subnet != "" {
		p, err := netip.ParsePrefix(n.Subnet)
		if err != nil {
			return config.FieldError("network.subnet", "%v", err)
		}
		nc.Subnet = p
	}
	if err := nc.Validate(); err != nil {
		key := "network"
		switch msg := err.Error(); {
		case strings.HasPrefix(msg, "bridge"):
			key = "network.bridge"
		case strings.HasPrefix(msg, "subnet"):
			key = "network.subnet"
		case strings.Contains(msg, "run dir"):
			key = "network.run_dir"
		case strings.HasPrefix(msg, "CNI plugin"):
			key = "network.plugin_dirs"
		}
		return config.FieldError(key, "%v", err)
	}
	n.cfg = &nc
	return nil
}

// validateLogs checks the logs section and fills in its defaults.
func (c *Config) validateLogs() error {
	l := &c.Logs
	if l.Driver != "" && !filepath.IsAbs(l.Driver) {
		return config.FieldError("logs.driver", "must be an absolute path")
	}
	if l.MaxBytes == 0 {
		l.MaxBytes = runtime.DefaultLogMaxBytes
	}
	if l.MaxFiles == 0 {
		l.MaxFiles = runtime.DefaultLogMaxFiles
	}
	if l.MaxBytes < 4<<10 || l.MaxBytes > 1<<30 {
		return config.FieldError("logs.max_bytes", "must be between 4096 and 1073741824")
	}
	if l.MaxFiles < 1 || l.MaxFiles > 100 {
		return config.FieldError("logs.max_files", "must be between 1 and 100")
	}
	return nil
}

// statusConfig is the status server's configuration.
func (c *Config) statusConfig(log *slog.Logger) status.Config {
	return status.Config{Socket: c.StatusSocket, AllowUIDs: c.StatusAllowUIDs, AllowGIDs: c.StatusAllowGIDs, Logger: log}
}

// loadConfig reads the configuration file with the environment's
// GPUAAS_AGENT_* variables and the -set flags over it (config.Overrides).
func loadConfig(path string, sets config.SetFlags) (*Config, []config.Override, error) {
	var cfg Config
	applied, err := config.LoadWith(path, &cfg, config.Overrides{EnvPrefix: config.EnvPrefix("agent"), Environ: os.Environ(), Set: sets})
	if err != nil {
		return nil, nil, err
	}
	cfg.path = path
	return &cfg, applied, nil
}

// logDriver is the log driver to use: the configured one, else
// gpuaas-logdriver next to the agent's executable if it is there ("" if
// not: the shim then writes an uncapped log).
func logDriver(cfg *Config, log *slog.Logger) string {
	if cfg.Logs.Driver != "" {
		return cfg.Logs.Driver
	}
	exe, err := os.Executable()
	if err == nil {
		p := filepath.Join(filepath.Dir(exe), "gpuaas-logdriver")
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() {
			return p
		}
	}
	log.Warn("no gpuaas-logdriver next to the agent and none configured (logs.driver): lease logs are not capped")
	return ""
}

func main() {
	if len(os.Args) > 1 {
		switch os.Args[1] {
		case "doctor":
			os.Exit(doctorMain(os.Args[2:]))
		case "status":
			os.Exit(statusMain(os.Args[2:], os.Stdout, os.Stderr))
		}
	}
	cfgPath := flag.String("config", "/etc/gpuaas/agent.yaml", "configuration file")
	showVersion := flag.Bool("version", false, "print the version and exit")
	checkConfig := flag.Bool("check-config", false, "validate the configuration (file, environment and -set) and exit (0: valid)")
	var sets config.SetFlags
	flag.Var(&sets, "set", "override a configuration key, `key.path=value` (repeatable; over GPUAAS_AGENT_* variables, over the file)")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: gpuaas-agent [-config FILE] [-set key.path=value]... [-check-config] [-version]\n       gpuaas-agent doctor [-config FILE] [-set key.path=value]... [-json]\n       gpuaas-agent status [-config FILE | -socket PATH] [-json]\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if *showVersion {
		fmt.Println("gpuaas-agent", version)
		return
	}
	cfg, applied, err := loadConfig(*cfgPath, sets)
	if err != nil {
		fmt.Fprintln(os.Stderr, "gpuaas-agent:", err)
		os.Exit(2)
	}
	if *checkConfig {
		fmt.Println("gpuaas-agent: configuration", *cfgPath, "is valid")
		for _, o := range applied {
			fmt.Println("  overridden:", o)
		}
		return
	}
	log := sanitize.Logger(os.Stderr, cfg.level, cfg.Log.JSON).With("node", cfg.Node)
	for _, o := range applied {
		log.Info("configuration key overridden", "key", o.Key, "source", o.Source)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cfg, log); err != nil {
		log.Error("agent stopped", "err", err)
		os.Exit(1)
	}
}

// doctorMain runs `gpuaas-agent doctor`: every host prerequisite checked
// against the configuration, findings on stdout, exit code 0 (all good),
// 1 (warnings) or 2 (failures; also a configuration that does not load).
func doctorMain(args []string) int {
	fs := flag.NewFlagSet("doctor", flag.ContinueOnError)
	cfgPath := fs.String("config", "/etc/gpuaas/agent.yaml", "configuration file")
	asJSON := fs.Bool("json", false, "print the findings as JSON")
	var sets config.SetFlags
	fs.Var(&sets, "set", "override a configuration key, `key.path=value` (repeatable)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	cfg, _, err := loadConfig(*cfgPath, sets)
	if err != nil {
		fmt.Fprintln(os.Stderr, "gpuaas-agent doctor:", err)
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	rs := doctor.Run(ctx, doctorInputs(cfg))
	if err := doctor.Write(os.Stdout, rs, *asJSON); err != nil {
		fmt.Fprintln(os.Stderr, "gpuaas-agent doctor:", err)
		return 2
	}
	return doctor.ExitCode(rs)
}

func run(ctx context.Context, cfg *Config, log *slog.Logger) error {
	// Fail closed: no identity, no work.
	src, err := identity.Open(ctx, cfg.SVID, cfg.td, log)
	if err != nil {
		return err
	}
	defer src.Close()
	self, err := identity.AgentID(cfg.td, cfg.Node)
	if err != nil {
		return err
	}
	if svid, err := src.GetX509SVID(); err != nil || svid.ID != self {
		got := "none"
		if svid != nil {
			got = svid.ID.String()
		}
		return fmt.Errorf("the SVID (%s) does not identify node %s (want %s)", got, cfg.Node, self)
	}

	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	backend, err := newBackend(cfg)
	if err != nil {
		return err
	}
	if c, ok := backend.(io.Closer); ok {
		defer c.Close()
	}
	j, err := lease.OpenJournal(filepath.Join(cfg.DataDir, "journal.db"))
	if err != nil {
		return err
	}
	defer j.Close()
	rt, err := runtime.NewContainerd(ctx, runtime.Config{Address: cfg.Containerd.Address, Namespace: cfg.Containerd.Namespace, CDISpecDir: cfg.Containerd.CDISpecDir,
		Images:    runtime.ImagePolicy{AllowedRegistries: cfg.Images.AllowedRegistries, RequireDigest: cfg.Images.RequireDigest},
		Network:   cfg.Network.cfg,
		LogDriver: logDriver(cfg, log), LogMaxBytes: cfg.Logs.MaxBytes, LogMaxFiles: cfg.Logs.MaxFiles})
	if err != nil {
		return err
	}
	defer rt.Close()
	for _, a := range cfg.ImageArchives {
		names, err := rt.ImportArchive(ctx, a)
		if err != nil {
			return fmt.Errorf("import image archive %s: %w", a, err)
		}
		log.Info("imported image archive", "path", a, "images", names)
	}
	logDir := filepath.Join(cfg.DataDir, "logs")
	if err := os.MkdirAll(logDir, 0o750); err != nil {
		return err
	}
	if err := reconcilePartitions(ctx, cfg, backend, j, log); err != nil {
		return err
	}
	metrics := telemetry.New()
	var fencerP atomic.Pointer[isolation.Enforcer] // set below; /fences reads it
	var clientP atomic.Pointer[session.Client]     // set below; /readyz reads it
	if cfg.MetricsListen != "" {
		lis, err := net.Listen("tcp", cfg.MetricsListen)
		if err != nil {
			return fmt.Errorf("metrics_listen %s: %w", cfg.MetricsListen, err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", metrics.Handler())
		// /healthz: the agent's journal (every decision goes through it)
		// answers. /readyz: and the agent is connected to the control
		// plane; an agent that is not ready still enforces its leases.
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
			if _, _, err := j.Desired(); err != nil {
				http.Error(w, "journal unavailable", http.StatusServiceUnavailable)
				return
			}
			fmt.Fprintln(w, "ok")
		})
		mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
			if _, _, err := j.Desired(); err != nil {
				http.Error(w, "journal unavailable", http.StatusServiceUnavailable)
				return
			}
			if c := clientP.Load(); c == nil || !c.Status().Connected {
				http.Error(w, "not connected to the control plane", http.StatusServiceUnavailable)
				return
			}
			fmt.Fprintln(w, "ok")
		})
		// /fences: per lease, the programs (ids, tags) the kernel has
		// attached and the policy they enforce, read back and verified
		// against the policy, for reviewers and the attestation report.
		mux.HandleFunc("/fences", func(w http.ResponseWriter, _ *http.Request) {
			fencer := fencerP.Load()
			if fencer == nil {
				http.Error(w, "isolation unavailable", http.StatusServiceUnavailable)
				return
			}
			ids, err := fencer.Leases()
			if err != nil {
				http.Error(w, "list fences", http.StatusInternalServerError)
				return
			}
			out := []isolation.Description{}
			for _, id := range ids {
				d, err := fencer.Describe(id)
				if err != nil {
					d = isolation.Description{LeaseID: id, Problems: []string{err.Error()}}
				}
				out = append(out, d)
			}
			w.Header().Set("Content-Type", "application/json")
			_ = json.NewEncoder(w).Encode(out)
		})
		srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() { _ = srv.Serve(lis) }()
		defer srv.Close()
	}
	devs, err := backend.Devices(ctx)
	if err != nil {
		return fmt.Errorf("list gpus: %w", err)
	}
	var uuids []string
	for _, d := range devs {
		uuids = append(uuids, d.UUID)
		metrics.GPUHealthy.WithLabelValues(d.UUID).Set(1)
	}
	var exec *lease.Executor
	tracker := health.NewTracker(health.Options{GPUs: uuids, OnChange: func(c health.Change) {
		// Every health change is an audit event; the next report carries
		// the new verdict so the control plane stops placing there.
		log.Warn("gpu health changed", "gpu", c.GPU, "gi", c.GI, "to", c.To.String(), "reason", c.Reason, "xid", c.XID)
		healthy := 1.0
		if c.To == health.Unhealthy {
			healthy = 0 // a GPU with any unhealthy partition takes no new leases
		}
		metrics.GPUHealthy.WithLabelValues(c.GPU).Set(healthy)
		ev := &agentv1.AuditEvent{Time: timestamppb.New(c.Time), Action: "gpu.health", Resource: fmt.Sprintf("gpu/%s/gi/%d", c.GPU, c.GI),
			Outcome: "success", Reason: c.Reason, Details: map[string]string{"from": c.From.String(), "to": c.To.String(), "xid": fmt.Sprint(c.XID), "clear": c.Clear.String()}}
		if err := j.AddEvents(ev); err != nil {
			log.Error("journal health event", "err", err)
		}
		if exec != nil {
			exec.NotifyChange()
		}
	}})
	unhealthy := func(uuid string) (bool, string) {
		for _, e := range tracker.Snapshot() {
			if e.GPU == uuid {
				return true, e.Health.Reason
			}
		}
		return false, ""
	}
	if cfg.sealer == nil {
		log.Warn("secrets.key_file is not set: tenant env values are journaled in plain text, protected by file permissions only")
	}
	opts := lease.Options{Journal: j, GPU: backend, Runtime: rt, LogDir: logDir, StopGrace: cfg.StopGrace.D(), Logger: log, Sealer: cfg.sealer,
		Eligible: func(uuid string) bool { bad, _ := unhealthy(uuid); return !bad }}
	if !cfg.Isolation.Disabled {
		enf, err := isolation.NewEnforcer(isolation.Config{PinRoot: cfg.Isolation.PinRoot, Logger: log})
		if err != nil {
			// Fail closed: the agent runs (so operators see why) but no
			// lease starts unfenced.
			log.Error("eBPF isolation unavailable; leases will fail to start", "err", err)
			opts.FenceUnavailable = err
		} else {
			defer enf.Close()
			opts.Fencer = enf
			fencerP.Store(enf)
			if opts.BaseDeny, err = baseDeny(cfg.controlPlanes, leaseSubnet(cfg)...); err != nil {
				return err
			}
			go auditDenials(ctx, enf, j, metrics, log)
		}
	}
	exec = lease.New(opts)

	// Telemetry: sampled every interval for /metrics and signed with a key
	// that lives only in memory; attestation reports vouch for it.
	tkey, err := attestation.NewTelemetryKey()
	if err != nil {
		return err
	}
	sampler, err := telemetry.NewSampler(telemetry.Options{Backend: backend, Node: cfg.Node, Interval: cfg.Telemetry.Interval.D(),
		Attribution: attribution(j, log), Key: tkey, Logger: log})
	if err != nil {
		return err
	}
	metrics.RegisterSampler(sampler)
	go sampler.Run(ctx)
	tpm, err := openTPM(cfg.Attestation.TPMDevice, log)
	if err != nil {
		return err
	}
	if tpm != nil {
		defer tpm.Close()
	}
	var tpmT transport.TPM
	if tpm != nil {
		tpmT = tpm
	}
	collector, err := newCollector(cfg, cfg.path, backend, rt, tpmT, j, fencerP.Load, tkey.Public())
	if err != nil {
		return err
	}
	go func() {
		if err := tracker.Run(ctx, backend); err != nil && ctx.Err() == nil {
			log.Error("gpu health monitoring stopped; GPUs are no longer vouched for", "err", err)
		}
	}()
	cpID := identity.ControlPlaneID(cfg.td)
	client := session.New(session.Options{
		Addresses: cfg.controlPlanes, Node: cfg.Node, AgentVersion: version,
		Creds:    identity.ClientCredentials(src, tlsconfig.AuthorizeID(cpID)),
		Executor: exec, Journal: j, Logger: log,
		Logs:      session.FileLogs{Dir: logDir},
		Signer:    auditsig.NewSigner(src),
		Attester:  sessionAttester{c: collector, src: src},
		Telemetry: sampler.Reports(),
		Inventory: func(ctx context.Context) (*nodev1.Inventory, error) {
			inv, err := partition.Inventory(ctx, backend)
			if err == nil {
				partition.MarkHealth(inv, unhealthy)
			}
			return inv, err
		},
	})
	clientP.Store(client)
	if cfg.StatusSocket != "none" {
		// Operators' view of this agent; a failure to serve it is logged,
		// never fatal (it changes nothing the agent enforces).
		srv, err := status.Listen(cfg.statusConfig(log), status.Sources{
			Node: cfg.Node, Version: version, Session: client.Status, Journal: j.Records, GPU: backend,
			Fences: func() status.Fencer {
				if f := fencerP.Load(); f != nil {
					return f
				}
				return nil
			},
		})
		if err != nil {
			log.Error("status socket unavailable; `gpuaas-agent status` will not reach this agent", "err", err)
		} else {
			go func() {
				if err := srv.Serve(); err != nil {
					log.Error("status socket stopped", "err", err)
				}
			}()
			defer srv.Close()
		}
	}
	log.Info("agent starting", "version", version, "control_plane", cfg.ControlPlane, "backend", cfg.GPU.Backend)
	done := make(chan error, 1)
	go func() { done <- exec.Run(ctx) }()
	// The watchdog is fed while the journal (every decision goes through
	// it) still answers: a wedged agent stops the pings and systemd
	// restarts it; tenants keep running (KillMode=process).
	var live sdnotify.Liveness
	go func() {
		t := time.NewTicker(5 * time.Second)
		defer t.Stop()
		for {
			if _, _, err := j.Desired(); err == nil {
				live.Beat()
			}
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	go sdnotify.Watchdog(ctx, &live, 20*time.Second, log)
	sdnotify.Ready("node " + cfg.Node + ", control plane " + cfg.ControlPlane)
	defer sdnotify.Stopping()
	if err := client.Run(ctx); err != nil {
		return err
	}
	return <-done
}

func newBackend(cfg *Config) (gpu.Backend, error) {
	if cfg.GPU.Backend == "nvml" {
		return nvml.New(nvml.Options{})
	}
	sc := sim.Config{StatePath: filepath.Join(cfg.DataDir, "sim-gpus.json"), ImmediateModeChange: true}
	for _, g := range cfg.GPU.Sim.GPUs {
		sc.GPUs = append(sc.GPUs, sim.GPUConfig{Model: g.Model, MIGEnabled: g.MIGEnabled})
	}
	return sim.New(sc)
}

// baseDeny is every lease's egress deny list: the default list (metadata,
// private and special ranges), the host's own addresses and the control
// plane's.
func baseDeny(controlPlanes []string, extra ...netip.Prefix) ([]netip.Prefix, error) {
	deny := append(isolation.DefaultDenyPrefixes(), extra...)
	host, err := isolation.HostAddresses()
	if err != nil {
		return nil, fmt.Errorf("host addresses: %w", err)
	}
	deny = append(deny, host...)
	for _, cp := range controlPlanes {
		h, _, _ := net.SplitHostPort(cp)
		addrs, err := net.DefaultResolver.LookupNetIP(context.Background(), "ip", h)
		if err != nil {
			return nil, fmt.Errorf("resolve control plane %s: %w", h, err)
		}
		for _, a := range addrs {
			a = a.Unmap()
			deny = append(deny, netip.PrefixFrom(a, a.BitLen()))
		}
	}
	return deny, nil
}

// leaseSubnet is the bridge network's subnet, whatever its range: leases
// on it reach neither each other nor the gateway (the host) unless their
// egress_allow says so. None without a network.
func leaseSubnet(cfg *Config) []netip.Prefix {
	n := cfg.Network.cfg
	if n == nil {
		return nil
	}
	if n.Subnet.IsValid() {
		return []netip.Prefix{n.Subnet}
	}
	return []netip.Prefix{runtime.DefaultSubnet}
}

// auditDenials turns the fences' deny events into aggregated, rate-limited
// audit events (one summary per lease and kind per interval).
func auditDenials(ctx context.Context, enf *isolation.Enforcer, j *lease.Journal, m *telemetry.Metrics, log *slog.Logger) {
	events, err := enf.Events(ctx)
	if err != nil {
		log.Error("deny events unavailable", "err", err)
		return
	}
	for sum := range isolation.NewAggregator(10*time.Second).Run(ctx, events) {
		m.FenceDenials.WithLabelValues(sum.Kind.String()).Add(float64(sum.Count))
		var targets []string
		for _, t := range sum.Targets {
			targets = append(targets, fmt.Sprintf("%s=%d", t.Target, t.Count))
		}
		ev := &agentv1.AuditEvent{Time: timestamppb.New(sum.Last), Action: "fence.deny", LeaseId: sum.LeaseID, Resource: "lease/" + sum.LeaseID,
			Outcome: "denied", Reason: sum.Kind.String() + " denied by the lease's fence",
			Details: map[string]string{"count": fmt.Sprint(sum.Count), "targets": strings.Join(targets, " "), "other": fmt.Sprint(sum.Other)}}
		if err := j.AddEvents(ev); err != nil {
			log.Error("journal deny summary", "err", err)
		}
	}
}

// reconcilePartitions repairs what a crash left between a MIG call and its
// record, then, in static mode, applies the configured mig-parted layout.
// Partitions held by live leases are never touched.
func reconcilePartitions(ctx context.Context, cfg *Config, backend gpu.Backend, j *lease.Journal, log *slog.Logger) error {
	intents, err := partition.OpenIntentLog(filepath.Join(cfg.DataDir, "partition-intents.db"))
	if err != nil {
		return err
	}
	defer intents.Close()
	rc := partition.ReconcilerConfig{Backend: backend, Intents: intents, Logger: log}
	if s, ok := backend.(*sim.Sim); ok {
		rc.Reset = partition.ResetFunc(func(_ context.Context, uuid string) error { return s.ResetGPU(uuid) })
	}
	rec, err := partition.NewReconciler(rc)
	if err != nil {
		return err
	}
	recs, err := j.Records()
	if err != nil {
		return err
	}
	protected := func(gpuUUID string, gi int) bool {
		for _, r := range recs {
			if r.HasGI && r.GPUUUID == gpuUUID && r.GIID == gi && r.Phase != leasev1.Phase_PHASE_TERMINATED && r.Phase != leasev1.Phase_PHASE_FAILED {
				return true
			}
		}
		return false
	}
	report, err := rec.Recover(ctx, protected)
	if err != nil {
		return fmt.Errorf("recover partitions: %w", err)
	}
	if cfg.migParted != nil {
		if report, err = partition.ApplyStatic(ctx, rec, cfg.migParted, cfg.MIG.Static.ConfigName, backend, protected); err != nil {
			return fmt.Errorf("apply mig-parted config %s: %w", cfg.MIG.Static.ConfigName, err)
		}
	}
	var events []*agentv1.AuditEvent
	for _, g := range report.GPUs {
		for _, c := range g.Conflicts {
			log.Warn("mig layout conflict", "gpu", c.GPUUUID, "reason", string(c.Reason), "detail", c.Detail)
		}
		for _, set := range []struct {
			action string
			refs   []partition.InstanceRef
		}{{"partition.create", g.Created}, {"partition.destroy", g.Destroyed}, {"partition.adopt", g.Adopted}} {
			for _, in := range set.refs {
				events = append(events, &agentv1.AuditEvent{Time: timestamppb.Now(), Action: set.action, Resource: fmt.Sprintf("gpu/%s/gi/%d", g.GPUUUID, in.GIID),
					Outcome: "success", Reason: "mig reconcile", Details: map[string]string{"profile": fmt.Sprint(int(in.Profile)), "placement": in.Placement.String()}})
			}
		}
	}
	if len(events) > 0 {
		return j.AddEvents(events...)
	}
	return nil
}
