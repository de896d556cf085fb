package status

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"text/tabwriter"
	"time"
)

// Exit codes of `gpuaas-agent status`.
const (
	ExitOK           = 0 // the agent runs and is connected to the control plane
	ExitDisconnected = 1 // the agent runs but is not connected
	ExitUnreachable  = 2 // the agent could not be asked
)

// maxSnapshot bounds what Fetch reads.
const maxSnapshot = 16 << 20

// Fetch asks the agent serving on socket for its snapshot.
func Fetch(ctx context.Context, socket string) (*Snapshot, error) {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		DisableKeepAlives: true,
	}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://agent"+Path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return nil, fmt.Errorf("reach the agent at %s: %w", socket, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxSnapshot))
	if err != nil {
		return nil, fmt.Errorf("read the agent's status: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("the agent refused: %s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	var s Snapshot
	if err := json.Unmarshal(body, &s); err != nil {
		return nil, fmt.Errorf("decode the agent's status: %w", err)
	}
	return &s, nil
}

// ExitCode is the CLI's exit code for a snapshot.
func ExitCode(s *Snapshot) int {
	if s.ControlPlane.Connected {
		return ExitOK
	}
	return ExitDisconnected
}

// Write prints a snapshot: JSON, or a human summary.
func Write(w io.Writer, s *Snapshot, asJSON bool) error {
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(s)
	}
	now := s.Time
	if now.IsZero() {
		now = time.Now()
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	cp := s.ControlPlane
	fmt.Fprintf(tw, "node:\t%s (agent %s)\n", s.Node, s.Version)
	link := "NOT CONNECTED"
	if cp.Connected {
		link = "connected"
	}
	fmt.Fprintf(tw, "control plane:\t%s %s since %s, %d reconnects\n", cp.Address, link, when(cp.Since, now), cp.Reconnects)
	if cp.LastError != "" {
		fmt.Fprintf(tw, "last error:\t%s: %s\n", when(cp.LastErrorTime, now), cp.LastError)
	}
	a := s.Attestation
	switch {
	case a.Time.IsZero():
		fmt.Fprintf(tw, "attestation:\tno challenge yet\n")
	case a.OK:
		fmt.Fprintf(tw, "attestation:\tchallenge %s… answered %s\n", a.NoncePrefix, when(a.Time, now))
	default:
		fmt.Fprintf(tw, "attestation:\tchallenge %s… NOT answered %s: %s\n", a.NoncePrefix, when(a.Time, now), a.Error)
	}
	if s.Telemetry.Time.IsZero() {
		fmt.Fprintf(tw, "telemetry:\tno report sent yet\n")
	} else {
		fmt.Fprintf(tw, "telemetry:\treport %d sent %s\n", s.Telemetry.Sequence, when(s.Telemetry.Time, now))
	}
	if err := tw.Flush(); err != nil {
		return err
	}

	fmt.Fprintf(w, "\nLEASES (%d)\n", len(s.Leases))
	if len(s.Leases) > 0 {
		tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tPHASE\tGPU\tMIG DEVICE\tCONTAINER\tSTARTED\tFENCED\tREASON")
		for _, l := range s.Leases {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", l.ID, strings.TrimPrefix(l.Phase, "PHASE_"), dash(l.GPU), dash(l.MIGDevice), dash(l.Container), stamp(l.StartTime), yes(l.Fenced), l.Reason)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	fmt.Fprintf(w, "\nPARTITIONS (%d)\n", len(s.Partitions))
	if len(s.Partitions) > 0 {
		tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "GPU\tGI\tCI\tPROFILE\tPLACEMENT\tMEMORY\tMIG DEVICE")
		for _, p := range s.Partitions {
			fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%s\t%d MiB\t%s\n", p.GPU, p.GI, p.CI, p.Profile, p.Placement, p.MemoryMiB, p.UUID)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	fmt.Fprintf(w, "\nFENCES (%d)\n", len(s.Fences))
	if len(s.Fences) > 0 {
		tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "LEASE\tATTACHED\tTAGS VERIFIED\tVERIFIED\tPROBLEMS")
		for _, f := range s.Fences {
			attached, tagged := 0, 0
			for _, p := range f.Programs {
				if p.Attached {
					attached++
				}
				if p.TagVerified {
					tagged++
				}
			}
			fmt.Fprintf(tw, "%s\t%d/%d\t%d/%d\t%s\t%s\n", f.LeaseID, attached, len(f.Programs), tagged, len(f.Programs), yes(f.Verified), strings.Join(f.Problems, "; "))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	if len(s.Errors) > 0 {
		fmt.Fprintf(w, "\nUNAVAILABLE\n")
		for _, e := range s.Errors {
			fmt.Fprintf(w, "  %s\n", e)
		}
	}
	return nil
}

// when is a time with how long ago it was.
func when(t, now time.Time) string {
	if t.IsZero() {
		return "never"
	}
	return fmt.Sprintf("%s (%s ago)", stamp(t), now.Sub(t).Round(time.Second))
}

func stamp(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func yes(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}
