package runtime

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/opencontainers/go-digest"

	"github.com/gpuaas/gpuaas/test/harness"
	"github.com/gpuaas/gpuaas/test/ociimage"
)

// pullEnv is a containerd with an empty image store next to a real
// registry on loopback, which the runtime's policy allows.
type pullEnv struct {
	*env
	reg    *harness.Registry
	policy ImagePolicy
}

func newPullEnv(t *testing.T) *pullEnv {
	t.Helper()
	harness.RequireRoot(t, append(slices.Clone(harness.ContainerdComponents), harness.RegistryComponents...)...)
	ctrd := harness.StartContainerdT(t, harness.Options{})
	reg := harness.StartRegistryT(t)
	policy := ImagePolicy{AllowedRegistries: []string{reg.Host()}}
	ctx := context.Background()
	rt, err := NewContainerd(ctx, Config{Address: ctrd.Address(), Namespace: testNamespace, Images: policy})
	if err != nil {
		t.Fatalf("new runtime: %v", err)
	}
	t.Cleanup(func() {
		if err := rt.Close(); err != nil {
			t.Errorf("close runtime: %v", err)
		}
	})
	raw, err := ctrd.NewClient(testNamespace)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { raw.Close() })
	return &pullEnv{
		env:    &env{t: t, ctrd: ctrd, rt: rt, raw: raw, ctx: namespaces.WithNamespace(ctx, testNamespace)},
		reg:    reg,
		policy: policy,
	}
}

// archive builds a busybox image whose config carries marker, so its
// digest is this test's own.
func (p *pullEnv) archive(name, marker string) (string, ociimage.Image) {
	p.t.Helper()
	return harness.BusyboxArchiveT(p.t, ociimage.Options{Name: name, Env: []string{"IMAGE_MARKER=" + marker}})
}

// push pushes a fresh image as repoTag and returns its full reference on
// the registry and the image.
func (p *pullEnv) push(repoTag, marker string) (string, ociimage.Image) {
	p.t.Helper()
	path, img := p.archive("localhost/gpuaas/busybox:push", marker)
	dgst, err := p.reg.Push(context.Background(), path, repoTag)
	if err != nil {
		p.t.Fatal(err)
	}
	if dgst != img.Manifest.Digest.String() {
		p.t.Fatalf("registry stored %s for the archive's manifest %s", dgst, img.Manifest.Digest)
	}
	return p.reg.Host() + "/" + repoTag, img
}

func (p *pullEnv) requests() []string {
	p.t.Helper()
	reqs, err := p.reg.Requests()
	if err != nil {
		p.t.Fatal(err)
	}
	return reqs
}

// assertNoRequestSince fails the test if the registry served a request
// after the first n.
func (p *pullEnv) assertNoRequestSince(n int) {
	p.t.Helper()
	if reqs := p.requests(); len(reqs) != n {
		p.t.Errorf("the registry was contacted: %q", reqs[n:])
	}
}

// assertImage checks that the store holds name with the manifest digest,
// unpacked for the runtime's snapshotter.
func (p *pullEnv) assertImage(name, dgst string) {
	p.t.Helper()
	img, err := p.raw.GetImage(p.ctx, name)
	if err != nil {
		p.t.Fatalf("image %s not in the store: %v", name, err)
	}
	if got := img.Target().Digest.String(); got != dgst {
		p.t.Errorf("image %s has manifest %s, want %s", name, got, dgst)
	}
	if ok, err := img.IsUnpacked(p.ctx, p.rt.Snapshotter()); err != nil || !ok {
		p.t.Errorf("image %s unpacked = %v, %v", name, ok, err)
	}
}

func (p *pullEnv) assertNoImages() {
	p.t.Helper()
	imgs, err := p.raw.ListImages(p.ctx)
	if err != nil || len(imgs) != 0 {
		p.t.Errorf("images in the store: %v, %v", imgs, err)
	}
}

func (p *pullEnv) assertNoLeases() {
	p.t.Helper()
	leases, err := p.raw.LeasesService().List(p.ctx)
	if err != nil || len(leases) != 0 {
		p.t.Errorf("containerd leases left: %v, %v", leases, err)
	}
}

func TestEnsureImagePullsByTagAndReturnsThePushedDigest(t *testing.T) {
	p := newPullEnv(t)
	ref, img := p.push("gpuaas/busybox:v1", t.Name())
	before := len(p.requests())

	begin := time.Now()
	dgst, err := p.rt.EnsureImage(context.Background(), ref, p.rt.ImagePolicy())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("pull by tag (resolve, fetch, unpack) took %v", time.Since(begin))
	if dgst != img.Manifest.Digest.String() {
		t.Errorf("EnsureImage = %s, pushed manifest %s", dgst, img.Manifest.Digest)
	}
	p.assertImage(ref, dgst)
	p.assertImage(p.reg.Host()+"/gpuaas/busybox@"+dgst, dgst) // the pinned name
	reqs := p.requests()[before:]
	for _, want := range []string{
		"HEAD /v2/gpuaas/busybox/manifests/v1",
		"GET /v2/gpuaas/busybox/manifests/" + dgst,
		"GET /v2/gpuaas/busybox/blobs/" + img.Config.Digest.String(),
		"GET /v2/gpuaas/busybox/blobs/" + img.Layer.Digest.String(),
	} {
		if !slices.Contains(reqs, want) {
			t.Errorf("the pull did not request %q: %q", want, reqs)
		}
	}
	p.assertNoLeases()

	// Present now: a second call answers from the store.
	n := len(p.requests())
	again, err := p.rt.EnsureImage(context.Background(), ref, p.policy)
	if err != nil || again != dgst {
		t.Errorf("second EnsureImage = %s, %v; want %s", again, err, dgst)
	}
	p.assertNoRequestSince(n)
}

func TestEnsureImagePullsByDigest(t *testing.T) {
	p := newPullEnv(t)
	_, img := p.push("gpuaas/busybox:v1", t.Name())
	ref := p.reg.Host() + "/gpuaas/busybox@" + img.Manifest.Digest.String()
	pinned := p.policy
	pinned.RequireDigest = true

	begin := time.Now()
	dgst, err := p.rt.EnsureImage(context.Background(), ref, pinned)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("pull by digest took %v", time.Since(begin))
	if dgst != img.Manifest.Digest.String() {
		t.Errorf("EnsureImage = %s, want %s", dgst, img.Manifest.Digest)
	}
	p.assertImage(ref, dgst)
	if reqs := p.requests(); !slices.Contains(reqs, "GET /v2/gpuaas/busybox/manifests/"+dgst) {
		t.Errorf("no manifest fetch by digest: %q", reqs)
	}
	// A tag next to the digest changes nothing: the digest decides.
	n := len(p.requests())
	withTag := p.reg.Host() + "/gpuaas/busybox:other@" + dgst
	if again, err := p.rt.EnsureImage(context.Background(), withTag, pinned); err != nil || again != dgst {
		t.Errorf("EnsureImage(%s) = %s, %v", withTag, again, err)
	}
	p.assertNoRequestSince(n)
	p.assertNoLeases()
}

func TestEnsureImageRequireDigestRefusesATagBeforeAnyRequest(t *testing.T) {
	p := newPullEnv(t)
	ref, _ := p.push("gpuaas/busybox:v1", t.Name())
	n := len(p.requests())
	pinned := p.policy
	pinned.RequireDigest = true

	_, err := p.rt.EnsureImage(context.Background(), ref, pinned)
	if !errors.Is(err, ErrImagePolicy) || !strings.Contains(err.Error(), "digest is required") {
		t.Fatalf("EnsureImage(%s) = %v, want ErrImagePolicy for a missing digest", ref, err)
	}
	p.assertNoRequestSince(n)
	p.assertNoImages()
}

func TestEnsureImageRefusesARegistryNotAllowlistedBeforeAnyRequest(t *testing.T) {
	p := newPullEnv(t)
	ref, img := p.push("gpuaas/busybox:v1", t.Name())
	n := len(p.requests())

	for _, policy := range []ImagePolicy{
		{AllowedRegistries: []string{"registry.example.com", "*.0.0.1", "127.0.0.1"}},
		{}, // no policy: nothing runs
	} {
		for _, r := range []string{ref, p.reg.Host() + "/gpuaas/busybox@" + img.Manifest.Digest.String()} {
			_, err := p.rt.EnsureImage(context.Background(), r, policy)
			if !errors.Is(err, ErrImagePolicy) || !strings.Contains(err.Error(), "not in the allowed registries") {
				t.Errorf("EnsureImage(%s) with %+v = %v, want ErrImagePolicy", r, policy, err)
			}
		}
	}
	// A malformed reference never gets that far either.
	if _, err := p.rt.EnsureImage(context.Background(), p.reg.Host()+"/GPUaaS/busybox:v1", p.policy); !errors.Is(err, ErrInvalidSpec) {
		t.Errorf("malformed reference: %v, want ErrInvalidSpec", err)
	}
	p.assertNoRequestSince(n)
	p.assertNoImages()
}

func TestEnsureImageUnknownImageIsErrImageNotFound(t *testing.T) {
	p := newPullEnv(t)
	p.push("gpuaas/busybox:v1", t.Name())
	for name, ref := range map[string]string{
		"unknown repository": p.reg.Host() + "/gpuaas/nothing:v1",
		"unknown tag":        p.reg.Host() + "/gpuaas/busybox:v2",
		"unknown digest":     p.reg.Host() + "/gpuaas/busybox@" + digestA,
	} {
		t.Run(name, func(t *testing.T) {
			n := len(p.requests())
			_, err := p.rt.EnsureImage(context.Background(), ref, p.policy)
			if !errors.Is(err, ErrImageNotFound) {
				t.Fatalf("EnsureImage(%s) = %v, want ErrImageNotFound", ref, err)
			}
			if len(p.requests()) == n {
				t.Errorf("ErrImageNotFound without asking the registry")
			}
		})
	}
	p.assertNoImages()
	p.assertNoLeases()
}

func TestEnsureImageUsesALocalArchiveImageWithoutPulling(t *testing.T) {
	p := newPullEnv(t)
	// An air-gapped host: the image was imported from an archive under a
	// name on the (allowed) registry, which has never seen it.
	name := p.reg.Host() + "/gpuaas/airgap:v1"
	path, img := p.archive(name, t.Name())
	if _, err := p.rt.ImportArchive(context.Background(), path); err != nil {
		t.Fatal(err)
	}
	want := img.Manifest.Digest.String()
	n := len(p.requests())

	dgst, err := p.rt.EnsureImage(context.Background(), name, p.policy)
	if err != nil || dgst != want {
		t.Fatalf("EnsureImage(%s) = %s, %v; want %s", name, dgst, err, want)
	}
	// By digest, under RequireDigest: the imported tag of the same
	// repository with that manifest satisfies it.
	pinned := p.policy
	pinned.RequireDigest = true
	byDigest := p.reg.Host() + "/gpuaas/airgap@" + want
	dgst, err = p.rt.EnsureImage(context.Background(), byDigest, pinned)
	if err != nil || dgst != want {
		t.Fatalf("EnsureImage(%s) = %s, %v; want %s", byDigest, dgst, err, want)
	}
	p.assertImage(byDigest, want)
	p.assertNoRequestSince(n)

	// RequireDigest still holds locally: the imported image does not
	// satisfy another digest of its repository, nor its digest under
	// another repository; both go to the registry, which has neither.
	for _, ref := range []string{
		p.reg.Host() + "/gpuaas/airgap@" + digestA,
		p.reg.Host() + "/gpuaas/other@" + want,
	} {
		n := len(p.requests())
		if _, err := p.rt.EnsureImage(context.Background(), ref, pinned); !errors.Is(err, ErrImageNotFound) {
			t.Errorf("EnsureImage(%s) = %v, want ErrImageNotFound", ref, err)
		}
		if len(p.requests()) == n {
			t.Errorf("EnsureImage(%s) was answered from the store", ref)
		}
	}
	// And the image policy applies to local images too.
	if _, err := p.rt.EnsureImage(context.Background(), name, ImagePolicy{AllowedRegistries: []string{"registry.example.com"}}); !errors.Is(err, ErrImagePolicy) {
		t.Errorf("local image of a registry not allowed: %v, want ErrImagePolicy", err)
	}
	p.assertNoLeases()
}

func TestEnsureImageDoesNotTrustARecordNamedForAnotherDigest(t *testing.T) {
	p := newPullEnv(t)
	_, pushed := p.push("gpuaas/busybox:v2", t.Name())
	want := pushed.Manifest.Digest.String()
	// A local image other than the pushed one, under a record named for
	// the pushed digest.
	local := p.reg.Host() + "/gpuaas/busybox:v1"
	path, other := p.archive(local, t.Name()+"-other")
	if _, err := p.rt.ImportArchive(context.Background(), path); err != nil {
		t.Fatal(err)
	}
	forged := p.reg.Host() + "/gpuaas/busybox@" + want
	if _, err := p.raw.ImageService().Create(p.ctx, images.Image{Name: forged, Target: other.Manifest}); err != nil {
		t.Fatal(err)
	}

	dgst, err := p.rt.EnsureImage(context.Background(), forged, p.policy)
	if err != nil || dgst != want {
		t.Fatalf("EnsureImage(%s) = %s, %v; want %s from the registry", forged, dgst, err, want)
	}
	p.assertImage(forged, want) // the record now holds what its name says
	p.assertImage(local, other.Manifest.Digest.String())
	if reqs := p.requests(); !slices.Contains(reqs, "GET /v2/gpuaas/busybox/manifests/"+want) {
		t.Errorf("no pull from the registry: %q", reqs)
	}
}

func TestEnsureImagePulledImageRunsAsAContainer(t *testing.T) {
	p := newPullEnv(t)
	ref, _ := p.push("gpuaas/busybox:v1", t.Name())
	dgst, err := p.rt.EnsureImage(context.Background(), ref, p.policy)
	if err != nil {
		t.Fatal(err)
	}
	pinned, err := Pinned(ref, dgst)
	if err != nil {
		t.Fatal(err)
	}
	s := p.spec("sh", "-c", `echo "marker: $IMAGE_MARKER"; echo END`)
	s.Image = pinned
	st, out, kv := p.run(s)
	defer p.stop(s.ID, 0)
	if st.ExitCode != 0 || kv["marker"] != t.Name() {
		t.Errorf("container of the pulled image exited %d:\n%s", st.ExitCode, out)
	}
	if st.ImageDigest != dgst || st.Image != pinned {
		t.Errorf("status image %s (%s), want %s (%s)", st.Image, st.ImageDigest, pinned, dgst)
	}
}

// What EnsureImage stored is referenced by image records, not only by its
// containerd lease: a garbage collection after the call keeps the content
// and the unpacked snapshots.
func TestEnsureImageContentSurvivesGarbageCollection(t *testing.T) {
	p := newPullEnv(t)
	ref, img := p.push("gpuaas/busybox:v1", t.Name())
	dgst, err := p.rt.EnsureImage(context.Background(), ref, p.policy)
	if err != nil {
		t.Fatal(err)
	}
	// Deleting a lease synchronously runs containerd's collector.
	l, err := p.raw.LeasesService().Create(p.ctx, leases.WithRandomID())
	if err != nil {
		t.Fatal(err)
	}
	if err := p.raw.LeasesService().Delete(p.ctx, l, leases.SynchronousDelete); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{dgst, img.Config.Digest.String(), img.Layer.Digest.String()} {
		if _, err := p.raw.ContentStore().Info(p.ctx, digest.Digest(d)); err != nil {
			t.Errorf("blob %s collected: %v", d, err)
		}
	}
	p.assertImage(ref, dgst)
	p.assertImage(p.reg.Host()+"/gpuaas/busybox@"+dgst, dgst)
}
