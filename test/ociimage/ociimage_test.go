package ociimage

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

func busyboxOrSkip(t *testing.T) string {
	t.Helper()
	p, err := FindBusybox()
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("CI needs a static busybox: %v", err)
		}
		t.Skipf("no static busybox on this host: %v", err)
	}
	return p
}

// readTar returns the regular files and symlinks of a tar stream by name.
func readTar(t *testing.T, r io.Reader) (files map[string][]byte, links map[string]string) {
	t.Helper()
	files, links = map[string][]byte{}, map[string]string{}
	tr := tar.NewReader(r)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return files, links
		}
		if err != nil {
			t.Fatalf("read tar: %v", err)
		}
		if !hdr.ModTime.Equal(epoch) {
			t.Errorf("%s: mtime %v, want the fixed epoch", hdr.Name, hdr.ModTime)
		}
		switch hdr.Typeflag {
		case tar.TypeReg:
			b, err := io.ReadAll(tr)
			if err != nil {
				t.Fatalf("read %s: %v", hdr.Name, err)
			}
			files[hdr.Name] = b
		case tar.TypeSymlink:
			links[hdr.Name] = hdr.Linkname
		}
	}
}

func TestWriteArchiveIsAValidOCILayout(t *testing.T) {
	bb := busyboxOrSkip(t)
	var buf bytes.Buffer
	img, err := WriteArchive(&buf, Options{Name: "localhost/gpuaas/busybox:v1", BusyboxPath: bb, Cmd: []string{"sh", "-c", "true"}})
	if err != nil {
		t.Fatal(err)
	}
	files, _ := readTar(t, &buf)

	blob := func(d digest.Digest) []byte {
		t.Helper()
		b, ok := files[filepath.Join("blobs", d.Algorithm().String(), d.Encoded())]
		if !ok {
			t.Fatalf("blob %s missing", d)
		}
		if got := digest.FromBytes(b); got != d {
			t.Fatalf("blob %s has digest %s", d, got)
		}
		return b
	}

	if got := string(files["oci-layout"]); !strings.Contains(got, `"imageLayoutVersion":"1.0.0"`) {
		t.Errorf("oci-layout = %s", got)
	}
	var index ocispec.Index
	if err := json.Unmarshal(files["index.json"], &index); err != nil {
		t.Fatalf("index.json: %v", err)
	}
	if len(index.Manifests) != 1 {
		t.Fatalf("index has %d manifests, want 1", len(index.Manifests))
	}
	m := index.Manifests[0]
	if m.Digest != img.Manifest.Digest {
		t.Errorf("index points at %s, want %s", m.Digest, img.Manifest.Digest)
	}
	if got := m.Annotations[annotationImageName]; got != "localhost/gpuaas/busybox:v1" {
		t.Errorf("image name annotation = %q", got)
	}
	if got := m.Annotations[ocispec.AnnotationRefName]; got != "v1" {
		t.Errorf("ref name annotation = %q, want the tag", got)
	}

	var manifest ocispec.Manifest
	if err := json.Unmarshal(blob(m.Digest), &manifest); err != nil {
		t.Fatalf("manifest: %v", err)
	}
	if manifest.Config.Digest != img.Config.Digest || len(manifest.Layers) != 1 || manifest.Layers[0].Digest != img.Layer.Digest {
		t.Fatalf("manifest does not reference the config and layer: %+v", manifest)
	}
	var config ocispec.Image
	if err := json.Unmarshal(blob(manifest.Config.Digest), &config); err != nil {
		t.Fatalf("config: %v", err)
	}
	if config.Config.User != DefaultUser {
		t.Errorf("config user = %q, want %q", config.Config.User, DefaultUser)
	}
	if strings.Join(config.Config.Cmd, " ") != "sh -c true" {
		t.Errorf("config cmd = %q", config.Config.Cmd)
	}
	if config.OS != "linux" || len(config.RootFS.DiffIDs) != 1 || config.RootFS.DiffIDs[0] != img.DiffID {
		t.Errorf("config platform/rootfs wrong: %+v", config)
	}

	zr, err := gzip.NewReader(bytes.NewReader(blob(manifest.Layers[0].Digest)))
	if err != nil {
		t.Fatalf("layer gzip: %v", err)
	}
	raw, err := io.ReadAll(zr)
	if err != nil {
		t.Fatalf("layer gzip: %v", err)
	}
	if got := digest.FromBytes(raw); got != img.DiffID {
		t.Errorf("layer diff id %s, config says %s", got, img.DiffID)
	}
	layerFiles, links := readTar(t, bytes.NewReader(raw))
	want, err := os.ReadFile(bb)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(layerFiles["bin/busybox"], want) {
		t.Error("bin/busybox is not the host's busybox")
	}
	for _, a := range []string{"sh", "echo", "sleep", "cat", "env", "id", "ls", "true", "false"} {
		if links["bin/"+a] != "busybox" {
			t.Errorf("bin/%s -> %q, want busybox", a, links["bin/"+a])
		}
	}
	if !strings.Contains(string(layerFiles["etc/passwd"]), "nobody:x:65534:65534") {
		t.Error("etc/passwd lacks nobody")
	}
}

func TestWriteArchiveIsDeterministic(t *testing.T) {
	bb := busyboxOrSkip(t)
	dir := t.TempDir()
	a, err := WriteArchiveFile(filepath.Join(dir, "a.tar"), Options{BusyboxPath: bb})
	if err != nil {
		t.Fatal(err)
	}
	b, err := WriteArchiveFile(filepath.Join(dir, "b.tar"), Options{BusyboxPath: bb})
	if err != nil {
		t.Fatal(err)
	}
	if a.Manifest.Digest != b.Manifest.Digest {
		t.Errorf("manifest digests differ: %s vs %s", a.Manifest.Digest, b.Manifest.Digest)
	}
	ab, _ := os.ReadFile(filepath.Join(dir, "a.tar"))
	bbytes, _ := os.ReadFile(filepath.Join(dir, "b.tar"))
	if !bytes.Equal(ab, bbytes) {
		t.Error("archives differ byte for byte")
	}
	if a.Name != DefaultName {
		t.Errorf("name = %q, want %q", a.Name, DefaultName)
	}
	c, err := WriteArchiveFile(filepath.Join(dir, "c.tar"), Options{BusyboxPath: bb, User: "0:0"})
	if err != nil {
		t.Fatal(err)
	}
	if c.Config.Digest == a.Config.Digest {
		t.Error("a different user must give a different config digest")
	}
}

func TestWriteArchiveRejectsBadInput(t *testing.T) {
	bb := busyboxOrSkip(t)
	tests := []struct {
		name string
		opts Options
	}{
		{"digest reference", Options{Name: "localhost/x@sha256:abcd", BusyboxPath: bb}},
		{"empty tag", Options{Name: "localhost/x:", BusyboxPath: bb}},
		{"space in name", Options{Name: "local host/x", BusyboxPath: bb}},
		{"missing busybox", Options{BusyboxPath: filepath.Join(t.TempDir(), "nope")}},
		{"not an ELF", Options{BusyboxPath: writeFile(t, "#!/bin/sh\n")}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out := filepath.Join(t.TempDir(), "out.tar")
			if _, err := WriteArchiveFile(out, tt.opts); err == nil {
				t.Fatal("want an error")
			}
			if _, err := os.Stat(out); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("failed write left %s behind", out)
			}
		})
	}
}

func writeFile(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(p, []byte(content), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}
