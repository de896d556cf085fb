package status

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultSocket is where the agent serves its status unless configured
// otherwise (status_socket).
const DefaultSocket = "/run/gpuaas/agent.sock"

// maxSocketPath leaves room in sun_path (108 bytes with its NUL) for the
// temporary name the socket is bound at before it is renamed into place.
const maxSocketPath = 90

// Config configures the status server.
type Config struct {
	// Socket is the unix socket's absolute path.
	Socket string
	// AllowUIDs and AllowGIDs admit peers besides root (and the agent's
	// own user). With AllowGIDs the socket's group is the first of them
	// and its mode 0660; otherwise it is 0600.
	AllowUIDs, AllowGIDs []uint32
	Logger               *slog.Logger
}

// Cred is a peer's kernel-reported credentials (SO_PEERCRED).
type Cred struct {
	PID      int32
	UID, GID uint32
}

// Server serves snapshots on the unix socket.
type Server struct {
	cfg Config
	src Sources
	lis *net.UnixListener
	srv *http.Server
	// ino identifies the socket file this server made, so Close removes
	// it only if it is still that one.
	ino  os.FileInfo
	done chan struct{}
	once sync.Once

	// peerCred reads a connection's credentials (SO_PEERCRED); tests
	// replace it.
	peerCred func(net.Conn) (Cred, error)
}

// ErrSocketInUse: another process serves on the socket path.
var ErrSocketInUse = errors.New("status socket in use")

// Validate checks a configuration's values (the socket's path and the
// allowed ids) without touching the filesystem.
func (c Config) Validate() error {
	if !filepath.IsAbs(c.Socket) {
		return errors.New("must be an absolute path (or \"none\")")
	}
	if len(c.Socket) > maxSocketPath {
		return fmt.Errorf("longer than %d bytes (a unix socket's limit)", maxSocketPath)
	}
	return nil
}

// Listen prepares the socket: it makes the directory (0700) if missing and
// refuses one that is not a directory owned by this user and writable by
// no one else; it removes a stale socket left by an agent that died, and
// refuses to touch a symlink or anything that is not a socket; then it
// binds a new socket with its final owner and mode before it appears under
// its name. Serve starts answering.
func Listen(cfg Config, src Sources) (*Server, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("status socket %q: %w", cfg.Socket, err)
	}
	if err := secureDir(filepath.Dir(cfg.Socket)); err != nil {
		return nil, err
	}
	if err := removeStale(cfg.Socket); err != nil {
		return nil, err
	}
	// Bind under a temporary name, set the mode and owner, then rename:
	// the socket never exists under its name with the wrong permissions.
	tmp := cfg.Socket + ".tmp" + strconv.Itoa(os.Getpid())
	_ = os.Remove(tmp)
	lis, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("status socket: %w", err)
	}
	lis.SetUnlinkOnClose(false)
	fail := func(err error) (*Server, error) {
		lis.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("status socket %s: %w", cfg.Socket, err)
	}
	mode := os.FileMode(0o600)
	if len(cfg.AllowGIDs) > 0 {
		if err := os.Lchown(tmp, -1, int(cfg.AllowGIDs[0])); err != nil {
			return fail(err)
		}
		mode = 0o660
	}
	if err := os.Chmod(tmp, mode); err != nil {
		return fail(err)
	}
	if err := os.Rename(tmp, cfg.Socket); err != nil {
		return fail(err)
	}
	fi, err := os.Lstat(cfg.Socket)
	if err != nil {
		return fail(err)
	}
	s := &Server{cfg: cfg, src: src, lis: lis, ino: fi, done: make(chan struct{}), peerCred: peerCred}
	mux := http.NewServeMux()
	mux.HandleFunc(Path, s.handleStatus)
	s.srv = &http.Server{Handler: s.authorize(mux), ReadHeaderTimeout: 5 * time.Second, WriteTimeout: 30 * time.Second,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			cred, err := s.peerCred(c)
			return context.WithValue(ctx, credKey{}, credResult{cred, err})
		}}
	return s, nil
}

// Serve answers until Close; it returns nil after Close.
func (s *Server) Serve() error {
	defer close(s.done)
	if err := s.srv.Serve(s.lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// Close stops serving and removes the socket (if it is still the one this
// server made).
func (s *Server) Close() error {
	var err error
	s.once.Do(func() {
		err = s.srv.Close()
		if fi, lerr := os.Lstat(s.cfg.Socket); lerr == nil && os.SameFile(fi, s.ino) {
			os.Remove(s.cfg.Socket)
		}
	})
	return err
}

// Addr is the socket's path.
func (s *Server) Addr() string { return s.cfg.Socket }

type credKey struct{}

type credResult struct {
	cred Cred
	err  error
}

// allowed reports whether a peer may read the status.
func (s *Server) allowed(c Cred) bool {
	return c.UID == 0 || int(c.UID) == os.Geteuid() || slices.Contains(s.cfg.AllowUIDs, c.UID) || slices.Contains(s.cfg.AllowGIDs, c.GID)
}

// authorize refuses every request from a peer that is not root, the
// agent's own user, or allowed by the configuration.
func (s *Server) authorize(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cr, _ := r.Context().Value(credKey{}).(credResult)
		if cr.err != nil {
			s.cfg.Logger.Warn("status request refused: peer credentials unreadable", "err", cr.err)
			http.Error(w, "peer credentials unreadable", http.StatusForbidden)
			return
		}
		if !s.allowed(cr.cred) {
			s.cfg.Logger.Warn("status request refused", "peer_uid", cr.cred.UID, "peer_gid", cr.cred.GID, "peer_pid", cr.cred.PID)
			http.Error(w, fmt.Sprintf("uid %d (gid %d) may not read the agent's status: root only, unless status_allow_uids or status_allow_gids names it", cr.cred.UID, cr.cred.GID), http.StatusForbidden)
			return
		}
		next.ServeHTTP(w, r)
	})
}

func (s *Server) handleStatus(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		w.Header().Set("Allow", http.MethodGet)
		http.Error(w, "GET only", http.StatusMethodNotAllowed)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
	defer cancel()
	snap := Collect(ctx, s.src)
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(snap)
}

// peerCred reads SO_PEERCRED of a unix connection.
func peerCred(c net.Conn) (Cred, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return Cred{}, fmt.Errorf("not a unix connection: %T", c)
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return Cred{}, err
	}
	var ucred *unix.Ucred
	var serr error
	if err := raw.Control(func(fd uintptr) {
		ucred, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return Cred{}, err
	}
	if serr != nil {
		return Cred{}, fmt.Errorf("SO_PEERCRED: %w", serr)
	}
	return Cred{PID: ucred.Pid, UID: ucred.Uid, GID: ucred.Gid}, nil
}

// secureDir makes dir (0700) if it does not exist and refuses one that
// someone other than this user could change: a symlink, not a directory,
// owned by another user, or writable by its group or others.
func secureDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("status socket directory: %w", err)
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return fmt.Errorf("status socket directory: %w", err)
	}
	switch st, _ := fi.Sys().(*syscall.Stat_t); {
	case fi.Mode()&fs.ModeSymlink != 0:
		return fmt.Errorf("status socket directory %s is a symlink; refusing it", dir)
	case !fi.IsDir():
		return fmt.Errorf("status socket directory %s is not a directory", dir)
	case st == nil || int(st.Uid) != os.Geteuid():
		return fmt.Errorf("status socket directory %s is not owned by uid %d", dir, os.Geteuid())
	case fi.Mode().Perm()&0o022 != 0:
		return fmt.Errorf("status socket directory %s is writable by its group or others (mode %04o); make it 0700", dir, fi.Mode().Perm())
	}
	return nil
}

// removeStale removes a socket nobody listens on any more (an agent that
// died). A live socket is ErrSocketInUse; a symlink or anything that is not
// a socket is left alone and refused.
func removeStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("status socket: %w", err)
	}
	switch {
	case fi.Mode()&fs.ModeSymlink != 0:
		return fmt.Errorf("status socket %s is a symlink; refusing to follow or remove it", path)
	case fi.Mode()&fs.ModeSocket == 0:
		return fmt.Errorf("status socket %s exists and is not a socket (%s); remove it by hand", path, fi.Mode().Type())
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("%w: %s (is another agent running?)", ErrSocketInUse, path)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("remove stale status socket: %w", err)
	}
	return nil
}
