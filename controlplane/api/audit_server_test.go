package api

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"golang.org/x/mod/sumdb/note"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/lease"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/errs"
	auditv1 "github.com/gpuaas/gpuaas/proto/gpuaas/audit/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// TestAuditLogIsReadOnlineAndEveryReadAudited: an auditor pages through the
// log in its canonical encoding, gets an inclusion proof that verifies
// offline against the log's key, and each read leaves its own entry.
func TestAuditLogIsReadOnlineAndEveryReadAudited(t *testing.T) {
	s := startServer(t)
	conn := s.dial(t, sourceFor(t, s.pki, s.pki.Operators["alice"]))
	lc := leasev1.NewLeaseServiceClient(conn)
	ac := auditv1.NewAuditLogServiceClient(conn)
	ctx := context.Background()
	for _, k := range []string{"a", "b", "c"} {
		if _, err := lc.CreateLease(ctx, createReq(k)); err != nil {
			t.Fatal(err)
		}
	}
	page, err := ac.ListAuditEntries(ctx, &auditv1.ListAuditEntriesRequest{PageSize: 2, Action: "lease.create"})
	if err != nil || len(page.GetEntries()) != 2 || page.GetNextAfter() == 0 {
		t.Fatalf("first page: %v, %v", page, err)
	}
	for _, raw := range page.GetEntries() {
		if e, err := auditlog.Decode(raw); err != nil || e.Action != "lease.create" {
			t.Fatalf("entry %s: %v", raw, err)
		}
	}
	next, err := ac.ListAuditEntries(ctx, &auditv1.ListAuditEntriesRequest{PageSize: 2, Action: "lease.create", After: page.GetNextAfter()})
	if err != nil || len(next.GetEntries()) != 1 || next.GetNextAfter() != 0 {
		t.Fatalf("second page: %v, %v", next, err)
	}
	// No checkpoint yet: no proof.
	if _, err := ac.GetInclusionProof(ctx, &auditv1.GetInclusionProofRequest{Seq: 1}); errs.ReasonOf(errs.FromStatus(err)) != "NOT_CHECKPOINTED" {
		t.Fatalf("proof before a checkpoint: %v", err)
	}
	skey, vkey, err := auditlog.GenerateKey("gpuaas.test/audit")
	if err != nil {
		t.Fatal(err)
	}
	signers, err := auditlog.ParseSigners([]byte(skey))
	if err != nil {
		t.Fatal(err)
	}
	cp, err := audit.NewCheckpointer(audit.CheckpointerOptions{Store: s.st, Signers: signers, Origin: "gpuaas.test/audit"})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := cp.Checkpoint(ctx); err != nil {
		t.Fatal(err)
	}
	resp, err := ac.GetInclusionProof(ctx, &auditv1.GetInclusionProofRequest{Seq: 1})
	if err != nil {
		t.Fatal(err)
	}
	var b auditlog.InclusionBundle
	if err := json.Unmarshal(resp.GetBundle(), &b); err != nil {
		t.Fatal(err)
	}
	v, err := note.NewVerifier(vkey)
	if err != nil {
		t.Fatal(err)
	}
	if e, _, err := b.Verify("gpuaas.test/audit", note.VerifierList(v)); err != nil || e.Seq != 1 {
		t.Fatalf("the proof does not verify offline: %v", err)
	}
	// Every read above (two pages, two proofs) has its entry.
	es, err := audit.Search(ctx, s.st, audit.Filter{Action: "audit.read"})
	if err != nil || len(es) != 4 {
		t.Fatalf("%d audit.read entries, want 4 (two pages, two proofs): %v", len(es), err)
	}
	if es[2].Outcome != auditlog.OutcomeFailure || es[2].Reason != "NOT_CHECKPOINTED" || es[3].Resource != "audit/entry/1" {
		t.Fatalf("read entries %+v", es)
	}
}

// TestTenantAuditReadsAreConfined: a tenant's token reads only its
// tenant's entries, and asking for another tenant's is refused.
func TestTenantAuditReadsAreConfined(t *testing.T) {
	s := startServer(t)
	ctx := context.Background()
	lc := leasev1.NewLeaseServiceClient(s.dial(t, sourceFor(t, s.pki, s.pki.Operators["alice"])))
	if _, err := lc.CreateLease(ctx, createReq("acme-1")); err != nil {
		t.Fatal(err)
	}
	other := createReq("other-1")
	other.Spec.Tenant = "other"
	if _, err := lc.CreateLease(ctx, other); err != nil {
		t.Fatal(err)
	}
	srv := &AuditLogServer{Store: s.st}
	tctx := context.WithValue(ctx, callerKey{}, lease.Caller{ID: "oidc:bob", Tenant: "acme"})
	resp, err := srv.ListAuditEntries(tctx, &auditv1.ListAuditEntriesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, raw := range resp.GetEntries() {
		if strings.Contains(string(raw), `"tenant":"other"`) {
			t.Fatalf("a tenant's caller read another tenant's entry: %s", raw)
		}
	}
	if len(resp.GetEntries()) == 0 {
		t.Fatal("the tenant's own entries are missing")
	}
	if _, err := srv.ListAuditEntries(tctx, &auditv1.ListAuditEntriesRequest{Tenant: "other"}); !errors.Is(err, errs.ErrPermissionDenied) {
		t.Fatalf("asking for another tenant: %v", err)
	}
}
