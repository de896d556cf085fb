package errs

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestToStatusMapsEveryClass(t *testing.T) {
	for _, cc := range classCodes {
		err := fmt.Errorf("outer: %w", New(cc.class, "SOME_REASON", "safe message"))
		st := ToStatus(err)
		if st.Code() != cc.code {
			t.Errorf("%v: code = %v, want %v", cc.class, st.Code(), cc.code)
		}
		back := FromStatus(st.Err())
		if !errors.Is(back, cc.class) {
			t.Errorf("%v: round trip lost the class: %v", cc.class, back)
		}
		if ReasonOf(back) != "SOME_REASON" {
			t.Errorf("%v: reason = %q", cc.class, ReasonOf(back))
		}
	}
}

func TestInternalErrorsAreOpaque(t *testing.T) {
	secret := errors.New("open /var/lib/gpuaas/state.db: permission denied (token=abc)")
	for _, err := range []error{
		secret,
		fmt.Errorf("wrapped: %w", secret),
		Wrap(ErrInternal, "STORE", "internal error", secret),
	} {
		st := ToStatus(err)
		if st.Code() != codes.Internal {
			t.Fatalf("code = %v, want Internal", st.Code())
		}
		if st.Message() != "internal error" {
			t.Fatalf("message %q leaks internals", st.Message())
		}
	}
}

func TestWrapKeepsCauseServerSideOnly(t *testing.T) {
	cause := errors.New("bbolt: timeout")
	err := Wrap(ErrUnavailable, "STORE_BUSY", "store busy, retry", cause)
	if !errors.Is(err, cause) || !errors.Is(err, ErrUnavailable) {
		t.Fatal("errors.Is must see both the class and the cause")
	}
	if m := ToStatus(err).Message(); m != "store busy, retry" {
		t.Fatalf("caller sees %q", m)
	}
}

func TestInvalidArgumentNamesField(t *testing.T) {
	err := InvalidArgument("spec.workload.image", "must not be empty")
	st := ToStatus(err)
	if st.Code() != codes.InvalidArgument || st.Message() != "spec.workload.image: must not be empty" {
		t.Fatalf("status = %v %q", st.Code(), st.Message())
	}
	var found bool
	for _, d := range st.Details() {
		if br, ok := d.(*errdetails.BadRequest); ok && br.GetFieldViolations()[0].GetField() == "spec.workload.image" {
			found = true
		}
	}
	if !found {
		t.Fatal("no BadRequest field violation")
	}
	back := FromStatus(st.Err())
	if FieldOf(back) != "spec.workload.image" || !errors.Is(back, ErrInvalidArgument) {
		t.Fatalf("round trip: %v field=%q", back, FieldOf(back))
	}
}

func TestContextErrors(t *testing.T) {
	if c := ToStatus(fmt.Errorf("x: %w", context.Canceled)).Code(); c != codes.Canceled {
		t.Fatalf("canceled -> %v", c)
	}
	if c := ToStatus(context.DeadlineExceeded).Code(); c != codes.DeadlineExceeded {
		t.Fatalf("deadline -> %v", c)
	}
}

func TestGRPCStatusPassesThrough(t *testing.T) {
	err := status.Error(codes.Unavailable, "connection refused")
	if c := ToStatus(err).Code(); c != codes.Unavailable {
		t.Fatalf("code = %v", c)
	}
	if c := ToStatus(status.Error(codes.Unknown, "panic: x")).Code(); c != codes.Internal {
		t.Fatalf("unknown status must become internal, got %v", c)
	}
}

func TestInternalErrorCarriesTheRequestIDAndNothingElse(t *testing.T) {
	st := WithRequestID(ToStatus(errors.New("disk /var/lib/secret full")), "req-42")
	if st.Code() != codes.Internal || st.Message() != "internal error" {
		t.Fatalf("status = %v %q", st.Code(), st.Message())
	}
	err := st.Err()
	if got := RequestIDOf(err); got != "req-42" {
		t.Fatalf("request id = %q, want req-42", got)
	}
	for _, d := range st.Details() {
		switch d := d.(type) {
		case *errdetails.ErrorInfo:
			if d.GetReason() != "INTERNAL" || len(d.GetMetadata()) != 0 {
				t.Fatalf("error info leaks: %v", d)
			}
		case *errdetails.RequestInfo:
			if d.GetServingData() != "" {
				t.Fatalf("request info leaks: %v", d)
			}
		default:
			t.Fatalf("unexpected detail %T", d)
		}
	}
	if e := FromStatus(err); !errors.Is(e, ErrInternal) || ReasonOf(e) != "INTERNAL" {
		t.Fatalf("FromStatus = %v reason %q", e, ReasonOf(e))
	}
}

func TestWithRequestIDLeavesOKAndEmptyAlone(t *testing.T) {
	if st := WithRequestID(ToStatus(nil), "req-1"); st.Code() != codes.OK || len(st.Details()) != 0 {
		t.Fatalf("OK status got details: %v", st.Details())
	}
	st := ToStatus(NotFound("LEASE_NOT_FOUND", "no lease"))
	if got := WithRequestID(st, ""); len(got.Details()) != len(st.Details()) || RequestIDOf(got.Err()) != "" {
		t.Fatalf("empty id added a detail: %v", got.Details())
	}
	if RequestIDOf(errors.New("plain")) != "" || RequestIDOf(nil) != "" {
		t.Fatal("a non-status error has no request id")
	}
}

func TestToStatusForCarriesTheRequestIDOfEveryKindOfError(t *testing.T) {
	for _, err := range []error{
		InvalidArgument("spec.workload.image", "is required"),
		errors.New("internal detail"),
		context.Canceled,
		status.Error(codes.ResourceExhausted, "grpc: received message larger than max"),
	} {
		st := ToStatusFor(err, "req-9")
		if got := RequestIDOf(st.Err()); got != "req-9" {
			t.Errorf("%v: request id %q", err, got)
		}
		if st.Code() != ToStatus(err).Code() || st.Message() != ToStatus(err).Message() {
			t.Errorf("%v: %v %q differs from ToStatus", err, st.Code(), st.Message())
		}
	}
	if ToStatusFor(nil, "req-9").Code() != codes.OK {
		t.Fatal("nil is OK")
	}
}
