// Package errs is the one place where causes become gRPC status codes.
//
// Errors are classes (sentinels) that map 1:1 onto gRPC codes, as in
// containerd's errdefs. A *Error carries a class, a stable machine-readable
// reason, an optional request field, and a message that is safe to show to
// the caller. Anything that is not an *Error is internal: the caller sees
// "internal error" and nothing of its text. Contract 5 of DESIGN.md.
package errs

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/protoadapt"
)

// Domain is the ErrorInfo domain of every error this project returns.
const Domain = "gpuaas.dev"

// Classes. Test with errors.Is.
var (
	ErrInvalidArgument    = errors.New("invalid argument")
	ErrNotFound           = errors.New("not found")
	ErrAlreadyExists      = errors.New("already exists")
	ErrPermissionDenied   = errors.New("permission denied")
	ErrUnauthenticated    = errors.New("unauthenticated")
	ErrFailedPrecondition = errors.New("failed precondition")
	ErrResourceExhausted  = errors.New("resource exhausted")
	ErrUnavailable        = errors.New("unavailable")
	ErrAborted            = errors.New("aborted")
	ErrDeadlineExceeded   = errors.New("deadline exceeded")
	ErrCanceled           = errors.New("canceled")
	ErrInternal           = errors.New("internal")
)

var classCodes = []struct {
	class error
	code  codes.Code
}{
	{ErrInvalidArgument, codes.InvalidArgument},
	{ErrNotFound, codes.NotFound},
	{ErrAlreadyExists, codes.AlreadyExists},
	{ErrPermissionDenied, codes.PermissionDenied},
	{ErrUnauthenticated, codes.Unauthenticated},
	{ErrFailedPrecondition, codes.FailedPrecondition},
	{ErrResourceExhausted, codes.ResourceExhausted},
	{ErrUnavailable, codes.Unavailable},
	{ErrAborted, codes.Aborted},
	{ErrDeadlineExceeded, codes.DeadlineExceeded},
	{ErrCanceled, codes.Canceled},
	{ErrInternal, codes.Internal},
}

// Error is an error that is safe to show to the caller.
type Error struct {
	Class   error  // one of the classes above
	Reason  string // stable UPPER_SNAKE_CASE reason, e.g. "LEASE_NOT_FOUND"
	Field   string // the request field at fault, if any (e.g. "spec.workload.image")
	Message string // safe for the caller; lower case, no trailing period
	cause   error  // never shown to the caller
}

func (e *Error) Error() string {
	msg := e.Message
	if e.Field != "" {
		msg = e.Field + ": " + msg
	}
	if e.cause != nil {
		return msg + ": " + e.cause.Error()
	}
	return msg
}

// Is makes errors.Is(err, ErrX) true for the error's class.
func (e *Error) Is(target error) bool { return target == e.Class }

// Unwrap exposes the internal cause to errors.Is/As on the server side.
func (e *Error) Unwrap() error { return e.cause }

// New returns a caller-safe error of the class.
func New(class error, reason, message string) *Error {
	return &Error{Class: class, Reason: reason, Message: message}
}

// Wrap returns a caller-safe error of the class that keeps cause for logs
// and errors.Is; the cause's text is never sent to the caller.
func Wrap(class error, reason, message string, cause error) *Error {
	return &Error{Class: class, Reason: reason, Message: message, cause: cause}
}

// InvalidArgument names the offending request field.
func InvalidArgument(field, format string, args ...any) *Error {
	return &Error{Class: ErrInvalidArgument, Reason: "INVALID_ARGUMENT", Field: field, Message: fmt.Sprintf(format, args...)}
}

// NotFound says the named resource does not exist.
func NotFound(reason, format string, args ...any) *Error {
	return &Error{Class: ErrNotFound, Reason: reason, Message: fmt.Sprintf(format, args...)}
}

// AlreadyExists says the resource (or key) is taken.
func AlreadyExists(reason, field, format string, args ...any) *Error {
	return &Error{Class: ErrAlreadyExists, Reason: reason, Field: field, Message: fmt.Sprintf(format, args...)}
}

// PermissionDenied says the caller may not do this.
func PermissionDenied(reason, format string, args ...any) *Error {
	return &Error{Class: ErrPermissionDenied, Reason: reason, Message: fmt.Sprintf(format, args...)}
}

// FailedPrecondition says the system is not in a state that allows this.
func FailedPrecondition(reason, format string, args ...any) *Error {
	return &Error{Class: ErrFailedPrecondition, Reason: reason, Message: fmt.Sprintf(format, args...)}
}

// ResourceExhausted says there is no capacity (or quota) for this.
func ResourceExhausted(reason, format string, args ...any) *Error {
	return &Error{Class: ErrResourceExhausted, Reason: reason, Message: fmt.Sprintf(format, args...)}
}

// Code is the gRPC code for err.
func Code(err error) codes.Code {
	if err == nil {
		return codes.OK
	}
	if errors.Is(err, context.Canceled) {
		return codes.Canceled
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return codes.DeadlineExceeded
	}
	var e *Error
	if errors.As(err, &e) {
		for _, cc := range classCodes {
			if e.Class == cc.class {
				return cc.code
			}
		}
	}
	if s, ok := status.FromError(err); ok {
		return s.Code()
	}
	return codes.Internal
}

// ToStatus converts err into the status sent to a caller. Only *Error
// content crosses the boundary; everything else becomes "internal error".
func ToStatus(err error) *status.Status { return ToStatusFor(err, "") }

// ToStatusFor is ToStatus for the call with the request id: the status
// also carries the id, as WithRequestID adds it.
func ToStatusFor(err error, requestID string) *status.Status {
	if err == nil {
		return status.New(codes.OK, "")
	}
	var e *Error
	if !errors.As(err, &e) {
		switch Code(err) {
		case codes.Canceled:
			return WithRequestID(status.New(codes.Canceled, "request canceled"), requestID)
		case codes.DeadlineExceeded:
			return WithRequestID(status.New(codes.DeadlineExceeded, "deadline exceeded"), requestID)
		}
		if s, ok := status.FromError(err); ok && s.Code() != codes.Unknown && s.Code() != codes.Internal {
			// Already a status made by a trusted layer (grpc itself).
			return WithRequestID(s, requestID)
		}
		e = &Error{Class: ErrInternal, Reason: "INTERNAL", Message: "internal error"}
	}
	msg := e.Message
	if e.Field != "" {
		msg = e.Field + ": " + msg
	}
	st := status.New(Code(e), msg)
	details := []protoadapt.MessageV1{&errdetails.ErrorInfo{Reason: e.Reason, Domain: Domain}}
	if e.Field != "" && e.Class == ErrInvalidArgument {
		details = append(details, &errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{{Field: e.Field, Description: e.Message}}})
	}
	if requestID != "" {
		details = append(details, &errdetails.RequestInfo{RequestId: requestID})
	}
	if withDetails, derr := st.WithDetails(details...); derr == nil {
		return withDetails
	}
	return st
}

// FromStatus turns an error from a gRPC call back into an *Error with its
// class, reason and field, so clients can use errors.Is on it.
func FromStatus(err error) error {
	if err == nil {
		return nil
	}
	s, ok := status.FromError(err)
	if !ok {
		return err
	}
	e := &Error{Class: ErrInternal, Reason: "", Message: s.Message()}
	for _, cc := range classCodes {
		if cc.code == s.Code() {
			e.Class = cc.class
		}
	}
	if s.Code() == codes.Unknown {
		e.Class = ErrInternal
	}
	for _, d := range s.Details() {
		switch d := d.(type) {
		case *errdetails.ErrorInfo:
			e.Reason = d.GetReason()
		case *errdetails.BadRequest:
			if v := d.GetFieldViolations(); len(v) > 0 {
				e.Field = v[0].GetField()
				e.Message = v[0].GetDescription()
			}
		}
	}
	return e
}

// ReasonOf returns the stable reason of err, or "" if it has none.
func ReasonOf(err error) string {
	var e *Error
	if errors.As(err, &e) {
		return e.Reason
	}
	return ""
}

// FieldOf returns the request field of err, or "" if it names none.
func FieldOf(err error) string {
	var e *Error
	if errors.As(err, &e) {
		return e.Field
	}
	return ""
}

// ErrUnimplemented: the request is valid but this version cannot serve it.
var ErrUnimplemented = errors.New("unimplemented")

func init() {
	classCodes = append(classCodes, struct {
		class error
		code  codes.Code
	}{ErrUnimplemented, codes.Unimplemented})
}

// WithRequestID returns st with the request id of its call attached as a
// RequestInfo detail, so a caller can quote the id that names the call in
// the server's logs, traces and audit entries. An OK status, or an empty
// id, is returned unchanged. An internal error thereby carries the request
// id and nothing else.
func WithRequestID(st *status.Status, requestID string) *status.Status {
	if requestID == "" || st.Code() == codes.OK {
		return st
	}
	withID, err := st.WithDetails(&errdetails.RequestInfo{RequestId: requestID})
	if err != nil {
		return st
	}
	return withID
}

// RequestIDOf returns the request id an error from a gRPC call carries
// (see WithRequestID), or "" if it carries none.
func RequestIDOf(err error) string {
	s, ok := status.FromError(err)
	if !ok {
		return ""
	}
	for _, d := range s.Details() {
		if ri, ok := d.(*errdetails.RequestInfo); ok {
			return ri.GetRequestId()
		}
	}
	return ""
}
