package config

import (
	"errors"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// daemonConfig is shaped like the daemons' configurations: sections,
// keys with underscores, a pointer section, lists, a map, defaults filled
// in by Validate.
type daemonConfig struct {
	Listen        string   `yaml:"listen"`
	MetricsListen string   `yaml:"metrics_listen"`
	Tick          Duration `yaml:"tick"`
	Log           Log      `yaml:"log"`
	Store         struct {
		Backend string `yaml:"backend"`
		Etcd    struct {
			Endpoints   []string      `yaml:"endpoints"`
			DialTimeout time.Duration `yaml:"dial_timeout"`
			MaxTxnOps   int           `yaml:"max_txn_ops"`
		} `yaml:"etcd"`
	} `yaml:"store"`
	OIDC *struct {
		Issuer string `yaml:"issuer"`
	} `yaml:"oidc"`
	GPUs []struct {
		Model string `yaml:"model"`
	} `yaml:"gpus"`
	Labels   map[string]string `yaml:"labels"`
	Embedded `yaml:",inline"`

	//lint:ignore U1000 an unexported field is not a key (TestOverrideErrorsNameTheKey)
	hidden string
}

type Embedded struct {
	Region string `yaml:"region"`
}

func (c *daemonConfig) Validate() error {
	if c.Listen == "" {
		return FieldError("listen", "is required")
	}
	if c.Tick == 0 {
		c.Tick = Duration(time.Second)
	}
	if c.Store.Etcd.MaxTxnOps < 0 {
		return FieldError("store.etcd.max_txn_ops", "must not be negative")
	}
	_, err := c.Log.SlogLevel()
	return err
}

const file = `listen: 127.0.0.1:1
metrics_listen: 127.0.0.1:2
log:
  level: info
store:
  backend: bbolt
labels:
  rack: r1
`

func env(kv ...string) []string { return kv }

func TestOverridePrecedence(t *testing.T) {
	cases := map[string]struct {
		o     Overrides
		check func(*daemonConfig) bool
	}{
		"file only": {Overrides{}, func(c *daemonConfig) bool { return c.Log.Level == "info" && c.Tick.D() == time.Second }},
		"environment over file": {Overrides{EnvPrefix: "GPUAAS_AGENT_", Environ: env("GPUAAS_AGENT_LOG_LEVEL=debug")},
			func(c *daemonConfig) bool { return c.Log.Level == "debug" }},
		"flag over environment": {Overrides{EnvPrefix: "GPUAAS_AGENT_", Environ: env("GPUAAS_AGENT_LOG_LEVEL=debug"), Set: []string{"log.level=warn"}},
			func(c *daemonConfig) bool { return c.Log.Level == "warn" }},
		"later flag wins": {Overrides{Set: []string{"log.level=warn", "log.level=error"}},
			func(c *daemonConfig) bool { return c.Log.Level == "error" }},
		"environment over default": {Overrides{EnvPrefix: "GPUAAS_AGENT_", Environ: env("GPUAAS_AGENT_TICK=250ms")},
			func(c *daemonConfig) bool { return c.Tick.D() == 250*time.Millisecond }},
		"other prefixes ignored": {Overrides{EnvPrefix: "GPUAAS_AGENT_", Environ: env("GPUAAS_CONTROLPLANE_LISTEN=x", "GPUAAS_ADDR=y", "PATH=/bin")},
			func(c *daemonConfig) bool { return c.Listen == "127.0.0.1:1" }},
		"no prefix reads no environment": {Overrides{Environ: env("GPUAAS_AGENT_LOG_LEVEL=debug")},
			func(c *daemonConfig) bool { return c.Log.Level == "info" }},
		"underscored key": {Overrides{EnvPrefix: "GPUAAS_AGENT_", Environ: env("GPUAAS_AGENT_METRICS_LISTEN=0.0.0.0:9")},
			func(c *daemonConfig) bool { return c.MetricsListen == "0.0.0.0:9" }},
		"nested underscored key": {Overrides{EnvPrefix: "GPUAAS_AGENT_", Environ: env("GPUAAS_AGENT_STORE_ETCD_MAX_TXN_OPS=64", "GPUAAS_AGENT_STORE_ETCD_DIAL_TIMEOUT=3s")},
			func(c *daemonConfig) bool {
				return c.Store.Etcd.MaxTxnOps == 64 && c.Store.Etcd.DialTimeout == 3*time.Second
			}},
		"siblings in the file kept": {Overrides{Set: []string{"store.etcd.max_txn_ops=8"}},
			func(c *daemonConfig) bool { return c.Store.Backend == "bbolt" && c.Store.Etcd.MaxTxnOps == 8 }},
		"list as flow sequence": {Overrides{Set: []string{"store.etcd.endpoints=[a:1, b:2]"}},
			func(c *daemonConfig) bool { return reflect.DeepEqual(c.Store.Etcd.Endpoints, []string{"a:1", "b:2"}) }},
		"list of sections": {Overrides{Set: []string{"gpus=[{model: H200}, {model: H100}]"}},
			func(c *daemonConfig) bool { return len(c.GPUs) == 2 && c.GPUs[1].Model == "H100" }},
		"pointer section made": {Overrides{EnvPrefix: "GPUAAS_CONTROLPLANE_", Environ: env("GPUAAS_CONTROLPLANE_OIDC_ISSUER=https://id.example")},
			func(c *daemonConfig) bool { return c.OIDC != nil && c.OIDC.Issuer == "https://id.example" }},
		"map key": {Overrides{Set: []string{"labels.zone=z1"}},
			func(c *daemonConfig) bool { return c.Labels["zone"] == "z1" && c.Labels["rack"] == "r1" }},
		"map key reset": {Overrides{Set: []string{"labels.rack="}},
			func(c *daemonConfig) bool { _, ok := c.Labels["rack"]; return !ok }},
		"inline key": {Overrides{Set: []string{"region=eu"}},
			func(c *daemonConfig) bool { return c.Region == "eu" }},
		"empty value resets to the default": {Overrides{Set: []string{"metrics_listen="}},
			func(c *daemonConfig) bool { return c.MetricsListen == "" }},
		"null resets a string": {Overrides{Set: []string{"metrics_listen=~"}},
			func(c *daemonConfig) bool { return c.MetricsListen == "" }},
		"string field keeps yaml-looking text": {Overrides{Set: []string{"listen=true", "store.backend=a: b"}},
			func(c *daemonConfig) bool { return c.Listen == "true" && c.Store.Backend == "a: b" }},
		"value may hold =": {Overrides{Set: []string{"store.backend=x=y"}},
			func(c *daemonConfig) bool { return c.Store.Backend == "x=y" }},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			var c daemonConfig
			if _, err := DecodeWith([]byte(file), &c, tc.o); err != nil {
				t.Fatal(err)
			}
			if !tc.check(&c) {
				t.Fatalf("got %+v", c)
			}
		})
	}
}

func TestOverrideErrorsNameTheKey(t *testing.T) {
	cases := map[string]struct {
		o    Overrides
		want []string
	}{
		"unknown environment key": {Overrides{EnvPrefix: "GPUAAS_AGENT_", Environ: env("GPUAAS_AGENT_LOG_LEVLE=debug")},
			[]string{"GPUAAS_AGENT_LOG_LEVLE", "names no configuration key"}},
		"prefix alone":         {Overrides{EnvPrefix: "GPUAAS_AGENT_", Environ: env("GPUAAS_AGENT_=x")}, []string{"GPUAAS_AGENT_"}},
		"unknown flag key":     {Overrides{Set: []string{"log.levle=debug"}}, []string{"-set log.levle", `no such key "log.levle"`, "json, level"}},
		"key below a scalar":   {Overrides{Set: []string{"listen.port=1"}}, []string{`no key "listen.port"`}},
		"key below a duration": {Overrides{Set: []string{"tick.seconds=1"}}, []string{`no key "tick.seconds"`}},
		"unexported field":     {Overrides{Set: []string{"hidden=1"}}, []string{`no such key "hidden"`}},
		"not an assignment":    {Overrides{Set: []string{"log.level"}}, []string{"not key.path=value"}},
		"empty path segment":   {Overrides{Set: []string{"log..level=x"}}, []string{"empty key"}},
		"wrong type from the environment": {Overrides{EnvPrefix: "GPUAAS_AGENT_", Environ: env("GPUAAS_AGENT_STORE_ETCD_MAX_TXN_OPS=many")},
			[]string{"store.etcd.max_txn_ops", "environment GPUAAS_AGENT_STORE_ETCD_MAX_TXN_OPS", "cannot unmarshal"}},
		"bad duration":                    {Overrides{Set: []string{"tick=5 parsecs"}}, []string{"tick (-set tick)", "unknown unit"}},
		"unknown key inside a flow value": {Overrides{Set: []string{"gpus=[{modle: H200}]"}}, []string{"gpus", "modle"}},
		// Validation runs after the overrides, with its own message.
		"validation names the key": {Overrides{Set: []string{"log.level=loud"}}, []string{"log.level: must be debug, info, warn or error"}},
		"validation of a reset":    {Overrides{EnvPrefix: "GPUAAS_AGENT_", Environ: env("GPUAAS_AGENT_LISTEN=")}, []string{"listen: is required"}},
		"validation after a flag":  {Overrides{Set: []string{"store.etcd.max_txn_ops=-1"}}, []string{"store.etcd.max_txn_ops: must not be negative"}},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			var c daemonConfig
			_, err := DecodeWith([]byte(file), &c, tc.o)
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("err = %v, want ErrInvalid", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("err = %q, want it to contain %q", err, w)
				}
			}
			if strings.Contains(err.Error(), "line ") {
				t.Errorf("err = %q names a line of a document the operator never wrote", err)
			}
		})
	}
}

func TestOverrideAmbiguousEnvironmentName(t *testing.T) {
	var c struct {
		AB string `yaml:"a_b"`
		A  struct {
			B string `yaml:"b"`
		} `yaml:"a"`
	}
	_, err := DecodeWith([]byte("a_b: x\n"), &c, Overrides{EnvPrefix: "P_", Environ: env("P_A_B=y")})
	if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "a.b or a_b") {
		t.Fatalf("err = %v, want an ambiguity naming a.b and a_b", err)
	}
	// -set says which one.
	if _, err := DecodeWith([]byte("a_b: x\n"), &c, Overrides{Set: []string{"a.b=y"}}); err != nil || c.A.B != "y" || c.AB != "x" {
		t.Fatalf("err %v, got %+v", err, c)
	}
}

func TestOverrideFileErrorsUnchanged(t *testing.T) {
	// A broken file is reported exactly as without overrides: same key,
	// same line.
	in := "listen: x\nlog:\n  levle: debug\n"
	var a, b daemonConfig
	plain := Decode([]byte(in), &a)
	_, with := DecodeWith([]byte(in), &b, Overrides{Set: []string{"log.level=debug"}})
	if plain == nil || with == nil || plain.Error() != with.Error() || !strings.Contains(with.Error(), "line 3") {
		t.Fatalf("without overrides %v, with %v", plain, with)
	}
}

func TestOverrideAppliedList(t *testing.T) {
	var c daemonConfig
	applied, err := DecodeWith([]byte(file), &c, Overrides{EnvPrefix: "GPUAAS_AGENT_",
		Environ: env("GPUAAS_AGENT_LOG_LEVEL=debug", "GPUAAS_AGENT_LISTEN=secret-looking:1"), Set: []string{"log.level=warn"}})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, o := range applied {
		got = append(got, o.String())
	}
	want := []string{"listen (environment GPUAAS_AGENT_LISTEN)", "log.level (environment GPUAAS_AGENT_LOG_LEVEL)", "log.level (-set log.level)"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("applied %q, want %q", got, want)
	}
	for _, g := range got {
		if strings.Contains(g, "secret-looking") || strings.Contains(g, "warn") {
			t.Fatalf("an applied override shows its value: %q", g)
		}
	}
}

func TestLoadWith(t *testing.T) {
	p := filepath.Join(t.TempDir(), "c.yaml")
	if err := os.WriteFile(p, []byte(file), 0o600); err != nil {
		t.Fatal(err)
	}
	var c daemonConfig
	if _, err := LoadWith(p, &c, Overrides{EnvPrefix: EnvPrefix("controlplane"), Environ: env("GPUAAS_CONTROLPLANE_LISTEN=10.0.0.1:7443")}); err != nil {
		t.Fatal(err)
	}
	if c.Listen != "10.0.0.1:7443" {
		t.Fatalf("listen = %q", c.Listen)
	}
	_, err := LoadWith(p, &c, Overrides{Set: []string{"nope=1"}})
	if !errors.Is(err, ErrInvalid) || !strings.HasPrefix(err.Error(), p+": ") {
		t.Fatalf("err = %v, want one naming the file", err)
	}
}

func TestSetFlags(t *testing.T) {
	var s SetFlags
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	fs.SetOutput(new(strings.Builder))
	fs.Var(&s, "set", "")
	if err := fs.Parse([]string{"-set", "log.level=debug", "-set", "listen=a=b"}); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual([]string(s), []string{"log.level=debug", "listen=a=b"}) {
		t.Fatalf("got %q", s)
	}
	if err := fs.Parse([]string{"-set", "=x"}); err == nil {
		t.Fatal("-set =x accepted")
	}
	if err := fs.Parse([]string{"-set", "novalue"}); err == nil {
		t.Fatal("-set novalue accepted")
	}
	if EnvPrefix("controlplane") != "GPUAAS_CONTROLPLANE_" || EnvPrefix("agent") != "GPUAAS_AGENT_" {
		t.Fatal("EnvPrefix")
	}
}

func FuzzOverride(f *testing.F) {
	f.Add("log.level", "debug", "GPUAAS_AGENT_LOG_LEVEL=info")
	f.Add("gpus", "[{model: H200}]", "GPUAAS_AGENT_STORE_ETCD_ENDPOINTS=[a]")
	f.Add("labels.x", "", "GPUAAS_AGENT_=")
	f.Fuzz(func(t *testing.T, key, value, envKV string) {
		var c daemonConfig
		_, err := DecodeWith([]byte(file), &c, Overrides{EnvPrefix: "GPUAAS_AGENT_", Environ: []string{envKV}, Set: []string{key + "=" + value}})
		if err != nil && !errors.Is(err, ErrInvalid) {
			t.Fatalf("error outside the class: %v", err)
		}
	})
}
