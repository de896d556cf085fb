package identity

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// DefaultPollInterval is how often a FileSource checks its files.
const DefaultPollInterval = 5 * time.Second

// fullCheckEvery forces a content hash every so many polls even when mtime,
// size and inode look unchanged, in case a writer preserved all three.
const fullCheckEvery = 12

// FileSourceConfig configures NewFileSource.
type FileSourceConfig struct {
	// CertPath is the PEM SVID: the leaf first, then any intermediates.
	CertPath string
	// KeyPath is the PEM PKCS#8 private key of the leaf.
	KeyPath string
	// BundlePath is the PEM trust bundle (CA certificates) of TrustDomain.
	BundlePath string
	// TrustDomain is the only trust domain the SVID may belong to and the
	// only one the bundle is served for.
	TrustDomain spiffeid.TrustDomain
	// PollInterval is how often files are checked; DefaultPollInterval if
	// zero.
	PollInterval time.Duration
	// Logger receives rotation and rejection events; nothing if nil. File
	// contents are never logged.
	Logger *slog.Logger
}

// FileSource is a Source backed by PEM files that are reloaded when they
// change, as written by spiffe-helper, cert-manager or WriteDevPKI. It holds
// one validated set (SVID, key, bundle) at a time and replaces it only with
// another fully valid set: a half-written, mismatched, foreign or expired
// replacement is logged and ignored, and the old set is kept. TLS
// configurations built on it use a rotated SVID for new handshakes without
// a restart.
//
// It is safe for concurrent use. Close stops the watcher.
type FileSource struct {
	cfg FileSourceConfig
	log *slog.Logger

	cur atomic.Pointer[material]

	// reloadMu serializes reloads and guards the watch state below.
	reloadMu   sync.Mutex
	stats      [3]os.FileInfo
	loadedHash [sha256.Size]byte
	failing    bool
	lastErr    string
	polls      int
	// expiredLogged is set once the held SVID's expiry has been logged.
	expiredLogged bool

	cancel    context.CancelFunc
	done      chan struct{}
	closeOnce sync.Once
}

// NewFileSource loads the files named by cfg and starts watching them until
// ctx ends or Close is called. It fails, naming the file, when a file is
// missing or malformed, when the key does not match the certificate, when
// the SVID's ID is not in cfg.TrustDomain, when the SVID is expired or not
// yet valid, or when it does not chain to the bundle.
func NewFileSource(ctx context.Context, cfg FileSourceConfig) (*FileSource, error) {
	switch {
	case cfg.CertPath == "":
		return nil, errors.New("file source: certificate path is empty")
	case cfg.KeyPath == "":
		return nil, errors.New("file source: key path is empty")
	case cfg.BundlePath == "":
		return nil, errors.New("file source: bundle path is empty")
	case cfg.TrustDomain.IsZero():
		return nil, errors.New("file source: trust domain is empty")
	case cfg.PollInterval < 0:
		return nil, fmt.Errorf("file source: poll interval %s is negative", cfg.PollInterval)
	}
	if cfg.PollInterval == 0 {
		cfg.PollInterval = DefaultPollInterval
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &FileSource{cfg: cfg, log: log.With("component", "identity.filesource")}
	if err := s.Reload(); err != nil {
		return nil, err
	}
	if fi, err := os.Stat(cfg.KeyPath); err == nil && fi.Mode().Perm()&0o077 != 0 {
		s.log.Warn("svid key file is readable by group or others", "path", cfg.KeyPath, "mode", fi.Mode().Perm().String())
	}
	wctx, cancel := context.WithCancel(ctx)
	s.cancel = cancel
	s.done = make(chan struct{})
	go s.watch(wctx)
	return s, nil
}

// GetX509SVID returns the current SVID. It fails closed with an error
// wrapping ErrNoIdentity once that SVID has expired and no valid replacement
// has arrived, so no handshake presents an expired identity.
func (s *FileSource) GetX509SVID() (*x509svid.SVID, error) {
	m := s.cur.Load()
	if m == nil {
		return nil, fmt.Errorf("file source: %w: nothing loaded", ErrNoIdentity)
	}
	if leaf := m.svid.Certificates[0]; time.Now().After(leaf.NotAfter) {
		return nil, fmt.Errorf("file source: %w: svid %s expired at %s, waiting for rotation of %s", ErrNoIdentity, m.svid.ID, leaf.NotAfter.UTC().Format(time.RFC3339), s.cfg.CertPath)
	}
	return m.svid, nil
}

// GetX509BundleForTrustDomain returns the current bundle for the configured
// trust domain and an error for any other (federation is not supported).
func (s *FileSource) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	if td != s.cfg.TrustDomain {
		return nil, fmt.Errorf("file source: no bundle for trust domain %q (only %q)", td.Name(), s.cfg.TrustDomain.Name())
	}
	m := s.cur.Load()
	if m == nil {
		return nil, fmt.Errorf("file source: %w: nothing loaded", ErrNoIdentity)
	}
	return m.bundle, nil
}

// Reload reads and validates the files now, replacing the current set if the
// new one is valid and different. On error the current set is kept. The
// watcher calls it on change; a daemon may also call it on SIGHUP.
func (s *FileSource) Reload() error {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	return s.reloadLocked()
}

// Close stops the watcher and waits for it to exit. The last loaded SVID
// stays available. Close is idempotent.
func (s *FileSource) Close() error {
	s.closeOnce.Do(func() {
		if s.cancel != nil {
			s.cancel()
			<-s.done
		}
	})
	return nil
}

func (s *FileSource) watch(ctx context.Context) {
	defer close(s.done)
	t := time.NewTicker(s.cfg.PollInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			s.poll()
		}
	}
}

func (s *FileSource) poll() {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	s.polls++
	defer s.warnIfExpired()
	force := s.failing || s.polls%fullCheckEvery == 0
	if !force && s.statUnchanged() {
		return
	}
	if err := s.reloadLocked(); err != nil {
		// Log each distinct failure once, not every poll.
		if msg := err.Error(); msg != s.lastErr {
			s.lastErr = msg
			s.log.Warn("ignoring invalid svid files, keeping current svid", "error", msg, "cert_path", s.cfg.CertPath)
		}
		return
	}
	s.lastErr = ""
}

// warnIfExpired logs once per SVID that it has expired without a
// replacement; GetX509SVID already refuses to hand it out.
func (s *FileSource) warnIfExpired() {
	m := s.cur.Load()
	if m == nil || s.expiredLogged {
		return
	}
	if leaf := m.svid.Certificates[0]; time.Now().After(leaf.NotAfter) {
		s.expiredLogged = true
		s.log.Error("svid expired and no valid replacement; refusing handshakes until the files rotate",
			"spiffe_id", m.svid.ID.String(), "not_after", leaf.NotAfter.UTC(), "cert_path", s.cfg.CertPath)
	}
}

func (s *FileSource) paths() [3]string {
	return [3]string{s.cfg.CertPath, s.cfg.KeyPath, s.cfg.BundlePath}
}

// statUnchanged reports whether all three files have the inode, size and
// mtime seen at the last read.
func (s *FileSource) statUnchanged() bool {
	for i, p := range s.paths() {
		fi, err := os.Stat(p)
		prev := s.stats[i]
		if err != nil || prev == nil || !os.SameFile(fi, prev) || fi.Size() != prev.Size() || !fi.ModTime().Equal(prev.ModTime()) {
			return false
		}
	}
	return true
}

// reloadLocked reads all files, skips parsing if their combined content
// hash is what is loaded, and otherwise swaps in the new set if it is valid.
// A failed set is parsed again on the next poll, since validity can depend
// on time (a not-yet-valid certificate becomes valid).
func (s *FileSource) reloadLocked() error {
	var stats [3]os.FileInfo
	var data [3][]byte
	for i, p := range s.paths() {
		fi, err := os.Stat(p)
		if err != nil {
			s.failing = true
			return fmt.Errorf("file source: %w", err)
		}
		b, err := readFileLimited(p)
		if err != nil {
			s.failing = true
			return fmt.Errorf("file source: %w", err)
		}
		stats[i], data[i] = fi, b
	}
	h := sha256.New()
	for _, b := range data {
		_ = binary.Write(h, binary.BigEndian, uint64(len(b)))
		h.Write(b)
	}
	var sum [sha256.Size]byte
	h.Sum(sum[:0])
	s.stats = stats
	if cur := s.cur.Load(); cur != nil && sum == s.loadedHash {
		s.failing = false
		return nil
	}
	m, err := parseMaterial(s.cfg.TrustDomain, time.Now(), s.cfg.CertPath, data[0], s.cfg.KeyPath, data[1], s.cfg.BundlePath, data[2])
	if err != nil {
		s.failing = true
		return fmt.Errorf("file source: %w", err)
	}
	prev := s.cur.Swap(m)
	s.loadedHash, s.failing, s.expiredLogged = sum, false, false
	leaf := m.svid.Certificates[0]
	attrs := []any{"spiffe_id", m.svid.ID.String(), "serial", leaf.SerialNumber.Text(16), "not_after", leaf.NotAfter.UTC()}
	switch {
	case prev == nil:
		s.log.Info("svid loaded", attrs...)
	case prev.svid.ID != m.svid.ID:
		s.log.Warn("svid rotated to a different spiffe id", append(attrs, "previous_spiffe_id", prev.svid.ID.String())...)
	default:
		s.log.Info("svid rotated", attrs...)
	}
	return nil
}
