// Command gpuaasctl is the operators' and security reviewers' CLI: leases,
// nodes, audit verification and a development PKI.
package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/gpuaas/gpuaas/pkg/errs"
	"github.com/gpuaas/gpuaas/pkg/identity"
)

var version = "dev"

type globals struct {
	addr, trustDomain, cert, key, bundle, output string
	tokenFile                                    string
	timeout                                      time.Duration
	stdout                                       io.Writer
}

func main() {
	g := &globals{stdout: os.Stdout}
	root := newRoot(g)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "gpuaasctl:", describe(err))
		os.Exit(1)
	}
}

// describe renders an RPC error with its stable reason.
func describe(err error) string {
	e := errs.FromStatus(err)
	if r := errs.ReasonOf(e); r != "" {
		return fmt.Sprintf("%s (%s)", e.Error(), r)
	}
	return err.Error()
}

func envOr(k, d string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return d
}

func newRoot(g *globals) *cobra.Command {
	root := &cobra.Command{
		Use:           "gpuaasctl",
		Short:         "Operate a gpuaas fleet: leases, nodes, audit, development PKI",
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       version,
	}
	pf := root.PersistentFlags()
	pf.StringVar(&g.addr, "addr", envOr("GPUAAS_ADDR", "127.0.0.1:7443"), "control plane address (GPUAAS_ADDR)")
	pf.StringVar(&g.trustDomain, "trust-domain", envOr("GPUAAS_TRUST_DOMAIN", "gpuaas.test"), "SPIFFE trust domain (GPUAAS_TRUST_DOMAIN)")
	pf.StringVar(&g.cert, "cert", os.Getenv("GPUAAS_CERT"), "operator SVID certificate (GPUAAS_CERT)")
	pf.StringVar(&g.key, "key", os.Getenv("GPUAAS_KEY"), "operator SVID key (GPUAAS_KEY)")
	pf.StringVar(&g.bundle, "bundle", os.Getenv("GPUAAS_BUNDLE"), "trust bundle (GPUAAS_BUNDLE)")
	pf.StringVar(&g.tokenFile, "token-file", os.Getenv("GPUAAS_TOKEN_FILE"), "file holding an OIDC bearer token to authenticate with instead of (or besides) an SVID (GPUAAS_TOKEN_FILE); never pass a token on the command line")
	pf.StringVarP(&g.output, "output", "o", "table", "output format: table or json")
	pf.DurationVar(&g.timeout, "timeout", 15*time.Second, "timeout of each call")
	root.AddCommand(devPKICmd(g), leaseCmd(g), nodeCmd(g), auditCmd(g), attestCmd(g), usageCmd(g), secretsCmd(g))
	return root
}

// dial connects to the control plane, accepting only its SPIFFE ID, as
// the operator's SVID and/or with an OIDC bearer token read from a file.
func (g *globals) dial(ctx context.Context) (*grpc.ClientConn, func(), error) {
	td, err := spiffeid.TrustDomainFromString(g.trustDomain)
	if err != nil {
		return nil, nil, fmt.Errorf("--trust-domain: %w", err)
	}
	if g.bundle == "" {
		return nil, nil, errors.New("--bundle (or GPUAAS_BUNDLE) is required: it authenticates the control plane")
	}
	var token string
	if g.tokenFile != "" {
		b, err := os.ReadFile(g.tokenFile)
		if err != nil {
			return nil, nil, fmt.Errorf("--token-file: %w", err)
		}
		if token = strings.TrimSpace(string(b)); token == "" || strings.ContainsAny(token, " \t\r\n") {
			return nil, nil, fmt.Errorf("--token-file %s: not one bearer token", g.tokenFile)
		}
	}
	server := tlsconfig.AuthorizeID(identity.ControlPlaneID(td))
	var creds credentials.TransportCredentials
	closeSrc := func() {}
	switch {
	case g.cert != "" && g.key != "":
		src, err := identity.NewFileSource(ctx, identity.FileSourceConfig{CertPath: g.cert, KeyPath: g.key, BundlePath: g.bundle, TrustDomain: td})
		if err != nil {
			return nil, nil, err
		}
		creds, closeSrc = identity.ClientCredentials(src, server), func() { src.Close() }
	case token != "":
		bundle, err := x509bundle.Load(td, g.bundle)
		if err != nil {
			return nil, nil, fmt.Errorf("--bundle: %w", err)
		}
		cfg := tlsconfig.TLSClientConfig(bundle, server)
		cfg.MinVersion = tls.VersionTLS13
		creds = credentials.NewTLS(cfg)
	default:
		return nil, nil, errors.New("authenticate with --cert and --key (an operator SVID) or --token-file (an OIDC bearer token)")
	}
	opts := []grpc.DialOption{grpc.WithTransportCredentials(creds)}
	if token != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(bearerToken(token)))
	}
	conn, err := grpc.NewClient(g.addr, opts...)
	if err != nil {
		closeSrc()
		return nil, nil, err
	}
	return conn, func() { conn.Close(); closeSrc() }, nil
}

// bearerToken sends an OIDC token with every call, only over TLS.
type bearerToken string

func (b bearerToken) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

func (bearerToken) RequireTransportSecurity() bool { return true }

func (g *globals) printJSON(m proto.Message) error {
	b, err := protojson.MarshalOptions{Multiline: true, Indent: "  "}.Marshal(m)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(g.stdout, string(b))
	return err
}

func (g *globals) checkOutput() error {
	if g.output != "table" && g.output != "json" {
		return fmt.Errorf("--output must be table or json, not %q", g.output)
	}
	return nil
}

func devPKICmd(g *globals) *cobra.Command {
	var dir string
	var agents, operators []string
	var ttl time.Duration
	cmd := &cobra.Command{
		Use:   "dev-pki",
		Short: "Write a development CA and SVIDs for the control plane, agents and operators",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			pki, err := identity.WriteDevPKI(dir, identity.DevPKIOptions{TrustDomain: g.trustDomain, Agents: agents, Operators: operators, TTL: ttl})
			if err != nil {
				return err
			}
			w := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "IDENTITY\tCERT\tKEY")
			fmt.Fprintf(w, "%s\t%s\t%s\n", pki.ControlPlane.ID, pki.ControlPlane.CertPath, pki.ControlPlane.KeyPath)
			for _, set := range []map[string]identity.SVIDFiles{pki.Agents, pki.Operators} {
				for _, name := range slices.Sorted(maps.Keys(set)) {
					f := set[name]
					fmt.Fprintf(w, "%s\t%s\t%s\n", f.ID, f.CertPath, f.KeyPath)
				}
			}
			fmt.Fprintf(w, "bundle\t%s\t\n", pki.BundlePath)
			return w.Flush()
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "pki", "directory to write into")
	cmd.Flags().StringSliceVar(&agents, "agents", nil, "node names to issue agent SVIDs for")
	cmd.Flags().StringSliceVar(&operators, "operators", []string{"admin"}, "operator names to issue SVIDs for")
	cmd.Flags().DurationVar(&ttl, "ttl", 24*time.Hour, "SVID lifetime")
	return cmd
}

// encodeJSON prints a plain Go value as indented JSON (a slice is printed
// as [] when empty, never null).
func (g *globals) encodeJSON(v any) error {
	enc := json.NewEncoder(g.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
