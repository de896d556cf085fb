// Package crash kills the real control plane (bbolt store) with SIGKILL in
// the middle of concurrent lease creation and checks, after every restart,
// that each acknowledged lease exists exactly once, that an idempotency key
// never maps to two leases, and that the audit log verifies with one
// lease.create entry per lease.
//
// The kill points come from a seeded math/rand/v2 source; the seed is
// logged, and GPUAAS_CRASH_SEED replays a failure.
package crash

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

const (
	// rounds is how many times the control plane is killed; calls how
	// many CreateLease calls are in flight together in each round.
	rounds = 20
	calls  = 1000
	// checkers is how many verification calls run at once after a restart.
	checkers = 100
	// sample is how many acknowledged leases of a round are read back and
	// recreated one by one after the restart (the listing checks all of
	// them): the calls of a race-enabled client are what the test's time
	// goes on.
	sample = 100
	// pageSize is the ListLeases page: a round's leases span two.
	pageSize = 500
	// callTimeout bounds every RPC: a hang fails the test instead of
	// blocking it; nothing is asserted about speed.
	callTimeout = 2 * time.Minute
	// seedEnv replays a run: the seed every run logs.
	seedEnv = "GPUAAS_CRASH_SEED"
)

// keyFor is the idempotency key of call i of a round.
func keyFor(round, i int) string { return fmt.Sprintf("crash-%02d-%04d", round, i) }

// tenantOf is the tenant of a round's leases: a round's leases are listed
// by tenant, so a check costs the same in the last round as in the first.
func tenantOf(round int) string { return fmt.Sprintf("crash-%02d", round) }

// specFor is the lease spec sent with a round's key. The key is also the
// workload's last argument, so every stored lease names the key it was
// created under and a key that produced two leases shows in a listing.
func specFor(round int, key string) *leasev1.LeaseSpec {
	return &leasev1.LeaseSpec{
		Tenant:   tenantOf(round),
		Gpu:      &leasev1.GpuRequest{Kind: &leasev1.GpuRequest_MigProfile{MigProfile: "1g.18gb"}},
		Workload: &leasev1.Workload{Image: "localhost/gpuaas/busybox:crash", Args: []string{"crash", key}},
		Duration: durationpb.New(time.Hour),
	}
}

func createReq(round int, key string) *leasev1.CreateLeaseRequest {
	return &leasev1.CreateLeaseRequest{IdempotencyKey: key, Spec: specFor(round, key)}
}

// keyOf is the idempotency key a stored lease was created under.
func keyOf(l *leasev1.Lease) string {
	if a := l.GetSpec().GetWorkload().GetArgs(); len(a) == 2 && a[0] == "crash" {
		return a[1]
	}
	return ""
}

// crashSeed is GPUAAS_CRASH_SEED if set, else a random seed.
func crashSeed(t *testing.T) uint64 {
	t.Helper()
	if s := os.Getenv(seedEnv); s != "" {
		seed, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("%s=%q: %v", seedEnv, s, err)
		}
		return seed
	}
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	return binary.LittleEndian.Uint64(b[:])
}

// ledger is every idempotency key the test has seen resolved to a lease,
// in both directions: after each round every key issued so far is in it.
type ledger struct {
	byKey map[string]string
	byID  map[string]string
}

func (lg *ledger) add(t *testing.T, key, id string) {
	t.Helper()
	if k, ok := lg.byID[id]; ok && k != key {
		t.Errorf("lease %s is returned for key %s and for key %s", id, k, key)
	}
	if i, ok := lg.byKey[key]; ok && i != id {
		t.Errorf("key %s maps to lease %s and to lease %s", key, i, id)
	}
	lg.byKey[key], lg.byID[id] = id, key
}

// volley is what the client saw of one round's creates.
type volley struct {
	acked  map[string]string // key -> lease id, acknowledged
	failed map[codes.Code]int
	// killAt is the acknowledgement that triggered the kill; late the
	// acknowledgements that reached the client after it (sent before the
	// process died).
	killAt, late int
}

// TestAcknowledgedLeasesSurviveKill9 starts the control plane binary on a
// bbolt data directory, fires 1,000 concurrent CreateLease calls (distinct
// idempotency keys) and kills the process with SIGKILL after a random
// number of them (1-999) were acknowledged, 20 times on the same data
// directory. After each kill the audit chain as the crash left it
// verifies; after each restart the listing (paged) holds every
// acknowledged lease with its spec, no lease twice and no key twice, the
// leases committed but not acknowledged are at most the calls that were
// not acknowledged, 100 acknowledged leases read back with GetLease, and a
// retry of every unacknowledged key and of those 100 acknowledged ones
// returns the lease the key already has or creates its only one. After a
// clean stop the audit log verifies and has exactly one lease.create entry
// per lease; at the end the state file holds every lease of every round,
// once.
func TestAcknowledgedLeasesSurviveKill9(t *testing.T) {
	if testing.Short() {
		t.Skip("kills and restarts the control plane binary 20 times")
	}
	seed := crashSeed(t)
	t.Logf("seed %d (replay with %s=%d)", seed, seedEnv, seed)
	// The kill points are drawn first, from their own stream, so a replay
	// kills at the same acknowledgements whatever else draws.
	kills := mrand.New(mrand.NewPCG(seed, 1))
	killAts := make([]int, rounds)
	for i := range killAts {
		killAts[i] = 1 + kills.IntN(calls-1)
	}
	rng := mrand.New(mrand.NewPCG(seed, 2))
	r := newRig(t)
	lg := &ledger{byKey: map[string]string{}, byID: map[string]string{}}
	creates := &auditCreates{count: map[string]int{}}
	begin := time.Now()

	for round := range rounds {
		killAt := killAts[round]
		r.start(t)
		conn := r.dial(t)
		v := fire(t, r, leasev1.NewLeaseServiceClient(conn), round, killAt)
		conn.Close()
		if len(v.acked) == 0 {
			t.Fatalf("round %d: no create was acknowledged (failures %v)", round, v.failed)
		}
		r.verifyAudit(t, fmt.Sprintf("round %d, after the kill", round))

		r.start(t)
		conn = r.dial(t)
		lc := leasev1.NewLeaseServiceClient(conn)
		listed := checkListing(t, lc, round, v)
		picked := pick(rng, v.acked, sample)
		checkAcknowledged(t, lc, round, v, picked)
		retryRound(t, lc, lg, round, v, picked, listed)
		conn.Close()
		r.stop(t)
		r.verifyAudit(t, fmt.Sprintf("round %d, after a clean stop", round))
		creates.check(t, r, lg)
		t.Logf("round %d: killed at ack %d (+%d late): %d acknowledged, %d failed %v, %d committed unacknowledged; %d leases",
			round, v.killAt, v.late, len(v.acked), calls-len(v.acked), v.failed, len(listed)-len(v.acked), len(lg.byKey))
		if t.Failed() {
			t.Fatalf("round %d failed; replay with %s=%d", round, seedEnv, seed)
		}
	}

	// At the end the state file holds exactly the ledger's leases, so no
	// later kill lost or duplicated an earlier round's lease.
	stored := r.storedLeases(t)
	seen := map[string]string{}
	for _, l := range stored {
		id, key := l.GetId(), keyOf(l)
		if lg.byID[id] != key {
			t.Errorf("stored lease %s has key %q; the ledger has %q", id, key, lg.byID[id])
		}
		if other, dup := seen[key]; dup {
			t.Errorf("key %q has two stored leases, %s and %s", key, other, id)
		}
		seen[key] = id
	}
	if len(stored) != rounds*calls || len(lg.byKey) != rounds*calls {
		t.Errorf("%d leases stored, %d keys resolved; want %d each", len(stored), len(lg.byKey), rounds*calls)
	}
	t.Logf("%d kills, %d leases, %s", rounds, len(stored), time.Since(begin).Round(time.Millisecond))
	if t.Failed() {
		t.Logf("replay with %s=%d", seedEnv, seed)
	}
}

// fire sends the round's creates all at once and kills the control plane
// when the killAt-th acknowledgement arrives (or when every call has
// returned, should that come first). It returns once every call has.
func fire(t *testing.T, r *rig, lc leasev1.LeaseServiceClient, round, killAt int) volley {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	// One call through the connection first: the creates must not fail
	// fast on a connection still being set up.
	if _, err := lc.ListLeases(ctx, &leasev1.ListLeasesRequest{PageSize: 1}); err != nil {
		t.Fatalf("round %d: control plane does not answer: %v", round, err)
	}
	v := volley{acked: map[string]string{}, failed: map[codes.Code]int{}, killAt: killAt}
	var (
		mu         sync.Mutex
		wg         sync.WaitGroup
		once       sync.Once
		unexpected []error
	)
	start, reached := make(chan struct{}), make(chan struct{})
	for i := range calls {
		key := keyFor(round, i)
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			resp, err := lc.CreateLease(ctx, createReq(round, key))
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				c := status.Code(err)
				v.failed[c]++
				// Only the kill may fail a call: the connection is lost.
				if c != codes.Unavailable && len(unexpected) < 5 {
					unexpected = append(unexpected, fmt.Errorf("create %s: %w", key, err))
				}
				return
			}
			v.acked[key] = resp.GetLease().GetId()
			if len(v.acked) == killAt {
				once.Do(func() { close(reached) })
			}
		}()
	}
	all := make(chan struct{})
	go func() { wg.Wait(); close(all) }()
	close(start)
	select {
	case <-reached:
	case <-all:
	}
	r.kill(t)
	<-all
	v.late = max(0, len(v.acked)-killAt)
	for _, err := range unexpected {
		t.Errorf("round %d: %v", round, err)
	}
	return v
}

// listRound pages through ListLeases for a round's tenant and returns the
// leases by key. It fails the test on a lease listed twice, a key with two
// leases, a key no call of the round sent and a spec other than the one
// sent with the key.
func listRound(t *testing.T, lc leasev1.LeaseServiceClient, round int) map[string]string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	byKey, seen := map[string]string{}, map[string]bool{}
	for token := ""; ; {
		resp, err := lc.ListLeases(ctx, &leasev1.ListLeasesRequest{Tenant: tenantOf(round), PageSize: pageSize, PageToken: token})
		if err != nil {
			t.Fatalf("list the leases of round %d: %v", round, err)
		}
		for _, l := range resp.GetLeases() {
			id, key := l.GetId(), keyOf(l)
			if seen[id] {
				t.Errorf("round %d: lease %s is listed twice", round, id)
				continue
			}
			seen[id] = true
			if other, dup := byKey[key]; dup {
				t.Errorf("round %d: key %q has two leases, %s and %s", round, key, other, id)
				continue
			}
			if !strings.HasPrefix(key, tenantOf(round)+"-") {
				t.Errorf("round %d: lease %s has key %q, which no call of the round sent", round, id, key)
				continue
			}
			if !proto.Equal(l.GetSpec(), specFor(round, key)) {
				t.Errorf("round %d: lease %s has spec %v, not the one sent with key %q", round, id, l.GetSpec(), key)
				continue
			}
			byKey[key] = id
		}
		if token = resp.GetNextPageToken(); token == "" {
			return byKey
		}
	}
}

// checkListing lists the round's leases after the restart: every
// acknowledged lease is there under its key, and the others (committed
// before the kill, their answers lost) are at most the calls that were not
// acknowledged. It returns the listing by key.
func checkListing(t *testing.T, lc leasev1.LeaseServiceClient, round int, v volley) map[string]string {
	t.Helper()
	byKey := listRound(t, lc, round)
	for key, id := range v.acked {
		if byKey[key] != id {
			t.Errorf("round %d: acknowledged lease %s (key %s) is gone or changed: listed %q", round, id, key, byKey[key])
		}
	}
	extra := 0
	for key := range byKey {
		if _, ok := v.acked[key]; !ok {
			extra++
		}
	}
	if unacked := calls - len(v.acked); extra > unacked {
		t.Errorf("round %d: %d unacknowledged leases committed, more than the %d calls not acknowledged", round, extra, unacked)
	}
	return byKey
}

// pick returns n of the acknowledged keys (all if fewer), chosen by rng.
func pick(rng *mrand.Rand, acked map[string]string, n int) []string {
	keys := make([]string, 0, len(acked))
	for k := range acked {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	rng.Shuffle(len(keys), func(i, j int) { keys[i], keys[j] = keys[j], keys[i] })
	return keys[:min(n, len(keys))]
}

// checkAcknowledged reads the picked acknowledged leases back one by one.
func checkAcknowledged(t *testing.T, lc leasev1.LeaseServiceClient, round int, v volley, picked []string) {
	t.Helper()
	each(len(picked), func(ctx context.Context, i int) {
		key, id := picked[i], v.acked[picked[i]]
		resp, err := lc.GetLease(ctx, &leasev1.GetLeaseRequest{Id: id})
		if err != nil {
			t.Errorf("get acknowledged lease %s (key %s): %v", id, key, err)
			return
		}
		if l := resp.GetLease(); l.GetId() != id || !proto.Equal(l.GetSpec(), specFor(round, key)) {
			t.Errorf("acknowledged lease %s (key %s) reads back as %v", id, key, l)
		}
	})
}

// retryRound resends, same key and same body, every unacknowledged create
// of the round and the picked acknowledged ones. A key with a lease
// (acknowledged, or committed unacknowledged as listed) must get that
// lease back; a key without one gets a new lease, no other key's. Every key
// of the round then goes into the ledger.
func retryRound(t *testing.T, lc leasev1.LeaseServiceClient, lg *ledger, round int, v volley, picked []string, listed map[string]string) {
	t.Helper()
	keys := append([]string(nil), picked...)
	for i := range calls {
		if key := keyFor(round, i); v.acked[key] == "" {
			keys = append(keys, key)
		}
	}
	ids := make([]string, len(keys))
	each(len(keys), func(ctx context.Context, i int) {
		key := keys[i]
		resp, err := lc.CreateLease(ctx, createReq(round, key))
		if err != nil {
			t.Errorf("retry create %s: %v", key, err)
			return
		}
		ids[i] = resp.GetLease().GetId()
		if want, ok := listed[key]; ok && ids[i] != want {
			t.Errorf("retry of key %s returned lease %s; the key already has lease %s", key, ids[i], want)
		}
	})
	for i, id := range ids {
		key := keys[i]
		if id == "" {
			continue
		}
		if _, ok := listed[key]; !ok {
			if k, taken := lg.byID[id]; taken {
				t.Errorf("retry of key %s returned lease %s of key %s", key, id, k)
			}
		}
		lg.add(t, key, id)
	}
	for key, id := range v.acked {
		lg.add(t, key, id)
	}
}

// auditCreates counts the lease.create entries of the audit log per lease,
// reading only the entries appended since the last check.
type auditCreates struct {
	seq   uint64
	count map[string]int
}

// check reads the new audit entries (the control plane stopped) and checks
// that the log names every lease of the ledger in exactly one lease.create
// entry, and no other lease.
func (a *auditCreates) check(t *testing.T, r *rig, lg *ledger) {
	t.Helper()
	var last uint64
	for id, n := range r.leaseCreates(t, a.seq, &last) {
		a.count[id] += n
	}
	a.seq = last
	var bad []string
	for id, key := range lg.byID {
		if n := a.count[id]; n != 1 {
			bad = append(bad, fmt.Sprintf("lease %s (key %s): %d lease.create entries", id, key, n))
		}
	}
	for id := range a.count {
		if _, ok := lg.byID[id]; !ok {
			bad = append(bad, fmt.Sprintf("lease.create of %s, a lease no key has", id))
		}
	}
	sort.Strings(bad)
	for i, b := range bad {
		if i == 10 {
			t.Errorf("... and %d more", len(bad)-i)
			break
		}
		t.Error(b)
	}
}

// each runs f(0..n-1) on checkers goroutines, each call with its own
// bounded context.
func each(n int, f func(ctx context.Context, i int)) {
	var wg sync.WaitGroup
	next := make(chan int)
	for range min(n, checkers) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
				f(ctx, i)
				cancel()
			}
		}()
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
}
