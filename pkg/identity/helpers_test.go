package identity_test

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/gpuaas/gpuaas/pkg/identity"
)

// devPKI writes a dev PKI with agents n1 and n2 and operator alice.
func devPKI(t *testing.T) *identity.DevPKI {
	t.Helper()
	pki, err := identity.WriteDevPKI(t.TempDir(), identity.DevPKIOptions{
		TrustDomain: td.Name(),
		Agents:      []string{"n1", "n2"},
		Operators:   []string{"alice"},
	})
	if err != nil {
		t.Fatalf("WriteDevPKI: %v", err)
	}
	return pki
}

// static loads one identity's files into a StaticSource with bundle b.
func static(t *testing.T, f identity.SVIDFiles, b *x509bundle.Bundle) identity.StaticSource {
	t.Helper()
	svid, err := x509svid.Load(f.CertPath, f.KeyPath)
	if err != nil {
		t.Fatalf("load %s: %v", f.CertPath, err)
	}
	return identity.StaticSource{SVID: svid, Bundle: b}
}

type handshakeResult struct {
	serverErr, clientErr error
	// serverSaw is the client leaf the server received; clientSaw the
	// server leaf the client received.
	serverSaw, clientSaw *x509.Certificate
}

func (r handshakeResult) ok() bool { return r.serverErr == nil && r.clientErr == nil }

// handshake runs one real TLS handshake over loopback TCP. The server
// writes "ok" after a successful handshake; the client reads it, so a client
// certificate the server rejects after the client's side of a TLS 1.3
// handshake finished still shows up as a client error.
func handshake(t *testing.T, server, client *tls.Config) handshakeResult {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	defer ln.Close()

	var res handshakeResult
	done := make(chan struct{})
	go func() {
		defer close(done)
		c, err := ln.Accept()
		if err != nil {
			res.serverErr = err
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		tc := tls.Server(c, server)
		if err := tc.Handshake(); err != nil {
			res.serverErr = err
			return
		}
		if pc := tc.ConnectionState().PeerCertificates; len(pc) > 0 {
			res.serverSaw = pc[0]
		}
		if _, err := tc.Write([]byte("ok")); err != nil {
			res.serverErr = err
		}
	}()

	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	tc := tls.Client(c, client)
	res.clientErr = tc.Handshake()
	if res.clientErr == nil {
		if pc := tc.ConnectionState().PeerCertificates; len(pc) > 0 {
			res.clientSaw = pc[0]
		}
		buf := make([]byte, 2)
		if _, err := io.ReadFull(tc, buf); err != nil {
			res.clientErr = err
		}
	}
	_ = tc.Close()
	<-done
	return res
}

// syncBuffer is a goroutine-safe log sink.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// eventually polls cond until it holds or 10s pass.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
