package audit_test

import (
	"context"
	"testing"

	"github.com/gpuaas/gpuaas/controlplane/audit"
)

// slotCtx is a context that is its own audit slot, as the API edge's
// per-call mark is.
type slotCtx struct {
	context.Context
	c audit.Correlation
}

func (s *slotCtx) Correlation() audit.Correlation     { return s.c }
func (s *slotCtx) SetCorrelation(c audit.Correlation) { s.c = c }
func (s *slotCtx) Value(key any) any {
	if audit.IsSlotKey(key) {
		return s
	}
	return s.Context.Value(key)
}

type childKey struct{}

func TestSlotCarriesTheCorrelationSetAfterTheContextWasMade(t *testing.T) {
	if audit.IsSlotKey("correlation") || audit.IsSlotKey(nil) {
		t.Fatal("a foreign key is taken for the slot key")
	}
	s := &slotCtx{Context: context.Background()}
	var ctx context.Context = s
	if got := audit.CorrelationFrom(ctx); got != (audit.Correlation{}) {
		t.Fatalf("empty slot: %+v", got)
	}
	slot := audit.SlotFrom(ctx)
	if slot == nil {
		t.Fatal("no slot found")
	}
	slot.SetCorrelation(audit.Correlation{RequestID: "r1", TraceID: "t1"})
	if got := audit.CorrelationFrom(context.WithValue(ctx, childKey{}, 1)); got.RequestID != "r1" || got.TraceID != "t1" {
		t.Fatalf("filled slot through a child context: %+v", got)
	}
	// A correlation set over the slot wins, and hides the slot.
	over := audit.NewContext(ctx, audit.Correlation{RequestID: "r2"})
	if got := audit.CorrelationFrom(over); got.RequestID != "r2" {
		t.Fatalf("correlation over the slot: %+v", got)
	}
	if audit.SlotFrom(over) != nil {
		t.Fatal("the slot shows through a correlation set over it")
	}
	if audit.SlotFrom(context.Background()) != nil {
		t.Fatal("a slot where none was set")
	}
}
