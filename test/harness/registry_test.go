package harness

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/gpuaas/gpuaas/test/ociimage"
)

// get fetches a registry URL without keep-alive (no idle connection may
// outlive the test) and returns the response with its body read.
func get(t *testing.T, url string, accept string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if accept != "" {
		req.Header.Set("Accept", accept)
	}
	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return resp, body
}

func TestStartRegistryServesV2OnLoopbackAndCloseRemovesEverything(t *testing.T) {
	Require(t, CheckRegistry())
	parent := t.TempDir()
	begin := time.Now()
	r, err := StartRegistry(context.Background(), parent)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("registry answered after %v", time.Since(begin))
	host, _, err := net.SplitHostPort(r.Host())
	if err != nil || host != "127.0.0.1" {
		t.Errorf("host %q: want 127.0.0.1:PORT (%v)", r.Host(), err)
	}
	if filepath.Dir(r.Dir()) != parent {
		t.Errorf("dir %s is not below %s", r.Dir(), parent)
	}
	resp, _ := get(t, "http://"+r.Host()+"/v2/", "")
	if resp.StatusCode != http.StatusOK {
		t.Errorf("GET /v2/ = %s", resp.Status)
	}
	if reqs, err := r.Requests(); err != nil || !slices.Contains(reqs, "GET /v2/") {
		t.Errorf("requests %q, %v: want GET /v2/ logged", reqs, err)
	}

	if err := r.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	if err := r.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
	if _, err := os.Stat(r.Dir()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("registry dir left: %v", err)
	}
	if conn, err := net.DialTimeout("tcp", r.Host(), time.Second); err == nil {
		conn.Close()
		t.Errorf("%s still accepts connections after close", r.Host())
	}
}

func TestRegistryPushStoresTheArchiveManifestUnchanged(t *testing.T) {
	r := StartRegistryT(t)
	archive, img := BusyboxArchiveT(t, ociimage.Options{Name: "localhost/gpuaas/busybox:push"})

	begin := time.Now()
	dgst, err := r.Push(context.Background(), archive, "gpuaas/busybox:v1")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("push took %v", time.Since(begin))
	if dgst != img.Manifest.Digest.String() {
		t.Errorf("pushed digest %s, archive manifest %s", dgst, img.Manifest.Digest)
	}

	resp, body := get(t, "http://"+r.Host()+"/v2/gpuaas/busybox/manifests/v1", ocispec.MediaTypeImageManifest)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET manifest = %s: %s", resp.Status, body)
	}
	sum := sha256.Sum256(body)
	if got := "sha256:" + hex.EncodeToString(sum[:]); got != dgst {
		t.Errorf("served manifest hashes to %s, want %s", got, dgst)
	}
	if h := resp.Header.Get("Docker-Content-Digest"); h != dgst {
		t.Errorf("Docker-Content-Digest %q, want %s", h, dgst)
	}
	reqs, err := r.Requests()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"PUT /v2/gpuaas/busybox/manifests/v1", "GET /v2/gpuaas/busybox/manifests/v1"} {
		if !slices.Contains(reqs, want) {
			t.Errorf("requests lack %q: %q", want, reqs)
		}
	}
}

func TestRegistryPushRefusesAReferenceWithoutTag(t *testing.T) {
	r := StartRegistryT(t)
	for _, ref := range []string{"gpuaas/busybox", "gpuaas/busybox@sha256:" + strings.Repeat("0", 64)} {
		if _, err := r.Push(context.Background(), "/nonexistent.tar", ref); err == nil || !strings.Contains(err.Error(), "repository:tag") {
			t.Errorf("push %q: %v, want a repository:tag error", ref, err)
		}
	}
}
