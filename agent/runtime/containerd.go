package runtime

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/identifiers"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"tags.cncf.io/container-device-interface/pkg/cdi"
)

// Defaults for Config.
const (
	DefaultNamespace   = "gpuaas"
	DefaultRuntimeName = "io.containerd.runc.v2"
	// DefaultLeaseTTL bounds how long the content and snapshots of an
	// operation interrupted by a crash stay protected from containerd's
	// garbage collector.
	DefaultLeaseTTL = 15 * time.Minute
)

// Snapshotters tried, in order, when Config.Snapshotter is empty.
var defaultSnapshotters = []string{"overlayfs", "native"}

const snapshotterPluginType = "io.containerd.snapshotter.v1"

// Config configures the containerd runtime.
type Config struct {
	// Address is containerd's gRPC socket (absolute path).
	Address string
	// Namespace isolates the agent's containers, images and leases from
	// anything else on the containerd; DefaultNamespace if empty.
	Namespace string
	// Snapshotter for container root filesystems. Empty: overlayfs when
	// containerd could load it (the kernel and the root filesystem support
	// overlay), else native. A named snapshotter that is not loaded is an
	// error.
	Snapshotter string
	// RuntimeName is the containerd runtime (shim); DefaultRuntimeName if
	// empty.
	RuntimeName string
	// LeaseTTL is the expiry of the containerd lease held by each mutating
	// operation; DefaultLeaseTTL if zero.
	LeaseTTL time.Duration
	// Images is the image policy the agent applies before it runs or pulls
	// an image (see EnsureImage and ImagePolicy). Optional, but its zero
	// value allows no registry.
	Images ImagePolicy
	// CDISpecDir, when set, is a Container Device Interface spec
	// directory: Create writes the partition's CDI spec there
	// (WriteCDISpec) and injects the partition through CDI instead of
	// adding its device nodes directly (same nodes, cgroup rules and
	// environment); Stop removes the spec with the container. Empty: no
	// CDI.
	CDISpecDir string
	// Network, when set, is the bridge network containers in NetworkBridge
	// mode join; NewContainerd fails if it cannot work on this host. Nil:
	// only NetworkNone containers can be created.
	Network *NetworkConfig
	// LogDriver, when set, is the absolute path of the gpuaas-logdriver
	// binary: the shim runs it for each task (containerd's binary logging
	// protocol) to write Spec.LogPath size-capped and rotated, LogMaxFiles
	// files of at most LogMaxBytes each. The shim owns it, so logging goes
	// on while the agent restarts. Empty: the shim appends to Spec.LogPath
	// itself, without a cap.
	LogDriver string
	// LogMaxBytes and LogMaxFiles bound each lease's log with LogDriver;
	// DefaultLogMaxBytes and DefaultLogMaxFiles if zero.
	LogMaxBytes int64
	LogMaxFiles int
}

// Defaults for Config's log bounds (10 MiB x 3 files per lease).
const (
	DefaultLogMaxBytes int64 = 10 << 20
	DefaultLogMaxFiles       = 3
)

// Containerd implements Runtime on a containerd daemon. Containers and
// their tasks belong to containerd and the shims, not to this process:
// closing the client (or the agent exiting) leaves them running, and a new
// client adopts them by id. It is safe for concurrent use.
type Containerd struct {
	client      *client.Client
	namespace   string
	snapshotter string
	runtime     string
	leaseTTL    time.Duration
	cgroupRoot  string // cgroup v2 mount; empty if the host has none
	images      ImagePolicy
	cdiDir      string      // Config.CDISpecDir
	cdiCache    *cdi.Cache  // over cdiDir; nil without CDI
	net         *cniNetwork // nil without Config.Network
	logDriver   string
	logMaxBytes int64
	logMaxFiles int
	memory      memoryCgroup

	closeOnce sync.Once
	closeErr  error
}

var _ Runtime = (*Containerd)(nil)

// NewContainerd connects to containerd, checks that it answers, and picks
// the snapshotter.
func NewContainerd(ctx context.Context, cfg Config) (*Containerd, error) {
	if cfg.Address == "" {
		return nil, errors.New("connect to containerd: empty address")
	}
	if cfg.Namespace == "" {
		cfg.Namespace = DefaultNamespace
	}
	if err := identifiers.Validate(cfg.Namespace); err != nil {
		return nil, fmt.Errorf("connect to containerd: namespace: %w", err)
	}
	if cfg.RuntimeName == "" {
		cfg.RuntimeName = DefaultRuntimeName
	}
	if cfg.LeaseTTL == 0 {
		cfg.LeaseTTL = DefaultLeaseTTL
	}
	if err := cfg.Images.Validate(); err != nil {
		return nil, fmt.Errorf("connect to containerd: image policy: %w", err)
	}
	if cfg.LogMaxBytes == 0 {
		cfg.LogMaxBytes = DefaultLogMaxBytes
	}
	if cfg.LogMaxFiles == 0 {
		cfg.LogMaxFiles = DefaultLogMaxFiles
	}
	if d := cfg.LogDriver; d != "" {
		if !filepath.IsAbs(d) {
			return nil, fmt.Errorf("log driver %q: want an absolute path", d)
		}
		if fi, err := os.Stat(d); err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0 {
			return nil, fmt.Errorf("log driver %s: not an executable file (%v)", d, err)
		}
	}
	if cfg.LogMaxBytes < 0 || cfg.LogMaxFiles < 0 {
		return nil, fmt.Errorf("log bounds %d bytes x %d files: want positive values", cfg.LogMaxBytes, cfg.LogMaxFiles)
	}
	// Fail fast when nobody serves the socket: the client's dialer would
	// otherwise keep retrying in the background for its whole timeout.
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", strings.TrimPrefix(cfg.Address, "unix://"))
	if err != nil {
		return nil, fmt.Errorf("connect to containerd at %s: %w", cfg.Address, err)
	}
	conn.Close()
	cl, err := client.New(cfg.Address,
		client.WithDefaultNamespace(cfg.Namespace),
		client.WithDefaultRuntime(cfg.RuntimeName))
	if err != nil {
		return nil, fmt.Errorf("connect to containerd at %s: %w", cfg.Address, err)
	}
	r := &Containerd{
		client:     cl,
		namespace:  cfg.Namespace,
		runtime:    cfg.RuntimeName,
		leaseTTL:   cfg.LeaseTTL,
		cgroupRoot: cgroupV2Root(),
		images:     cfg.Images.clone(),
		cdiDir:     cfg.CDISpecDir,

		logDriver:   cfg.LogDriver,
		logMaxBytes: cfg.LogMaxBytes,
		logMaxFiles: cfg.LogMaxFiles,
	}
	r.memory = detectMemoryCgroup(r.cgroupRoot)
	if cfg.Network != nil {
		if r.net, err = newCNINetwork(ctx, cfg.Namespace, *cfg.Network); err != nil {
			cl.Close()
			return nil, fmt.Errorf("container network: %w", err)
		}
	}
	if cfg.CDISpecDir != "" {
		if r.cdiCache, err = newCDICache(cfg.CDISpecDir); err != nil {
			cl.Close()
			return nil, fmt.Errorf("CDI spec directory %s: %w", cfg.CDISpecDir, err)
		}
	}
	ctx = r.nsContext(ctx)
	if _, err := cl.Version(ctx); err != nil {
		cl.Close()
		return nil, fmt.Errorf("connect to containerd at %s: %w", cfg.Address, err)
	}
	if r.snapshotter, err = r.pickSnapshotter(ctx, cfg.Snapshotter); err != nil {
		cl.Close()
		return nil, err
	}
	return r, nil
}

// Snapshotter is the snapshotter in use (overlayfs or native when
// detected).
func (r *Containerd) Snapshotter() string { return r.snapshotter }

// Namespace is the containerd namespace holding the agent's containers.
func (r *Containerd) Namespace() string { return r.namespace }

// pickSnapshotter returns want if containerd loaded it, else the first
// loaded default.
func (r *Containerd) pickSnapshotter(ctx context.Context, want string) (string, error) {
	candidates := defaultSnapshotters
	if want != "" {
		candidates = []string{want}
	}
	for _, name := range candidates {
		resp, err := r.client.IntrospectionService().Plugins(ctx,
			fmt.Sprintf("type==%s,id==%s", snapshotterPluginType, name))
		if err != nil {
			return "", fmt.Errorf("detect snapshotter: %w", err)
		}
		for _, p := range resp.Plugins {
			if p.InitErr == nil {
				return name, nil
			}
		}
	}
	return "", fmt.Errorf("detect snapshotter: none of %v is loaded by containerd: %w", candidates, errdefs.ErrNotImplemented)
}

func (r *Containerd) nsContext(ctx context.Context) context.Context {
	return namespaces.WithNamespace(ctx, r.namespace)
}

// withLease puts the operation under a containerd lease, so the garbage
// collector cannot remove content or snapshots between the steps of an
// operation; release drops it (what the operation created is referenced by
// then). An interrupted operation's lease expires after leaseTTL.
func (r *Containerd) withLease(ctx context.Context) (context.Context, func(), error) {
	ctx = r.nsContext(ctx)
	lctx, done, err := r.client.WithLease(ctx, leases.WithRandomID(), leases.WithExpiration(r.leaseTTL))
	if err != nil {
		return nil, nil, fmt.Errorf("create containerd lease: %w", err)
	}
	return lctx, func() { _ = done(context.WithoutCancel(lctx)) }, nil
}

// wrapErr maps containerd's error classes onto ours, keeping the original
// in the chain.
func wrapErr(err error, format string, args ...any) error {
	what := fmt.Sprintf(format, args...)
	switch {
	case errdefs.IsNotFound(err):
		return fmt.Errorf("%s: %w: %w", what, ErrNotFound, err)
	case errdefs.IsInvalidArgument(err):
		return fmt.Errorf("%s: %w: %w", what, ErrInvalidSpec, err)
	default:
		return fmt.Errorf("%s: %w", what, err)
	}
}

// ImportArchive imports an OCI image archive into the namespace's image
// store and returns the names of the images it held.
func (r *Containerd) ImportArchive(ctx context.Context, path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("import image archive: %w", err)
	}
	defer f.Close()
	ctx, release, err := r.withLease(ctx)
	if err != nil {
		return nil, fmt.Errorf("import image archive %s: %w", path, err)
	}
	defer release()
	imgs, err := r.client.Import(ctx, f)
	if err != nil {
		return nil, wrapErr(err, "import image archive %s", path)
	}
	names := make([]string, 0, len(imgs))
	for _, img := range imgs {
		names = append(names, img.Name)
	}
	return names, nil
}

// Create creates the container with a hardened spec (see hardenedSpec) and
// its task, not started, with stdout and stderr going to spec.LogPath
// through the shim. If the container exists (for the same lease) it
// returns its status, creating the task if it has none; a container of
// another lease under the id is ErrInvalidSpec. A failure leaves nothing
// behind.
func (r *Containerd) Create(ctx context.Context, spec Spec) (Status, error) {
	if err := validateSpec(spec); err != nil {
		return Status{}, err
	}
	if spec.Network == NetworkBridge && r.net == nil {
		return Status{}, fmt.Errorf("create container %s: %w: bridge networking is not configured", spec.ID, ErrNetworkUnavailable)
	}
	ctx, release, err := r.withLease(ctx)
	if err != nil {
		return Status{}, fmt.Errorf("create container %s: %w", spec.ID, err)
	}
	defer release()

	if c, err := r.client.LoadContainer(ctx, spec.ID); err == nil {
		return r.adopt(ctx, c, spec)
	} else if !errdefs.IsNotFound(err) {
		return Status{}, wrapErr(err, "create container %s", spec.ID)
	}

	img, err := r.client.GetImage(ctx, spec.Image)
	if errdefs.IsNotFound(err) {
		return Status{}, fmt.Errorf("create container %s: %w: %s", spec.ID, ErrImageNotFound, spec.Image)
	}
	if err != nil {
		return Status{}, wrapErr(err, "create container %s: get image %s", spec.ID, spec.Image)
	}
	unpacked, err := img.IsUnpacked(ctx, r.snapshotter)
	if err != nil {
		return Status{}, wrapErr(err, "create container %s: image %s", spec.ID, spec.Image)
	}
	if !unpacked {
		if err := img.Unpack(ctx, r.snapshotter); err != nil {
			return Status{}, wrapErr(err, "create container %s: unpack %s", spec.ID, spec.Image)
		}
	}
	if spec.LogPath != "" {
		if err := os.MkdirAll(filepath.Dir(spec.LogPath), 0o750); err != nil {
			return Status{}, fmt.Errorf("create container %s: log directory: %w", spec.ID, err)
		}
	}

	labels := map[string]string{
		LabelLease:       spec.LeaseID,
		LabelImageDigest: img.Target().Digest.String(),
		LabelNetwork:     spec.Network.String(),
	}
	if spec.Tenant != "" {
		labels[LabelTenant] = spec.Tenant
	}
	if spec.Device.UUID != "" {
		labels[LabelMIG] = spec.Device.UUID
	}
	devices := withDeviceNodes(spec)
	cdiWritten := false
	if r.cdiCache != nil && spec.Device.UUID != "" {
		name, err := WriteCDISpec(r.cdiDir, spec.Device)
		if err != nil {
			return Status{}, fmt.Errorf("create container %s: %w", spec.ID, err)
		}
		cdiWritten = true
		devices = withCDIDevices(r.cdiCache, name)
	}
	specOpts := append([]oci.SpecOpts{oci.WithDefaultSpec(), oci.WithImageConfig(img)}, hardenedSpecWith(r.namespace, spec, devices)...)
	if spec.Network == NetworkBridge {
		// The namespace the runtime creates and attaches (after the
		// container record exists, so a sweep never takes it for a
		// leftover) before the task joins it.
		specOpts = append(specOpts, oci.WithLinuxNamespace(specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: r.net.netnsPath(spec.ID)}))
	}
	c, err := r.client.NewContainer(ctx, spec.ID,
		client.WithImage(img),
		client.WithSnapshotter(r.snapshotter),
		client.WithNewSnapshot(spec.ID, img),
		client.WithRuntime(r.runtime, nil),
		client.WithNewSpec(specOpts...),
		client.WithContainerLabels(labels),
	)
	if errdefs.IsAlreadyExists(err) {
		// Lost a race with a concurrent Create of the same id.
		if c, lerr := r.client.LoadContainer(ctx, spec.ID); lerr == nil {
			return r.adopt(ctx, c, spec)
		}
	}
	if err != nil {
		// The snapshot may have been prepared before a later option
		// failed; remove it so a retry can use the key.
		if rerr := r.client.SnapshotService(r.snapshotter).Remove(ctx, spec.ID); rerr != nil && !errdefs.IsNotFound(rerr) {
			err = errors.Join(err, fmt.Errorf("remove snapshot: %w", rerr))
		}
		if cdiWritten {
			if rerr := RemoveCDISpec(r.cdiDir, spec.Device.UUID); rerr != nil {
				err = errors.Join(err, rerr)
			}
		}
		return Status{}, wrapErr(err, "create container %s", spec.ID)
	}
	if c, err = r.networkAndTask(ctx, c, spec, spec.Network); err != nil {
		if spec.Network == NetworkBridge {
			if nerr := r.net.teardown(context.WithoutCancel(ctx), spec.ID); nerr != nil {
				err = errors.Join(err, nerr)
			}
		}
		if derr := c.Delete(ctx, client.WithSnapshotCleanup); derr != nil && !errdefs.IsNotFound(derr) {
			err = errors.Join(err, fmt.Errorf("roll back container: %w", derr))
		} else if cdiWritten {
			if rerr := RemoveCDISpec(r.cdiDir, spec.Device.UUID); rerr != nil {
				err = errors.Join(err, rerr)
			}
		}
		return Status{}, err
	}
	return r.status(ctx, c)
}

// adopt returns the status of an existing container for spec, creating
// its task if it has none.
func (r *Containerd) adopt(ctx context.Context, c client.Container, spec Spec) (Status, error) {
	labels, err := c.Labels(ctx)
	if err != nil {
		return Status{}, wrapErr(err, "create container %s", spec.ID)
	}
	if got := labels[LabelLease]; got != spec.LeaseID {
		return Status{}, fmt.Errorf("%w: container %s exists for lease %q, not %q", ErrInvalidSpec, spec.ID, got, spec.LeaseID)
	}
	if _, err := c.Task(ctx, nil); errdefs.IsNotFound(err) {
		// Half-created (a crash between the steps of Create): finish it.
		if c, err = r.networkAndTask(ctx, c, spec, networkOf(labels)); err != nil {
			return Status{}, err
		}
	} else if err != nil {
		return Status{}, wrapErr(err, "create container %s: load task", spec.ID)
	}
	return r.status(ctx, c)
}

// networkOf is the network mode a container was created with.
func networkOf(labels map[string]string) NetworkMode {
	if labels[LabelNetwork] == NetworkBridge.String() {
		return NetworkBridge
	}
	return NetworkNone
}

// networkAndTask creates the container's task, not started, and in
// bridge mode its network namespace, attached and its address recorded as
// a label, before it returns. The task (runc create, which joins the
// namespace) and the CNI attachment run at the same time. It redoes an
// attachment a crash left incomplete (no address recorded, or the
// namespace gone). On error it deletes the task it created; the caller
// removes the network. It returns the container with its metadata
// reloaded when it changed.
func (r *Containerd) networkAndTask(ctx context.Context, c client.Container, spec Spec, mode NetworkMode) (client.Container, error) {
	newTask := func() error {
		if err := r.newTask(ctx, c, spec); err != nil && !errdefs.IsAlreadyExists(err) {
			return err
		}
		return nil
	}
	if mode != NetworkBridge {
		return c, newTask()
	}
	if r.net == nil {
		return c, fmt.Errorf("create container %s: %w: bridge networking is not configured", c.ID(), ErrNetworkUnavailable)
	}
	labels, err := c.Labels(ctx)
	if err != nil {
		return c, wrapErr(err, "create container %s: labels", c.ID())
	}
	if labels[LabelIP] != "" && isNetNS(r.net.netnsPath(c.ID())) {
		return c, newTask()
	}
	// Whatever a previous attempt left is removed first: the bridge
	// plugin refuses an eth0 that exists, host-local a second address.
	if r.net.holds(c.ID()) {
		if err := r.net.teardown(ctx, c.ID()); err != nil {
			return c, fmt.Errorf("create container %s: %w", c.ID(), err)
		}
	}
	if err := newNetNS(r.net.netnsPath(c.ID())); err != nil {
		return c, fmt.Errorf("create container %s: %w", c.ID(), err)
	}
	var ip netip.Addr
	attached := make(chan error, 1)
	go func() {
		var err error
		ip, err = r.net.attach(ctx, c.ID())
		attached <- err
	}()
	terr := newTask()
	if err := <-attached; err != nil || terr != nil {
		err = errors.Join(terr, err)
		if terr == nil {
			if task, lerr := c.Task(ctx, nil); lerr == nil {
				if _, derr := task.Delete(context.WithoutCancel(ctx), client.WithProcessKill); derr != nil && !errdefs.IsNotFound(derr) {
					err = errors.Join(err, fmt.Errorf("roll back task: %w", derr))
				}
			}
		}
		return c, fmt.Errorf("create container %s: %w", c.ID(), err)
	}
	if _, err := c.SetLabels(ctx, map[string]string{LabelIP: ip.String()}); err != nil {
		return c, wrapErr(err, "create container %s: record address", c.ID())
	}
	// The client caches the metadata it loaded; Status reads the label.
	nc, err := r.client.LoadContainer(ctx, c.ID())
	if err != nil {
		return c, wrapErr(err, "create container %s: reload", c.ID())
	}
	return nc, nil
}

// newTask creates the container's task, not started. The shim writes the
// output to the log file, itself or through the log driver it runs, so
// nothing depends on this process.
func (r *Containerd) newTask(ctx context.Context, c client.Container, spec Spec) error {
	ioc := cio.NullIO
	switch {
	case spec.LogPath != "" && r.logDriver != "":
		// The shim passes each key and its value as two arguments, in no
		// fixed order: the keys carry the flags' dashes.
		ioc = cio.BinaryIO(r.logDriver, map[string]string{
			"--file":      spec.LogPath,
			"--max-bytes": strconv.FormatInt(r.logMaxBytes, 10),
			"--max-files": strconv.Itoa(r.logMaxFiles),
		})
	case spec.LogPath != "":
		ioc = cio.LogFile(spec.LogPath)
	}
	if _, err := c.NewTask(ctx, ioc); err != nil {
		return wrapErr(err, "create task for container %s", spec.ID)
	}
	return nil
}

// Start starts a created task. A running task is left alone; a task that
// has already exited is not restarted: its status (StateStopped) is
// returned and the caller decides. A container without a task is
// ErrNotFound.
func (r *Containerd) Start(ctx context.Context, id string) (Status, error) {
	if err := ValidateID(id); err != nil {
		return Status{}, err
	}
	ctx, release, err := r.withLease(ctx)
	if err != nil {
		return Status{}, fmt.Errorf("start container %s: %w", id, err)
	}
	defer release()
	c, err := r.client.LoadContainer(ctx, id)
	if err != nil {
		return Status{}, wrapErr(err, "start container %s", id)
	}
	task, err := c.Task(ctx, nil)
	if err != nil {
		return Status{}, wrapErr(err, "start container %s: load task", id)
	}
	ts, err := task.Status(ctx)
	if err != nil {
		return Status{}, wrapErr(err, "start container %s: task status", id)
	}
	if ts.Status == client.Created {
		if err := task.Start(ctx); err != nil {
			return Status{}, wrapErr(err, "start container %s", id)
		}
	}
	return r.status(ctx, c)
}

// Status reports the container's state; ErrNotFound if there is none.
func (r *Containerd) Status(ctx context.Context, id string) (Status, error) {
	if err := ValidateID(id); err != nil {
		return Status{}, err
	}
	ctx = r.nsContext(ctx)
	c, err := r.client.LoadContainer(ctx, id)
	if err != nil {
		return Status{}, wrapErr(err, "status of container %s", id)
	}
	return r.status(ctx, c)
}

func (r *Containerd) status(ctx context.Context, c client.Container) (Status, error) {
	info, err := c.Info(ctx, client.WithoutRefreshedMetadata)
	if err != nil {
		return Status{}, wrapErr(err, "status of container %s", c.ID())
	}
	st := Status{
		ID:          info.ID,
		LeaseID:     info.Labels[LabelLease],
		Image:       info.Image,
		ImageDigest: info.Labels[LabelImageDigest],
		State:       StateNoTask,
		Network:     networkOf(info.Labels),
	}
	if ip, err := netip.ParseAddr(info.Labels[LabelIP]); err == nil {
		st.IP = ip
	}
	task, err := c.Task(ctx, nil)
	if errdefs.IsNotFound(err) {
		return st, nil
	}
	if err != nil {
		return Status{}, wrapErr(err, "status of container %s: load task", c.ID())
	}
	ts, err := task.Status(ctx)
	if errdefs.IsNotFound(err) {
		return st, nil // deleted since it was loaded
	}
	if err != nil {
		return Status{}, wrapErr(err, "status of container %s: task status", c.ID())
	}
	st.Pid = task.Pid()
	switch ts.Status {
	case client.Created:
		st.State = StateCreated
	case client.Running:
		st.State = StateRunning
	case client.Stopped:
		st.State = StateStopped
		st.ExitCode = ts.ExitStatus
		st.ExitedAt = ts.ExitTime
		// The task's cgroup stays until the task is deleted.
		if n, ok := r.memory.oomKills(cgroupsPathOf(info.Spec)); ok && n > 0 {
			st.OOMKilled = true
		}
	default:
		st.State = StateUnknown
	}
	if st.State == StateCreated || st.State == StateRunning {
		st.CgroupPath = r.cgroupDir(info.Spec)
	}
	return st, nil
}

// cgroupDir is the task's cgroup v2 directory: the spec's cgroupsPath
// below the host's cgroup v2 mount. Empty when the host has no cgroup v2
// or the path is not a cgroupfs path (systemd "slice:prefix:name").
func (r *Containerd) cgroupDir(specAny interface{ GetValue() []byte }) string {
	p := cgroupsPathOf(specAny)
	if r.cgroupRoot == "" || p == "" {
		return ""
	}
	return filepath.Join(r.cgroupRoot, p)
}

// cgroupsPathOf is a container spec's cgroupsPath when it is a cgroupfs
// path (absolute), else "".
func cgroupsPathOf(specAny interface{ GetValue() []byte }) string {
	if specAny == nil {
		return ""
	}
	var s specs.Spec
	if err := json.Unmarshal(specAny.GetValue(), &s); err != nil || s.Linux == nil {
		return ""
	}
	if p := s.Linux.CgroupsPath; filepath.IsAbs(p) {
		return p
	}
	return ""
}

// Stop sends SIGTERM to the task, SIGKILL to everything in the container
// if it has not exited after grace, then deletes the task, the container
// and its snapshot. A missing container (or task) is not an error.
func (r *Containerd) Stop(ctx context.Context, id string, grace time.Duration) error {
	if err := ValidateID(id); err != nil {
		return err
	}
	ctx, release, err := r.withLease(ctx)
	if err != nil {
		return fmt.Errorf("stop container %s: %w", id, err)
	}
	defer release()
	c, err := r.client.LoadContainer(ctx, id)
	if errdefs.IsNotFound(err) {
		// Gone behind our back (or a retry after a crash mid-Stop):
		// release what it may still hold on the network.
		if r.net != nil && r.net.holds(id) {
			if err := r.net.teardown(ctx, id); err != nil {
				return fmt.Errorf("stop container %s: %w", id, err)
			}
		}
		return nil
	}
	if err != nil {
		return wrapErr(err, "stop container %s", id)
	}
	task, err := c.Task(ctx, nil)
	switch {
	case err == nil:
		if err := stopTask(ctx, task, grace); err != nil {
			return fmt.Errorf("stop container %s: %w", id, err)
		}
	case !errdefs.IsNotFound(err):
		return wrapErr(err, "stop container %s: load task", id)
	}
	labels, err := c.Labels(ctx)
	if err != nil && !errdefs.IsNotFound(err) {
		return wrapErr(err, "stop container %s: labels", id)
	}
	var migUUID string
	if r.cdiDir != "" {
		migUUID = labels[LabelMIG]
	}
	// The network goes before the container record: a namespace file or
	// an address never outlives its container but through a crash, which
	// SweepNetwork repairs.
	if networkOf(labels) == NetworkBridge && r.net != nil {
		if err := r.net.teardown(ctx, id); err != nil {
			return fmt.Errorf("stop container %s: %w", id, err)
		}
	}
	if err := c.Delete(ctx, client.WithSnapshotCleanup); err != nil && !errdefs.IsNotFound(err) {
		return wrapErr(err, "delete container %s", id)
	}
	if migUUID != "" {
		if err := RemoveCDISpec(r.cdiDir, migUUID); err != nil {
			return fmt.Errorf("stop container %s: %w", id, err)
		}
	}
	return nil
}

// stopTask terminates a running task within grace and deletes it.
func stopTask(ctx context.Context, task client.Task, grace time.Duration) error {
	ts, err := task.Status(ctx)
	if errdefs.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("task status: %w", err)
	}
	if ts.Status == client.Running && grace > 0 {
		wctx, cancel := context.WithCancel(ctx)
		defer cancel()
		exited, err := task.Wait(wctx)
		if err != nil {
			return fmt.Errorf("wait for task: %w", err)
		}
		if err := task.Kill(ctx, syscall.SIGTERM); err != nil && !errdefs.IsNotFound(err) {
			return fmt.Errorf("send SIGTERM: %w", err)
		}
		timer := time.NewTimer(grace)
		defer timer.Stop()
		select {
		case <-exited:
		case <-timer.C:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	// SIGKILLs every process of the container if any is left, waits for
	// the exit, then deletes the task (runc state, cgroup, rootfs mount).
	if _, err := task.Delete(ctx, client.WithProcessKill); err != nil && !errdefs.IsNotFound(err) {
		return fmt.Errorf("delete task: %w", err)
	}
	return nil
}

// List returns the status of every container in the namespace that has a
// LabelLease label, by id.
func (r *Containerd) List(ctx context.Context) ([]Status, error) {
	ctx = r.nsContext(ctx)
	cs, err := r.client.Containers(ctx, fmt.Sprintf("labels.%q", LabelLease))
	if err != nil {
		return nil, wrapErr(err, "list containers")
	}
	out := make([]Status, 0, len(cs))
	for _, c := range cs {
		st, err := r.status(ctx, c)
		if errors.Is(err, ErrNotFound) {
			continue // removed while listing
		}
		if err != nil {
			return nil, fmt.Errorf("list containers: %w", err)
		}
		out = append(out, st)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

// SweepNetwork releases the network namespace, the CNI attachment (veth)
// and the address of every container that no longer exists:
// deleted behind the runtime's back, or lost to an agent crash or a host
// reboot (which empties the namespace directory but not the persistent
// allocations). It returns the ids it cleaned up; without a network it
// does nothing.
func (r *Containerd) SweepNetwork(ctx context.Context) ([]string, error) {
	if r.net == nil {
		return nil, nil
	}
	ctx = r.nsContext(ctx)
	// Leftovers first, containers second: Create makes the container
	// before its network and Stop removes the network before the
	// container, so a leftover seen here whose container is missing
	// afterwards is not one being created.
	ids, err := r.net.leftovers()
	if err != nil {
		return nil, fmt.Errorf("sweep network: %w", err)
	}
	if len(ids) == 0 {
		return nil, nil
	}
	cs, err := r.client.Containers(ctx)
	if err != nil {
		return nil, wrapErr(err, "sweep network: list containers")
	}
	live := make(map[string]bool, len(cs))
	for _, c := range cs {
		live[c.ID()] = true
	}
	var gone []string
	var errs []error
	for _, id := range ids {
		if live[id] {
			continue
		}
		if err := r.net.teardown(ctx, id); err != nil {
			errs = append(errs, err)
			continue
		}
		gone = append(gone, id)
	}
	if err := errors.Join(errs...); err != nil {
		return gone, fmt.Errorf("sweep network: %w", err)
	}
	return gone, nil
}

var _ NetworkSweeper = (*Containerd)(nil)

// Close closes the client connection; containers and tasks keep running.
// Calling it again returns the first result.
func (r *Containerd) Close() error {
	r.closeOnce.Do(func() {
		if err := r.client.Close(); err != nil {
			r.closeErr = fmt.Errorf("close containerd client: %w", err)
		}
	})
	return r.closeErr
}

// Versions reports containerd's version (with its revision) and the OCI
// runtime's (the first line of `runc --version`), for attestation.
func (r *Containerd) Versions(ctx context.Context) (containerd, runc string, err error) {
	v, err := r.client.Version(r.nsContext(ctx))
	if err != nil {
		return "", "", fmt.Errorf("containerd version: %w", err)
	}
	containerd = v.Version
	if v.Revision != "" {
		containerd += " (" + v.Revision + ")"
	}
	out, err := exec.CommandContext(ctx, "runc", "--version").Output()
	if err != nil {
		return containerd, "", fmt.Errorf("runc version: %w", err)
	}
	runc, _, _ = strings.Cut(strings.TrimSpace(string(out)), "\n")
	return containerd, runc, nil
}
