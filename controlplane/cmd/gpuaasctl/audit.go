package main

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/store"
)

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
