package fleetsim

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/credentials"

	"github.com/gpuaas/gpuaas/pkg/attestation"
	"github.com/gpuaas/gpuaas/pkg/identity"
)

// Options configure a fleet.
type Options struct {
	// Addr is the control plane's gRPC address (several, of replicas,
	// separated by commas) and CA the development CA
	// its trust bundle holds (DevPKI.CA). Required.
	Addr string
	CA   *identity.CA
	// GPUs are each simulated host's GPU models (default eight H200s).
	GPUs []string
	// Heartbeat is each agent's heartbeat interval. Required.
	Heartbeat time.Duration
	// Telemetry, if positive, is each agent's signed telemetry interval.
	Telemetry time.Duration
	// Parallel bounds the sessions being opened at once (default 64).
	Parallel int
	// SVIDTTL is the agents' SVID lifetime (default 24h).
	SVIDTTL time.Duration
}

// Fleet is a set of simulated agents.
type Fleet struct {
	o Options

	heartbeats atomic.Uint64
	attested   atomic.Int64
	maxGap     atomic.Int64 // the longest time between two heartbeats of one agent

	mu     sync.Mutex
	agents map[string]*Agent
	ended  map[string]error // the last error of agents whose sessions ended on their own
	ends   int              // how many sessions ended on their own
}

// New returns an empty fleet.
func New(o Options) (*Fleet, error) {
	if o.Addr == "" || o.CA == nil {
		return nil, errors.New("new fleet: addr and ca are required")
	}
	if o.Heartbeat <= 0 {
		return nil, errors.New("new fleet: heartbeat interval is required")
	}
	if len(o.GPUs) == 0 {
		o.GPUs = []string{"H200", "H200", "H200", "H200", "H200", "H200", "H200", "H200"}
	}
	if o.Parallel <= 0 {
		o.Parallel = 64
	}
	if o.SVIDTTL <= 0 {
		o.SVIDTTL = 24 * time.Hour
	}
	return &Fleet{o: o, agents: map[string]*Agent{}, ended: map[string]error{}}, nil
}

// NodeName is the name of the i-th simulated node.
func NodeName(i int) string { return fmt.Sprintf("sim-%05d", i) }

func (f *Fleet) creds(svid *x509svid.SVID) credentials.TransportCredentials {
	src := identity.StaticSource{SVID: svid, Bundle: f.o.CA.Bundle()}
	return identity.ClientCredentials(src, tlsconfig.AuthorizeID(identity.ControlPlaneID(f.o.CA.TrustDomain)))
}

// Add starts agents for nodes, at most Options.Parallel opening at once,
// and returns when every one has its first desired state. On error the
// agents already started stay (Close stops them).
func (f *Fleet) Add(ctx context.Context, nodes []string) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	sem := make(chan struct{}, f.o.Parallel)
	var wg sync.WaitGroup
	var once sync.Once
	var first error
	for _, n := range nodes {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := f.add(ctx, n); err != nil {
				once.Do(func() { first = err; cancel() })
			}
		}()
	}
	wg.Wait()
	if first != nil {
		return first
	}
	return ctx.Err()
}

func (f *Fleet) add(ctx context.Context, node string) error {
	f.mu.Lock()
	_, dup := f.agents[node]
	f.mu.Unlock()
	if dup {
		return fmt.Errorf("add agent %s: already in the fleet", node)
	}
	id, err := identity.AgentID(f.o.CA.TrustDomain, node)
	if err != nil {
		return err
	}
	now := time.Now()
	svid, err := f.o.CA.IssueSVID(id, now.Add(-time.Minute), now.Add(f.o.SVIDTTL))
	if err != nil {
		return err
	}
	inv, err := inventory(ctx, node, f.o.GPUs)
	if err != nil {
		return fmt.Errorf("add agent %s: inventory: %w", node, err)
	}
	var boot [16]byte
	_, _ = rand.Read(boot[:])
	a := &Agent{Node: node, f: f, svid: svid, id: id, inv: inv, bootID: hex.EncodeToString(boot[:]),
		ready: make(chan struct{}), done: make(chan struct{})}
	if f.o.Telemetry > 0 {
		if a.telemKey, err = attestation.NewTelemetryKey(); err != nil {
			return err
		}
	}
	f.mu.Lock()
	f.agents[node] = a
	f.mu.Unlock()
	return a.start(ctx)
}

func (f *Fleet) noteGap(d time.Duration) {
	for {
		cur := f.maxGap.Load()
		if int64(d) <= cur || f.maxGap.CompareAndSwap(cur, int64(d)) {
			return
		}
	}
}

func (f *Fleet) sessionEnded(a *Agent, err error) {
	f.mu.Lock()
	f.ended[a.Node] = err
	f.ends++
	f.mu.Unlock()
}

// Agent returns a node's agent, nil if none.
func (f *Fleet) Agent(node string) *Agent {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.agents[node]
}

// Kill ends a node's agent abruptly (Agent.kill) and removes it from the
// fleet. It returns the time of the kill and of the agent's last contact:
// the last message that renewed its liveness, a heartbeat or an observed
// state (zero if none).
func (f *Fleet) Kill(node string) (killed, lastContact time.Time, err error) {
	f.mu.Lock()
	a := f.agents[node]
	delete(f.agents, node)
	f.mu.Unlock()
	if a == nil {
		return time.Time{}, time.Time{}, fmt.Errorf("kill agent %s: not in the fleet", node)
	}
	killed = time.Now()
	return killed, a.kill(), nil
}

// Stats are a fleet's counters.
type Stats struct {
	// Agents in the fleet; Attested, those that have answered a challenge.
	Agents, Attested int
	// Heartbeats sent by all agents so far; MaxHeartbeatGap the longest
	// time between two heartbeats of one agent (the simulator's own lag
	// shows here: beyond the interval, the agent was late).
	Heartbeats      uint64
	MaxHeartbeatGap time.Duration
	// Ended are the agents whose session ended without Kill or Close (and
	// was opened again), with the last reason; Ends counts such ends.
	Ended map[string]error
	Ends  int
}

// Stats returns the fleet's counters now.
func (f *Fleet) Stats() Stats {
	f.mu.Lock()
	defer f.mu.Unlock()
	s := Stats{Agents: len(f.agents), Attested: int(f.attested.Load()), Heartbeats: f.heartbeats.Load(), MaxHeartbeatGap: time.Duration(f.maxGap.Load()), Ended: map[string]error{}, Ends: f.ends}
	for n, err := range f.ended {
		s.Ended[n] = err
	}
	return s
}

// EndedSummary is a one-line account of sessions that ended on their own.
func (s Stats) EndedSummary() string {
	if len(s.Ended) == 0 {
		return "none"
	}
	nodes := make([]string, 0, len(s.Ended))
	for n := range s.Ended {
		nodes = append(nodes, n)
	}
	sort.Strings(nodes)
	return fmt.Sprintf("%d ends of %d agents' sessions, first %s: %v", s.Ends, len(nodes), nodes[0], s.Ended[nodes[0]])
}

// Close stops every agent.
func (f *Fleet) Close() {
	f.mu.Lock()
	agents := make([]*Agent, 0, len(f.agents))
	for _, a := range f.agents {
		agents = append(agents, a)
	}
	f.agents = map[string]*Agent{}
	f.mu.Unlock()
	var wg sync.WaitGroup
	sem := make(chan struct{}, 256)
	for _, a := range agents {
		wg.Add(1)
		sem <- struct{}{}
		go func() { defer wg.Done(); defer func() { <-sem }(); a.stop() }()
	}
	wg.Wait()
}
