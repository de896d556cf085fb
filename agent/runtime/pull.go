package runtime

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/errdefs"
	"github.com/distribution/reference"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// ImageEnsurer makes images available before containers are created from
// them. It is not part of Runtime so that existing fakes of Runtime keep
// compiling; *Containerd implements both.
type ImageEnsurer interface {
	EnsureImage(ctx context.Context, ref string, policy ImagePolicy) (digest string, err error)
	ImagePolicy() ImagePolicy
}

var _ ImageEnsurer = (*Containerd)(nil)

// ImagePolicy is the policy from Config.Images, for callers of EnsureImage.
func (r *Containerd) ImagePolicy() ImagePolicy { return r.images.clone() }

// EnsureImage makes the image ref available to Create and returns its
// manifest digest ("sha256:..."). ref is first checked against policy
// (ImagePolicy.Check); a refused or malformed reference fails before the
// local store or any registry is consulted.
//
// An image already in the local store under the normalized name is used as
// it is, without contacting a registry: images imported with ImportArchive
// on an air-gapped host count. A digest reference is satisfied locally only
// by an image of the same repository whose manifest digest is that digest.
// Otherwise the image is pulled from its registry over HTTPS (plain HTTP
// only for a loopback registry) and unpacked for the runtime's snapshotter,
// under a containerd lease. A registry that does not know the name, tag or
// digest is ErrImageNotFound.
//
// On success the image is also stored under the pinned name
// "NAME@DIGEST" (Pinned(ref, digest)); create the container from that name
// so that a tag moved after this call cannot change what runs.
func (r *Containerd) EnsureImage(ctx context.Context, ref string, policy ImagePolicy) (string, error) {
	named, err := policy.Check(ref)
	if err != nil {
		return "", err
	}
	name := named.String()
	ctx, release, err := r.withLease(ctx)
	if err != nil {
		return "", fmt.Errorf("ensure image %s: %w", name, err)
	}
	defer release()

	target, ok, err := r.localImage(ctx, named)
	if err != nil {
		return "", err
	}
	if !ok {
		if target, err = r.pull(ctx, name); err != nil {
			return "", err
		}
	}
	if err := r.pin(ctx, named, target); err != nil {
		return "", err
	}
	return target.Digest.String(), nil
}

// Pinned returns the name EnsureImage stores the image under besides its
// normalized name: the repository of ref with digest, e.g.
// "docker.io/library/busybox@sha256:...". ref must be a valid reference.
func Pinned(ref, digest string) (string, error) {
	named, err := reference.ParseNormalizedNamed(ref)
	if err != nil {
		return "", fmt.Errorf("pin image %q: %w: %w", ref, ErrInvalidSpec, err)
	}
	pinned := named.Name() + "@" + digest
	if _, err := reference.ParseNamed(pinned); err != nil {
		return "", fmt.Errorf("pin image %q: %w: digest %q: %w", ref, ErrInvalidSpec, digest, err)
	}
	return pinned, nil
}

// localImage returns the target of a local image that satisfies named and
// is usable (its content present and unpacked, unpacking it if needed).
// ok is false when there is none and the image must be pulled.
func (r *Containerd) localImage(ctx context.Context, named reference.Named) (ocispec.Descriptor, bool, error) {
	name := named.String()
	canonical, digested := named.(reference.Canonical)
	meta, err := r.client.ImageService().Get(ctx, name)
	switch {
	case err == nil:
		if digested && meta.Target.Digest != canonical.Digest() {
			// A record named for one digest that holds another: never
			// trust the name over the content.
			return ocispec.Descriptor{}, false, nil
		}
	case errdefs.IsNotFound(err) && digested:
		var found bool
		if meta, found, err = r.imageByDigest(ctx, named.Name(), canonical); err != nil || !found {
			return ocispec.Descriptor{}, false, err
		}
	case errdefs.IsNotFound(err):
		return ocispec.Descriptor{}, false, nil
	default:
		return ocispec.Descriptor{}, false, fmt.Errorf("ensure image %s: look up local image: %w", name, err)
	}

	img := client.NewImage(r.client, meta)
	unpacked, err := img.IsUnpacked(ctx, r.snapshotter)
	if errdefs.IsNotFound(err) {
		return ocispec.Descriptor{}, false, nil // content missing: pull it
	}
	if err != nil {
		return ocispec.Descriptor{}, false, fmt.Errorf("ensure image %s: local image: %w", name, err)
	}
	if !unpacked {
		err := img.Unpack(ctx, r.snapshotter)
		if errdefs.IsNotFound(err) {
			return ocispec.Descriptor{}, false, nil
		}
		if err != nil {
			return ocispec.Descriptor{}, false, fmt.Errorf("ensure image %s: unpack local image: %w", name, err)
		}
	}
	return meta.Target, true, nil
}

// imageByDigest finds a local image of repository repo (any tag) whose
// manifest is dgst, such as one imported from an archive under a tag.
func (r *Containerd) imageByDigest(ctx context.Context, repo string, dgst reference.Canonical) (images.Image, bool, error) {
	imgs, err := r.client.ImageService().List(ctx, fmt.Sprintf("target.digest==%q", dgst.Digest().String()))
	if err != nil {
		return images.Image{}, false, fmt.Errorf("ensure image %s: list local images: %w", dgst, err)
	}
	for _, img := range imgs {
		n, err := reference.ParseNormalizedNamed(img.Name)
		if err == nil && n.Name() == repo && img.Target.Digest == dgst.Digest() {
			return img, true, nil
		}
	}
	return images.Image{}, false, nil
}

// pull fetches name from its registry and unpacks it.
func (r *Containerd) pull(ctx context.Context, name string) (ocispec.Descriptor, error) {
	hosts, closeIdle := registryHosts()
	// Idle keep-alive connections would otherwise outlive the pull by the
	// transport's idle timeout.
	defer closeIdle()
	img, err := r.client.Pull(ctx, name,
		client.WithResolver(docker.NewResolver(docker.ResolverOptions{Hosts: hosts})),
		client.WithPullUnpack,
		client.WithPullSnapshotter(r.snapshotter))
	if errdefs.IsNotFound(err) {
		return ocispec.Descriptor{}, fmt.Errorf("pull image %s: %w: %w", name, ErrImageNotFound, err)
	}
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("pull image %s: %w", name, err)
	}
	return img.Target(), nil
}

// pin stores target under NAME@DIGEST as well, unless it is there.
func (r *Containerd) pin(ctx context.Context, named reference.Named, target ocispec.Descriptor) error {
	pinned := named.Name() + "@" + target.Digest.String()
	is := r.client.ImageService()
	cur, err := is.Get(ctx, pinned)
	if err == nil && cur.Target.Digest == target.Digest {
		return nil
	}
	if err != nil && !errdefs.IsNotFound(err) {
		return fmt.Errorf("ensure image %s: look up %s: %w", named, pinned, err)
	}
	img := images.Image{Name: pinned, Target: target}
	if _, err = is.Create(ctx, img); errdefs.IsAlreadyExists(err) {
		_, err = is.Update(ctx, img, "target")
	}
	if err != nil {
		return fmt.Errorf("ensure image %s: store as %s: %w", named, pinned, err)
	}
	return nil
}

// registryHosts configures the resolver: HTTPS with the system's roots for
// every registry, plain HTTP only for one on a loopback address, no
// credentials. The returned func closes the idle connections.
func registryHosts() (docker.RegistryHosts, func()) {
	tr := docker.DefaultHTTPTransport(nil)
	hc := &http.Client{Transport: tr}
	hosts := docker.ConfigureDefaultRegistries(
		docker.WithClient(hc),
		docker.WithAuthorizer(docker.NewDockerAuthorizer(docker.WithAuthClient(hc))),
		docker.WithPlainHTTP(plainHTTPAllowed),
	)
	return hosts, tr.CloseIdleConnections
}

// plainHTTPAllowed reports whether the registry host[:port] is on a
// loopback address (localhost, 127.0.0.0/8, ::1), the only place plain
// HTTP cannot be intercepted off the host.
func plainHTTPAllowed(hostport string) (bool, error) {
	host := hostport
	if h, port, err := net.SplitHostPort(hostport); err == nil {
		if _, err := strconv.ParseUint(port, 10, 16); err != nil {
			return false, fmt.Errorf("registry %q: invalid port", hostport)
		}
		host = h
	} else if strings.Contains(strings.Trim(hostport, "[]"), ":") {
		host = strings.Trim(hostport, "[]") // a bare IPv6 address
	}
	if strings.EqualFold(host, "localhost") {
		return true, nil
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback(), nil
}
