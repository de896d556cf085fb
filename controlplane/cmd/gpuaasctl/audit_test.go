package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/audit/sink"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/identity"
)

const testAuditOrigin = "gpuaas.test/audit"

// signedAuditStore writes a state file with n entries (two actors) and a
// checkpoint after every 4, signed with a key made by `audit keygen`.
func signedAuditStore(t *testing.T, n int) (db, pub, skey string) {
	t.Helper()
	dir := t.TempDir()
	out := mustOffline(t, "audit", "keygen", "--dir", filepath.Join(dir, "keys"), "--name", testAuditOrigin)
	if !strings.Contains(out, testAuditOrigin+"+") {
		t.Fatalf("keygen printed %q", out)
	}
	skey, pub = filepath.Join(dir, "keys", "audit-signing.key"), filepath.Join(dir, "keys", "audit-signing.pub")
	if fi, err := os.Stat(skey); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("signing key: %v %v", fi, err)
	}
	signers, err := auditlog.LoadSigners(skey)
	if err != nil {
		t.Fatal(err)
	}
	db = filepath.Join(dir, "state.db")
	st, err := store.OpenBolt(db, store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	cp, err := audit.NewCheckpointer(audit.CheckpointerOptions{Store: st, Signers: signers, Origin: testAuditOrigin})
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= n; i++ {
		actor := "spiffe://gpuaas.test/gpuaas/operator/alice"
		if i%3 == 0 {
			actor = "spiffe://gpuaas.test/gpuaas/operator/bob"
		}
		err := st.Update(context.Background(), func(tx store.Tx) error {
			_, err := audit.Append(tx, auditlog.Entry{Time: time.Unix(1700000000+int64(i), 0), Actor: actor, Tenant: "t1",
				Action: "lease.create", Resource: fmt.Sprintf("lease/l%02d", i), Outcome: auditlog.OutcomeSuccess, RequestID: fmt.Sprintf("req-%d", i)})
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		if i%4 == 0 {
			if _, _, err := cp.Checkpoint(context.Background()); err != nil {
				t.Fatal(err)
			}
		}
	}
	return db, pub, skey
}

func fileSum(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

func TestAuditVerifySignedLog(t *testing.T) {
	db, pub, _ := signedAuditStore(t, 10)
	before := fileSum(t, db)
	out := mustOffline(t, "audit", "verify", "--db", db, "--key", pub, "--origin", testAuditOrigin)
	if !strings.HasPrefix(out, "audit log OK: 10 entries") || !strings.Contains(out, "2 checkpoints, signatures verified") {
		t.Fatalf("verify = %q", out)
	}
	out = mustOffline(t, "audit", "verify", "--db", db)
	if !strings.Contains(out, "signatures NOT checked") {
		t.Fatalf("keyless verify = %q", out)
	}
	if fileSum(t, db) != before {
		t.Fatal("verifying changed the state file")
	}
	// A running control plane holds the file: verify says so, touches nothing.
	st, err := store.OpenBolt(db, store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = ctl(t, "audit", "verify", "--db", db)
	st.Close()
	if !errors.Is(err, store.ErrLocked) {
		t.Fatalf("verify of a file in use: %v, want ErrLocked", err)
	}
	if _, err := ctl(t, "audit", "verify", "--db", filepath.Join(t.TempDir(), "none.db")); err == nil {
		t.Fatal("verify of a missing file passed (and may have created it)")
	}
}

func TestAuditVerifyNamesTampering(t *testing.T) {
	_, otherPub, _ := signedAuditStore(t, 1)
	for name, tc := range map[string]struct {
		edit func(tx store.Tx) error
		want string
	}{
		"flip a byte": {func(tx store.Tx) error {
			raw, _ := tx.Get(store.BucketAudit, audit.Key(6))
			return tx.Put(store.BucketAudit, audit.Key(6), bytes.Replace(raw, []byte("l06"), []byte("l07"), 1))
		}, "checkpoint 8"},
		"delete an entry": {func(tx store.Tx) error { return tx.Delete(store.BucketAudit, audit.Key(3)) }, "entry 3"},
		"reorder two": {func(tx store.Tx) error {
			a, _ := tx.Get(store.BucketAudit, audit.Key(1))
			b, _ := tx.Get(store.BucketAudit, audit.Key(2))
			tx.Put(store.BucketAudit, audit.Key(1), b)
			return tx.Put(store.BucketAudit, audit.Key(2), a)
		}, "entry 1"},
		"truncate": {func(tx store.Tx) error {
			for i := uint64(5); i <= 10; i++ {
				tx.Delete(store.BucketAudit, audit.Key(i))
			}
			return tx.Put(store.BucketMeta, "audit_seq", store.U64(4))
		}, "checkpoint 8"},
	} {
		t.Run(name, func(t *testing.T) {
			db, pub, _ := signedAuditStore(t, 10)
			st, err := store.OpenBolt(db, store.BoltOptions{})
			if err != nil {
				t.Fatal(err)
			}
			err = st.Update(context.Background(), tc.edit)
			st.Close()
			if err != nil {
				t.Fatal(err)
			}
			out, err := ctl(t, "audit", "verify", "--db", db, "--key", pub)
			if err == nil || !strings.Contains(err.Error(), "INVALID") || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("verify = %q, %v; want INVALID naming %q", out, err, tc.want)
			}
		})
	}
	t.Run("checkpoints signed by another key", func(t *testing.T) {
		db, _, _ := signedAuditStore(t, 10)
		_, err := ctl(t, "audit", "verify", "--db", db, "--key", otherPub)
		if !errors.Is(err, auditlog.ErrUntrusted) || !strings.Contains(err.Error(), "checkpoint 4") {
			t.Fatalf("verify with an untrusted key = %v", err)
		}
	})
}

func TestAuditProofRoundTrip(t *testing.T) {
	db, pub, _ := signedAuditStore(t, 10)
	_, otherPub, _ := signedAuditStore(t, 1)
	proof := mustOffline(t, "audit", "proof", "3", "--db", db)
	if !strings.Contains(proof, `"leaf_index": 2`) || !strings.Contains(proof, `"tree_size": 8`) {
		t.Fatalf("proof = %s", proof)
	}
	path := filepath.Join(t.TempDir(), "proof.json")
	os.WriteFile(path, []byte(proof), 0o600)
	out := mustOffline(t, "audit", "check-proof", path, "--key", pub, "--origin", testAuditOrigin)
	if !strings.HasPrefix(out, "proof OK: entry 3 is in checkpoint 8") || !strings.Contains(out, "lease/l03") {
		t.Fatalf("check-proof = %q", out)
	}
	if _, err := ctl(t, "audit", "check-proof", path, "--key", otherPub); err == nil || !strings.Contains(err.Error(), "INVALID") {
		t.Fatalf("check-proof with another key = %v", err)
	}
	os.WriteFile(path, bytes.Replace([]byte(proof), []byte("l03"), []byte("l04"), 1), 0o600)
	if _, err := ctl(t, "audit", "check-proof", path, "--key", pub); !errors.Is(err, auditlog.ErrTampered) {
		t.Fatalf("check-proof of an altered entry = %v", err)
	}
	if _, err := ctl(t, "audit", "proof", "9", "--db", db); !errors.Is(err, audit.ErrNotCheckpointed) {
		t.Fatalf("proof of an unsigned entry = %v", err)
	}
}

func TestAuditTailAndSearch(t *testing.T) {
	db, _, _ := signedAuditStore(t, 10)
	rows := tableRows(t, mustOffline(t, "audit", "tail", "--db", db, "-n", "3"), "SEQ", "TIME", "ACTOR", "ACTION")
	if len(rows) != 3 || rows[0][0] != "8" || rows[2][0] != "10" {
		t.Fatalf("tail rows = %q", rows)
	}
	rows = tableRows(t, mustOffline(t, "audit", "search", "--db", db, "--actor", "spiffe://gpuaas.test/gpuaas/operator/bob"), "SEQ", "TIME", "ACTOR", "ACTION")
	if len(rows) != 3 || rows[0][0] != "3" || rows[1][0] != "6" || rows[2][0] != "9" {
		t.Fatalf("search rows = %q", rows)
	}
	out := mustOffline(t, "-o", "json", "audit", "search", "--db", db, "--resource", "lease/l1*", "--until", time.Unix(1700000011, 0).UTC().Format(time.RFC3339))
	if strings.Count(out, `"seq"`) != 1 || !strings.Contains(out, `"lease/l10"`) {
		t.Fatalf("search json = %s", out)
	}
	if _, err := ctl(t, "audit", "search", "--db", db, "--since", "yesterday"); err == nil {
		t.Fatal("a bad --since was accepted")
	}
}

func TestAuditVerifySinkDirectory(t *testing.T) {
	db, pub, _ := signedAuditStore(t, 10)
	trusted, err := auditlog.LoadVerifiers(pub)
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.OpenBolt(db, store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	dir := t.TempDir()
	s, err := sink.Open(sink.Options{Dir: dir, Origin: testAuditOrigin, Trusted: trusted})
	if err != nil {
		t.Fatal(err)
	}
	for _, from := range []uint64{0, 4} {
		b, err := audit.ReadBatch(context.Background(), st, from, 4)
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := s.Deliver(context.Background(), b); err != nil {
			t.Fatal(err)
		}
	}
	out := mustOffline(t, "audit", "verify", "--sink", dir, "--key", pub, "--origin", testAuditOrigin)
	if !strings.HasPrefix(out, "audit log OK: 8 entries in 2 batches") {
		t.Fatalf("verify --sink = %q", out)
	}
	files, _ := filepath.Glob(filepath.Join(dir, "batches", "*.json"))
	os.Remove(files[0])
	if _, err := ctl(t, "audit", "verify", "--sink", dir, "--key", pub, "--origin", testAuditOrigin); err == nil || !strings.Contains(err.Error(), "INVALID") {
		t.Fatalf("verify --sink with a batch removed = %v", err)
	}
}

func TestAuditSinkCommandReceivesOverMTLS(t *testing.T) {
	db, pub, _ := signedAuditStore(t, 8)
	dir := t.TempDir()
	pki, err := identity.WriteDevPKI(filepath.Join(dir, "pki"), identity.DevPKIOptions{TrustDomain: "gpuaas.test"})
	if err != nil {
		t.Fatal(err)
	}
	sinkID := spiffeid.RequireFromPath(pki.TrustDomain, "/gpuaas/audit-sink")
	svid, err := pki.CA.IssueSVID(sinkID, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	cert, key := filepath.Join(dir, "sink.pem"), filepath.Join(dir, "sink-key.pem")
	if err := identity.WriteSVID(cert, key, svid); err != nil {
		t.Fatal(err)
	}
	addr := func() string {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		return l.Addr().String()
	}()
	sinkDir := filepath.Join(dir, "sink")
	ctx, cancel := context.WithCancel(context.Background())
	var out bytes.Buffer
	root := newRoot(&globals{stdout: &out})
	root.SetArgs([]string{"--trust-domain", "gpuaas.test", "--cert", cert, "--key", key, "--bundle", pki.BundlePath,
		"audit", "sink", "--dir", sinkDir, "--listen", addr, "--log-key", pub, "--origin", testAuditOrigin})
	root.SetErr(io.Discard)
	done := make(chan error, 1)
	go func() { done <- root.ExecuteContext(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("audit sink exited with %v", err)
		}
	}()

	cpSrc, err := identity.NewFileSource(ctx, identity.FileSourceConfig{CertPath: pki.ControlPlane.CertPath, KeyPath: pki.ControlPlane.KeyPath,
		BundlePath: pki.BundlePath, TrustDomain: pki.TrustDomain})
	if err != nil {
		t.Fatal(err)
	}
	defer cpSrc.Close()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(identity.ClientCredentials(cpSrc, tlsconfig.AuthorizeID(sinkID))))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	st, err := store.OpenBolt(db, store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	f, err := audit.NewForwarder(audit.ForwarderOptions{Store: st, Sink: audit.NewGRPCSink(conn), Origin: testAuditOrigin})
	if err != nil {
		t.Fatal(err)
	}
	callCtx, callCancel := context.WithTimeout(ctx, 30*time.Second)
	defer callCancel()
	var syncErr error
	for { // the sink is starting
		if syncErr = f.Sync(callCtx); syncErr == nil || callCtx.Err() != nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if syncErr != nil {
		t.Fatalf("sync with the sink: %v", syncErr)
	}
	for {
		ok, err := f.Step(callCtx)
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			break
		}
	}
	got := mustOffline(t, "audit", "verify", "--sink", sinkDir, "--key", pub, "--origin", testAuditOrigin)
	if !strings.HasPrefix(got, "audit log OK: 8 entries") {
		t.Fatalf("verify --sink = %q", got)
	}
}
