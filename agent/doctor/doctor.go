// Package doctor checks a GPU host's prerequisites before the agent starts
// (`gpuaas-agent doctor`): the NVIDIA driver and MIG capability of each GPU,
// containerd and runc, cgroup v2, bpffs and cgroup eBPF support, the CNI
// plugins, the SVID the agent will present, clock synchronisation, and the
// state directory's ownership and permissions. Each check says what is wrong
// and what to do about it; the worst severity becomes the exit code.
//
// Checks only read: none changes MIG mode, mounts anything or starts a
// process other than `runc --version`.
package doctor

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/features"
	"github.com/containerd/containerd/v2/client"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"golang.org/x/sys/unix"

	"github.com/gpuaas/gpuaas/agent/gpu"
	"github.com/gpuaas/gpuaas/pkg/config"
)

// Severity of a finding; the exit code is the worst one's.
type Severity int

const (
	OK   Severity = iota // nothing to do
	Warn                 // works, but not as a production host should
	Fail                 // the agent cannot run correctly
)

func (s Severity) String() string {
	switch s {
	case OK:
		return "ok"
	case Warn:
		return "warn"
	default:
		return "fail"
	}
}

// MarshalText renders the severity by name in JSON output.
func (s Severity) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// Result is one check's finding.
type Result struct {
	Check    string   `json:"check"`
	Severity Severity `json:"severity"`
	Detail   string   `json:"detail"`
	Fix      string   `json:"fix,omitempty"`
}

// DefaultCNIPlugins are the plugins the agent's bridge network uses.
var DefaultCNIPlugins = []string{"bridge", "host-local", "portmap", "loopback"}

// Inputs is what the checks look at, taken from the agent's configuration.
type Inputs struct {
	// GPUBackend is "nvml" or "sim"; GPU is the opened backend, or nil with
	// GPUErr saying why it could not be opened.
	GPUBackend string
	GPU        gpu.Backend
	GPUErr     error
	// ContainerdAddress is containerd's socket.
	ContainerdAddress string
	// CNIPluginDir holds the CNI plugins; CNIPlugins those required
	// (DefaultCNIPlugins if nil). An empty dir skips the check (no network).
	CNIPluginDir string
	CNIPlugins   []string
	// Node, TrustDomain and SVID identify the agent.
	Node        string
	TrustDomain string
	SVID        config.SVID
	// DataDir is the agent's state directory.
	DataDir string
	// CgroupRoot and BPFFS default to /sys/fs/cgroup and /sys/fs/bpf.
	CgroupRoot string
	BPFFS      string
	// Now defaults to time.Now.
	Now func() time.Time
}

// Run runs every check and returns their findings in a stable order.
func Run(ctx context.Context, in Inputs) []Result {
	if in.Now == nil {
		in.Now = time.Now
	}
	if in.CgroupRoot == "" {
		in.CgroupRoot = "/sys/fs/cgroup"
	}
	if in.BPFFS == "" {
		in.BPFFS = "/sys/fs/bpf"
	}
	if in.CNIPlugins == nil {
		in.CNIPlugins = DefaultCNIPlugins
	}
	var rs []Result
	rs = append(rs, checkRoot())
	rs = append(rs, checkGPU(ctx, in)...)
	rs = append(rs, checkContainerd(ctx, in.ContainerdAddress), checkRunc(ctx))
	rs = append(rs, checkCgroup(in.CgroupRoot), checkBPFFS(in.BPFFS), checkCgroupBPF())
	if in.CNIPluginDir != "" {
		rs = append(rs, checkCNI(in.CNIPluginDir, in.CNIPlugins))
	}
	rs = append(rs, checkSVID(in), checkClock(), checkStateDir(in.DataDir))
	return rs
}

// ExitCode is 0 when every check passed, 1 with warnings, 2 with failures.
func ExitCode(rs []Result) int {
	worst := OK
	for _, r := range rs {
		worst = max(worst, r.Severity)
	}
	return int(worst)
}

// Write prints the findings as a table, or as JSON.
func Write(w io.Writer, rs []Result, asJSON bool) error {
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(rs)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "CHECK\tRESULT\tDETAIL")
	for _, r := range rs {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", r.Check, strings.ToUpper(r.Severity.String()), r.Detail)
		if r.Fix != "" && r.Severity != OK {
			fmt.Fprintf(tw, "\t\tfix: %s\n", r.Fix)
		}
	}
	return tw.Flush()
}

func checkRoot() Result {
	if uid := os.Geteuid(); uid != 0 {
		return Result{"root", Fail, fmt.Sprintf("running as uid %d", uid), "run the agent (and doctor) as root: it manages MIG, containers, eBPF and network namespaces"}
	}
	return Result{"root", OK, "running as root", ""}
}

func checkGPU(ctx context.Context, in Inputs) []Result {
	if in.GPU == nil {
		err := in.GPUErr
		if err == nil {
			err = errors.New("no GPU backend")
		}
		fix := "install the NVIDIA driver (it provides libnvidia-ml.so.1) and check `nvidia-smi` works"
		if in.GPUBackend == "sim" {
			fix = "check the gpu.sim section of the configuration"
		}
		return []Result{{"gpu-driver", Fail, err.Error(), fix}}
	}
	var rs []Result
	if in.GPUBackend == "sim" {
		rs = append(rs, Result{"gpu-driver", Warn, "simulated GPUs (gpu.backend: sim)", "use gpu.backend: nvml on a production GPU host"})
	} else {
		v, err := in.GPU.DriverVersion(ctx)
		if err != nil {
			return append(rs, Result{"gpu-driver", Fail, "driver version: " + err.Error(), "check the NVIDIA driver with `nvidia-smi`"})
		}
		rs = append(rs, Result{"gpu-driver", OK, "NVIDIA driver " + v, ""})
	}
	devs, err := in.GPU.Devices(ctx)
	if err != nil {
		return append(rs, Result{"gpu-mig", Fail, "list GPUs: " + err.Error(), "check the NVIDIA driver with `nvidia-smi`"})
	}
	if len(devs) == 0 {
		return append(rs, Result{"gpu-mig", Fail, "no GPU found", "check the GPUs are visible to the driver (`nvidia-smi -L`)"})
	}
	for _, d := range devs {
		name := fmt.Sprintf("gpu-mig[%d]", d.Index)
		if !d.MIGCapable {
			rs = append(rs, Result{name, Warn, fmt.Sprintf("%s (%s) is not MIG-capable; it can only be leased whole", d.Name, d.UUID), ""})
			continue
		}
		m, err := in.GPU.MIGMode(ctx, d.UUID)
		switch {
		case err != nil:
			rs = append(rs, Result{name, Fail, fmt.Sprintf("%s: MIG mode: %v", d.UUID, err), "check the driver supports MIG on this GPU"})
		case m.Current != m.Pending:
			rs = append(rs, Result{name, Warn, fmt.Sprintf("%s: MIG mode change pending (current %v, pending %v)", d.UUID, m.Current, m.Pending),
				fmt.Sprintf("reset the GPU when it is idle to apply it (`nvidia-smi -i %d -r`)", d.Index)})
		case !m.Current:
			rs = append(rs, Result{name, Warn, fmt.Sprintf("%s: MIG disabled", d.UUID),
				fmt.Sprintf("enable MIG (`nvidia-smi -i %d -mig 1`, then reset the GPU) or let the agent enable it", d.Index)})
		default:
			rs = append(rs, Result{name, OK, fmt.Sprintf("%s (%s): MIG enabled", d.Name, d.UUID), ""})
		}
	}
	return rs
}

func checkContainerd(ctx context.Context, addr string) Result {
	const fix = "start containerd (systemctl start containerd) and check containerd.address in the agent's configuration"
	if addr == "" {
		return Result{"containerd", Fail, "containerd.address is empty", fix}
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c, err := client.New(addr, client.WithTimeout(3*time.Second))
	if err != nil {
		return Result{"containerd", Fail, fmt.Sprintf("%s: %v", addr, err), fix}
	}
	defer c.Close()
	v, err := c.Version(ctx)
	if err != nil {
		return Result{"containerd", Fail, fmt.Sprintf("%s: version: %v", addr, err), fix}
	}
	major, minor := 0, 0
	fmt.Sscanf(strings.TrimPrefix(v.Version, "v"), "%d.%d", &major, &minor)
	if major < 1 || (major == 1 && minor < 6) {
		return Result{"containerd", Warn, "containerd " + v.Version + " is older than 1.6", "upgrade containerd to 1.6 or later"}
	}
	return Result{"containerd", OK, fmt.Sprintf("containerd %s at %s", v.Version, addr), ""}
}

func checkRunc(ctx context.Context) Result {
	const fix = "install runc (Debian: apt install runc)"
	p, err := exec.LookPath("runc")
	if err != nil {
		for _, dir := range []string{"/usr/sbin", "/usr/local/sbin", "/sbin"} {
			if _, serr := os.Stat(filepath.Join(dir, "runc")); serr == nil {
				p, err = filepath.Join(dir, "runc"), nil
				break
			}
		}
	}
	if err != nil {
		return Result{"runc", Fail, "runc not found", fix}
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, p, "--version").Output()
	if err != nil {
		return Result{"runc", Fail, fmt.Sprintf("%s --version: %v", p, err), fix}
	}
	first, _, _ := strings.Cut(string(out), "\n")
	return Result{"runc", OK, first, ""}
}

func fsMagic(path string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return 0, err
	}
	return int64(st.Type), nil
}

func checkCgroup(root string) Result {
	m, err := fsMagic(root)
	if err != nil {
		return Result{"cgroup-v2", Fail, fmt.Sprintf("%s: %v", root, err), "mount the cgroup filesystem"}
	}
	if m == unix.CGROUP2_SUPER_MAGIC {
		return Result{"cgroup-v2", OK, root + " is cgroup v2 (unified)", ""}
	}
	if u, err := fsMagic(filepath.Join(root, "unified")); err == nil && u == unix.CGROUP2_SUPER_MAGIC {
		return Result{"cgroup-v2", Warn, "hybrid hierarchy: cgroup v2 only at " + filepath.Join(root, "unified"),
			"boot with systemd.unified_cgroup_hierarchy=1 for a pure cgroup v2 host"}
	}
	return Result{"cgroup-v2", Fail, root + " has no cgroup v2 hierarchy: eBPF fences cannot attach", "boot with systemd.unified_cgroup_hierarchy=1"}
}

func checkBPFFS(path string) Result {
	m, err := fsMagic(path)
	if err != nil || m != unix.BPF_FS_MAGIC {
		return Result{"bpffs", Fail, path + " is not a bpf filesystem: fences cannot be pinned and would not survive an agent restart",
			"mount -t bpf bpffs " + path + " (and add it to /etc/fstab)"}
	}
	return Result{"bpffs", OK, path + " is bpffs", ""}
}

func checkCgroupBPF() Result {
	const fix = "use a kernel built with CONFIG_CGROUP_BPF and CONFIG_BPF_SYSCALL (5.8 or later)"
	for _, pt := range []ebpf.ProgramType{ebpf.CGroupDevice, ebpf.CGroupSockAddr} {
		if err := features.HaveProgramType(pt); err != nil {
			return Result{"cgroup-bpf", Fail, fmt.Sprintf("%s programs: %v", pt, err), fix}
		}
	}
	return Result{"cgroup-bpf", OK, "cgroup device and sock_addr eBPF programs supported", ""}
}

func checkCNI(dir string, plugins []string) Result {
	var missing []string
	for _, p := range plugins {
		fi, err := os.Stat(filepath.Join(dir, p))
		if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0 {
			missing = append(missing, p)
		}
	}
	if len(missing) > 0 {
		return Result{"cni-plugins", Fail, fmt.Sprintf("missing in %s: %s", dir, strings.Join(missing, ", ")),
			"install the CNI plugins (Debian: apt install containernetworking-plugins) or set network.plugin_dir"}
	}
	return Result{"cni-plugins", OK, strings.Join(plugins, ", ") + " in " + dir, ""}
}

func checkSVID(in Inputs) Result {
	const name = "identity"
	if err := in.SVID.Validate(); err != nil {
		return Result{name, Fail, err.Error(), "set svid.cert, svid.key and svid.bundle (or use the SPIFFE Workload API)"}
	}
	td, err := spiffeid.TrustDomainFromString(in.TrustDomain)
	if err != nil {
		return Result{name, Fail, "trust_domain: " + err.Error(), "set trust_domain"}
	}
	var svid *x509svid.SVID
	var bundle *x509bundle.Bundle
	if in.SVID.WorkloadAPI != "" {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		xc, err := workloadapi.FetchX509Context(ctx, workloadapi.WithAddr(in.SVID.WorkloadAPI))
		if err != nil {
			return Result{name, Fail, "workload API " + in.SVID.WorkloadAPI + ": " + err.Error(),
				"start the SPIRE agent and register an entry for the gpuaas-agent workload"}
		}
		svid = xc.DefaultSVID()
		if bundle, err = xc.Bundles.GetX509BundleForTrustDomain(td); err != nil {
			return Result{name, Fail, err.Error(), "the SPIRE agent has no bundle for " + td.Name()}
		}
	} else {
		if svid, err = x509svid.Load(in.SVID.Cert, in.SVID.Key); err != nil {
			return Result{name, Fail, err.Error(), "check the SVID certificate and key files are readable PEM and belong together"}
		}
		if bundle, err = x509bundle.Load(td, in.SVID.Bundle); err != nil {
			return Result{name, Fail, err.Error(), "check the trust bundle file"}
		}
	}
	want, err := spiffeid.FromSegments(td, "gpuaas", "agent", in.Node)
	if err != nil {
		return Result{name, Fail, "node: " + err.Error(), "set node to a valid SPIFFE path segment"}
	}
	if svid.ID != want {
		return Result{name, Fail, fmt.Sprintf("SVID is %s, the control plane requires %s", svid.ID, want), "issue the agent an SVID for its node"}
	}
	if _, _, err := x509svid.Verify(svid.Certificates, bundle); err != nil {
		return Result{name, Fail, "SVID does not chain to the bundle: " + err.Error(), "update the trust bundle or reissue the SVID"}
	}
	return svidExpiry(svid.Certificates[0], in.Now())
}

func svidExpiry(leaf *x509.Certificate, now time.Time) Result {
	left := leaf.NotAfter.Sub(now)
	switch {
	case left <= 0:
		return Result{"identity", Fail, "SVID expired at " + leaf.NotAfter.UTC().Format(time.RFC3339), "rotate the SVID"}
	case now.Before(leaf.NotBefore):
		return Result{"identity", Fail, "SVID not valid before " + leaf.NotBefore.UTC().Format(time.RFC3339), "check the clock and the SVID"}
	case left < 24*time.Hour:
		return Result{"identity", Warn, fmt.Sprintf("SVID expires in %s", left.Round(time.Minute)), "make sure rotation is running (SPIRE or the file rotation job)"}
	}
	return Result{"identity", OK, fmt.Sprintf("SVID valid for %s", left.Round(time.Hour)), ""}
}

func checkClock() Result {
	var tx unix.Timex
	state, err := unix.Adjtimex(&tx)
	if err != nil {
		return Result{"clock-sync", Warn, "adjtimex: " + err.Error(), "check time synchronisation (chrony or systemd-timesyncd)"}
	}
	if state == unix.TIME_ERROR || tx.Status&unix.STA_UNSYNC != 0 {
		return Result{"clock-sync", Warn, "the kernel clock is not synchronised: lease expiry and certificate checks depend on it",
			"run a time daemon (chrony or systemd-timesyncd) against reliable servers"}
	}
	return Result{"clock-sync", OK, fmt.Sprintf("synchronised (estimated error %d µs)", tx.Esterror), ""}
}

func checkStateDir(dir string) Result {
	const name = "state-dir"
	if dir == "" {
		return Result{name, Fail, "data_dir is empty", "set data_dir (default /var/lib/gpuaas-agent)"}
	}
	fi, err := os.Lstat(dir)
	if errors.Is(err, os.ErrNotExist) {
		return Result{name, OK, dir + " does not exist yet; the agent creates it with mode 0700", ""}
	}
	if err != nil {
		return Result{name, Fail, err.Error(), "check " + dir}
	}
	if !fi.IsDir() {
		return Result{name, Fail, dir + " is not a directory", "remove it or point data_dir elsewhere"}
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return Result{name, Fail, "cannot read the owner of " + dir, "check " + dir}
	}
	if int(st.Uid) != os.Geteuid() {
		return Result{name, Fail, fmt.Sprintf("%s is owned by uid %d, not the agent (uid %d)", dir, st.Uid, os.Geteuid()),
			fmt.Sprintf("chown root:root %s", dir)}
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return Result{name, Fail, fmt.Sprintf("%s has mode %v: others can read the journal (leases, tenant env, audit outbox)", dir, fi.Mode().Perm()),
			"chmod 0700 " + dir}
	}
	return Result{name, OK, fmt.Sprintf("%s (%v, owner uid %d)", dir, fi.Mode().Perm(), st.Uid), ""}
}
