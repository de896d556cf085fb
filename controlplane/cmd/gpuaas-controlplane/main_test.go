package main

import (
	"errors"
	"strings"
	"testing"

	"github.com/gpuaas/gpuaas/pkg/config"
)

func TestShippedConfigIsValid(t *testing.T) {
	var c Config
	if err := config.Load("../../../packaging/config/controlplane.yaml", &c); err != nil {
		t.Fatal(err)
	}
	if c.td.Name() != "example.org" || c.TickInterval.D().Seconds() != 1 {
		t.Fatalf("parsed %+v", c)
	}
}

func TestBadConfigNamesTheKey(t *testing.T) {
	base := "listen: 127.0.0.1:7443\ndata_dir: /var/lib/x\ntrust_domain: example.org\nsvid: {cert: a, key: b, bundle: c}\n"
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
