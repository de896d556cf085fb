// Command gpuaasctl is the operators' and security reviewers' CLI: leases,
// nodes, audit verification and a development PKI.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/errs"
	"github.com/gpuaas/gpuaas/pkg/identity"
	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

var version = "dev"

type globals struct {
	addr, trustDomain, cert, key, bundle, output string
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
	pf.StringVarP(&g.output, "output", "o", "table", "output format: table or json")
	pf.DurationVar(&g.timeout, "timeout", 15*time.Second, "timeout of each call")
	root.AddCommand(devPKICmd(g), leaseCmd(g), nodeCmd(g), auditCmd(g))
	return root
}

// dial connects to the control plane with the operator's SVID, accepting
// only the control plane's SPIFFE ID.
func (g *globals) dial(ctx context.Context) (*grpc.ClientConn, func(), error) {
	td, err := spiffeid.TrustDomainFromString(g.trustDomain)
	if err != nil {
		return nil, nil, fmt.Errorf("--trust-domain: %w", err)
	}
	if g.cert == "" || g.key == "" || g.bundle == "" {
		return nil, nil, errors.New("--cert, --key and --bundle (or GPUAAS_CERT, GPUAAS_KEY, GPUAAS_BUNDLE) are required")
	}
	src, err := identity.NewFileSource(ctx, identity.FileSourceConfig{CertPath: g.cert, KeyPath: g.key, BundlePath: g.bundle, TrustDomain: td})
	if err != nil {
		return nil, nil, err
	}
	conn, err := grpc.NewClient(g.addr, grpc.WithTransportCredentials(identity.ClientCredentials(src, tlsconfig.AuthorizeID(identity.ControlPlaneID(td)))))
	if err != nil {
		src.Close()
		return nil, nil, err
	}
	return conn, func() { conn.Close(); src.Close() }, nil
}

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

func leaseClient(g *globals, cmd *cobra.Command) (leasev1.LeaseServiceClient, context.Context, func(), error) {
	if err := g.checkOutput(); err != nil {
		return nil, nil, nil, err
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), g.timeout)
	conn, closeConn, err := g.dial(ctx)
	if err != nil {
		cancel()
		return nil, nil, nil, err
	}
	return leasev1.NewLeaseServiceClient(conn), ctx, func() { closeConn(); cancel() }, nil
}

func parseKV(flag string, kvs []string) (map[string]string, error) {
	out := map[string]string{}
	for _, kv := range kvs {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("--%s %q: want KEY=VALUE", flag, kv)
		}
		out[k] = v
	}
	return out, nil
}

func leaseCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "lease", Short: "Create, inspect and end GPU leases"}

	var (
		tenant, profile, image, node, model, key string
		args, env, metadata                      []string
		duration                                 time.Duration
		memory, cpu, pids                        int64
		wholeGPUs                                uint32
	)
	create := &cobra.Command{
		Use:   "create",
		Short: "Create a lease",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			envMap, err := parseKV("env", env)
			if err != nil {
				return err
			}
			md, err := parseKV("metadata", metadata)
			if err != nil {
				return err
			}
			if key == "" {
				var b [16]byte
				rand.Read(b[:])
				key = hex.EncodeToString(b[:])
			}
			gr := &leasev1.GpuRequest{Node: node, GpuModel: model}
			if wholeGPUs > 0 {
				gr.Kind = &leasev1.GpuRequest_WholeGpus{WholeGpus: wholeGPUs}
			} else {
				gr.Kind = &leasev1.GpuRequest_MigProfile{MigProfile: profile}
			}
			c, ctx, done, err := leaseClient(g, cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := c.CreateLease(ctx, &leasev1.CreateLeaseRequest{IdempotencyKey: key, Spec: &leasev1.LeaseSpec{
				Tenant: tenant, Gpu: gr, Duration: durationpb.New(duration), Metadata: md,
				Workload: &leasev1.Workload{Image: image, Args: args, Env: envMap, Resources: &leasev1.Resources{MemoryBytes: memory, CpuMillis: cpu, Pids: pids}},
			}})
			if err != nil {
				return err
			}
			return g.printLeases(resp.GetLease())
		},
	}
	f := create.Flags()
	f.StringVar(&tenant, "tenant", "", "tenant name")
	f.StringVar(&profile, "profile", "", "MIG profile, e.g. 1g.18gb")
	f.Uint32Var(&wholeGPUs, "whole-gpus", 0, "whole GPUs with MIG off (instead of --profile)")
	f.StringVar(&image, "image", "", "OCI image reference")
	f.StringArrayVar(&args, "arg", nil, "command argument (repeat)")
	f.StringArrayVar(&env, "env", nil, "environment KEY=VALUE (repeat)")
	f.StringArrayVar(&metadata, "metadata", nil, "metadata KEY=VALUE (repeat)")
	f.DurationVar(&duration, "duration", time.Hour, "lease duration")
	f.StringVar(&node, "node", "", "only this node")
	f.StringVar(&model, "gpu-model", "", "only this GPU model")
	f.Int64Var(&memory, "memory", 0, "memory limit in bytes")
	f.Int64Var(&cpu, "cpu-millis", 0, "CPU limit in thousandths of a CPU")
	f.Int64Var(&pids, "pids", 0, "process limit")
	f.StringVar(&key, "idempotency-key", "", "idempotency key (random if empty)")

	get := &cobra.Command{
		Use: "get ID", Short: "Show a lease", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, a []string) error {
			c, ctx, done, err := leaseClient(g, cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := c.GetLease(ctx, &leasev1.GetLeaseRequest{Id: a[0]})
			if err != nil {
				return err
			}
			return g.printLeases(resp.GetLease())
		},
	}

	var listTenant string
	var listPhases []string
	list := &cobra.Command{
		Use: "list", Short: "List leases, newest first", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			req := &leasev1.ListLeasesRequest{Tenant: listTenant, PageSize: 1000}
			for _, p := range listPhases {
				v, ok := leasev1.Phase_value["PHASE_"+strings.ToUpper(p)]
				if !ok {
					return fmt.Errorf("--phase %q: unknown phase", p)
				}
				req.Phases = append(req.Phases, leasev1.Phase(v))
			}
			c, ctx, done, err := leaseClient(g, cmd)
			if err != nil {
				return err
			}
			defer done()
			var all []*leasev1.Lease
			for {
				resp, err := c.ListLeases(ctx, req)
				if err != nil {
					return err
				}
				all = append(all, resp.GetLeases()...)
				if resp.GetNextPageToken() == "" {
					break
				}
				req.PageToken = resp.GetNextPageToken()
			}
			if g.output == "json" {
				return g.printJSON(&leasev1.ListLeasesResponse{Leases: all})
			}
			return g.printLeases(all...)
		},
	}
	list.Flags().StringVar(&listTenant, "tenant", "", "only this tenant")
	list.Flags().StringSliceVar(&listPhases, "phase", nil, "only these phases (e.g. running,terminated)")

	var reason string
	cancelCmd := &cobra.Command{
		Use: "cancel ID", Short: "End a lease now", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, a []string) error {
			c, ctx, done, err := leaseClient(g, cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := c.CancelLease(ctx, &leasev1.CancelLeaseRequest{Id: a[0], Reason: reason})
			if err != nil {
				return err
			}
			return g.printLeases(resp.GetLease())
		},
	}
	cancelCmd.Flags().StringVar(&reason, "reason", "", "why")

	var by time.Duration
	extend := &cobra.Command{
		Use: "extend ID", Short: "Move a lease's end later", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, a []string) error {
			c, ctx, done, err := leaseClient(g, cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := c.ExtendLease(ctx, &leasev1.ExtendLeaseRequest{Id: a[0], ExtendBy: durationpb.New(by)})
			if err != nil {
				return err
			}
			return g.printLeases(resp.GetLease())
		},
	}
	extend.Flags().DurationVar(&by, "by", time.Hour, "how much longer")

	var watchTenant string
	var fromRev int64
	watch := &cobra.Command{
		Use: "watch", Short: "Stream lease changes until interrupted", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := g.checkOutput(); err != nil {
				return err
			}
			conn, closeConn, err := g.dial(cmd.Context())
			if err != nil {
				return err
			}
			defer closeConn()
			stream, err := leasev1.NewLeaseServiceClient(conn).WatchLeases(cmd.Context(), &leasev1.WatchLeasesRequest{Tenant: watchTenant, FromRevision: fromRev})
			if err != nil {
				return err
			}
			for {
				resp, err := stream.Recv()
				if err != nil {
					if errors.Is(err, io.EOF) || cmd.Context().Err() != nil {
						return nil
					}
					return err
				}
				l := resp.GetLease()
				if g.output == "json" {
					b, err := protojson.Marshal(l)
					if err != nil {
						return err
					}
					fmt.Fprintln(g.stdout, string(b))
					continue
				}
				fmt.Fprintf(g.stdout, "%d\t%s\t%s\t%s\t%s\n", l.GetRevision(), l.GetId(), l.GetSpec().GetTenant(), phaseName(l.GetPhase()), l.GetReason())
			}
		},
	}
	watch.Flags().StringVar(&watchTenant, "tenant", "", "only this tenant")
	watch.Flags().Int64Var(&fromRev, "from-revision", 0, "resume after this revision (0: current state first)")

	cmd.AddCommand(create, get, list, cancelCmd, extend, watch)
	return cmd
}

func phaseName(p leasev1.Phase) string { return strings.TrimPrefix(p.String(), "PHASE_") }

func (g *globals) printLeases(ls ...*leasev1.Lease) error {
	if g.output == "json" {
		if len(ls) == 1 {
			return g.printJSON(ls[0])
		}
		return g.printJSON(&leasev1.ListLeasesResponse{Leases: ls})
	}
	w := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "ID\tTENANT\tPROFILE\tPHASE\tNODE\tGPU\tPLACEMENT\tNOT AFTER\tREASON")
	for _, l := range ls {
		p := l.GetPlacement()
		place, gpuID := "-", "-"
		if p != nil {
			place = fmt.Sprintf("%d:%d", p.GetStart(), p.GetSize())
			gpuID = p.GetGpuUuid()
			if len(gpuID) > 12 {
				gpuID = gpuID[:12]
			}
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", l.GetId(), l.GetSpec().GetTenant(), l.GetSpec().GetGpu().GetMigProfile(),
			phaseName(l.GetPhase()), orDash(p.GetNode()), gpuID, place, l.GetNotAfter().AsTime().Local().Format("01-02 15:04:05"), l.GetReason())
	}
	return w.Flush()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func nodeCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "node", Short: "Inspect GPU hosts"}
	client := func(cmd *cobra.Command) (nodev1.NodeServiceClient, context.Context, func(), error) {
		if err := g.checkOutput(); err != nil {
			return nil, nil, nil, err
		}
		ctx, cancel := context.WithTimeout(cmd.Context(), g.timeout)
		conn, closeConn, err := g.dial(ctx)
		if err != nil {
			cancel()
			return nil, nil, nil, err
		}
		return nodev1.NewNodeServiceClient(conn), ctx, func() { closeConn(); cancel() }, nil
	}
	list := &cobra.Command{
		Use: "list", Short: "List nodes", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, ctx, done, err := client(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := c.ListNodes(ctx, &nodev1.ListNodesRequest{})
			if err != nil {
				return err
			}
			if g.output == "json" {
				return g.printJSON(resp)
			}
			return g.printNodes(resp.GetNodes()...)
		},
	}
	get := &cobra.Command{
		Use: "get NODE", Short: "Show a node, its GPUs and free capacity", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, a []string) error {
			c, ctx, done, err := client(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := c.GetNode(ctx, &nodev1.GetNodeRequest{Id: a[0]})
			if err != nil {
				return err
			}
			if g.output == "json" {
				return g.printJSON(resp.GetNode())
			}
			if err := g.printNodes(resp.GetNode()); err != nil {
				return err
			}
			w := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "\nGPU\tMODEL\tMIG\tPARTITIONS\tFREE")
			caps := map[string]*nodev1.GpuCapacity{}
			for _, c := range resp.GetNode().GetCapacity() {
				caps[c.GetGpuUuid()] = c
			}
			for _, gp := range resp.GetNode().GetInventory().GetGpus() {
				var free []string
				for _, p := range caps[gp.GetUuid()].GetProfiles() {
					free = append(free, fmt.Sprintf("%s=%d", p.GetName(), p.GetFree()))
				}
				fmt.Fprintf(w, "%s\t%s\t%v\t%d\t%s\n", gp.GetUuid(), gp.GetModel(), gp.GetMigEnabled(), len(gp.GetInstances()), strings.Join(free, " "))
			}
			return w.Flush()
		},
	}
	cmd.AddCommand(list, get)
	return cmd
}

func (g *globals) printNodes(ns ...*nodev1.Node) error {
	w := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "NODE\tCONNECTED\tGPUS\tLEASES\tLAST SEEN\tAGENT")
	for _, n := range ns {
		fmt.Fprintf(w, "%s\t%v\t%d\t%d\t%s\t%s\n", n.GetId(), n.GetConnected(), len(n.GetInventory().GetGpus()), n.GetLeaseCount(),
			n.GetLastSeen().AsTime().Local().Format(time.TimeOnly), orDash(n.GetSession().GetAgentVersion()))
	}
	return w.Flush()
}

func auditCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "audit", Short: "Verify and read the audit log"}
	var db string
	verify := &cobra.Command{
		Use:   "verify",
		Short: "Verify the audit hash chain in a control plane state file (offline)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			st, err := store.OpenBolt(db, store.BoltOptions{OpenTimeout: 2 * time.Second})
			if err != nil {
				return err
			}
			defer st.Close()
			res, err := audit.Verify(cmd.Context(), st)
			if err != nil {
				return fmt.Errorf("audit log INVALID: %w", err)
			}
			fmt.Fprintf(g.stdout, "audit log OK: %d entries, head %s\n", res.Entries, res.Head)
			return nil
		},
	}
	verify.Flags().StringVar(&db, "db", "/var/lib/gpuaas-controlplane/state.db", "control plane state file")
	var after uint64
	var limit int
	list := &cobra.Command{
		Use:   "list",
		Short: "Print audit entries from a control plane state file (offline)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := g.checkOutput(); err != nil {
				return err
			}
			st, err := store.OpenBolt(db, store.BoltOptions{OpenTimeout: 2 * time.Second})
			if err != nil {
				return err
			}
			defer st.Close()
			es, err := audit.List(cmd.Context(), st, after, limit)
			if err != nil {
				return err
			}
			if g.output == "json" {
				enc := json.NewEncoder(g.stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(es)
			}
			w := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "SEQ\tTIME\tACTOR\tACTION\tRESOURCE\tOUTCOME\tREASON")
			for _, e := range es {
				fmt.Fprintf(w, "%d\t%s\t%s\t%s\t%s\t%s\t%s\n", e.Seq, e.Time.Local().Format(time.TimeOnly+".000"), filepath.Base(e.Actor), e.Action, e.Resource, e.Outcome, e.Reason)
			}
			return w.Flush()
		},
	}
	list.Flags().StringVar(&db, "db", "/var/lib/gpuaas-controlplane/state.db", "control plane state file")
	list.Flags().Uint64Var(&after, "after", 0, "only entries after this sequence number")
	list.Flags().IntVar(&limit, "limit", 0, "at most this many (0: all)")
	cmd.AddCommand(verify, list)
	return cmd
}
