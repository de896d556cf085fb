package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/lease"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/errs"
	auditv1 "github.com/gpuaas/gpuaas/proto/gpuaas/audit/v1"
)

// Limits of AuditLogService.
const (
	defaultAuditPage = 100
	maxAuditPage     = 1000
	maxAuditFilter   = 256
)

// AuditLogServer serves gpuaas.audit.v1.AuditLogService: the log read
// online by auditors. Every call appends its own entry (audit.read),
// after the read, naming what was read.
type AuditLogServer struct {
	auditv1.UnimplementedAuditLogServiceServer
	Store store.Store
}

// record appends the call's entry; a read whose entry cannot be written
// is not answered.
func (s *AuditLogServer) record(ctx context.Context, c lease.Caller, resource, outcome, reason string, details map[string]string) error {
	return s.Store.Update(context.WithoutCancel(ctx), func(tx store.Tx) error {
		_, err := audit.Append(tx, audit.FromContext(ctx, auditlog.Entry{Actor: c.ID, Tenant: c.Tenant, Action: "audit.read",
			Resource: resource, Outcome: outcome, Reason: reason, RequestID: c.RequestID, Details: details}))
		return err
	})
}

func (s *AuditLogServer) ListAuditEntries(ctx context.Context, req *auditv1.ListAuditEntriesRequest) (resp *auditv1.ListAuditEntriesResponse, err error) {
	c, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	n := int(req.GetPageSize())
	f := audit.Filter{After: req.GetAfter(), Actor: req.GetActor(), Action: req.GetAction(), Resource: req.GetResource(),
		Tenant: req.GetTenant(), Outcome: req.GetOutcome(), RequestID: req.GetRequestId()}
	switch {
	case n < 0 || n > maxAuditPage:
		err = errs.InvalidArgument("page_size", "must be between 0 and %d", maxAuditPage)
	case len(f.Actor) > maxAuditFilter || len(f.Action) > maxAuditFilter || len(f.Resource) > maxAuditFilter ||
		len(f.Tenant) > maxAuditFilter || len(f.Outcome) > maxAuditFilter || len(f.RequestID) > maxAuditFilter:
		err = errs.InvalidArgument("filter", "at most %d characters a field", maxAuditFilter)
	case c.Tenant != "" && f.Tenant != "" && f.Tenant != c.Tenant:
		err = errs.PermissionDenied("TENANT_MISMATCH", "the caller may read only its tenant's entries")
	}
	if n == 0 {
		n = defaultAuditPage
	}
	if c.Tenant != "" {
		// A tenant's caller sees its tenant's entries only.
		f.Tenant = c.Tenant
	}
	f.Limit = n
	var es []auditlog.Entry
	if err == nil {
		es, err = audit.Search(ctx, s.Store, f)
	}
	outcome, reason := auditlog.OutcomeSuccess, ""
	if err != nil {
		outcome, reason = auditlog.OutcomeFailure, errs.ReasonOf(err)
	}
	details := map[string]string{"after": fmt.Sprint(f.After), "returned": fmt.Sprint(len(es))}
	if aerr := s.record(ctx, c, "audit/log", outcome, reason, details); aerr != nil {
		return nil, errs.Wrap(errs.ErrInternal, "AUDIT_FAILED", "the read could not be audited", aerr)
	}
	if err != nil {
		return nil, err
	}
	resp = &auditv1.ListAuditEntriesResponse{}
	for _, e := range es {
		resp.Entries = append(resp.Entries, auditlog.Encode(e))
	}
	if len(es) == n {
		resp.NextAfter = es[len(es)-1].Seq
	}
	err = s.Store.View(ctx, func(tx store.Tx) error {
		resp.TreeSize, err = store.GetU64(tx, "audit_seq")
		if errors.Is(err, store.ErrNotFound) {
			return nil
		}
		return err
	})
	return resp, err
}

func (s *AuditLogServer) GetInclusionProof(ctx context.Context, req *auditv1.GetInclusionProofRequest) (*auditv1.GetInclusionProofResponse, error) {
	c, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	var b auditlog.InclusionBundle
	if req.GetSeq() == 0 {
		err = errs.InvalidArgument("seq", "must be at least 1")
	} else if b, err = audit.Prove(ctx, s.Store, req.GetSeq()); err != nil {
		if errors.Is(err, audit.ErrNotCheckpointed) {
			err = errs.New(errs.ErrFailedPrecondition, "NOT_CHECKPOINTED", "the entry is not covered by a signed checkpoint yet")
		}
	}
	if err == nil && c.Tenant != "" {
		// A tenant's caller may prove only its tenant's entries.
		if e, derr := auditlog.Decode([]byte(b.Entry)); derr != nil || e.Tenant != c.Tenant {
			err = errs.NotFound("AUDIT_ENTRY_NOT_FOUND", "entry %d not found", req.GetSeq())
		}
	}
	outcome, reason := auditlog.OutcomeSuccess, ""
	if err != nil {
		outcome, reason = auditlog.OutcomeFailure, errs.ReasonOf(err)
	}
	if aerr := s.record(ctx, c, fmt.Sprintf("audit/entry/%d", req.GetSeq()), outcome, reason, nil); aerr != nil {
		return nil, errs.Wrap(errs.ErrInternal, "AUDIT_FAILED", "the read could not be audited", aerr)
	}
	if err != nil {
		return nil, err
	}
	raw, err := json.Marshal(b)
	if err != nil {
		return nil, err
	}
	return &auditv1.GetInclusionProofResponse{Bundle: raw}, nil
}
