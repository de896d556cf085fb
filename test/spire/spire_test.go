package spire

import (
	"context"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/gpuaas/gpuaas/pkg/identity"
	"github.com/gpuaas/gpuaas/test/harness"
)

// TestWorkloadGetsARotatingSVIDFromSPIRE starts real SPIRE, registers this
// test binary (by uid and executable path, as the daemons are registered in
// production), takes its SVID through pkg/identity's Workload API source,
// and sees SPIRE rotate it: the source serves the new SVID without being
// reopened.
func TestWorkloadGetsARotatingSVIDFromSPIRE(t *testing.T) {
	harness.Require(t, Check(""))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	s, err := Start(ctx, Options{TrustDomain: "gpuaas.test", SVIDTTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	want := "spiffe://gpuaas.test/gpuaas/operator/spire-test"
	if err := s.Register(ctx, want, 10*time.Second, "unix:uid:"+strconv.Itoa(os.Geteuid()), "unix:path:"+exe); err != nil {
		t.Fatal(err)
	}
	td := spiffeid.RequireTrustDomainFromString("gpuaas.test")
	// The entry reaches the agent on its next sync (every few seconds).
	var src *identity.WorkloadSource
	for deadline := time.Now().Add(time.Minute); ; {
		src, err = identity.NewWorkloadSource(ctx, s.WorkloadAPI(), td, 10*time.Second)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no SVID from SPIRE: %v", err)
		}
	}
	defer src.Close()
	first, err := src.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	if first.ID.String() != want {
		t.Fatalf("SVID %s, want %s", first.ID, want)
	}
	if b, err := src.GetX509BundleForTrustDomain(td); err != nil || len(b.X509Authorities()) == 0 {
		t.Fatalf("bundle: %v", err)
	}
	if _, err := src.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString("other.test")); err == nil {
		t.Error("a bundle for a foreign trust domain was served")
	}
	// A 10 s SVID is rotated at about half its life.
	for deadline := time.Now().Add(40 * time.Second); ; {
		cur, err := src.GetX509SVID()
		if err != nil {
			t.Fatal(err)
		}
		if cur.Certificates[0].SerialNumber.Cmp(first.Certificates[0].SerialNumber) != 0 {
			if !cur.Certificates[0].NotAfter.After(first.Certificates[0].NotAfter) {
				t.Errorf("rotated SVID does not outlive the first")
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("SPIRE did not rotate a 10 s SVID within 40 s")
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestWorkloadSourceRefusesAForeignTrustDomain: an SVID of another trust
// domain from the Workload API is no identity for us.
func TestWorkloadSourceRefusesAForeignTrustDomain(t *testing.T) {
	harness.Require(t, Check(""))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s, err := Start(ctx, Options{TrustDomain: "elsewhere.test"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	exe, _ := os.Executable()
	if err := s.Register(ctx, "spiffe://elsewhere.test/gpuaas/operator/x", 0, "unix:uid:"+strconv.Itoa(os.Geteuid()), "unix:path:"+exe); err != nil {
		t.Fatal(err)
	}
	td := spiffeid.RequireTrustDomainFromString("gpuaas.test")
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(time.Second) {
		if _, err = identity.NewWorkloadSource(ctx, s.WorkloadAPI(), td, 5*time.Second); err == nil {
			t.Fatal("an SVID of elsewhere.test was accepted for gpuaas.test")
		}
		if err != nil && ctx.Err() == nil && isForeign(err) {
			return
		}
	}
	t.Fatalf("never refused for the trust domain: %v", err)
}

func isForeign(err error) bool {
	return err != nil && strings.Contains(err.Error(), "not in trust domain")
}
