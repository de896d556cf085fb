package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/agent/lease"
	"github.com/gpuaas/gpuaas/agent/session"
	"github.com/gpuaas/gpuaas/agent/status"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

// startStatus serves a status socket whose session says connected (or
// not), with one running lease.
func startStatus(t *testing.T, connected bool) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "st")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "agent.sock")
	since := time.Now().Add(-time.Minute)
	srv, err := status.Listen(status.Config{Socket: sock}, status.Sources{Node: "node-a", Version: "v1",
		Session: func() session.Status {
			return session.Status{Address: "cp:7443", Connected: connected, Since: since, LastError: "control plane closed the session", LastErrorTime: since, Reconnects: 2,
				Challenge: session.ChallengeStatus{Time: since, NoncePrefix: "0badc0de", OK: true}, Telemetry: session.TelemetryStatus{Time: since, Sequence: 9}}
		},
		Journal: func() (map[string]lease.Record, error) {
			return map[string]lease.Record{"l-7": {LeaseID: "l-7", Phase: leasev1.Phase_PHASE_RUNNING, GPUUUID: "GPU-1", MIGUUID: "MIG-1", ContainerID: "gpuaas-l-7", Fenced: true, StartTime: since}}, nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve() }()
	t.Cleanup(func() { srv.Close(); <-done })
	return sock
}

func runStatus(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errOut strings.Builder
	code := statusMain(args, &out, &errOut)
	return code, out.String(), errOut.String()
}

func TestStatusCommandRendersAndExits(t *testing.T) {
	sock := startStatus(t, true)
	code, out, errOut := runStatus(t, "-socket", sock)
	if code != 0 {
		t.Fatalf("exit %d, stderr %s", code, errOut)
	}
	for _, want := range []string{"node-a (agent v1)", "cp:7443 connected since", "2 reconnects", "last error:", "challenge 0badc0de… answered",
		"report 9 sent", "LEASES (1)", "l-7", "RUNNING", "MIG-1", "gpuaas-l-7", "PARTITIONS (0)", "FENCES (0)", "UNAVAILABLE", "partitions: no GPU backend"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}

	code, out, _ = runStatus(t, "-socket", sock, "-json")
	var snap status.Snapshot
	if err := json.Unmarshal([]byte(out), &snap); err != nil || code != 0 {
		t.Fatalf("-json: exit %d, %v\n%s", code, err, out)
	}
	if len(snap.Leases) != 1 || snap.Leases[0].Phase != "PHASE_RUNNING" || !snap.ControlPlane.Connected || snap.Attestation.NoncePrefix != "0badc0de" {
		t.Fatalf("-json snapshot = %+v", snap)
	}
}

func TestStatusCommandExitCodes(t *testing.T) {
	if code, out, _ := runStatus(t, "-socket", startStatus(t, false)); code != 1 || !strings.Contains(out, "NOT CONNECTED") {
		t.Fatalf("disconnected agent: exit %d\n%s", code, out)
	}
	if code, _, errOut := runStatus(t, "-socket", filepath.Join(t.TempDir(), "none.sock")); code != 2 || !strings.Contains(errOut, "reach the agent") {
		t.Fatalf("no agent: exit %d, stderr %s", code, errOut)
	}
	if code, _, errOut := runStatus(t, "-config", filepath.Join(t.TempDir(), "missing.yaml")); code != 2 || errOut == "" {
		t.Fatalf("missing config: exit %d, stderr %s", code, errOut)
	}
	if code, _, _ := runStatus(t, "-bogus"); code != 2 {
		t.Fatalf("bad flag: exit %d", code)
	}
}

// The socket comes from the configuration, with the same overrides the
// daemon applies: status_socket from the file, the environment or -set.
func TestStatusCommandFindsTheSocketInTheConfiguration(t *testing.T) {
	sock := startStatus(t, true)
	base := "node: node-a\ncontrol_plane: cp:7443\ntrust_domain: example.org\nsvid: {cert: a, key: b, bundle: c}\ndata_dir: /var/lib/a\ngpu:\n  backend: sim\n  sim:\n    gpus: [{model: H200, mig_enabled: true}]\n"
	cfg := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(cfg, []byte(base+"status_socket: "+sock+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if code, _, errOut := runStatus(t, "-config", cfg); code != 0 {
		t.Fatalf("socket from the file: exit %d, %s", code, errOut)
	}
	off := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(off, []byte(base+"status_socket: none\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if code, _, errOut := runStatus(t, "-config", off); code != 2 || !strings.Contains(errOut, "off") {
		t.Fatalf("status_socket none: exit %d, %s", code, errOut)
	}
	if code, _, errOut := runStatus(t, "-config", off, "-set", "status_socket="+sock); code != 0 {
		t.Fatalf("socket from -set: exit %d, %s", code, errOut)
	}
	t.Setenv("GPUAAS_AGENT_STATUS_SOCKET", sock)
	if code, _, errOut := runStatus(t, "-config", off); code != 0 {
		t.Fatalf("socket from the environment: exit %d, %s", code, errOut)
	}
}
