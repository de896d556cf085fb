package main

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/config"
	"github.com/gpuaas/gpuaas/pkg/heapfloor"
)

func TestShippedConfigIsValid(t *testing.T) {
	// The shipped configuration with the shipped policy (the package puts
	// it at /etc/gpuaas/attestation-policy.json).
	raw, err := os.ReadFile("../../../packaging/config/controlplane.yaml")
	if err != nil {
		t.Fatal(err)
	}
	policy, err := filepath.Abs("../../../packaging/config/attestation-policy.json")
	if err != nil {
		t.Fatal(err)
	}
	body := strings.Replace(string(raw), "/etc/gpuaas/attestation-policy.json", policy, 1)
	var c Config
	if err := config.Decode([]byte(body), &c); err != nil {
		t.Fatal(err)
	}
	if c.td.Name() != "example.org" || c.TickInterval.D().Seconds() != 1 {
		t.Fatalf("parsed %+v", c)
	}
	// Fail closed: the template allows no agent until packaging fills in
	// the release's digest.
	if p := c.Attestation.policy; p == nil || len(p.AllowedAgentSHA256) != 0 || !slices.Contains(p.RequiredFences, "egress") {
		t.Fatalf("shipped policy = %+v", p)
	}
}

func TestAuditConfigDefaults(t *testing.T) {
	var c Config
	body := "listen: 127.0.0.1:7443\ndata_dir: /var/lib/x\ntrust_domain: example.org\nsvid: {cert: a, key: b, bundle: c}\nattestation: {disabled: true}\n" +
		"audit: {signing_key: /etc/gpuaas/audit-signing.key, forward: {address: \"sink:7444\", sink_id: \"spiffe://example.org/gpuaas/audit-sink\"}}\n"
	if err := config.Decode([]byte(body), &c); err != nil {
		t.Fatal(err)
	}
	a := c.Audit
	if a.Origin != "example.org/audit" || a.CheckpointEvery != 1000 || a.CheckpointInterval.D() != 10*time.Second || a.Forward.MaxBatch != 1000 {
		t.Fatalf("audit defaults = %+v %+v", a, a.Forward)
	}
}

func TestStartAuditSignsAtStart(t *testing.T) {
	dir := t.TempDir()
	skey, pub := filepath.Join(dir, "k"), filepath.Join(dir, "k.pub")
	if _, err := auditlog.WriteKeyPair("example.org/audit", skey, pub); err != nil {
		t.Fatal(err)
	}
	st, err := store.OpenBolt(filepath.Join(dir, "state.db"), store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	err = st.Update(context.Background(), func(tx store.Tx) error {
		_, err := audit.Append(tx, auditlog.Entry{Actor: "a", Action: "lease.create", Outcome: auditlog.OutcomeSuccess})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	cfg := &Config{Audit: AuditConfig{Origin: "example.org/audit", SigningKey: skey, CheckpointEvery: 10, CheckpointInterval: config.Duration(time.Second)}}
	stop, err := startAudit(context.Background(), cfg, st, nil, prometheus.NewRegistry(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	stop()
	trusted, _ := auditlog.LoadVerifiers(pub)
	res, err := audit.Verify(context.Background(), st, audit.VerifyOptions{Trusted: trusted})
	if err != nil || res.Checkpoints != 1 || res.Latest.Size != 1 {
		t.Fatalf("after start: %+v, %v", res, err)
	}
	cfg.Audit.SigningKey = filepath.Join(dir, "missing")
	if _, err := startAudit(context.Background(), cfg, st, nil, prometheus.NewRegistry(), slog.New(slog.DiscardHandler)); err == nil {
		t.Fatal("a missing signing key was accepted")
	}
}

func TestBadConfigNamesTheKey(t *testing.T) {
	base := "listen: 127.0.0.1:7443\ndata_dir: /var/lib/x\ntrust_domain: example.org\nsvid: {cert: a, key: b, bundle: c}\nattestation: {disabled: true}\n"
	const etcd = "store: {backend: etcd, etcd: {endpoints: [\"127.0.0.1:2379\"], prefix: /gpuaas/x/}}\n"
	cases := map[string]struct{ body, key string }{
		"unknown key":      {base + "listne: x\n", "listne"},
		"bad listen":       {strings.Replace(base, "127.0.0.1:7443", "nowhere", 1), "listen"},
		"relative datadir": {strings.Replace(base, "/var/lib/x", "var/lib/x", 1), "data_dir"},
		"bad trust domain": {strings.Replace(base, "example.org", "Example Org", 1), "trust_domain"},
		"missing cert":     {strings.Replace(base, "cert: a, ", "", 1), "svid.cert"},
		"foreign operator": {base + "operators: [spiffe://other.org/gpuaas/operator/x]\n", "operators[0]"},
		"bad log level":    {base + "log: {level: loud}\n", "log.level"},
		"bad tick":         {base + "tick_interval: 1h\n", "tick_interval"},
		"tick type":        {base + "tick_interval: [1]\n", "tick_interval"},
		"audit origin":     {base + "audit: {origin: \"a b\"}\n", "audit.origin"},
		"no policy":        {strings.Replace(base, "attestation: {disabled: true}\n", "", 1), "attestation.policy_file"},
		"missing policy":   {strings.Replace(base, "{disabled: true}", "{policy_file: /nonexistent/policy.json}", 1), "attestation.policy_file"},
		"both":             {strings.Replace(base, "{disabled: true}", "{disabled: true, policy_file: /p.json}", 1), "attestation.disabled"},
		"relative key":     {base + "audit: {signing_key: k}\n", "audit.signing_key"},
		"forward unsigned": {base + "audit: {forward: {address: \"s:1\", sink_id: \"spiffe://example.org/sink\"}}\n", "audit.forward"},
		"forward sink id":  {base + "audit: {signing_key: /k, forward: {address: \"s:1\", sink_id: sink}}\n", "audit.forward.sink_id"},
		"forward batch":    {base + "audit: {signing_key: /k, checkpoint_every: 100, forward: {address: \"s:1\", sink_id: \"spiffe://example.org/sink\", max_batch: 10}}\n", "audit.forward.max_batch"},
		"metrics listen":   {base + "metrics_listen: nowhere\n", "metrics_listen"},
		"read buffer":      {base + "edge: {read_buffer_bytes: 100}\n", "edge.read_buffer_bytes"},
		"replica on bbolt": {base + "replica: {id: cp-1}\n", "replica"},
		"replica id":       {base + etcd + "replica: {id: \"cp 1\"}\n", "replica.id"},
		"replica ttl":      {base + etcd + "replica: {ttl: 1s}\n", "replica.ttl"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			var c Config
			err := config.Decode([]byte(tc.body), &c)
			if !errors.Is(err, config.ErrInvalid) || !strings.Contains(err.Error(), tc.key) {
				t.Fatalf("err = %v, want one naming %s", err, tc.key)
			}
		})
	}
}

func TestGCHeapFloorConfig(t *testing.T) {
	base := "listen: 127.0.0.1:7443\ndata_dir: /var/lib/x\ntrust_domain: example.org\nsvid: {cert: a, key: b, bundle: c}\nattestation: {disabled: true}\n"
	for _, tc := range []struct {
		line string
		want int
		err  string
	}{
		{"", heapfloor.DefaultMiB, ""},
		{"gc_heap_floor_mib: 512\n", 512, ""},
		{"gc_heap_floor_mib: -1\n", -1, ""},
		{"gc_heap_floor_mib: 65537\n", 0, "gc_heap_floor_mib"},
		{"gc_heap_floor_mib: lots\n", 0, "gc_heap_floor_mib"},
	} {
		var c Config
		err := config.Decode([]byte(base+tc.line), &c)
		switch {
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("%q: err %v, want one naming %s", tc.line, err, tc.err)
		case tc.err == "" && err != nil:
			t.Errorf("%q: %v", tc.line, err)
		case tc.err == "" && c.GCHeapFloorMiB != tc.want:
			t.Errorf("%q: floor %d MiB, want %d", tc.line, c.GCHeapFloorMiB, tc.want)
		}
	}
}
