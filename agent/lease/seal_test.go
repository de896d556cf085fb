package lease

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gpuaas/gpuaas/pkg/seal"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// TestEnvIsSealedInTheJournal: with a secrets key the journal never holds
// an env value in plain text, and the workload still gets it; a journaled
// value the agent can no longer open fails the lease instead of running it
// without.
func TestEnvIsSealedInTheJournal(t *testing.T) {
	r := newRig(t)
	line, err := seal.GenerateKeyLine("agent1")
	if err != nil {
		t.Fatal(err)
	}
	ring, err := seal.ParseKeyring([]byte(line))
	if err != nil {
		t.Fatal(err)
	}
	ex := r.start(func(o *Options) { o.Sealer = ring })
	l := r.lease(19, at(0, 1), "sh", "-c", "echo token=$TOKEN")
	l.Spec.Workload.Env = map[string]string{"TOKEN": "agent-s3cret"}
	r.desire(ex, l)
	r.waitPhase(l.GetId(), leasev1.Phase_PHASE_TERMINATED)
	raw, err := os.ReadFile(filepath.Join(r.logDir, l.GetId()+".log"))
	if err != nil || !strings.Contains(string(raw), "token=agent-s3cret") {
		t.Fatalf("the workload did not see its env value: %v\n%s", err, raw)
	}
	ex.stop(t)
	db, err := os.ReadFile(r.journalPath)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(db, []byte("agent-s3cret")) {
		t.Fatal("the journal holds the env value in plain text")
	}
	if !bytes.Contains(db, []byte(seal.Prefix)) {
		t.Fatal("no sealed value in the journal")
	}

	// The key is gone (replaced): the next lease with a journaled sealed
	// value fails, with the reason, and never runs without it.
	other, _ := seal.GenerateKeyLine("agent2")
	ring2, _ := seal.ParseKeyring([]byte(other))
	l2 := r.lease(19, at(1, 1), sleeper...)
	l2.Spec.Workload.Env = map[string]string{"TOKEN": "agent-s3cret"}
	sealed, err := (&Executor{o: Options{Sealer: ring}}).sealEnv([]*leasev1.Lease{l2})
	if err != nil {
		t.Fatal(err)
	}
	r.gen++
	if _, err := r.journal.SetDesired(r.gen, sealed); err != nil {
		t.Fatal(err)
	}
	r.start(func(o *Options) { o.Sealer = ring2 })
	rec := r.waitPhase(l2.GetId(), leasev1.Phase_PHASE_FAILED)
	if !strings.Contains(rec.Reason, "env") {
		t.Fatalf("failed for %q, want the env step named", rec.Reason)
	}
}
