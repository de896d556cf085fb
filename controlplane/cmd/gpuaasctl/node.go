package main

import (
	"context"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/durationpb"

	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

func nodeCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "node", Short: "Inspect GPU hosts"}
	client := func(cmd *cobra.Command) (nodev1.NodeServiceClient, context.Context, func(), error) {
		if err := g.checkOutput(); err != nil {
			return nil, nil, nil, err
		}
		return g.nodeClient(cmd)
	}
	list := &cobra.Command{
		Use: "list", Short: "List nodes", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, ctx, done, err := client(cmd)
			if err != nil {
				return err
			}
			defer done()
			// Every page, in id order.
			resp := &nodev1.ListNodesResponse{}
			for token := ""; ; {
				page, err := c.ListNodes(ctx, &nodev1.ListNodesRequest{PageToken: token})
				if err != nil {
					return err
				}
				resp.Nodes = append(resp.Nodes, page.GetNodes()...)
				if token = page.GetNextPageToken(); token == "" {
					break
				}
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
	var reason, gpu string
	var deadline time.Duration
	cordon := func(use, short string, on bool) *cobra.Command {
		c := &cobra.Command{
			Use: use + " NODE", Short: short, Args: cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, a []string) error {
				c, ctx, done, err := client(cmd)
				if err != nil {
					return err
				}
				defer done()
				var n *nodev1.Node
				if on {
					resp, err := c.CordonNode(ctx, &nodev1.CordonNodeRequest{Id: a[0], Reason: reason, GpuUuid: gpu})
					if err != nil {
						return err
					}
					n = resp.GetNode()
				} else {
					resp, err := c.UncordonNode(ctx, &nodev1.UncordonNodeRequest{Id: a[0], Reason: reason, GpuUuid: gpu})
					if err != nil {
						return err
					}
					n = resp.GetNode()
				}
				if g.output == "json" {
					return g.printJSON(n)
				}
				return g.printNodes(n)
			},
		}
		c.Flags().StringVar(&reason, "reason", "", "why (recorded in the audit log)")
		c.Flags().StringVar(&gpu, "gpu", "", "only this GPU (its UUID) instead of the whole node")
		return c
	}
	drain := &cobra.Command{
		Use: "drain NODE", Short: "Cordon a node and cancel the leases still running there at the deadline", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, a []string) error {
			c, ctx, done, err := client(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := c.DrainNode(ctx, &nodev1.DrainNodeRequest{Id: a[0], Reason: reason, Deadline: durationpb.New(deadline)})
			if err != nil {
				return err
			}
			if g.output == "json" {
				return g.printJSON(resp.GetNode())
			}
			return g.printNodes(resp.GetNode())
		},
	}
	drain.Flags().StringVar(&reason, "reason", "", "why (recorded in the audit log)")
	drain.Flags().DurationVar(&deadline, "deadline", time.Hour, "how long running leases may keep running (0: cancel them now)")
	cmd.AddCommand(list, get, drain,
		cordon("cordon", "Stop placing new leases on a node (its running leases stay)", true),
		cordon("uncordon", "Let a cordoned node take leases again (it must also pass attestation)", false))
	return cmd
}

func (g *globals) printNodes(ns ...*nodev1.Node) error {
	w := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "NODE\tCONNECTED\tATTESTATION\tSCHEDULING\tGPUS\tLEASES\tLAST SEEN\tAGENT")
	for _, n := range ns {
		sched := "ok"
		switch {
		case n.GetDown():
			sched = "down"
		case n.GetDrainDeadline() != nil:
			sched = "draining: deadline " + n.GetDrainDeadline().AsTime().Local().Format(time.RFC3339)
		case n.GetCordoned():
			sched = "cordoned: " + oneLine(n.GetCordonReason())
		case len(n.GetCordonedGpus()) > 0:
			sched = fmt.Sprintf("ok (%d GPU cordoned)", len(n.GetCordonedGpus()))
		}
		fmt.Fprintf(w, "%s\t%v\t%s\t%s\t%d\t%d\t%s\t%s\n", n.GetId(), n.GetConnected(), attestStatus(n.GetAttestation()), sched,
			len(n.GetInventory().GetGpus()), n.GetLeaseCount(),
			n.GetLastSeen().AsTime().Local().Format(time.TimeOnly), orDash(n.GetSession().GetAgentVersion()))
	}
	return w.Flush()
}
