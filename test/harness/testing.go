package harness

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"

	"github.com/gpuaas/gpuaas/test/ociimage"
)

// StartContainerdT is StartContainerd for tests: it requires root and the
// containerd components (RequireRoot), fails the test if containerd does
// not start, and registers Close as a cleanup that fails the test if
// anything was left behind.
func StartContainerdT(t testing.TB, opts Options) *Containerd {
	t.Helper()
	RequireRoot(t, ContainerdComponents...)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := StartContainerd(ctx, opts)
	if err != nil {
		t.Fatalf("start containerd: %v", err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("close containerd: %v", err)
		}
	})
	return c
}

// BusyboxArchiveT writes a busybox OCI image archive (see package ociimage)
// into a test temporary directory and returns its path and description.
// Without a static busybox the test fails in CI and is skipped elsewhere.
func BusyboxArchiveT(t testing.TB, opts ociimage.Options) (string, ociimage.Image) {
	t.Helper()
	if opts.BusyboxPath == "" {
		p, err := ociimage.FindBusybox()
		Require(t, err)
		opts.BusyboxPath = p
	}
	out := filepath.Join(t.TempDir(), "image.tar")
	img, err := ociimage.WriteArchiveFile(out, opts)
	if err != nil {
		t.Fatalf("build busybox image: %v", err)
	}
	return out, img
}

// ImportBusyboxT builds a busybox OCI archive named name, imports it into
// cl (ctx carries the namespace) and unpacks it with the first snapshotter
// that works (overlayfs, else native). It returns the image and the
// snapshotter.
func ImportBusyboxT(t testing.TB, ctx context.Context, cl *client.Client, name string) (client.Image, string) {
	t.Helper()
	archive, _ := BusyboxArchiveT(t, ociimage.Options{Name: name})
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	imgs, err := cl.Import(ctx, f)
	f.Close()
	if err != nil || len(imgs) != 1 {
		t.Fatalf("import %s: %v %v", name, imgs, err)
	}
	img := client.NewImage(cl, imgs[0])
	for _, s := range []string{"overlayfs", "native"} {
		if err := img.Unpack(ctx, s); err == nil {
			return img, s
		}
	}
	t.Fatal("no snapshotter could unpack the image")
	return nil, ""
}

// UniqueID returns prefix followed by a suffix unique to this test run, for
// container ids: runc keeps its state per namespace and id in a directory
// shared by every containerd on the host, so parallel test packages must not
// reuse ids.
func UniqueID(prefix string) string {
	return prefix + "-" + randomSuffix()
}

func randomSuffix() string {
	var b [5]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// RepoRoot is the root of the gpuaas repository containing the working
// directory (the directory whose go.mod declares the module).
func RepoRoot() (string, error) {
	wd, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for d := wd; ; d = filepath.Dir(d) {
		if b, err := os.ReadFile(filepath.Join(d, "go.mod")); err == nil && strings.HasPrefix(string(b), "module github.com/gpuaas/gpuaas\n") {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", errors.New("not inside the gpuaas repository (no go.mod of github.com/gpuaas/gpuaas above the working directory)")
		}
	}
}
