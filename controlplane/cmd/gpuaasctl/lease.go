package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/durationpb"

	leasev1 "github.com/gpuaas/gpuaas/proto/gpuaas/lease/v1"
)

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

	var tail int64
	logs := &cobra.Command{
		Use:   "logs ID",
		Short: "Print a lease's captured stdout and stderr",
		Long: "Print the workload's output as the agent stored it, oldest first, one record a line:\n" +
			"<time> <stdout|stderr> <F|P> <text> (P: part of a longer line). The control plane\n" +
			"caps what one call returns; a note on stderr says when output was left out.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, a []string) error {
			if tail < 0 {
				return fmt.Errorf("--tail %d: must not be negative", tail)
			}
			c, ctx, done, err := leaseClient(g, cmd)
			if err != nil {
				return err
			}
			defer done()
			stream, err := c.GetLeaseLogs(ctx, &leasev1.GetLeaseLogsRequest{LeaseId: a[0], TailBytes: tail})
			if err != nil {
				return err
			}
			truncated := false
			for {
				resp, err := stream.Recv()
				if errors.Is(err, io.EOF) {
					break
				}
				if err != nil {
					return err
				}
				truncated = truncated || resp.GetTruncated()
				if _, err := g.stdout.Write(resp.GetData()); err != nil {
					return err
				}
			}
			if truncated {
				fmt.Fprintln(cmd.ErrOrStderr(), "gpuaasctl: older output was rotated away or the server's limit was reached; not all of the log is shown")
			}
			return nil
		},
	}
	logs.Flags().Int64Var(&tail, "tail", 0, "only the last BYTES of the log, from a line start (0: all that is retained)")

	cmd.AddCommand(create, get, list, cancelCmd, extend, watch, logs)
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
