package status

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/agent/gpu/sim"
	"github.com/gpuaas/gpuaas/agent/isolation"
	"github.com/gpuaas/gpuaas/agent/lease"
	"github.com/gpuaas/gpuaas/agent/session"
	"github.com/gpuaas/gpuaas/pkg/mig"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	"github.com/gpuaas/gpuaas/test/harness"
)

// fakeFencer stands in for the eBPF enforcer: the fences of a host with
// one verified lease and one whose pins cannot be read.
type fakeFencer struct{}

func (fakeFencer) Leases() ([]string, error) { return []string{"l-1", "l-broken"}, nil }

func (fakeFencer) Describe(id string) (isolation.Description, error) {
	if id != "l-1" {
		return isolation.Description{}, fmt.Errorf("describe fence of %s: %w", id, isolation.ErrNotFenced)
	}
	d := isolation.Description{LeaseID: id, Cgroup: "/sys/fs/cgroup/gpuaas/l-1", Verified: true}
	for i, a := range []string{"device", "connect4", "connect6", "sendmsg4", "sendmsg6"} {
		d.Programs = append(d.Programs, isolation.ProgramDescription{Attach: a, ProgramID: uint32(10 + i), Tag: "abcd", Attached: true, TagVerified: true})
	}
	return d, nil
}

// sources are a host's parts as fakes and real stand-ins: the simulated
// GPU with one partition, a bbolt journal with one running lease, the
// fake fencer and a connected session.
func sources(t *testing.T) Sources {
	t.Helper()
	ctx := context.Background()
	gpus, err := sim.New(sim.Config{GPUs: []sim.GPUConfig{{Model: "H200", MIGEnabled: true}}, ImmediateModeChange: true})
	if err != nil {
		t.Fatal(err)
	}
	devs, err := gpus.Devices(ctx)
	if err != nil {
		t.Fatal(err)
	}
	gi, err := gpus.CreateGPUInstance(ctx, devs[0].UUID, mig.Profile3g, mig.Placement{Start: 4, Size: 4})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := gpus.CreateComputeInstance(ctx, devs[0].UUID, gi.ID); err != nil {
		t.Fatal(err)
	}
	j, err := lease.OpenJournal(filepath.Join(t.TempDir(), "journal.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { j.Close() })
	start := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	if err := j.Put(lease.Record{LeaseID: "l-1", Phase: leasev1.Phase_PHASE_RUNNING, GPUUUID: devs[0].UUID, GIID: gi.ID, HasGI: true, HasCI: true,
		MIGUUID: "MIG-x", ContainerID: "gpuaas-l-1", Fenced: true, StartTime: start}); err != nil {
		t.Fatal(err)
	}
	return Sources{Node: "node-a", Version: "v-test", GPU: gpus, Journal: j.Records,
		Session: func() session.Status {
			return session.Status{Address: "cp:7443", Connected: true, Since: start,
				Challenge: session.ChallengeStatus{Time: start, NoncePrefix: "deadbeef", OK: true},
				Telemetry: session.TelemetryStatus{Time: start, Sequence: 7}}
		},
		Fences: func() Fencer { return fakeFencer{} },
	}
}

// socketDir is a fresh directory for a socket, short enough for sun_path.
func socketDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "st")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// serve starts a server and stops it with the test.
func serve(t *testing.T, cfg Config, src Sources) *Server {
	t.Helper()
	s, err := Listen(cfg, src)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve() }()
	t.Cleanup(func() {
		s.Close()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return s
}

func fetch(t *testing.T, socket string) (*Snapshot, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return Fetch(ctx, socket)
}

func TestSnapshotShowsLinkLeasesPartitionsFences(t *testing.T) {
	sock := filepath.Join(socketDir(t), "agent.sock")
	serve(t, Config{Socket: sock}, sources(t))
	s, err := fetch(t, sock)
	if err != nil {
		t.Fatal(err)
	}
	if s.Node != "node-a" || s.Version != "v-test" || !s.ControlPlane.Connected || s.ControlPlane.Address != "cp:7443" {
		t.Fatalf("link = %+v", s.ControlPlane)
	}
	if s.Attestation.NoncePrefix != "deadbeef" || !s.Attestation.OK || s.Telemetry.Sequence != 7 {
		t.Fatalf("attestation %+v telemetry %+v", s.Attestation, s.Telemetry)
	}
	if len(s.Leases) != 1 || s.Leases[0].ID != "l-1" || s.Leases[0].Phase != "PHASE_RUNNING" || s.Leases[0].Container != "gpuaas-l-1" ||
		s.Leases[0].MIGDevice != "MIG-x" || !s.Leases[0].Fenced || s.Leases[0].StartTime.IsZero() {
		t.Fatalf("leases = %+v", s.Leases)
	}
	if len(s.Partitions) != 1 || s.Partitions[0].Placement != "4:4" || s.Partitions[0].Profile != int(mig.Profile3g) || !strings.HasPrefix(s.Partitions[0].UUID, "MIG-") {
		t.Fatalf("partitions = %+v", s.Partitions)
	}
	if len(s.Fences) != 2 || !s.Fences[0].Verified || len(s.Fences[0].Programs) != 5 || s.Fences[1].Verified || len(s.Fences[1].Problems) != 1 {
		t.Fatalf("fences = %+v", s.Fences)
	}
	if len(s.Errors) != 0 {
		t.Fatalf("errors = %q", s.Errors)
	}
	if ExitCode(s) != ExitOK {
		t.Fatalf("exit code %d for a connected agent", ExitCode(s))
	}
}

func TestMissingPartsAreNamedNotFatal(t *testing.T) {
	sock := filepath.Join(socketDir(t), "agent.sock")
	serve(t, Config{Socket: sock}, Sources{Node: "node-a", Session: func() session.Status { return session.Status{Address: "cp:1"} },
		Journal: func() (map[string]lease.Record, error) { return nil, errors.New("journal closed") },
		Fences:  func() Fencer { return nil }})
	s, err := fetch(t, sock)
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Join(s.Errors, "\n")
	for _, w := range []string{"leases: journal closed", "partitions: no GPU backend", "fences: eBPF isolation is off"} {
		if !strings.Contains(got, w) {
			t.Errorf("errors %q lack %q", got, w)
		}
	}
	if ExitCode(s) != ExitDisconnected {
		t.Fatalf("exit code %d for a disconnected agent", ExitCode(s))
	}
}

func TestSocketModeAndDirectory(t *testing.T) {
	dir := filepath.Join(socketDir(t), "run", "gpuaas")
	sock := filepath.Join(dir, "agent.sock")
	serve(t, Config{Socket: sock}, Sources{})
	for path, want := range map[string]os.FileMode{dir: os.ModeDir | 0o700, sock: os.ModeSocket | 0o600} {
		fi, err := os.Lstat(path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode() != want {
			t.Errorf("%s mode %v, want %v", path, fi.Mode(), want)
		}
		if st := fi.Sys().(*syscall.Stat_t); int(st.Uid) != os.Geteuid() {
			t.Errorf("%s owned by uid %d, want %d", path, st.Uid, os.Geteuid())
		}
	}
	// No temporary name is left behind.
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Fatalf("directory holds %v, want only the socket", ents)
	}

	// With allowed groups the socket is the first group's, 0660.
	sock2 := filepath.Join(socketDir(t), "agent.sock")
	gid := uint32(os.Getegid())
	serve(t, Config{Socket: sock2, AllowGIDs: []uint32{gid}}, Sources{})
	fi, err := os.Lstat(sock2)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode() != os.ModeSocket|0o660 || fi.Sys().(*syscall.Stat_t).Gid != gid {
		t.Fatalf("socket with allowed gids: mode %v gid %d", fi.Mode(), fi.Sys().(*syscall.Stat_t).Gid)
	}
}

func TestCloseRemovesTheSocket(t *testing.T) {
	sock := filepath.Join(socketDir(t), "agent.sock")
	s, err := Listen(Config{Socket: sock}, Sources{})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve() }()
	s.Close()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket after Close: %v", err)
	}
}

func TestStaleSocketIsReplaced(t *testing.T) {
	sock := filepath.Join(socketDir(t), "agent.sock")
	// An agent that died left its socket: nobody listens on it.
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	if fi, err := os.Lstat(sock); err != nil || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("stale socket not in place: %v", err)
	}
	serve(t, Config{Socket: sock}, sources(t))
	if _, err := fetch(t, sock); err != nil {
		t.Fatalf("fetch after replacing the stale socket: %v", err)
	}
}

func TestLiveSocketIsNotTaken(t *testing.T) {
	sock := filepath.Join(socketDir(t), "agent.sock")
	serve(t, Config{Socket: sock}, sources(t))
	if _, err := Listen(Config{Socket: sock}, Sources{}); !errors.Is(err, ErrSocketInUse) {
		t.Fatalf("second Listen = %v, want ErrSocketInUse", err)
	}
	if _, err := fetch(t, sock); err != nil {
		t.Fatalf("the first server stopped answering: %v", err)
	}
}

func TestRefusesWhatIsNotItsSocket(t *testing.T) {
	t.Run("symlink", func(t *testing.T) {
		dir := socketDir(t)
		target := filepath.Join(dir, "target")
		if err := os.WriteFile(target, []byte("keep"), 0o600); err != nil {
			t.Fatal(err)
		}
		sock := filepath.Join(dir, "agent.sock")
		if err := os.Symlink(target, sock); err != nil {
			t.Fatal(err)
		}
		_, err := Listen(Config{Socket: sock}, Sources{})
		if err == nil || !strings.Contains(err.Error(), "symlink") {
			t.Fatalf("Listen on a symlink = %v", err)
		}
		if fi, err := os.Lstat(sock); err != nil || fi.Mode()&os.ModeSymlink == 0 {
			t.Fatal("the symlink was removed")
		}
		if b, _ := os.ReadFile(target); string(b) != "keep" {
			t.Fatal("the symlink's target changed")
		}
	})
	t.Run("symlinked directory", func(t *testing.T) {
		real := socketDir(t)
		link := filepath.Join(socketDir(t), "run")
		if err := os.Symlink(real, link); err != nil {
			t.Fatal(err)
		}
		if _, err := Listen(Config{Socket: filepath.Join(link, "agent.sock")}, Sources{}); err == nil || !strings.Contains(err.Error(), "symlink") {
			t.Fatalf("Listen in a symlinked directory = %v", err)
		}
	})
	t.Run("regular file", func(t *testing.T) {
		sock := filepath.Join(socketDir(t), "agent.sock")
		if err := os.WriteFile(sock, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := Listen(Config{Socket: sock}, Sources{}); err == nil || !strings.Contains(err.Error(), "not a socket") {
			t.Fatalf("Listen over a file = %v", err)
		}
	})
	t.Run("directory writable by others", func(t *testing.T) {
		dir := socketDir(t)
		if err := os.Chmod(dir, 0o777); err != nil {
			t.Fatal(err)
		}
		if _, err := Listen(Config{Socket: filepath.Join(dir, "agent.sock")}, Sources{}); err == nil || !strings.Contains(err.Error(), "writable") {
			t.Fatalf("Listen in a 0777 directory = %v", err)
		}
	})
	t.Run("relative path", func(t *testing.T) {
		if _, err := Listen(Config{Socket: "run/agent.sock"}, Sources{}); err == nil {
			t.Fatal("relative socket path accepted")
		}
	})
}

// TestRefusesPeersThatAreNotRoot injects the peer's credentials: a uid
// other than root is refused unless the configuration names it or its
// group.
func TestRefusesPeersThatAreNotRoot(t *testing.T) {
	if os.Geteuid() == 1000 {
		t.Skip("the test's peer uid 1000 is this process's own user")
	}
	cases := []struct {
		name  string
		cfg   Config
		peer  Cred
		allow bool
	}{
		{"root", Config{}, Cred{UID: 0, GID: 0}, true},
		{"other user", Config{}, Cred{UID: 1000, GID: 1000}, false},
		{"other user in root's group", Config{}, Cred{UID: 1000, GID: 0}, false},
		{"allowed uid", Config{AllowUIDs: []uint32{1000}}, Cred{UID: 1000, GID: 1000}, true},
		{"allowed gid", Config{AllowGIDs: []uint32{1000}}, Cred{UID: 1001, GID: 1000}, true},
		{"other allowed uid", Config{AllowUIDs: []uint32{1001}}, Cred{UID: 1000, GID: 1000}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tc.cfg.Socket = filepath.Join(socketDir(t), "agent.sock")
			tc.cfg.AllowGIDs = append(tc.cfg.AllowGIDs[:0:0], tc.cfg.AllowGIDs...)
			if len(tc.cfg.AllowGIDs) > 0 {
				// The socket's group must exist for chown; the check
				// under test is the credential one.
				tc.cfg.AllowGIDs = append([]uint32{uint32(os.Getegid())}, tc.cfg.AllowGIDs...)
			}
			s, err := Listen(tc.cfg, sources(t))
			if err != nil {
				t.Fatal(err)
			}
			s.peerCred = func(net.Conn) (Cred, error) { return tc.peer, nil }
			done := make(chan error, 1)
			go func() { done <- s.Serve() }()
			defer func() { s.Close(); <-done }()
			_, err = fetch(t, tc.cfg.Socket)
			if tc.allow && err != nil {
				t.Fatalf("refused: %v", err)
			}
			if !tc.allow && (err == nil || !strings.Contains(err.Error(), "403") || !strings.Contains(err.Error(), fmt.Sprintf("uid %d", tc.peer.UID))) {
				t.Fatalf("fetch = %v, want a 403 naming uid %d", err, tc.peer.UID)
			}
		})
	}
	t.Run("unreadable credentials", func(t *testing.T) {
		sock := filepath.Join(socketDir(t), "agent.sock")
		s, err := Listen(Config{Socket: sock}, Sources{})
		if err != nil {
			t.Fatal(err)
		}
		s.peerCred = func(net.Conn) (Cred, error) { return Cred{}, errors.New("no SO_PEERCRED") }
		done := make(chan error, 1)
		go func() { done <- s.Serve() }()
		defer func() { s.Close(); <-done }()
		if _, err := fetch(t, sock); err == nil || !strings.Contains(err.Error(), "403") {
			t.Fatalf("fetch = %v, want 403", err)
		}
	})
}

// childEnv makes the test binary a status client (see TestMain).
const childEnv = "GPUAAS_STATUS_TEST_CHILD_SOCKET"

func TestMain(m *testing.M) {
	if sock := os.Getenv(childEnv); sock != "" {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		s, err := Fetch(ctx, sock)
		if err != nil {
			fmt.Println("error:", err)
			os.Exit(3)
		}
		fmt.Println("ok:", s.Node)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestKernelCredentialsOfANonRootPeer runs a client as uid/gid 65534
// (nobody): the socket's mode keeps it out; with the mode opened up (a
// misconfiguration) SO_PEERCRED still does; a configured uid lets it in.
func TestKernelCredentialsOfANonRootPeer(t *testing.T) {
	harness.Require(t, harness.CheckRoot())
	const nobody = 65534
	// The child must be able to run the test binary and reach the socket.
	dir, err := os.MkdirTemp("", "st")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(dir, "status.test")
	copyFile(t, os.Args[0], exe)
	child := func(sock string) (string, error) {
		cmd := exec.Command(exe)
		cmd.Env = []string{childEnv + "=" + sock}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
		out, err := cmd.CombinedOutput()
		return string(out), err
	}

	sock := filepath.Join(dir, "agent.sock")
	s := serve(t, Config{Socket: sock}, sources(t))
	if out, err := child(sock); err == nil || !strings.Contains(out, "permission denied") {
		t.Fatalf("nobody through a 0600 socket: %v %s", err, out)
	}
	if err := os.Chmod(sock, 0o666); err != nil {
		t.Fatal(err)
	}
	if out, err := child(sock); err == nil || !strings.Contains(out, "403") || !strings.Contains(out, "uid 65534") {
		t.Fatalf("nobody through a 0666 socket: %v %s", err, out)
	}
	s.Close()

	sock2 := filepath.Join(dir, "allowed.sock")
	serve(t, Config{Socket: sock2, AllowUIDs: []uint32{nobody}}, sources(t))
	if err := os.Chmod(sock2, 0o666); err != nil {
		t.Fatal(err)
	}
	if out, err := child(sock2); err != nil || !strings.Contains(out, "ok: node-a") {
		t.Fatalf("nobody allowed by uid: %v %s", err, out)
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	in, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}
