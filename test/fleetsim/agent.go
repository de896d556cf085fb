package fleetsim

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sort"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/gpuaas/gpuaas/agent/gpu/sim"
	"github.com/gpuaas/gpuaas/agent/partition"
	"github.com/gpuaas/gpuaas/pkg/attestation"
	"github.com/gpuaas/gpuaas/pkg/endpoint"
	agentv1 "github.com/gpuaas/gpuaas/proto/gpuaas/agent/v1"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

// driverVersion is the simulated GPUs' driver (agent/gpu/sim's default).
const driverVersion = sim.DefaultDriverVersion

// Agent is one simulated agent: one mTLS connection and one session.
type Agent struct {
	Node string

	f        *Fleet
	svid     *x509svid.SVID
	id       spiffeid.ID
	inv      *nodev1.Inventory
	bootID   string
	telemKey *attestation.TelemetryKey

	conn   *grpc.ClientConn
	cancel context.CancelFunc

	rawMu sync.Mutex
	raw   net.Conn // the TCP connection under the session

	// ready is closed on the first desired state; done when the session
	// has ended (err says why).
	ready, done chan struct{}
	readyOnce   sync.Once
	err         error

	mu            sync.Mutex
	leases        map[string]*leasev1.Lease // the desired set
	generation    uint64
	lastHeartbeat time.Time
	// lastContact is when the agent last sent what renews its liveness at
	// the control plane: a heartbeat or an observed state.
	lastContact time.Time
	attested    bool
	killed      bool
}

// inventory is a simulated host's inventory: the GPUs of models, MIG on,
// with identifiers derived from the node name.
func inventory(ctx context.Context, node string, models []string) (*nodev1.Inventory, error) {
	cfg := sim.Config{HostID: node}
	for _, m := range models {
		cfg.GPUs = append(cfg.GPUs, sim.GPUConfig{Model: m, MIGEnabled: true})
	}
	s, err := sim.New(cfg)
	if err != nil {
		return nil, err
	}
	return partition.Inventory(ctx, s)
}

// start dials the control plane, opens the session with a Hello and waits
// for the first desired state.
func (a *Agent) start(ctx context.Context) error {
	sctx, cancel := context.WithCancel(context.Background())
	a.cancel = cancel
	go a.run(sctx)
	select {
	case <-a.ready:
		return nil
	case <-a.done:
		return fmt.Errorf("agent %s: session ended before its desired state: %w", a.Node, a.err)
	case <-ctx.Done():
		a.stop()
		return fmt.Errorf("agent %s: %w", a.Node, ctx.Err())
	}
}

func (a *Agent) setRaw(c net.Conn) {
	a.rawMu.Lock()
	a.raw = c
	a.rawMu.Unlock()
}

// run holds the agent's session, as the real agent does: a session that
// ends (the control plane ended it, declared the node down, or the
// connection broke) is opened again after a short, jittered backoff. Before
// the first desired state, maxStartAttempts failures end the agent.
func (a *Agent) run(ctx context.Context) {
	defer close(a.done)
	defer func() {
		if a.conn != nil {
			_ = a.conn.Close()
		}
	}()
	dial := func(ctx context.Context, addr string) (net.Conn, error) {
		c, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
		if err == nil {
			a.setRaw(c)
		}
		return c, err
	}
	addrs, err := endpoint.Parse(a.f.o.Addr)
	if err != nil {
		a.err = err
		return
	}
	target, opts := endpoint.Target(addrs)
	a.conn, err = grpc.NewClient(target, append(opts,
		grpc.WithTransportCredentials(a.f.creds(a.svid)),
		grpc.WithContextDialer(dial),
		// Small buffers: the simulator holds thousands of connections.
		grpc.WithReadBufferSize(8<<10), grpc.WithWriteBufferSize(8<<10),
		grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(64<<10))...)
	if err != nil {
		a.err = fmt.Errorf("dial: %w", err)
		return
	}
	for attempt := 1; ; attempt++ {
		err := a.session(ctx)
		a.mu.Lock()
		stopped := a.killed || ctx.Err() != nil
		a.mu.Unlock()
		if stopped {
			return
		}
		if err == nil {
			err = errors.New("session ended")
		}
		a.f.sessionEnded(a, err)
		select {
		case <-a.ready:
		default:
			if attempt >= maxStartAttempts {
				a.err = err
				return
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Second/2 + time.Duration(rand.Int64N(int64(time.Second)))):
		}
	}
}

// maxStartAttempts bounds the sessions an agent opens before its first
// desired state.
const maxStartAttempts = 3

func (a *Agent) session(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // ends the receiver
	stream, err := agentv1.NewAgentServiceClient(a.conn).Session(ctx, grpc.WaitForReady(true))
	if err != nil {
		return fmt.Errorf("open session: %w", err)
	}
	if err := stream.Send(&agentv1.SessionRequest{Msg: &agentv1.SessionRequest_Hello{Hello: &agentv1.Hello{
		NodeId: a.Node, AgentVersion: "fleetsim", Inventory: a.inv}}}); err != nil {
		return fmt.Errorf("send hello: %w", err)
	}
	type recv struct {
		m   *agentv1.SessionResponse
		err error
	}
	in := make(chan recv, 4)
	go func() {
		for {
			m, err := stream.Recv()
			select {
			case in <- recv{m, err}:
			case <-ctx.Done():
				return
			}
			if err != nil {
				return
			}
		}
	}()
	// The first heartbeat at a random point of the interval, so that a
	// fleet started at once does not beat in step.
	hb := a.f.o.Heartbeat
	timer := time.NewTimer(time.Duration(rand.Int64N(int64(hb)) + 1))
	defer timer.Stop()
	var telemetry <-chan time.Time
	if a.f.o.Telemetry > 0 {
		t := time.NewTicker(a.f.o.Telemetry)
		defer t.Stop()
		telemetry = t.C
	}
	var observedSeq, telemetrySeq uint64
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-timer.C:
			timer.Reset(hb)
			if err := stream.Send(&agentv1.SessionRequest{Msg: &agentv1.SessionRequest_Heartbeat{Heartbeat: &agentv1.Heartbeat{Time: timestamppb.Now()}}}); err != nil {
				return fmt.Errorf("send heartbeat: %w", err)
			}
			now := time.Now()
			a.mu.Lock()
			if !a.lastHeartbeat.IsZero() {
				a.f.noteGap(now.Sub(a.lastHeartbeat))
			}
			a.lastHeartbeat, a.lastContact = now, now
			a.mu.Unlock()
			a.f.heartbeats.Add(1)
		case <-telemetry:
			telemetrySeq++
			r, err := a.telemetry(telemetrySeq)
			if err != nil {
				return err
			}
			if err := stream.Send(&agentv1.SessionRequest{Msg: &agentv1.SessionRequest_Telemetry{Telemetry: r}}); err != nil {
				return fmt.Errorf("send telemetry: %w", err)
			}
		case r := <-in:
			if r.err != nil {
				if errors.Is(r.err, io.EOF) {
					return errors.New("the control plane ended the session")
				}
				return fmt.Errorf("receive: %w", r.err)
			}
			switch m := r.m.GetMsg().(type) {
			case *agentv1.SessionResponse_Desired:
				observedSeq++
				if err := stream.Send(&agentv1.SessionRequest{Msg: &agentv1.SessionRequest_Observed{Observed: a.observe(m.Desired, observedSeq)}}); err != nil {
					return fmt.Errorf("send observed state: %w", err)
				}
				a.mu.Lock()
				a.lastContact = time.Now()
				a.mu.Unlock()
				a.readyOnce.Do(func() { close(a.ready) })
			case *agentv1.SessionResponse_Challenge:
				resp, err := a.answer(m.Challenge.GetNonce())
				if err != nil {
					return err
				}
				if err := stream.Send(&agentv1.SessionRequest{Msg: &agentv1.SessionRequest_ChallengeResponse{ChallengeResponse: resp}}); err != nil {
					return fmt.Errorf("send attestation report: %w", err)
				}
				a.mu.Lock()
				was := a.attested
				a.attested = true
				a.mu.Unlock()
				if !was {
					a.f.attested.Add(1)
				}
			case *agentv1.SessionResponse_LogRequest:
				// No workload, no output.
				chunk := &agentv1.LogChunk{RequestId: m.LogRequest.GetRequestId(), Eof: true, Error: "NOT_FOUND: the fleet simulator runs no workloads"}
				if err := stream.Send(&agentv1.SessionRequest{Msg: &agentv1.SessionRequest_LogChunk{LogChunk: chunk}}); err != nil {
					return fmt.Errorf("send log chunk: %w", err)
				}
			}
		}
	}
}

// migUUID is the simulated partition of a lease.
func migUUID(leaseID string) string { return "MIG-sim-" + leaseID }

// observe takes a desired state as converged at once: every desired lease
// RUNNING on its placement.
func (a *Agent) observe(ds *agentv1.DesiredState, seq uint64) *agentv1.ObservedState {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.generation = ds.GetGeneration()
	a.leases = map[string]*leasev1.Lease{}
	obs := &agentv1.ObservedState{Sequence: seq, DesiredGeneration: ds.GetGeneration(), Inventory: a.inv}
	now := timestamppb.Now()
	for _, l := range ds.GetLeases() {
		a.leases[l.GetId()] = l
		obs.Leases = append(obs.Leases, &agentv1.ObservedLease{LeaseId: l.GetId(), Phase: leasev1.Phase_PHASE_RUNNING, Reason: "simulated",
			Status: &leasev1.LeaseStatus{MigUuid: migUUID(l.GetId()), ContainerId: l.GetId()}, UpdateTime: now})
	}
	return obs
}

// report is the agent's attestation evidence for nonce: its GPUs, the
// partitions and fences of the leases it runs.
func (a *Agent) report(nonce []byte) *attestation.Report {
	r := &attestation.Report{
		Node: a.Node, AgentID: a.id.String(), Time: time.Now(), Nonce: nonce,
		Agent: attestation.AgentEvidence{Version: "fleetsim", BinarySHA256: AgentSHA256, ConfigSHA256: configSHA256},
		Host: attestation.HostEvidence{KernelRelease: "6.1.0-fleetsim", KernelCmdline: "BOOT_IMAGE=/vmlinuz ro",
			BootID: a.bootID, SecureBoot: attestation.SecureBootEnabled},
		Runtime: attestation.RuntimeEvidence{ContainerdVersion: "2.4.2", RuncVersion: "1.3.0"},
		GPU:     attestation.GPUEvidence{DriverVersion: a.inv.GetDriverVersion()},
		TPM:     attestation.TPMEvidence{Status: attestation.TPMNotAvailable},
	}
	if a.telemKey != nil {
		r.Agent.TelemetryKey = a.telemKey.Public()
	}
	byGPU := map[string][]attestation.MIGInstance{}
	a.mu.Lock()
	ids := make([]string, 0, len(a.leases))
	for id := range a.leases {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for i, id := range ids {
		p := a.leases[id].GetPlacement()
		byGPU[p.GetGpuUuid()] = append(byGPU[p.GetGpuUuid()], attestation.MIGInstance{GPUInstanceID: i + 1, ProfileID: int(p.GetProfileId()),
			Start: int(p.GetStart()), Size: int(p.GetSize()), MIGUUID: migUUID(id)})
		r.Leases = append(r.Leases, attestation.LeaseEvidence{LeaseID: id, GPUUUID: p.GetGpuUuid(), MIGUUID: migUUID(id),
			ImageDigest: imageDigest(a.leases[id].GetSpec().GetWorkload().GetImage()),
			Fences: []attestation.Fence{
				{Kind: "device", Attach: "cgroup_device", ProgramID: uint32(2*i + 1), Tag: "f1ee751f00000001"},
				{Kind: "egress", Attach: "cgroup_inet4_connect", ProgramID: uint32(2*i + 2), Tag: "f1ee751f00000002"},
			}})
	}
	a.mu.Unlock()
	for _, g := range a.inv.GetGpus() {
		mode := attestation.MIGDisabled
		if g.GetMigEnabled() {
			mode = attestation.MIGEnabled
		}
		r.GPU.Devices = append(r.GPU.Devices, attestation.GPUDevice{Index: int(g.GetIndex()), UUID: g.GetUuid(), Name: g.GetModel(),
			Serial: g.GetSerial(), VBIOSVersion: g.GetVbiosVersion(), MIGMode: mode, MIGLayout: byGPU[g.GetUuid()],
			CC: attestation.CCAttestation{Status: attestation.CCNotAvailable}})
	}
	return r
}

// imageDigest is the digest a simulated agent reports for an image
// reference: a stand-in, stable per reference.
func imageDigest(ref string) string {
	h := sha256.Sum256([]byte(ref))
	return "sha256:" + hex.EncodeToString(h[:])
}

// configSHA256 is the configuration digest simulated agents report.
var configSHA256 = hex.EncodeToString(func() []byte { h := sha256.Sum256([]byte("fleetsim")); return h[:] }())

// answer signs a report for a challenge's nonce with the agent's SVID.
func (a *Agent) answer(nonce []byte) (*agentv1.ChallengeResponse, error) {
	s, err := attestation.Sign(a.report(nonce), a.svid)
	if err != nil {
		return nil, fmt.Errorf("agent %s: %w", a.Node, err)
	}
	return &agentv1.ChallengeResponse{Nonce: s.Nonce, Report: s.Report, Signature: s.Signature}, nil
}

// telemetry is one signed sample of every GPU, idle.
func (a *Agent) telemetry(seq uint64) (*agentv1.TelemetryReport, error) {
	id := a.telemKey.ID()
	p := &agentv1.TelemetryPayload{NodeId: a.Node, KeyId: id[:], Sequence: seq, Time: timestamppb.Now(), Interval: durationpb.New(a.f.o.Telemetry)}
	for _, g := range a.inv.GetGpus() {
		util, mem, power, temp := uint32(0), uint64(0), uint32(70000), uint32(35)
		p.Devices = append(p.Devices, &agentv1.DeviceSample{Uuid: g.GetUuid(), GpuUuid: g.GetUuid(), GpuIndex: g.GetIndex(),
			UtilizationPct: &util, MemoryUsedMib: &mem, PowerMilliwatt: &power, TemperatureC: &temp})
	}
	r, err := a.telemKey.Sign(p)
	if err != nil {
		return nil, fmt.Errorf("agent %s: sign telemetry: %w", a.Node, err)
	}
	return r, nil
}

// kill ends the agent as a crash would: its TCP connection is reset (no
// goodbye on the session, no HTTP/2 GOAWAY), then its resources freed. It
// returns when the agent last renewed its liveness (a heartbeat or an
// observed state).
func (a *Agent) kill() time.Time {
	a.mu.Lock()
	a.killed = true
	last := a.lastContact
	a.mu.Unlock()
	a.rawMu.Lock()
	if tc, ok := a.raw.(*net.TCPConn); ok {
		_ = tc.SetLinger(0) // close with RST
	}
	if a.raw != nil {
		_ = a.raw.Close()
	}
	a.rawMu.Unlock()
	a.stop()
	return last
}

// stop ends the session and waits for its goroutines.
func (a *Agent) stop() {
	if a.cancel != nil {
		a.cancel()
	}
	<-a.done
}

// Leases is the agent's desired lease set.
func (a *Agent) Leases() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]string, 0, len(a.leases))
	for id := range a.leases {
		out = append(out, id)
	}
	sort.Strings(out)
	return out
}
