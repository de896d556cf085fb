package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.opentelemetry.io/otel/attribute"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/stats"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/fleet"
	"github.com/gpuaas/gpuaas/controlplane/lease"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/errs"
	"github.com/gpuaas/gpuaas/pkg/identity"
	"github.com/gpuaas/gpuaas/pkg/sanitize"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

// lockedBuffer is a log sink the server's goroutines may share.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// tracedOptions vary the traced server: untraced leaves the tracer out,
// trustParent adopts callers' traceparent, wrap replaces the lease
// service.
type tracedOptions struct {
	untraced, trustParent bool
	wrap                  func(leasev1.LeaseServiceServer) leasev1.LeaseServiceServer
}

type tracedServer struct {
	*server
	spans *tracetest.InMemoryExporter
	logs  *lockedBuffer
	ended *endedRPCs
}

// endedRPCs is a stats handler registered after the tracer's: once it
// sees a call end, the tracer has ended (and exported) the call's span.
type endedRPCs struct {
	mu    sync.Mutex
	count map[string]int
	cond  *sync.Cond
}

type methodKey struct{}

func newEndedRPCs() *endedRPCs {
	e := &endedRPCs{count: map[string]int{}}
	e.cond = sync.NewCond(&e.mu)
	return e
}

func (e *endedRPCs) TagRPC(ctx context.Context, info *stats.RPCTagInfo) context.Context {
	return context.WithValue(ctx, methodKey{}, info.FullMethodName)
}

func (e *endedRPCs) HandleRPC(ctx context.Context, s stats.RPCStats) {
	if _, ok := s.(*stats.End); !ok {
		return
	}
	m, _ := ctx.Value(methodKey{}).(string)
	e.mu.Lock()
	e.count[m]++
	e.mu.Unlock()
	e.cond.Broadcast()
}

func (e *endedRPCs) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context { return ctx }
func (e *endedRPCs) HandleConn(context.Context, stats.ConnStats)                       {}

func (e *endedRPCs) ended(method string) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.count[method]
}

// wait blocks until method has ended more than n times.
func (e *endedRPCs) wait(method string, n int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for e.count[method] <= n {
		e.cond.Wait()
	}
}

// startTracedServer runs the control plane edge as main wires it
// (Authorizer.ServerOptions, the sanitizing logger wrapped in
// CorrelatedHandler), with an in-memory span exporter.
func startTracedServer(t *testing.T, o tracedOptions) *tracedServer {
	t.Helper()
	dir := t.TempDir()
	pki, err := identity.WriteDevPKI(filepath.Join(dir, "pki"), identity.DevPKIOptions{TrustDomain: "gpuaas.test", Agents: []string{"node-a"}, Operators: []string{"alice"}})
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.OpenBolt(filepath.Join(dir, "state.db"), store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	logs := &lockedBuffer{}
	log := slog.New(CorrelatedHandler(sanitize.Logger(logs, slog.LevelDebug, true).Handler()))
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	leases := lease.New(lease.Options{Store: st, Logger: log})
	reg := fleet.New(st, log)
	leases.SetFleet(reg)
	relay := &LogRelay{}
	authz := Authorizer{TrustDomain: pki.TrustDomain, TrustTraceParent: o.trustParent}
	if !o.untraced {
		authz.Tracer = tp
	}
	opts := []grpc.ServerOption{grpc.Creds(identity.ServerCredentials(sourceFor(t, pki, pki.ControlPlane), identity.AuthorizeKinds(pki.TrustDomain, identity.PeerAgent, identity.PeerOperator)))}
	ended := newEndedRPCs()
	opts = append(append(opts, authz.ServerOptions(log)...), grpc.StatsHandler(ended))
	srv := grpc.NewServer(opts...)
	agentv1.RegisterAgentServiceServer(srv, &AgentServer{Fleet: reg, Leases: leases, Store: st, Log: log, HelloTimeout: time.Second, Logs: relay})
	var ls leasev1.LeaseServiceServer = &LeaseServer{Leases: leases, Store: st, Logs: relay, Log: log}
	if o.wrap != nil {
		ls = o.wrap(ls)
	}
	leasev1.RegisterLeaseServiceServer(srv, ls)
	nodev1.RegisterNodeServiceServer(srv, &NodeServer{Fleet: reg, Leases: leases})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	t.Cleanup(func() { srv.Stop(); st.Close() })
	return &tracedServer{
		server: &server{addr: lis.Addr().String(), pki: pki, st: st, td: pki.TrustDomain, leases: leases, logs: relay},
		spans:  exp, logs: logs, ended: ended,
	}
}

// tracedRPCs lists every RPC of the operator-facing services, from their
// registered descriptors, as "/pkg.Service/Method".
func tracedRPCs(t *testing.T) []string {
	t.Helper()
	var out []string
	for _, name := range []protoreflect.FullName{"gpuaas.lease.v1.LeaseService", "gpuaas.node.v1.NodeService"} {
		d, err := protoregistry.GlobalFiles.FindDescriptorByName(name)
		if err != nil {
			t.Fatalf("service %s is not registered: %v", name, err)
		}
		ms := d.(protoreflect.ServiceDescriptor).Methods()
		for i := 0; i < ms.Len(); i++ {
			out = append(out, fmt.Sprintf("/%s/%s", name, ms.Get(i).Name()))
		}
	}
	sort.Strings(out)
	return out
}

// traceCall makes one call of an RPC as the operator alice with the
// given context, and returns the response header and the call's error.
type traceCall func(ctx context.Context, conn *grpc.ClientConn, lease string) (metadata.MD, error)

// traceCalls has one call for every RPC of LeaseService and NodeService.
// A new RPC fails TestTraceGate until it gets one here.
var traceCalls = map[string]traceCall{
	leasev1.LeaseService_CreateLease_FullMethodName: func(ctx context.Context, conn *grpc.ClientConn, _ string) (metadata.MD, error) {
		var md metadata.MD
		_, err := leasev1.NewLeaseServiceClient(conn).CreateLease(ctx, createReq("trace"), grpc.Header(&md))
		return md, err
	},
	leasev1.LeaseService_GetLease_FullMethodName: func(ctx context.Context, conn *grpc.ClientConn, id string) (metadata.MD, error) {
		var md metadata.MD
		_, err := leasev1.NewLeaseServiceClient(conn).GetLease(ctx, &leasev1.GetLeaseRequest{Id: id}, grpc.Header(&md))
		return md, err
	},
	leasev1.LeaseService_ListLeases_FullMethodName: func(ctx context.Context, conn *grpc.ClientConn, _ string) (metadata.MD, error) {
		var md metadata.MD
		_, err := leasev1.NewLeaseServiceClient(conn).ListLeases(ctx, &leasev1.ListLeasesRequest{}, grpc.Header(&md))
		return md, err
	},
	leasev1.LeaseService_CancelLease_FullMethodName: func(ctx context.Context, conn *grpc.ClientConn, id string) (metadata.MD, error) {
		var md metadata.MD
		_, err := leasev1.NewLeaseServiceClient(conn).CancelLease(ctx, &leasev1.CancelLeaseRequest{Id: id, Reason: "trace"}, grpc.Header(&md))
		return md, err
	},
	leasev1.LeaseService_ExtendLease_FullMethodName: func(ctx context.Context, conn *grpc.ClientConn, id string) (metadata.MD, error) {
		var md metadata.MD
		_, err := leasev1.NewLeaseServiceClient(conn).ExtendLease(ctx, &leasev1.ExtendLeaseRequest{Id: id, ExtendBy: durationpb.New(time.Minute)}, grpc.Header(&md))
		return md, err
	},
	leasev1.LeaseService_WatchLeases_FullMethodName: func(ctx context.Context, conn *grpc.ClientConn, _ string) (metadata.MD, error) {
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		s, err := leasev1.NewLeaseServiceClient(conn).WatchLeases(ctx, &leasev1.WatchLeasesRequest{})
		if err != nil {
			return nil, err
		}
		md, err := s.Header()
		if err != nil {
			return md, err
		}
		_, err = s.Recv() // the existing lease; then the watch is ended
		return md, err
	},
	leasev1.LeaseService_GetLeaseLogs_FullMethodName: func(ctx context.Context, conn *grpc.ClientConn, id string) (metadata.MD, error) {
		s, err := leasev1.NewLeaseServiceClient(conn).GetLeaseLogs(ctx, &leasev1.GetLeaseLogsRequest{LeaseId: id})
		if err != nil {
			return nil, err
		}
		md, _ := s.Header()
		for {
			if _, err := s.Recv(); err != nil {
				if errors.Is(err, io.EOF) {
					return md, nil
				}
				return md, err
			}
		}
	},
	nodev1.NodeService_ListNodes_FullMethodName: func(ctx context.Context, conn *grpc.ClientConn, _ string) (metadata.MD, error) {
		var md metadata.MD
		_, err := nodev1.NewNodeServiceClient(conn).ListNodes(ctx, &nodev1.ListNodesRequest{}, grpc.Header(&md))
		return md, err
	},
	nodev1.NodeService_GetNode_FullMethodName: func(ctx context.Context, conn *grpc.ClientConn, _ string) (metadata.MD, error) {
		var md metadata.MD
		_, err := nodev1.NewNodeServiceClient(conn).GetNode(ctx, &nodev1.GetNodeRequest{Id: "node-a"}, grpc.Header(&md))
		return md, err
	},
	nodev1.NodeService_CordonNode_FullMethodName: func(ctx context.Context, conn *grpc.ClientConn, _ string) (metadata.MD, error) {
		var md metadata.MD
		_, err := nodev1.NewNodeServiceClient(conn).CordonNode(ctx, &nodev1.CordonNodeRequest{Id: "node-a", Reason: "trace"}, grpc.Header(&md))
		return md, err
	},
	nodev1.NodeService_UncordonNode_FullMethodName: func(ctx context.Context, conn *grpc.ClientConn, _ string) (metadata.MD, error) {
		var md metadata.MD
		_, err := nodev1.NewNodeServiceClient(conn).UncordonNode(ctx, &nodev1.UncordonNodeRequest{Id: "node-a", Reason: "trace"}, grpc.Header(&md))
		return md, err
	},
	nodev1.NodeService_DrainNode_FullMethodName: func(ctx context.Context, conn *grpc.ClientConn, _ string) (metadata.MD, error) {
		var md metadata.MD
		_, err := nodev1.NewNodeServiceClient(conn).DrainNode(ctx, &nodev1.DrainNodeRequest{Id: "node-a", Reason: "trace", Deadline: durationpb.New(time.Hour)}, grpc.Header(&md))
		return md, err
	},
	nodev1.NodeService_GetNodeAttestation_FullMethodName: func(ctx context.Context, conn *grpc.ClientConn, _ string) (metadata.MD, error) {
		var md metadata.MD
		_, err := nodev1.NewNodeServiceClient(conn).GetNodeAttestation(ctx, &nodev1.GetNodeAttestationRequest{Id: "node-a"}, grpc.Header(&md))
		return md, err
	},
	nodev1.NodeService_ListNodeAttestations_FullMethodName: func(ctx context.Context, conn *grpc.ClientConn, _ string) (metadata.MD, error) {
		var md metadata.MD
		_, err := nodev1.NewNodeServiceClient(conn).ListNodeAttestations(ctx, &nodev1.ListNodeAttestationsRequest{Id: "node-a"}, grpc.Header(&md))
		return md, err
	},
}

// spanOf returns the ended span of the call with the request id.
func spanOf(exp *tracetest.InMemoryExporter, reqID string) (tracetest.SpanStub, bool) {
	for _, s := range exp.GetSpans() {
		for _, a := range s.Attributes {
			if a.Key == AttrRequestID && a.Value.AsString() == reqID {
				return s, true
			}
		}
	}
	return tracetest.SpanStub{}, false
}

// callAndWait makes the call and waits until the server has ended it
// (the server ends the span after the caller already has the response).
func (s *tracedServer) callAndWait(method string, call func() (metadata.MD, error)) (metadata.MD, error) {
	n := s.ended.ended(method)
	md, err := call()
	s.ended.wait(method, n)
	return md, err
}

func attr(s tracetest.SpanStub, key attribute.Key) (attribute.Value, bool) {
	for _, a := range s.Attributes {
		if a.Key == key {
			return a.Value, true
		}
	}
	return attribute.Value{}, false
}

// checkTraced calls method once on s (after creating a lease to act on)
// and reports what of the tracing contract the call broke: a span named
// for the RPC with its rpc.method, caller and status code, the request id
// returned in the response header and, for a privileged RPC, an audit
// entry with the call's request id and the span's trace id.
func checkTraced(t *testing.T, s *tracedServer, method string, call traceCall, privileged bool) error {
	t.Helper()
	operator := s.pki.Operators["alice"]
	conn := s.dial(t, sourceFor(t, s.pki, operator))
	// The setup create is waited for too: were its span still open when
	// the call below counts the ended CreateLease calls, a CreateLease
	// under test would be taken as ended when the setup one ends.
	var r *leasev1.CreateLeaseResponse
	_, err := s.callAndWait(leasev1.LeaseService_CreateLease_FullMethodName, func() (metadata.MD, error) {
		var err error
		r, err = leasev1.NewLeaseServiceClient(conn).CreateLease(context.Background(), createReq("setup-"+method))
		return nil, err
	})
	if err != nil {
		return fmt.Errorf("setup: create lease: %w", err)
	}
	reqID := "trace-" + method[strings.LastIndex(method, "/")+1:]
	md, callErr := s.callAndWait(method, func() (metadata.MD, error) {
		return call(metadata.AppendToOutgoingContext(context.Background(), RequestIDHeader, reqID), conn, r.GetLease().GetId())
	})
	if got := md.Get(RequestIDHeader); len(got) != 1 || got[0] != reqID {
		return fmt.Errorf("%s returned request id header %q, want %q (call error: %v)", method, got, reqID, callErr)
	}
	span, ok := spanOf(s.spans, reqID)
	if !ok {
		return fmt.Errorf("%s produced no span with request id %s (call error: %v)", method, reqID, callErr)
	}
	name := strings.TrimPrefix(method, "/")
	if v, _ := attr(span, "rpc.method"); span.Name != name || v.AsString() != name {
		return fmt.Errorf("%s: span %q has rpc.method %q, want both %q", method, span.Name, v.AsString(), name)
	}
	if v, _ := attr(span, AttrCaller); v.AsString() != operator.ID.String() {
		return fmt.Errorf("%s: span caller %q, want %s", method, v.AsString(), operator.ID)
	}
	if _, ok := attr(span, AttrStatusCode); !ok {
		return fmt.Errorf("%s: span has no %s", method, AttrStatusCode)
	}
	if !privileged {
		return nil
	}
	es, err := audit.Search(context.Background(), s.st, audit.Filter{RequestID: reqID})
	if err != nil {
		return err
	}
	if len(es) == 0 {
		return fmt.Errorf("%s is privileged but no audit entry has its request id %s (call error: %v)", method, reqID, callErr)
	}
	want := span.SpanContext.TraceID().String()
	for _, e := range es {
		if e.TraceID != want {
			return fmt.Errorf("%s: audit entry %d (%s) has trace id %q, want the span's %s", method, e.Seq, e.Action, e.TraceID, want)
		}
	}
	return nil
}

// TestTraceGate is the trace gate (issue 10, item 7): every RPC of
// LeaseService and NodeService, enumerated from the proto descriptors,
// is called against the control plane edge as main wires it, and must
// produce a span named for it that carries its request id, caller and
// status; a privileged RPC's audit entries must carry the same request id
// and the span's trace id.
func TestTraceGate(t *testing.T) {
	privileged := map[string]bool{}
	for _, m := range privilegedRPCs() {
		privileged[m] = true
	}
	rpcs := tracedRPCs(t)
	if len(rpcs) < 9 {
		t.Fatalf("found %d RPCs in LeaseService and NodeService: the descriptors were not found, the gate checks nothing", len(rpcs))
	}
	s := startTracedServer(t, tracedOptions{})
	for _, m := range rpcs {
		t.Run(strings.TrimPrefix(m, "/"), func(t *testing.T) {
			call, ok := traceCalls[m]
			if !ok {
				t.Fatalf("%s has no call in traceCalls (controlplane/api/tracing_test.go): add one, so the trace gate can check its span", m)
			}
			if err := checkTraced(t, s, m, call, privileged[m]); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestTraceGateCatchesAnUntracedChain proves the gate fails for an edge
// without the tracer: calls still get request ids, but no span.
func TestTraceGateCatchesAnUntracedChain(t *testing.T) {
	s := startTracedServer(t, tracedOptions{untraced: true})
	m := leasev1.LeaseService_GetLease_FullMethodName
	err := checkTraced(t, s, m, traceCalls[m], false)
	if err == nil || !strings.Contains(err.Error(), "produced no span") {
		t.Fatalf("the gate passed an untraced RPC: %v", err)
	}
}

// uncorrelatedCreate is a lease service whose CreateLease writes its
// audit entry outside the call's correlation, as a handler would that
// built its entry without audit.FromContext.
type uncorrelatedCreate struct{ leasev1.LeaseServiceServer }

func (u uncorrelatedCreate) CreateLease(ctx context.Context, req *leasev1.CreateLeaseRequest) (*leasev1.CreateLeaseResponse, error) {
	return u.LeaseServiceServer.CreateLease(audit.NewContext(ctx, audit.Correlation{}), req)
}

// TestTraceGateCatchesAnUncorrelatedAuditEntry proves the gate fails for
// a privileged RPC whose audit entry lacks the span's trace id.
func TestTraceGateCatchesAnUncorrelatedAuditEntry(t *testing.T) {
	s := startTracedServer(t, tracedOptions{wrap: func(l leasev1.LeaseServiceServer) leasev1.LeaseServiceServer { return uncorrelatedCreate{l} }})
	m := leasev1.LeaseService_CreateLease_FullMethodName
	err := checkTraced(t, s, m, traceCalls[m], true)
	if err == nil || !strings.Contains(err.Error(), "has trace id \"\", want the span's") {
		t.Fatalf("the gate passed a privileged RPC whose audit entry lacks the trace id: %v", err)
	}
}

// TestRequestIDReachesErrorsAndLogs: a failed call's canonical error and
// its log line carry the request id the caller sent, and a call without
// one (or with a malformed one) gets a generated id, the same in the
// header and the error.
func TestRequestIDReachesErrorsAndLogs(t *testing.T) {
	s := startTracedServer(t, tracedOptions{})
	lc := leasev1.NewLeaseServiceClient(s.dial(t, sourceFor(t, s.pki, s.pki.Operators["alice"])))
	for _, c := range []struct {
		name, sent string
		kept       bool
	}{
		{"well-formed id is kept", "req-7f3a:9", true},
		{"no id gets one", "", false},
		{"id with a space is replaced", "evil id", false},
		{"id forging a log field is replaced", `x" level=ERROR`, false},
		{"overlong id is replaced", strings.Repeat("a", MaxRequestIDLen+1), false},
	} {
		t.Run(c.name, func(t *testing.T) {
			ctx := context.Background()
			if c.sent != "" {
				ctx = metadata.AppendToOutgoingContext(ctx, RequestIDHeader, c.sent)
			}
			md, err := s.callAndWait(leasev1.LeaseService_GetLease_FullMethodName, func() (metadata.MD, error) {
				var md metadata.MD
				_, err := lc.GetLease(ctx, &leasev1.GetLeaseRequest{Id: "l-aaaaaaaaaaaaaaaaaaaa"}, grpc.Header(&md))
				return md, err
			})
			if errs.Code(err) != codes.NotFound {
				t.Fatalf("err = %v, want NotFound", err)
			}
			id := errs.RequestIDOf(err)
			if h := md.Get(RequestIDHeader); len(h) != 1 || h[0] != id || !ValidRequestID(id) {
				t.Fatalf("header %q, error request id %q: want one valid id in both", h, id)
			}
			if c.kept != (id == c.sent) {
				t.Fatalf("sent %q, got %q (kept=%v)", c.sent, id, c.kept)
			}
			span, ok := spanOf(s.spans, id)
			if !ok {
				t.Fatalf("no span with request id %s", id)
			}
			if v, _ := attr(span, AttrReason); v.AsString() != "LEASE_NOT_FOUND" {
				t.Fatalf("span reason %q, want LEASE_NOT_FOUND", v.AsString())
			}
			line := logLine(t, s.logs.String(), id)
			if line["msg"] != "rpc failed" || line["trace_id"] != span.SpanContext.TraceID().String() {
				t.Fatalf("log line %v: want the failed call with trace id %s", line, span.SpanContext.TraceID())
			}
		})
	}
}

// logLine returns the JSON log line with the request id.
func logLine(t *testing.T, logs, reqID string) map[string]any {
	t.Helper()
	for _, l := range strings.Split(logs, "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(l), &m) == nil && m["request_id"] == reqID {
			return m
		}
	}
	t.Fatalf("no log line with request id %s in:\n%s", reqID, logs)
	return nil
}

// TestRefusedCallsAreTracedWithTheirRequestID: a call refused before any
// handler (no credentials) still has a span with its request id. Its
// error is the prebuilt refusal (the cheapest answer to a flood): the
// request id reaches the caller in the response header only.
func TestRefusedCallsAreTracedWithTheirRequestID(t *testing.T) {
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	ctx, span := tp.Tracer("test").Start(noPeer(), "gpuaas.lease.v1.LeaseService/GetLease")
	ctx = metadata.NewIncomingContext(ctx, metadata.Pairs(RequestIDHeader, "refused-1"))
	a := Authorizer{TrustDomain: spiffeid.RequireTrustDomainFromString("gpuaas.test")}
	_, err := a.Unary(slog.New(slog.DiscardHandler))(ctx, &leasev1.GetLeaseRequest{}, &grpc.UnaryServerInfo{FullMethod: leasev1.LeaseService_GetLease_FullMethodName},
		func(context.Context, any) (any, error) { t.Fatal("handler reached"); return nil, nil })
	span.End()
	if errs.Code(err) != codes.Unauthenticated || errs.ReasonOf(errs.FromStatus(err)) != "NO_CREDENTIALS" {
		t.Fatalf("err = %v (reason %q)", err, errs.ReasonOf(err))
	}
	got, ok := spanOf(exp, "refused-1")
	if !ok {
		t.Fatal("refused call has no span")
	}
	if v, _ := attr(got, AttrReason); v.AsString() != "NO_CREDENTIALS" {
		t.Fatalf("span reason %q", v.AsString())
	}
	if v, _ := attr(got, AttrStatusCode); v.AsInt64() != int64(codes.Unauthenticated) {
		t.Fatalf("span code %v", v)
	}
}

func TestTracingConfigValidate(t *testing.T) {
	for _, c := range []struct {
		cfg  TracingConfig
		want string
	}{
		{TracingConfig{}, ""},
		{TracingConfig{Exporter: ExporterNone, SampleRatio: 0.5}, ""},
		{TracingConfig{Exporter: ExporterOTLP, Endpoint: "localhost:4317", Insecure: true}, ""},
		{TracingConfig{Exporter: ExporterOTLP}, "needs an endpoint"},
		{TracingConfig{Exporter: "jaeger"}, `exporter "jaeger" is not one of none, otlp`},
		{TracingConfig{SampleRatio: 1.5}, "not in [0, 1]"},
	} {
		err := c.cfg.Validate()
		if (c.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), c.want)) {
			t.Errorf("%+v: err = %v, want %q", c.cfg, err, c.want)
		}
	}
}

func TestNewTracerProviderGivesEveryCallATraceID(t *testing.T) {
	tp, err := NewTracerProvider(context.Background(), TracingConfig{}, "gpuaas-controlplane")
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Shutdown(context.Background())
	_, span := tp.Tracer("test").Start(context.Background(), "x")
	defer span.End()
	if !span.SpanContext().HasTraceID() || !span.SpanContext().HasSpanID() {
		t.Fatal("exporter none: spans must still have trace and span ids")
	}
	if span.IsRecording() {
		t.Fatal("exporter none: spans are recorded though nothing reads them")
	}
	if _, err := NewTracerProvider(context.Background(), TracingConfig{Exporter: "zipkin"}, "x"); err == nil {
		t.Fatal("unknown exporter accepted")
	}
}

// FuzzValidRequestID: an accepted request id is bounded, plain ASCII
// without spaces or separators that could forge a log line, and beginCall
// keeps exactly the accepted ones.
func FuzzValidRequestID(f *testing.F) {
	for _, s := range []string{"", "req-1", "a b", "a\nb", "ünï", strings.Repeat("x", 64), strings.Repeat("x", 65), "a=b", `"q"`, "trace-CreateLease", "0af7651916cd43dd8448eb211c80319c"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ok := ValidRequestID(s)
		if ok && (len(s) > MaxRequestIDLen || strings.ContainsAny(s, " \t\r\n\"'=\\{}") || strings.IndexFunc(s, func(r rune) bool { return r > 0x7e || r < 0x21 }) >= 0) {
			t.Fatalf("accepted %q", s)
		}
		ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs(RequestIDHeader, s))
		var header string
		got := RequestIDFrom(beginCall(ctx, func(id string) { header = id }))
		if ok != (got == s) || !ValidRequestID(got) || header != got {
			t.Fatalf("sent %q (valid=%v), call id %q, header %q", s, ok, got, header)
		}
	})
}

// TestCallersCannotChooseTheTraceID: a caller's traceparent is linked to
// the call's span, which starts a new trace, so the trace id in audit
// entries is the server's; with TrustTraceParent the span joins the
// caller's trace.
func TestCallersCannotChooseTheTraceID(t *testing.T) {
	const sentTrace = "4bf92f3577b34da6a3ce929d0e0e4736"
	for _, trust := range []bool{false, true} {
		t.Run(fmt.Sprintf("trust=%v", trust), func(t *testing.T) {
			s := startTracedServer(t, tracedOptions{trustParent: trust})
			lc := leasev1.NewLeaseServiceClient(s.dial(t, sourceFor(t, s.pki, s.pki.Operators["alice"])))
			ctx := metadata.AppendToOutgoingContext(context.Background(), RequestIDHeader, "traceparent-test",
				"traceparent", "00-"+sentTrace+"-00f067aa0ba902b7-01")
			if _, err := s.callAndWait(leasev1.LeaseService_CreateLease_FullMethodName, func() (metadata.MD, error) {
				_, err := lc.CreateLease(ctx, createReq("traceparent"))
				return nil, err
			}); err != nil {
				t.Fatal(err)
			}
			span, ok := spanOf(s.spans, "traceparent-test")
			if !ok {
				t.Fatal("no span")
			}
			es, err := audit.Search(context.Background(), s.st, audit.Filter{RequestID: "traceparent-test"})
			if err != nil || len(es) != 1 || es[0].TraceID != span.SpanContext.TraceID().String() {
				t.Fatalf("audit entries %+v (%v): want one with the span's trace id", es, err)
			}
			joined := span.SpanContext.TraceID().String() == sentTrace
			if joined != trust {
				t.Fatalf("span trace id %s, caller's %s: joined=%v with trust=%v", span.SpanContext.TraceID(), sentTrace, joined, trust)
			}
			if !trust && (len(span.Links) != 1 || span.Links[0].SpanContext.TraceID().String() != sentTrace) {
				t.Fatalf("the caller's trace is not linked: %+v", span.Links)
			}
		})
	}
}

// TestConcurrentCallsKeepTheirOwnRequestIDs: many calls at once each read
// their own request id header (through the stats handler's copy of the
// headers) and get it back in their own response header and error: the
// recycled header maps never mix two calls' ids.
func TestConcurrentCallsKeepTheirOwnRequestIDs(t *testing.T) {
	s := startTracedServer(t, tracedOptions{})
	lc := leasev1.NewLeaseServiceClient(s.dial(t, sourceFor(t, s.pki, s.pki.Operators["alice"])))
	var wg sync.WaitGroup
	for w := range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 20 {
				sent := fmt.Sprintf("req-%d-%d", w, i)
				if i%2 == 1 {
					sent = "" // the server makes one
				}
				ctx := context.Background()
				if sent != "" {
					ctx = metadata.AppendToOutgoingContext(ctx, RequestIDHeader, sent)
				}
				var md metadata.MD
				_, err := lc.GetLease(ctx, &leasev1.GetLeaseRequest{Id: "l-aaaaaaaaaaaaaaaaaaaa"}, grpc.Header(&md))
				if errs.Code(err) != codes.NotFound {
					t.Errorf("err = %v, want NotFound", err)
					return
				}
				id := errs.RequestIDOf(err)
				if h := md.Get(RequestIDHeader); len(h) != 1 || h[0] != id || (sent != "" && id != sent) || !ValidRequestID(id) {
					t.Errorf("sent %q: header %q, error request id %q", sent, h, id)
					return
				}
			}
		}()
	}
	wg.Wait()
}
