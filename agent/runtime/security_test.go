package runtime

// Security tests: a tenant container, created with the hardened spec and
// bound to a simulated GPU partition, attempts from inside what a hostile
// tenant would try. A shell script, run as the container's command,
// prints one NAME=RESULT line per attempt (RESULT is OK when the attempt
// worked, else the errno the kernel returned, recovered from busybox's
// message); the test parses the log and asserts both that each attempt
// failed and that it failed for the reason the design gives (EROFS for a
// read-only mount, not EACCES from file modes; EPERM from a missing
// capability or the seccomp filter, not from a missing mount point).
// Where an attempt could fail for an unrelated reason, the script first
// shows the same mechanism working on something the tenant owns.

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/cio"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/gpuaas/gpuaas/agent/gpu"
)

// tenantPartition is the lease's simulated MIG partition: the parent GPU,
// the control node, UVM, and the GI and CI access capabilities. No driver
// backs these numbers on a CI host; the nodes are created by runc anyway.
func tenantPartition() gpu.MIGDevice {
	return gpu.MIGDevice{
		UUID:    "MIG-0f3c6a2e-8d41-5b7a-9c2e-7a1b3c4d5e6f",
		GPUUUID: "GPU-0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0",
		DeviceNodes: []gpu.DeviceNode{
			{Path: "/dev/nvidia0", Major: 195, Minor: 0},
			{Path: "/dev/nvidiactl", Major: 195, Minor: 255},
			{Path: "/dev/nvidia-uvm", Major: 510, Minor: 0},
			{Path: "/dev/nvidia-caps/nvidia-cap21", Major: 511, Minor: 21},
			{Path: "/dev/nvidia-caps/nvidia-cap22", Major: 511, Minor: 22},
		},
	}
}

// probePrelude defines check, which runs a command and prints NAME=OK or
// NAME=<errno> from busybox's error message.
const probePrelude = `
errno() {
	case "$1" in
	# busybox mount says this for EPERM and EACCES alike; for a mount
	# that reaches the kernel without CAP_SYS_ADMIN it is EPERM (seccomp
	# denies mount(2) with EPERM, and so does the kernel).
	*"are you root"*) echo EPERM ;;
	*"Operation not permitted"*) echo EPERM ;;
	*"Permission denied"*) echo EACCES ;;
	*"Read-only file system"*) echo EROFS ;;
	*"No such file or directory"*) echo ENOENT ;;
	*"No such device or address"*) echo ENXIO ;;
	*"Connection refused"*) echo ECONNREFUSED ;;
	*"Network is unreachable"*) echo ENETUNREACH ;;
	*"Device or resource busy"*) echo EBUSY ;;
	*"kernel does not support"*|*"Function not implemented"*) echo ENOSYS ;;
	*) echo "unrecognised: $1" | tr '\n' ' ' ;;
	esac
}
check() {
	name=$1
	shift
	if out=$("$@" 2>&1 </dev/null); then echo "$name=OK"; else echo "$name=$(errno "$out")"; fi
}
`

// probeResults are the NAME=RESULT lines of a probe, in order per name.
type probeResults map[string][]string

// one returns the single result for name, or a description of what was
// there instead.
func (r probeResults) one(name string) string {
	switch v := r[name]; len(v) {
	case 0:
		return "<missing>"
	case 1:
		return v[0]
	default:
		return fmt.Sprintf("<%d results: %q>", len(v), v)
	}
}

// expect checks single results against want, in name order.
func (r probeResults) expect(t *testing.T, want map[string]string) {
	t.Helper()
	names := make([]string, 0, len(want))
	for n := range want {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if got := r.one(n); got != want[n] {
			t.Errorf("%s = %q, want %q", n, got, want[n])
		}
	}
}

// tenantHooks let a test act on the container from the host around its
// start.
type tenantHooks struct {
	// created runs after Create, before Start, with the container's root
	// filesystem as the host sees it: what the image's layers hold.
	created func(rootfs string)
	// started runs right after Start; what it returns runs after the
	// container has exited.
	started func(id string) (done func())
	// network is the container's network mode (NetworkNone if zero).
	network NetworkMode
}

// runTenant runs script in a hardened container bound to tenantPartition,
// as the image's (nobody) user, waits for it to exit, and returns its
// results. The container is removed when the test ends.
func (e *env) runTenant(script string, env []string, h tenantHooks) probeResults {
	e.t.Helper()
	s := e.spec("sh", "-c", probePrelude+script+"\necho END\n")
	s.Device = tenantPartition()
	s.Env = append(s.Env, env...)
	s.Network = h.network
	e.create(s)
	e.t.Cleanup(func() { e.stop(s.ID, 0) })
	if h.created != nil {
		rootfs := filepath.Join(e.ctrd.Dir(), "state", "io.containerd.runtime.v2.task", testNamespace, s.ID, "rootfs")
		if _, err := os.Stat(filepath.Join(rootfs, "bin", "busybox")); err != nil {
			e.t.Fatalf("container rootfs on the host: %v", err)
		}
		h.created(rootfs)
	}
	e.start(s.ID)
	var done func()
	if h.started != nil {
		done = h.started(s.ID)
	}
	st := e.waitExit(s.ID)
	if done != nil {
		done()
	}
	out := e.readLog(s.LogPath, "END")
	if st.ExitCode != 0 {
		e.t.Fatalf("probe exited %d:\n%s", st.ExitCode, out)
	}
	e.t.Logf("probe output:\n%s", out)
	r := probeResults{}
	for _, line := range strings.Split(out, "\n") {
		if k, v, ok := strings.Cut(line, "="); ok && !strings.ContainsAny(k, " \t") {
			r[k] = append(r[k], v)
		}
	}
	return r
}

// TestTenantContainerCannotGainPrivileges: no capability in any set, no
// new privileges, and every privileged operation a tenant might use to
// leave the container is refused. EPERM here comes from the missing
// capability (CAP_SYS_ADMIN, CAP_MKNOD, CAP_SYS_CHROOT, CAP_SYS_MODULE)
// and, for mount, umount, unshare and init_module, already from
// containerd's seccomp profile, which allows those calls only when the
// capability is granted. On a kernel without module support a granted
// CAP_SYS_MODULE would show as ENOSYS, so EPERM is still the proof.
func TestTenantContainerCannotGainPrivileges(t *testing.T) {
	e := newEnv(t)
	r := e.runTenant(`
grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status | tr -d '\t' | sed 's/:/=/'
echo "uid=$(id -u)"
mkdir /tmp/mnt
check mount mount -t tmpfs none /tmp/mnt
check bind-mount mount --bind /tmp /tmp/mnt
check remount-root mount -o remount,rw /
check unmount-proc umount /proc
check userns unshare -U -r true
check mountns unshare -m true
check mknod mknod /tmp/null c 1 3
check chroot chroot / true
check module insmod /bin/busybox
`, nil, tenantHooks{})
	r.expect(t, map[string]string{
		"uid":          "65534",
		"CapInh":       "0000000000000000",
		"CapPrm":       "0000000000000000",
		"CapEff":       "0000000000000000",
		"CapBnd":       "0000000000000000",
		"CapAmb":       "0000000000000000",
		"NoNewPrivs":   "1",
		"Seccomp":      "2",
		"mount":        "EPERM",
		"bind-mount":   "EPERM",
		"remount-root": "EPERM",
		"unmount-proc": "EPERM",
		"userns":       "EPERM",
		"mountns":      "EPERM",
		"mknod":        "EPERM", // in /tmp, which nobody may write: only CAP_MKNOD is missing
		"chroot":       "EPERM",
		"module":       "EPERM",
	})
}

// TestTenantContainerCannotChangeUIDThroughASetuidBinary: an image may
// ship a setuid-root executable (layers keep the bit); with
// no_new_privileges the kernel runs it without changing the effective uid.
// The probe is busybox's su applet from a setuid-root copy of busybox:
// busybox checks geteuid() right after exec and says "must be suid to
// work properly" when the kernel did not grant euid 0; when it did, su
// asks for a password instead. /tmp cannot serve instead: it is nosuid,
// and a tenant can only make setuid files it owns.
func TestTenantContainerCannotChangeUIDThroughASetuidBinary(t *testing.T) {
	e := newEnv(t)
	r := e.runTenant(`
echo "suid-file=$(stat -c '%a %u:%g' /bin/busybox-suid)"
out=$(/bin/busybox-suid su -c 'id -u' root 2>&1 </dev/null)
case "$out" in
*"must be suid to work properly"*) echo "setuid=refused" ;;
*) echo "setuid=GRANTED: $out" | tr '\n' ' '; echo ;;
esac
echo "uid=$(id -u)"
echo "rootfs-mount=$(grep -m1 '^[^ ]* / ' /proc/self/mounts | cut -d' ' -f4)"
`, nil, tenantHooks{created: func(rootfs string) {
		// As if an image layer held it: root-owned, mode 4755.
		bb, err := os.ReadFile(filepath.Join(rootfs, "bin", "busybox"))
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(rootfs, "bin", "busybox-suid")
		if err := os.WriteFile(p, bb, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(p, 0, 0); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, 0o755|os.ModeSetuid); err != nil {
			t.Fatal(err)
		}
	}})
	r.expect(t, map[string]string{
		"suid-file": "4755 0:0",
		"setuid":    "refused",
		"uid":       "65534",
	})
	// The root filesystem is not mounted nosuid: the setuid bit is
	// honoured there, and no_new_privileges is what refuses it.
	if opts := strings.Split(r.one("rootfs-mount"), ","); slices.Contains(opts, "nosuid") {
		t.Logf("root filesystem mounted nosuid (%s): no_new_privileges is a second fence here", r.one("rootfs-mount"))
	}
}

// TestTenantContainerCannotPtraceAnotherUsersProcess: containerd's
// seccomp profile allows ptrace(2) and process_vm_readv(2) on kernels >=
// 4.8 whatever the capabilities (as Docker's does), so the fence is the
// kernel's ptrace access check, __ptrace_may_access: without
// CAP_SYS_PTRACE (the bounding set is empty) a process may trace only a
// dumpable process of its own uid and gid. Busybox has no ptrace tool, so
// the probe goes through /proc files the kernel guards with that same
// function and nothing else: following the /proc/PID/root and
// /proc/PID/exe links (PTRACE_MODE_READ_FSCREDS). PTRACE_ATTACH runs the same
// uid, gid, dumpable and capability checks (with the real instead of the
// filesystem ids, equal here: nothing in the container changes uid);
// only an LSM such as Yama may refuse an attach more often than a read.
// /proc/PID/mem and environ (mode 0600/0400, owned by the process's uid)
// are also refused, by the file mode first and the same ptrace check
// behind it, and signals by the kill permission check.
//
// The victim is a process of another uid in the container: what an
// operator's exec runs, as root without capabilities. Host processes are
// not addressable at all (TestTenantContainerCannotSeeHostProcesses).
// The tenant's own child is the control: every probe works on it, so a
// refusal is about the other uid, not the probe.
func TestTenantContainerCannotPtraceAnotherUsersProcess(t *testing.T) {
	e := newEnv(t)
	r := e.runTenant(`
victim=
i=0
while [ -z "$victim" ] && [ $i -lt 200 ]; do
	victim=$(ps -o pid,user,comm | while read pid user comm; do
		if [ "$user" = root ] && [ "$comm" = sleep ]; then echo $pid; fi
	done)
	i=$((i + 1))
	[ -n "$victim" ] || sleep 0.05
done
echo "victim-uid=$(stat -c %u /proc/$victim)"
sleep 1000 &
own=$!
for who in own victim; do
	eval pid=\$$who
	check ptrace-root-$who ls /proc/$pid/root/
	check ptrace-exe-$who head -c 1 /proc/$pid/exe
	check mem-$who dd if=/proc/$pid/mem of=/dev/null bs=1 count=0
	check environ-$who cat /proc/$pid/environ
	check signal-$who kill -0 $pid
done
kill $own
`, nil, tenantHooks{started: e.execVictim})
	r.expect(t, map[string]string{
		"victim-uid":         "0",
		"ptrace-root-own":    "OK",
		"ptrace-exe-own":     "OK",
		"mem-own":            "OK",
		"environ-own":        "OK",
		"signal-own":         "OK",
		"ptrace-root-victim": "EACCES",
		"ptrace-exe-victim":  "EACCES",
		"mem-victim":         "EACCES",
		"environ-victim":     "EACCES",
		"signal-victim":      "EPERM",
	})
}

// execVictim starts `sleep 1000` in the running container as uid and gid
// 0 with the container's (empty) capabilities and returns a function that
// waits for it to die with the container and deletes it.
func (e *env) execVictim(id string) func() {
	e.t.Helper()
	c, err := e.raw.LoadContainer(e.ctx, id)
	if err != nil {
		e.t.Fatal(err)
	}
	sp, err := c.Spec(e.ctx)
	if err != nil {
		e.t.Fatal(err)
	}
	task, err := c.Task(e.ctx, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	p := *sp.Process
	p.User = specs.User{UID: 0, GID: 0}
	p.Args = []string{"sleep", "1000"}
	proc, err := task.Exec(e.ctx, "victim", &p, cio.NullIO)
	if err != nil {
		e.t.Fatalf("exec victim: %v", err)
	}
	exited, err := proc.Wait(e.ctx)
	if err != nil {
		e.t.Fatal(err)
	}
	if err := proc.Start(e.ctx); err != nil {
		e.t.Fatalf("start victim: %v", err)
	}
	return func() {
		// The pid namespace's init exiting kills it.
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			e.t.Error("victim outlived the container's init")
		}
		if _, err := proc.Delete(e.ctx); err != nil {
			e.t.Errorf("delete victim: %v", err)
		}
	}
}

// TestTenantContainerCannotWriteTheRootFilesystem: the root filesystem is
// mounted read-only, so every write fails with EROFS. The kernel checks
// the mount before file modes for creating, mkdir, unlink, rename, chmod
// and truncating opens, so EROFS there proves the read-only mount, not
// just that nobody owns nothing (which gives EACCES; an appending open of
// an existing file checks the modes first, so it proves nothing and is
// not used). /proc/sys and /sys are read-only too. /tmp is the tenant's
// writable scratch space, the control that writing works at all.
func TestTenantContainerCannotWriteTheRootFilesystem(t *testing.T) {
	e := newEnv(t)
	r := e.runTenant(`
check create-file touch /probe
check create-dir mkdir /etc/probe
check overwrite-passwd sh -c 'echo "root::0:0::/:/bin/sh" > /etc/passwd'
check chmod-passwd chmod 666 /etc/passwd
check overwrite-binary sh -c 'echo x > /bin/busybox'
check unlink-binary rm -f /bin/ls
check rename-binary mv /bin/ls /bin/ls2
check write-proc-sys sh -c 'echo x > /proc/sys/kernel/hostname'
check write-sys sh -c 'echo 1500 > /sys/class/net/lo/mtu'
check write-tmp sh -c 'echo x > /tmp/probe'
`, nil, tenantHooks{})
	r.expect(t, map[string]string{
		"create-file":      "EROFS",
		"create-dir":       "EROFS",
		"overwrite-passwd": "EROFS",
		"chmod-passwd":     "EROFS",
		"overwrite-binary": "EROFS",
		"unlink-binary":    "EROFS",
		"rename-binary":    "EROFS",
		"write-proc-sys":   "EROFS",
		"write-sys":        "EROFS",
		"write-tmp":        "OK",
	})
}

// maskedFiles and maskedDirs are containerd's default masked paths
// (oci.WithDefaultSpec) that a tenant could otherwise read: runc binds
// /dev/null over each file and a read-only empty tmpfs over each
// directory, when the path exists.
var (
	maskedFiles = []string{"/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/interrupts",
		"/proc/sched_debug", "/proc/latency_stats", "/proc/timer_stats"}
	maskedDirs = []string{"/proc/acpi", "/proc/asound", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap"}
)

// TestTenantContainerCannotReadKernelMemoryOrMaskedPaths: /proc/kcore
// (kernel memory) and the other masked files read as /dev/null, masked
// directories are empty, and the tenant cannot unmount the masks. On a
// kernel built without /proc/kcore (as on some CI VMs) the path does not
// exist on the host either, and must not exist in the container; the
// other masked files prove the masking there.
func TestTenantContainerCannotReadKernelMemoryOrMaskedPaths(t *testing.T) {
	e := newEnv(t)
	r := e.runTenant(`
for p in `+strings.Join(maskedFiles, " ")+`; do
	if [ -e $p ]; then
		echo "$p=$(stat -c '%F %t:%T' $p), $(head -c 4096 $p 2>&1 | wc -c) bytes"
	else
		echo "$p=absent"
	fi
done
for d in `+strings.Join(maskedDirs, " ")+`; do
	if [ -e $d ]; then echo "$d=$(ls -A $d | wc -l) entries"; else echo "$d=absent"; fi
done
check kcore head -c 1 /proc/kcore
check unmask-file umount /proc/interrupts
check unmask-dir umount /sys/firmware
`, nil, tenantHooks{})

	want := map[string]string{
		"unmask-file": "EPERM",
		"unmask-dir":  "EPERM",
	}
	var present int
	for _, p := range maskedFiles {
		want[p] = "absent"
		if _, err := os.Stat(p); err == nil {
			want[p] = "character special file 1:3, 0 bytes"
			present++
		}
	}
	for _, d := range maskedDirs {
		want[d] = "absent"
		if _, err := os.Stat(d); err == nil {
			want[d] = "0 entries"
			present++
		}
	}
	want["kcore"] = "ENOENT"
	if _, err := os.Stat("/proc/kcore"); err == nil {
		want["kcore"] = "OK" // reads as /dev/null: zero bytes, checked above
	}
	if present == 0 {
		t.Fatal("no masked path exists on this host: the check would prove nothing")
	}
	r.expect(t, want)
}

// TestTenantContainerCannotSeeHostProcesses: the container has its own
// pid namespace (its script is pid 1 and only its processes are listed)
// and its own cgroup namespace (it sees its cgroups as the root, not
// where the host placed them).
func TestTenantContainerCannotSeeHostProcesses(t *testing.T) {
	e := newEnv(t)
	r := e.runTenant(`
echo "pid1=$(cat /proc/1/comm)"
ps -o pid,comm >/tmp/ps
while read pid comm; do [ "$pid" = PID ] || echo "proc=$pid $comm"; done </tmp/ps
echo "procdirs=$(ls -d /proc/[0-9]* | wc -l)"
sed 's/^/cgroup=/' /proc/self/cgroup
`, nil, tenantHooks{})
	r.expect(t, map[string]string{"pid1": "sh"})
	// sh (pid 1), and ps while it ran; ls and wc in the count.
	procs := r["proc"]
	if !slices.Contains(procs, "1 sh") || len(procs) > 3 {
		t.Errorf("processes visible in the container: %q, want pid 1 (sh) and ps", procs)
	}
	for _, p := range procs {
		if _, comm, _ := strings.Cut(p, " "); comm != "sh" && comm != "ps" {
			t.Errorf("foreign process visible: %q", p)
		}
	}
	if n, err := strconv.Atoi(r.one("procdirs")); err != nil || n > 5 {
		t.Errorf("/proc lists %s processes", r.one("procdirs"))
	}
	cgroups := r["cgroup"]
	if len(cgroups) == 0 {
		t.Error("no cgroup lines")
	}
	for _, c := range cgroups {
		if !strings.HasSuffix(c, ":/") {
			t.Errorf("cgroup path of the host visible: %q", c)
		}
	}
}

// TestTenantContainerCannotReachTheHostNetwork: the container's network
// namespace is new and empty: only lo, no route out, no view of the
// host's sockets. A listener the test opens on the host (all IPv4
// addresses) is unreachable through 127.0.0.1 (the container's own
// loopback: refused) and through the host's address (no route), and is
// absent from the container's /proc/net/tcp.
func TestTenantContainerCannotReachTheHostNetwork(t *testing.T) {
	e := newEnv(t)
	ln, err := net.Listen("tcp4", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	var accepted atomic.Int32
	acceptDone := make(chan struct{})
	go func() {
		defer close(acceptDone)
		for {
			c, err := ln.Accept()
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if err == nil {
				accepted.Add(1)
				c.Close()
			}
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-acceptDone
	})
	port := ln.Addr().(*net.TCPAddr).Port
	hostIP := hostIPv4()
	if hostIP == "" {
		t.Log("host has no non-loopback IPv4 address: checking loopback only")
	}

	r := e.runTenant(`
echo "interfaces=$(ls /sys/class/net | tr '\n' ' ')"
echo "netdev=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\n' ' ')"
check loopback nc -w 2 127.0.0.1 $HOST_PORT
if [ -n "$HOST_IP" ]; then check host-address nc -w 2 $HOST_IP $HOST_PORT; fi
tail -n +2 /proc/net/tcp | while read sl local rest; do echo "socket=$local"; done
`, []string{"HOST_PORT=" + strconv.Itoa(port), "HOST_IP=" + hostIP}, tenantHooks{})

	want := map[string]string{
		"interfaces": "lo ",
		"netdev":     "lo ",
		"loopback":   "ECONNREFUSED",
	}
	if hostIP != "" {
		want["host-address"] = "ENETUNREACH"
	}
	r.expect(t, want)
	suffix := fmt.Sprintf(":%04X", port)
	for _, s := range r["socket"] {
		if strings.HasSuffix(s, suffix) {
			t.Errorf("the host's listener is visible in the container: %s", s)
		}
	}
	if n := accepted.Load(); n != 0 {
		t.Errorf("the host listener accepted %d connection(s) from the container", n)
	}
}

// TestTenantBridgeContainerCannotReachTheHostNamespace: on the bridge
// network a tenant has a route to the host (the gateway), but still no
// way into the host's network namespace: it sees only its own lo and
// eth0, not the host's interfaces or sockets, and a listener bound to the
// host's loopback is unreachable through 127.0.0.1 (the container's own
// loopback), through the gateway and through the host's other addresses
// (refused: nothing listens there). What a host service bound to every
// address exposes on the gateway is the eBPF egress fence's to deny (the
// host is on every lease's base deny list; see agent/lease).
func TestTenantBridgeContainerCannotReachTheHostNamespace(t *testing.T) {
	e := newNetEnv(t)
	port, host := reservePort(t)
	hostIP := hostIPv4()
	r := e.runTenant(`
echo "interfaces=$(ls /sys/class/net | tr '\n' ' ')"
check loopback nc -w 2 127.0.0.1 $HOST_PORT
check gateway nc -w 2 $GATEWAY $HOST_PORT
if [ -n "$HOST_IP" ]; then check host-address nc -w 2 $HOST_IP $HOST_PORT; fi
tail -n +2 /proc/net/tcp | while read sl local rest; do echo "socket=$local"; done
`, []string{"HOST_PORT=" + strconv.Itoa(port), "HOST_IP=" + hostIP, "GATEWAY=" + e.net.Gateway().String()},
		tenantHooks{network: NetworkBridge})
	want := map[string]string{
		"interfaces": "eth0 lo ",
		"loopback":   "ECONNREFUSED",
		"gateway":    "ECONNREFUSED",
	}
	if hostIP != "" {
		want["host-address"] = "ECONNREFUSED"
	}
	// Only its own two: the eth0 there is the veth's container end (the
	// host may have an eth0 of its own; it is not this one).
	r.expect(t, want)
	suffix := fmt.Sprintf(":%04X", port)
	for _, s := range r["socket"] {
		if strings.HasSuffix(s, suffix) {
			t.Errorf("the host's listener is visible in the container: %s", s)
		}
	}
	if peers := host.peers(); len(peers) != 0 {
		t.Errorf("the host's loopback listener accepted connections from %v", peers)
	}
}

// hostIPv4 returns a non-loopback IPv4 address of the host, or "".
func hostIPv4() string {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return ""
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && n.IP.To4() != nil && !n.IP.IsLoopback() {
			return n.IP.String()
		}
	}
	return ""
}

// TestTenantContainerCannotSeeOtherDevices: /dev holds exactly what runc
// 1.1.5 creates for every container plus the lease's partition nodes,
// nothing of another GPU or partition; the partition's node passes the
// device cgroup (ENXIO: allowed, no driver on a CI host; on a host with
// the driver the open may succeed), and a tenant cannot make a node for
// another GPU (no CAP_MKNOD).
func TestTenantContainerCannotSeeOtherDevices(t *testing.T) {
	e := newEnv(t)
	r := e.runTenant(`
find /dev | sort | while read f; do
	if [ -L "$f" ]; then echo "dev=$f -> $(readlink "$f")"
	elif [ -c "$f" ]; then echo "dev=$f c $((0x$(stat -c %t "$f"))):$((0x$(stat -c %T "$f")))"
	elif [ -b "$f" ]; then echo "dev=$f b $((0x$(stat -c %t "$f"))):$((0x$(stat -c %T "$f")))"
	elif [ -d "$f" ]; then echo "dev=$f/"
	else echo "dev=$f $(stat -c %F "$f")"
	fi
done
check open-partition head -c 1 /dev/nvidia0
check open-other-gpu head -c 1 /dev/nvidia1
check open-other-cap head -c 1 /dev/nvidia-caps/nvidia-cap23
check mknod-other-gpu mknod /tmp/nvidia1 c 195 1
check mknod-other-cap mknod /tmp/nvidia-cap23 c 511 23
`, nil, tenantHooks{})

	assertTenantDev(t, r["dev"])

	if p := r.one("open-partition"); p != "ENXIO" && p != "OK" {
		t.Errorf("open-partition = %q, want ENXIO (no driver) or OK: the device cgroup must allow the lease's node", p)
	}
	r.expect(t, map[string]string{
		"open-other-gpu":  "ENOENT",
		"open-other-cap":  "ENOENT",
		"mknod-other-gpu": "EPERM",
		"mknod-other-cap": "EPERM",
	})
}

// assertTenantDev checks a container's /dev listing (ls -la style lines
// "path c maj:min", "path -> target", "dir/") is exactly runc's standard
// nodes plus tenantPartition's.
func assertTenantDev(t *testing.T, listing []string) {
	t.Helper()
	want := []string{
		"/dev/",
		"/dev/fd -> /proc/self/fd",
		"/dev/full c 1:7",
		"/dev/mqueue/",
		"/dev/null c 1:3",
		"/dev/nvidia-caps/",
		"/dev/nvidia-caps/nvidia-cap21 c 511:21",
		"/dev/nvidia-caps/nvidia-cap22 c 511:22",
		"/dev/nvidia-uvm c 510:0",
		"/dev/nvidia0 c 195:0",
		"/dev/nvidiactl c 195:255",
		"/dev/ptmx -> pts/ptmx",
		"/dev/pts/",
		"/dev/pts/ptmx c 5:2",
		"/dev/random c 1:8",
		"/dev/shm/",
		"/dev/stderr -> /proc/self/fd/2",
		"/dev/stdin -> /proc/self/fd/0",
		"/dev/stdout -> /proc/self/fd/1",
		"/dev/tty c 5:0",
		"/dev/urandom c 1:9",
		"/dev/zero c 1:5",
	}
	// runc links /dev/core to /proc/kcore when the host kernel has one;
	// the target is masked (see
	// TestTenantContainerCannotReadKernelMemoryOrMaskedPaths).
	if _, err := os.Stat("/proc/kcore"); err == nil {
		want = append(want, "/dev/core -> /proc/kcore")
	}
	sort.Strings(want)
	got := slices.Clone(listing)
	sort.Strings(got)
	if !slices.Equal(got, want) {
		t.Errorf("/dev in the container:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

}
