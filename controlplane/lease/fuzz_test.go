package lease

import (
	"context"
	"errors"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/gpuaas/gpuaas/pkg/errs"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// FuzzCreateLease feeds arbitrary wire bytes to CreateLease: it must never
// panic, must answer with a canonical error class, and a refused request
// must leave no lease and no audit entry behind.
func FuzzCreateLease(f *testing.F) {
	for _, r := range []*leasev1.CreateLeaseRequest{req("k", "1g.18gb"), req("k", "7g.141gb"), {}} {
		b, _ := proto.Marshal(r)
		f.Add(b)
	}
	fx := newFixture(f, h200("node-a", 1))
	f.Fuzz(func(t *testing.T, b []byte) {
		var r leasev1.CreateLeaseRequest
		if err := proto.Unmarshal(b, &r); err != nil {
			return
		}
		before, beforeAudit := fx.counts(t)
		_, err := fx.svc.Create(context.Background(), operator, &r)
		if err == nil {
			return
		}
		known := false
		for _, c := range []error{errs.ErrInvalidArgument, errs.ErrAlreadyExists, errs.ErrPermissionDenied, errs.ErrUnimplemented} {
			known = known || errors.Is(err, c)
		}
		if !known {
			t.Fatalf("non-canonical error: %v", err)
		}
		if after, afterAudit := fx.counts(t); after != before || afterAudit != beforeAudit {
			t.Fatalf("refused request changed state")
		}
	})
}
