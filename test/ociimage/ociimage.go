// Package ociimage builds small OCI image archives for tests and demos from
// the host's static busybox binary, in pure Go: no registry, no docker, no
// umoci. The output is deterministic (fixed mtimes, owners and order), so an
// image built twice from the same busybox has the same digest.
//
// It is test support: nothing in the agent or the control plane may import
// it.
package ociimage

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	_ "crypto/sha256" // go-digest hashes with the registered sha256
	"debug/elf"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"runtime"
	"sort"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// DefaultName is the image name used when Options.Name is empty.
const DefaultName = "localhost/gpuaas/busybox:test"

// DefaultUser is the config user used when Options.User is empty: nobody.
const DefaultUser = "65534:65534"

// annotationImageName is the index annotation containerd's importer reads
// the full image name from (core/images.AnnotationImageName).
const annotationImageName = "io.containerd.image.name"

// epoch is the fixed timestamp of every file and of the image config.
var epoch = time.Date(2024, time.January, 1, 0, 0, 0, 0, time.UTC)

// Applets are the busybox applets linked into /bin of every image.
var Applets = []string{
	"[", "basename", "cat", "chmod", "cp", "cut", "date", "dd", "dirname",
	"echo", "env", "false", "grep", "head", "hostname", "id", "kill", "ln",
	"ls", "mkdir", "mknod", "mount", "mv", "nproc", "ps", "pwd", "readlink",
	"rm", "sed", "seq", "sh", "sleep", "stat", "tail", "tee", "test", "touch",
	"tr", "true", "uname", "wc", "whoami", "nc", "yes",
	// For the tenant security tests (agent/runtime): attempts that must
	// fail inside a hardened container.
	"chroot", "find", "insmod", "sort", "su", "umount", "unshare",
}

// Options describe the image to build.
type Options struct {
	// Name is the full image reference, e.g. "localhost/gpuaas/busybox:test";
	// DefaultName if empty.
	Name string
	// BusyboxPath is a statically linked busybox; found with FindBusybox if
	// empty.
	BusyboxPath string
	// User is the config's user ("uid:gid" or a name in /etc/passwd);
	// DefaultUser if empty. "0:0" builds an image that asks for root.
	User string
	// Cmd is the config's default command; ["sh"] if empty.
	Cmd []string
	// Env is added to the config's environment after PATH.
	Env []string
}

// Image describes a built archive.
type Image struct {
	Name     string
	Manifest ocispec.Descriptor
	Config   ocispec.Descriptor
	Layer    ocispec.Descriptor
	// DiffID is the digest of the uncompressed layer.
	DiffID digest.Digest
}

// FindBusybox returns the path of a statically linked busybox on this host
// (Debian's busybox-static installs /bin/busybox), or an error that says
// what is missing.
func FindBusybox() (string, error) {
	candidates := []string{"/bin/busybox", "/usr/bin/busybox"}
	if p, err := exec.LookPath("busybox"); err == nil {
		candidates = append(candidates, p)
	}
	var errs []error
	for _, p := range candidates {
		err := checkStatic(p)
		if err == nil {
			return p, nil
		}
		errs = append(errs, err)
	}
	return "", fmt.Errorf("find static busybox (install busybox-static): %w", errors.Join(errs...))
}

// checkStatic reports whether the file is an ELF executable without a
// program interpreter, i.e. one that runs in an empty root filesystem.
func checkStatic(p string) error {
	f, err := elf.Open(p)
	if err != nil {
		return fmt.Errorf("open %s: %w", p, err)
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			return fmt.Errorf("%s is dynamically linked", p)
		}
	}
	return nil
}

// WriteArchiveFile writes the archive to path (replaced if it exists).
func WriteArchiveFile(path string, opts Options) (Image, error) {
	f, err := os.Create(path)
	if err != nil {
		return Image{}, fmt.Errorf("create image archive: %w", err)
	}
	img, err := WriteArchive(f, opts)
	if cerr := f.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("close image archive %s: %w", path, cerr)
	}
	if err != nil {
		os.Remove(path)
		return Image{}, err
	}
	return img, nil
}

// WriteArchive writes an OCI image layout as a tar stream to w: oci-layout,
// index.json (annotated with the image name for containerd's importer and
// the tag as org.opencontainers.image.ref.name), and the manifest, config
// and one gzip layer under blobs/sha256.
func WriteArchive(w io.Writer, opts Options) (Image, error) {
	if opts.Name == "" {
		opts.Name = DefaultName
	}
	if opts.User == "" {
		opts.User = DefaultUser
	}
	if len(opts.Cmd) == 0 {
		opts.Cmd = []string{"sh"}
	}
	tag, err := refTag(opts.Name)
	if err != nil {
		return Image{}, err
	}
	if opts.BusyboxPath == "" {
		if opts.BusyboxPath, err = FindBusybox(); err != nil {
			return Image{}, err
		}
	} else if err := checkStatic(opts.BusyboxPath); err != nil {
		return Image{}, fmt.Errorf("busybox: %w", err)
	}
	busybox, err := os.ReadFile(opts.BusyboxPath)
	if err != nil {
		return Image{}, fmt.Errorf("read busybox: %w", err)
	}

	rawLayer, err := buildLayer(busybox)
	if err != nil {
		return Image{}, err
	}
	// Stored (level 0) gzip: a valid gzip layer for every consumer, and
	// fast enough that tests built with -race do not spend seconds
	// compressing busybox. Size does not matter for a local test image.
	var gz bytes.Buffer
	zw, err := gzip.NewWriterLevel(&gz, gzip.NoCompression)
	if err != nil {
		return Image{}, fmt.Errorf("gzip layer: %w", err)
	}
	if _, err := zw.Write(rawLayer); err != nil {
		return Image{}, fmt.Errorf("gzip layer: %w", err)
	}
	if err := zw.Close(); err != nil {
		return Image{}, fmt.Errorf("gzip layer: %w", err)
	}

	img := Image{
		Name:   opts.Name,
		DiffID: digest.FromBytes(rawLayer),
		Layer: ocispec.Descriptor{
			MediaType: ocispec.MediaTypeImageLayerGzip,
			Digest:    digest.FromBytes(gz.Bytes()),
			Size:      int64(gz.Len()),
		},
	}

	created := epoch
	config := ocispec.Image{
		Created:  &created,
		Platform: ocispec.Platform{Architecture: runtime.GOARCH, OS: "linux"},
		Config: ocispec.ImageConfig{
			User:       opts.User,
			Env:        append([]string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}, opts.Env...),
			Cmd:        opts.Cmd,
			WorkingDir: "/",
		},
		RootFS: ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{img.DiffID}},
		History: []ocispec.History{{
			Created:   &created,
			CreatedBy: "gpuaas test/ociimage: static busybox",
		}},
	}
	configJSON, err := json.Marshal(config)
	if err != nil {
		return Image{}, fmt.Errorf("encode image config: %w", err)
	}
	img.Config = ocispec.Descriptor{
		MediaType: ocispec.MediaTypeImageConfig,
		Digest:    digest.FromBytes(configJSON),
		Size:      int64(len(configJSON)),
	}

	manifestJSON, err := json.Marshal(ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    img.Config,
		Layers:    []ocispec.Descriptor{img.Layer},
	})
	if err != nil {
		return Image{}, fmt.Errorf("encode image manifest: %w", err)
	}
	img.Manifest = ocispec.Descriptor{
		MediaType: ocispec.MediaTypeImageManifest,
		Digest:    digest.FromBytes(manifestJSON),
		Size:      int64(len(manifestJSON)),
	}

	indexEntry := img.Manifest
	indexEntry.Platform = &ocispec.Platform{Architecture: runtime.GOARCH, OS: "linux"}
	indexEntry.Annotations = map[string]string{
		annotationImageName:       opts.Name,
		ocispec.AnnotationRefName: tag,
	}
	indexJSON, err := json.Marshal(ocispec.Index{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageIndex,
		Manifests: []ocispec.Descriptor{indexEntry},
	})
	if err != nil {
		return Image{}, fmt.Errorf("encode image index: %w", err)
	}
	layoutJSON, err := json.Marshal(ocispec.ImageLayout{Version: ocispec.ImageLayoutVersion})
	if err != nil {
		return Image{}, fmt.Errorf("encode oci-layout: %w", err)
	}

	tw := tar.NewWriter(w)
	blobs := []struct {
		d    digest.Digest
		data []byte
	}{
		{img.Manifest.Digest, manifestJSON},
		{img.Config.Digest, configJSON},
		{img.Layer.Digest, gz.Bytes()},
	}
	sort.Slice(blobs, func(i, j int) bool { return blobs[i].d < blobs[j].d })
	entries := []tarEntry{
		{name: ocispec.ImageLayoutFile, data: layoutJSON, mode: 0o644},
		{name: ocispec.ImageIndexFile, data: indexJSON, mode: 0o644},
		{name: ocispec.ImageBlobsDir + "/", typ: tar.TypeDir, mode: 0o755},
		{name: ocispec.ImageBlobsDir + "/sha256/", typ: tar.TypeDir, mode: 0o755},
	}
	for _, b := range blobs {
		entries = append(entries, tarEntry{
			name: path.Join(ocispec.ImageBlobsDir, b.d.Algorithm().String(), b.d.Encoded()),
			data: b.data,
			mode: 0o644,
		})
	}
	if err := writeEntries(tw, entries); err != nil {
		return Image{}, fmt.Errorf("write image archive: %w", err)
	}
	if err := tw.Close(); err != nil {
		return Image{}, fmt.Errorf("write image archive: %w", err)
	}
	return img, nil
}

// refTag returns the tag of a reference ("latest" when it has none) and
// rejects names containerd would not accept as an image name.
func refTag(name string) (string, error) {
	if strings.ContainsAny(name, " \t\n") || strings.Contains(name, "@") {
		return "", fmt.Errorf("image name %q: only name[:tag] references are supported", name)
	}
	slash := strings.LastIndex(name, "/")
	colon := strings.LastIndex(name, ":")
	if colon > slash {
		if colon == len(name)-1 {
			return "", fmt.Errorf("image name %q: empty tag", name)
		}
		return name[colon+1:], nil
	}
	return "latest", nil
}

type tarEntry struct {
	name     string
	typ      byte
	mode     int64
	data     []byte
	linkname string
}

func writeEntries(tw *tar.Writer, entries []tarEntry) error {
	for _, e := range entries {
		typ := e.typ
		if typ == 0 {
			typ = tar.TypeReg
		}
		hdr := &tar.Header{
			Typeflag: typ,
			Name:     e.name,
			Linkname: e.linkname,
			Mode:     e.mode,
			Size:     int64(len(e.data)),
			ModTime:  epoch,
			Format:   tar.FormatPAX,
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return fmt.Errorf("%s: %w", e.name, err)
		}
		if len(e.data) > 0 {
			if _, err := tw.Write(e.data); err != nil {
				return fmt.Errorf("%s: %w", e.name, err)
			}
		}
	}
	return nil
}

// buildLayer returns the uncompressed root filesystem layer: a minimal FHS
// tree, /bin/busybox with its applet links, and passwd/group files that
// know root and nobody.
func buildLayer(busybox []byte) ([]byte, error) {
	dirs := []struct {
		name string
		mode int64
	}{
		{"bin/", 0o755}, {"dev/", 0o755}, {"etc/", 0o755}, {"home/", 0o755},
		{"proc/", 0o555}, {"root/", 0o700}, {"run/", 0o755}, {"sys/", 0o555},
		{"tmp/", 0o1777}, {"usr/", 0o755}, {"usr/bin/", 0o755}, {"var/", 0o755},
	}
	var entries []tarEntry
	for _, d := range dirs {
		entries = append(entries, tarEntry{name: d.name, typ: tar.TypeDir, mode: d.mode})
	}
	entries = append(entries,
		tarEntry{name: "bin/busybox", data: busybox, mode: 0o755},
		tarEntry{name: "etc/passwd", mode: 0o644, data: []byte(
			"root:x:0:0:root:/root:/bin/sh\n" +
				"user:x:1000:1000:user:/home:/bin/sh\n" +
				"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")},
		tarEntry{name: "etc/group", mode: 0o644, data: []byte(
			"root:x:0:\nuser:x:1000:\nnogroup:x:65534:\n")},
	)
	applets := append([]string(nil), Applets...)
	sort.Strings(applets)
	for _, a := range applets {
		entries = append(entries, tarEntry{name: "bin/" + a, typ: tar.TypeSymlink, linkname: "busybox", mode: 0o777})
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	if err := writeEntries(tw, entries); err != nil {
		return nil, fmt.Errorf("build layer: %w", err)
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("build layer: %w", err)
	}
	return buf.Bytes(), nil
}
