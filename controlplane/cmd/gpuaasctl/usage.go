package main

import (
	"fmt"
	"sort"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/gpuaas/gpuaas/controlplane/lease"
	"github.com/gpuaas/gpuaas/controlplane/store"
)

// usageCmd reads the usage ledger from a control plane state file.
func usageCmd(g *globals) *cobra.Command {
	var db, tenant string
	var after uint64
	var summary bool
	cmd := &cobra.Command{
		Use:   "usage",
		Short: "Print the usage ledger (one entry per lease that ran) from a control plane state file (offline)",
		Long: "Each entry is also an audit entry (usage.interval), covered by the signed checkpoints and\n" +
			"forwarded upstream with the audit batches; --summary adds up GPU time per tenant, GPU model\n" +
			"and profile.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := g.checkOutput(); err != nil {
				return err
			}
			return withDB(db, func(st store.Store) error {
				var es []lease.UsageEntry
				err := st.View(cmd.Context(), func(tx store.Tx) error {
					all, err := lease.Usage(tx, after, 0)
					for _, e := range all {
						if tenant == "" || e.Tenant == tenant {
							es = append(es, e)
						}
					}
					return err
				})
				if err != nil {
					return err
				}
				if summary {
					return g.printUsageSummary(es)
				}
				if g.output == "json" {
					if es == nil {
						es = []lease.UsageEntry{}
					}
					return g.encodeJSON(es)
				}
				w := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(w, "SEQ\tTENANT\tLEASE\tNODE\tGPU MODEL\tPROFILE\tSTART\tEND\tENDED\tSECONDS\tGPU SECONDS")
				for _, e := range es {
					fmt.Fprintf(w, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%.3f\t%.3f\n", e.Seq, oneLine(e.Tenant), e.LeaseID, e.Node, oneLine(e.GPUModel), e.Profile,
						e.Start.Format(time.RFC3339), e.End.Format(time.RFC3339), e.EndPhase, float64(e.Millis)/1000, float64(e.GPUMillis)/1000)
				}
				return w.Flush()
			})
		},
	}
	cmd.Flags().StringVar(&db, "db", defaultDB, "control plane state file")
	cmd.Flags().StringVar(&tenant, "tenant", "", "only this tenant's leases")
	cmd.Flags().Uint64Var(&after, "after", 0, "only entries after this ledger sequence")
	cmd.Flags().BoolVar(&summary, "summary", false, "GPU time per tenant, GPU model and profile")
	return cmd
}

type usageTotal struct {
	Tenant    string  `json:"tenant"`
	GPUModel  string  `json:"gpu_model"`
	Profile   string  `json:"profile"`
	Leases    int     `json:"leases"`
	Seconds   float64 `json:"seconds"`
	GPUSecond float64 `json:"gpu_seconds"`
}

func (g *globals) printUsageSummary(es []lease.UsageEntry) error {
	totals := map[[3]string]*usageTotal{}
	for _, e := range es {
		k := [3]string{e.Tenant, e.GPUModel, e.Profile}
		t := totals[k]
		if t == nil {
			t = &usageTotal{Tenant: e.Tenant, GPUModel: e.GPUModel, Profile: e.Profile}
			totals[k] = t
		}
		t.Leases++
		t.Seconds += float64(e.Millis) / 1000
		t.GPUSecond += float64(e.GPUMillis) / 1000
	}
	out := make([]*usageTotal, 0, len(totals))
	for _, t := range totals {
		out = append(out, t)
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if a.Tenant != b.Tenant {
			return a.Tenant < b.Tenant
		}
		if a.GPUModel != b.GPUModel {
			return a.GPUModel < b.GPUModel
		}
		return a.Profile < b.Profile
	})
	if g.output == "json" {
		return g.encodeJSON(out)
	}
	w := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "TENANT\tGPU MODEL\tPROFILE\tLEASES\tSECONDS\tGPU SECONDS")
	for _, t := range out {
		fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%.3f\t%.3f\n", oneLine(t.Tenant), oneLine(t.GPUModel), t.Profile, t.Leases, t.Seconds, t.GPUSecond)
	}
	return w.Flush()
}
