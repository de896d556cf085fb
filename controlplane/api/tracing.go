package api

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"

	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	"github.com/gpuaas/gpuaas/controlplane/audit"
)

// Request ids. Every call has exactly one: the caller's, if it sent a
// well-formed RequestIDHeader, otherwise a generated one. It is returned
// in the response header of the same name, and it is in the call's span,
// its log lines (CorrelatedHandler), its error (errs.WithRequestID) and
// every audit entry written while serving it (audit.FromContext).
const (
	RequestIDHeader = "x-request-id"
	// MaxRequestIDLen bounds a caller's request id; a longer one is
	// replaced, not truncated, so an id never names two calls by accident.
	MaxRequestIDLen = 64
)

// Span attributes the edge adds to the span of every call, besides the
// rpc.* attributes of otelgrpc (rpc.method, rpc.response.status_code).
const (
	AttrRequestID = "gpuaas.request_id"
	// AttrCaller is the verified identity: a SPIFFE ID or "token:" plus
	// the token's subject; never a credential.
	AttrCaller = "gpuaas.caller"
	// AttrStatusCode is the canonical gRPC code of the call's outcome.
	AttrStatusCode = "rpc.grpc.status_code"
	// AttrReason is the stable reason of a canonical error.
	AttrReason = "gpuaas.error.reason"
)

// ValidRequestID reports whether a caller's request id may be used as
// is: 1 to MaxRequestIDLen characters of [A-Za-z0-9._:-]. Anything else
// (spaces, quotes, control characters, non-ASCII) could forge log
// structure or hide in an audit entry, so it is replaced.
func ValidRequestID(id string) bool {
	if len(id) == 0 || len(id) > MaxRequestIDLen {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_', c == '.', c == ':':
		default:
			return false
		}
	}
	return true
}

// newRequestID returns 128 random bits in hex.
func newRequestID() string {
	// A random per-process prefix and a counter: unique across processes
	// and restarts without a crypto/rand read per call (an unauthenticated
	// flood gets ids too). Request ids correlate; they are not secrets.
	var b [16]byte
	copy(b[:8], requestIDPrefix[:])
	binary.BigEndian.PutUint64(b[8:], requestIDCounter.Add(1))
	return hex.EncodeToString(b[:])
}

var (
	requestIDPrefix = func() (p [8]byte) {
		_, _ = rand.Read(p[:]) // crypto/rand.Read never fails (Go 1.24+)
		return p
	}()
	requestIDCounter atomic.Uint64
)

// incomingRequestID is the caller's request id if it sent exactly one
// well-formed value.
func incomingRequestID(ctx context.Context) (string, bool) {
	return requestIDOf(incomingHeader(ctx, RequestIDHeader))
}

// requestIDOf is the request id in the header values v, if exactly one
// well-formed value.
func requestIDOf(v []string) (string, bool) {
	if len(v) != 1 || !ValidRequestID(v[0]) {
		return "", false
	}
	return v[0], true
}

// RequestIDFrom returns the request id of the call ctx serves, "" outside
// a call.
func RequestIDFrom(ctx context.Context) string {
	return audit.CorrelationFrom(ctx).RequestID
}

// beginCall gives the call its request id, once: it returns the id to
// the caller through setHeader, adds it to the call's span, and puts it
// with the span's trace id in the context for logs and audit entries.
func beginCall(ctx context.Context, setHeader func(id string)) context.Context {
	// The call's mark (TagRPC), looked up once, holds the correlation
	// and the headers if the call has one.
	m := markOf(ctx)
	if m != nil && m.corr.RequestID != "" || m == nil && RequestIDFrom(ctx) != "" {
		return ctx
	}
	id, ok := requestIDOf(m.headerValues(ctx, RequestIDHeader))
	if !ok {
		id = newRequestID()
	}
	setHeader(id)
	span := trace.SpanFromContext(ctx)
	c := audit.Correlation{RequestID: id}
	if span.IsRecording() {
		span.SetAttributes(attribute.String(AttrRequestID, id))
	}
	if sc := span.SpanContext(); sc.HasTraceID() {
		c.TraceID = sc.TraceID().String()
	}
	if m != nil {
		m.SetCorrelation(c) // no new context to allocate
		return ctx
	}
	return audit.NewContext(ctx, c)
}

// endCall records the call's caller and canonical outcome on its span.
func endCall(ctx context.Context, who string, code codes.Code, reason string) {
	span := trace.SpanFromContext(ctx)
	if !span.IsRecording() {
		return
	}
	attrs := make([]attribute.KeyValue, 0, 3)
	attrs = append(attrs, attribute.Int(AttrStatusCode, int(code)))
	if who != "" {
		attrs = append(attrs, attribute.String(AttrCaller, who))
	}
	if reason != "" {
		attrs = append(attrs, attribute.String(AttrReason, reason))
	}
	span.SetAttributes(attrs...)
}

// CorrelatedHandler wraps a slog handler (the sanitizing one) so every
// record logged with the context of a call carries the call's request_id
// and trace_id.
func CorrelatedHandler(h slog.Handler) slog.Handler { return correlatedHandler{h} }

type correlatedHandler struct{ slog.Handler }

func (h correlatedHandler) Handle(ctx context.Context, r slog.Record) error {
	if c := audit.CorrelationFrom(ctx); c.RequestID != "" {
		r = r.Clone()
		r.AddAttrs(slog.String("request_id", c.RequestID))
		if c.TraceID != "" {
			r.AddAttrs(slog.String("trace_id", c.TraceID))
		}
	}
	return h.Handler.Handle(ctx, r)
}

func (h correlatedHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return correlatedHandler{h.Handler.WithAttrs(as)}
}

func (h correlatedHandler) WithGroup(name string) slog.Handler {
	return correlatedHandler{h.Handler.WithGroup(name)}
}

// Trace exporters.
const (
	ExporterNone = "none"
	ExporterOTLP = "otlp"
)

// TracingConfig configures the control plane's traces (the "tracing"
// section of its configuration file).
type TracingConfig struct {
	// Exporter is where finished spans go: "none" (the default: spans
	// still give every call a trace id for logs and audit entries, and
	// are dropped) or "otlp" (OTLP over gRPC to Endpoint).
	Exporter string `yaml:"exporter"`
	// Endpoint is the OTLP collector's host:port.
	Endpoint string `yaml:"endpoint"`
	// Insecure sends OTLP without TLS (a collector on localhost).
	Insecure bool `yaml:"insecure"`
	// SampleRatio is the fraction of new traces exported, in (0, 1];
	// 0 means 1. A sampled-out call still has a trace id.
	SampleRatio float64 `yaml:"sample_ratio"`
	// TrustTraceParent adopts callers' W3C traceparent (Authorizer's
	// field of the same name); off by default.
	TrustTraceParent bool `yaml:"trust_traceparent"`
}

// Validate says what is wrong with c.
func (c TracingConfig) Validate() error {
	switch c.Exporter {
	case "", ExporterNone:
	case ExporterOTLP:
		if c.Endpoint == "" {
			return errors.New("tracing: exporter otlp needs an endpoint (host:port)")
		}
	default:
		return fmt.Errorf("tracing: exporter %q is not one of none, otlp", c.Exporter)
	}
	if c.SampleRatio < 0 || c.SampleRatio > 1 {
		return fmt.Errorf("tracing: sample ratio %v is not in [0, 1]", c.SampleRatio)
	}
	return nil
}

// NewTracerProvider returns the SDK tracer provider of the service named
// service, exporting as c says. Shut it down on exit so the last spans
// are flushed.
func NewTracerProvider(ctx context.Context, c TracingConfig, service string) (*sdktrace.TracerProvider, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	ratio := c.SampleRatio
	if ratio == 0 {
		ratio = 1
	}
	// With no exporter nothing reads a span's contents: spans are not
	// recorded (no attributes, events or timing kept), but each still has
	// a trace id and span id for logs and audit entries.
	sampler := sdktrace.NeverSample()
	if c.Exporter == ExporterOTLP {
		sampler = sdktrace.ParentBased(sdktrace.TraceIDRatioBased(ratio))
	}
	opts := []sdktrace.TracerProviderOption{
		sdktrace.WithResource(resource.NewSchemaless(attribute.String("service.name", service))),
		sdktrace.WithSampler(sampler),
	}
	if c.Exporter == ExporterOTLP {
		eo := []otlptracegrpc.Option{otlptracegrpc.WithEndpoint(c.Endpoint)}
		if c.Insecure {
			eo = append(eo, otlptracegrpc.WithInsecure())
		}
		exp, err := otlptracegrpc.New(ctx, eo...)
		if err != nil {
			return nil, fmt.Errorf("tracing: otlp exporter for %s: %w", c.Endpoint, err)
		}
		opts = append(opts, sdktrace.WithBatcher(exp))
	}
	return sdktrace.NewTracerProvider(opts...), nil
}

// tracingOption is the stats handler that starts a span for every call
// before any interceptor runs, so refused calls have one too. A caller's
// traceparent is linked, not adopted, unless trustParent: callers are
// outside the trust boundary and must not choose the trace id that audit
// entries record.
func tracingOption(tp trace.TracerProvider, trustParent bool) grpc.ServerOption {
	opts := []otelgrpc.Option{
		otelgrpc.WithTracerProvider(tp),
		otelgrpc.WithPropagators(propagation.TraceContext{}),
		otelgrpc.WithMeterProvider(noop.NewMeterProvider()),
	}
	if !trustParent {
		opts = append(opts, otelgrpc.WithPublicEndpoint())
	}
	return grpc.StatsHandler(otelgrpc.NewServerHandler(opts...))
}
