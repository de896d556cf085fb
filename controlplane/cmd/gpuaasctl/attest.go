package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/gpuaas/gpuaas/pkg/attestation"
	nodev1 "github.com/gpuaas/gpuaas/proto/gpuaas/node/v1"
)

// maxSavedReport bounds a saved report file (report, envelope, base64).
const maxSavedReport = 4 << 20

func attestCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "attest", Short: "Show nodes' attestation verdicts, and verify saved reports offline"}
	cmd.AddCommand(attestVerifyCmd(g), attestShowCmd(g), attestHistoryCmd(g))
	return cmd
}

// attestOpts are the flags verify and show share.
type attestOpts struct {
	policy, nonce, node, at string
}

func (o *attestOpts) flags(cmd *cobra.Command) {
	f := cmd.Flags()
	f.StringVar(&o.policy, "policy", "", "attestation policy file (JSON); without it the report is authenticated but not judged")
	f.StringVar(&o.nonce, "nonce", "", "the challenge nonce (hex) the report must answer")
	f.StringVar(&o.node, "node", "", "the node the report must be from")
	f.StringVar(&o.at, "at", "", "judge freshness at this time (RFC 3339) instead of now")
}

// attestResult is what verify and show print with -o json.
type attestResult struct {
	Verdict attestation.Verdict `json:"verdict"`
	// Judged is false when no policy was given: the verdict then covers
	// only authenticity (encoding, signer, signature, nonce).
	Judged bool                `json:"judged"`
	Report *attestation.Report `json:"report,omitempty"`
}

// evaluate verifies a saved report against the trust bundle and, with a
// policy, judges it.
func (g *globals) evaluate(path string, o attestOpts) (attestResult, error) {
	var res attestResult
	td, err := spiffeid.TrustDomainFromString(g.trustDomain)
	if err != nil {
		return res, fmt.Errorf("--trust-domain: %w", err)
	}
	if g.bundle == "" {
		return res, errors.New("--bundle (the trust bundle of the agents' trust domain) is required")
	}
	bundle, err := x509bundle.Load(td, g.bundle)
	if err != nil {
		return res, fmt.Errorf("load trust bundle: %w", err)
	}
	signed, err := readSigned(path)
	if err != nil {
		return res, err
	}
	exp := attestation.Expected{Node: o.node, Now: time.Now()}
	if o.nonce != "" {
		if exp.Nonce, err = hex.DecodeString(o.nonce); err != nil || len(exp.Nonce) == 0 {
			return res, fmt.Errorf("--nonce must be hex, got %q", o.nonce)
		}
	}
	if o.at != "" {
		if exp.Now, err = time.Parse(time.RFC3339Nano, o.at); err != nil {
			return res, fmt.Errorf("--at: %w", err)
		}
	}
	if o.policy == "" {
		return authenticate(signed, bundle, td, exp), nil
	}
	b, err := readLimitedFile(o.policy, 1<<20)
	if err != nil {
		return res, err
	}
	pol, err := attestation.ParsePolicy(b)
	if err != nil {
		return res, err
	}
	res.Judged = true
	res.Verdict = pol.VerifyAndEvaluate(signed, attestation.NewVerifier(bundle, td, 0), exp)
	res.Report, _ = attestation.Decode(signed.Report)
	return res, nil
}

// authenticate verifies without a policy: encoding, signer, signature, and
// the nonce and node when given.
func authenticate(s attestation.Signed, bundle x509bundle.Source, td spiffeid.TrustDomain, exp attestation.Expected) attestResult {
	res := attestResult{}
	r, id, err := attestation.Verify(s, bundle, td)
	if err != nil {
		// Verification fails again inside, before any policy check, and
		// the verdict names the failed check.
		res.Verdict = (&attestation.Policy{}).VerifyAndEvaluate(s, attestation.NewVerifier(bundle, td, 0), exp)
		res.Report = r
		return res
	}
	res.Report = r
	v := attestation.Verdict{Node: r.Node, Status: attestation.StatusPass, ReportTime: r.Time}
	v.Checks = append(v.Checks, attestation.Check{Name: attestation.CheckSignature, OK: true, Expected: "signed by the node's agent", Actual: id.String()})
	if exp.Node != "" {
		v.Checks = append(v.Checks, attestation.Check{Name: attestation.CheckNode, OK: r.Node == exp.Node, Expected: exp.Node, Actual: r.Node})
	}
	if exp.Nonce != nil {
		v.Checks = append(v.Checks, attestation.Check{Name: attestation.CheckNonce, OK: string(r.Nonce) == string(exp.Nonce), Expected: hex.EncodeToString(exp.Nonce), Actual: hex.EncodeToString(r.Nonce)})
	}
	if q := r.TPM.Quote; q != nil {
		h, err := attestation.HashWithoutQuote(r)
		actual := "verified"
		if err == nil {
			err = attestation.VerifyQuote(q, attestation.QualifyingData(r.Nonce, h))
		}
		if err != nil {
			actual = err.Error()
		}
		v.Checks = append(v.Checks, attestation.Check{Name: attestation.CheckTPMQuote, OK: err == nil, Expected: "a quote by the attestation key over this nonce and report", Actual: actual})
	}
	for _, c := range v.Checks {
		if !c.OK {
			v.Status = attestation.StatusFail
		}
	}
	res.Verdict = v
	return res
}

func readSigned(path string) (attestation.Signed, error) {
	var s attestation.Signed
	b, err := readLimitedFile(path, maxSavedReport)
	if err != nil {
		return s, err
	}
	// A saved report is the protojson form of a ChallengeResponse.
	if err := json.Unmarshal(b, &s); err != nil {
		return s, fmt.Errorf("read report %s: %w", path, err)
	}
	if len(s.Report) == 0 || len(s.Signature) == 0 {
		return s, fmt.Errorf("read report %s: no report or signature", path)
	}
	return s, nil
}

func readLimitedFile(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("read %s: larger than %d bytes", path, limit)
	}
	return b, nil
}

// verdictError makes a verdict other than PASS the command's failure, so
// scripts can gate on the exit status.
func verdictError(res attestResult) error {
	if res.Verdict.Status == attestation.StatusPass {
		return nil
	}
	var names []string
	for _, c := range res.Verdict.Failed() {
		names = append(names, c.Name)
	}
	return fmt.Errorf("attestation verdict %s: failed %s", res.Verdict.Status, strings.Join(names, ", "))
}

func attestVerifyCmd(g *globals) *cobra.Command {
	var o attestOpts
	cmd := &cobra.Command{
		Use:   "verify REPORT",
		Short: "Verify a saved attestation report offline, with no control plane",
		Long: "Verify reads a saved report (the protojson form of the session's ChallengeResponse),\n" +
			"checks that its bytes are canonical, that the signer's X509-SVID chains to --bundle and\n" +
			"is the agent of the report's node, and the signature; with --policy it then judges the\n" +
			"evidence (agent and driver versions, fences, PCRs, freshness). It prints the verdict and\n" +
			"every check, and exits non-zero unless the verdict is PASS.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := g.checkOutput(); err != nil {
				return err
			}
			res, err := g.evaluate(args[0], o)
			if err != nil {
				return err
			}
			res.Report = nil
			if err := g.printAttest(res, false); err != nil {
				return err
			}
			return verdictError(res)
		},
	}
	o.flags(cmd)
	return cmd
}

func attestShowCmd(g *globals) *cobra.Command {
	var o attestOpts
	var report, save string
	cmd := &cobra.Command{
		Use:   "show NODE | show --report FILE",
		Short: "Render a node's attestation for a human: verdict first, then every check, then the evidence",
		Long: "show NODE asks the control plane for the node's latest verdict and the signed report it\n" +
			"judged (--save FILE keeps that report for `attest verify`); show --report FILE renders a\n" +
			"saved report offline, verified against --bundle (and judged with --policy).",
		Args: func(cmd *cobra.Command, args []string) error {
			if report != "" {
				return cobra.NoArgs(cmd, args)
			}
			return cobra.ExactArgs(1)(cmd, args)
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := g.checkOutput(); err != nil {
				return err
			}
			if report != "" {
				res, err := g.evaluate(report, o)
				if err != nil {
					return err
				}
				return g.printAttest(res, true)
			}
			return g.showNodeAttestation(cmd, args[0], save)
		},
	}
	o.flags(cmd)
	cmd.Flags().StringVar(&report, "report", "", "render this saved report offline instead of asking the control plane")
	cmd.Flags().StringVar(&save, "save", "", "with NODE: also write the signed report to this file (for `attest verify`)")
	return cmd
}

func (g *globals) nodeClient(cmd *cobra.Command) (nodev1.NodeServiceClient, context.Context, func(), error) {
	ctx, cancel := context.WithTimeout(cmd.Context(), g.timeout)
	conn, closeConn, err := g.dial(ctx)
	if err != nil {
		cancel()
		return nil, nil, nil, err
	}
	return nodev1.NewNodeServiceClient(conn), ctx, func() { closeConn(); cancel() }, nil
}

// attestStatus renders an attestation status as the verdict's word.
func attestStatus(s nodev1.AttestationStatus) string {
	if s == nodev1.AttestationStatus_ATTESTATION_STATUS_UNSPECIFIED {
		return "-"
	}
	return strings.TrimPrefix(s.String(), "ATTESTATION_STATUS_")
}

func verdictFromProto(node string, v *nodev1.AttestationVerdict) attestation.Verdict {
	out := attestation.Verdict{Node: node, Status: attestation.Status(attestStatus(v.GetStatus())), Checks: []attestation.Check{}}
	if v.GetReportTime() != nil {
		out.ReportTime = v.GetReportTime().AsTime()
	}
	for _, c := range v.GetChecks() {
		out.Checks = append(out.Checks, attestation.Check{Name: c.GetName(), OK: c.GetOk(), Expected: c.GetExpected(), Actual: c.GetActual()})
	}
	return out
}

func (g *globals) showNodeAttestation(cmd *cobra.Command, node, save string) error {
	c, ctx, done, err := g.nodeClient(cmd)
	if err != nil {
		return err
	}
	defer done()
	resp, err := c.GetNodeAttestation(ctx, &nodev1.GetNodeAttestationRequest{Id: node})
	if err != nil {
		return err
	}
	a := resp.GetAttestation()
	if save != "" {
		if a.GetReport() == nil {
			return fmt.Errorf("node %s has no report to save (status %s)", node, attestStatus(a.GetStatus()))
		}
		raw, err := protojson.MarshalOptions{Indent: "  "}.Marshal(a.GetReport())
		if err != nil {
			return err
		}
		if err := os.WriteFile(save, append(raw, '\n'), 0o600); err != nil {
			return err
		}
	}
	if g.output == "json" {
		return g.printJSON(resp)
	}
	fmt.Fprintf(g.stdout, "NODE %s: %s\n", node, attestStatus(a.GetStatus()))
	fmt.Fprintf(g.stdout, "reports %d (pass %d, fail %d, stale %d), last success %s, last failure %s\n\n",
		a.GetCount(), a.GetPassCount(), a.GetFailCount(), a.GetStaleCount(), tsOrDash(a.GetLastSuccess()), tsOrDash(a.GetLastFailure()))
	if a.GetLatest() == nil {
		fmt.Fprintln(g.stdout, "no report judged yet")
		return nil
	}
	res := attestResult{Verdict: verdictFromProto(node, a.GetLatest()), Judged: true}
	if r := a.GetReport(); r != nil {
		res.Report, _ = attestation.Decode(r.GetReport())
	}
	return g.printAttest(res, true)
}

func tsOrDash(t *timestamppb.Timestamp) string {
	if t == nil {
		return "-"
	}
	return t.AsTime().Local().Format(time.RFC3339)
}

func attestHistoryCmd(g *globals) *cobra.Command {
	var limit int32
	cmd := &cobra.Command{
		Use: "history NODE", Short: "A node's recent attestation verdicts, newest first", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := g.checkOutput(); err != nil {
				return err
			}
			c, ctx, done, err := g.nodeClient(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := c.ListNodeAttestations(ctx, &nodev1.ListNodeAttestationsRequest{Id: args[0], PageSize: limit})
			if err != nil {
				return err
			}
			if g.output == "json" {
				return g.printJSON(resp)
			}
			w := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "VERIFIED\tSTATUS\tREPORT TIME\tFAILED CHECKS\tREPORT SHA256")
			for _, v := range resp.GetVerdicts() {
				var failed []string
				for _, c := range v.GetChecks() {
					if !c.GetOk() {
						failed = append(failed, c.GetName())
					}
				}
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", tsOrDash(v.GetVerifyTime()), attestStatus(v.GetStatus()), tsOrDash(v.GetReportTime()),
					oneLine(orDash(strings.Join(failed, ","))), orDash(v.GetReportSha256()))
			}
			return w.Flush()
		},
	}
	cmd.Flags().Int32Var(&limit, "limit", 20, "at most this many verdicts (1-100)")
	return cmd
}

func (g *globals) printAttest(res attestResult, evidence bool) error {
	if g.output == "json" {
		enc := json.NewEncoder(g.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	v := res.Verdict
	judged := ""
	if !res.Judged {
		judged = " (authenticity only: no --policy)"
	}
	fmt.Fprintf(g.stdout, "VERDICT %s%s\nnode %s, report time %s\n\n", v.Status, judged, v.Node, v.ReportTime.Format(time.RFC3339))
	w := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "CHECK\tRESULT\tEXPECTED\tACTUAL")
	for _, c := range v.Checks {
		result := "ok"
		if !c.OK {
			result = "FAILED"
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", c.Name, result, oneLine(c.Expected), oneLine(c.Actual))
	}
	if err := w.Flush(); err != nil {
		return err
	}
	if !evidence || res.Report == nil {
		return nil
	}
	return printEvidence(g.stdout, res.Report)
}

func printEvidence(out io.Writer, r *attestation.Report) error {
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "\nEVIDENCE\t")
	row := func(k, v string) { fmt.Fprintf(w, "%s\t%s\n", k, oneLine(v)) }
	row("agent", r.AgentID)
	row("nonce", hex.EncodeToString(r.Nonce))
	row("agent version", r.Agent.Version)
	row("agent binary sha256", r.Agent.BinarySHA256)
	row("config sha256", r.Agent.ConfigSHA256)
	row("kernel", r.Host.KernelRelease)
	row("kernel cmdline", r.Host.KernelCmdline)
	row("boot id", r.Host.BootID)
	row("secure boot", r.Host.SecureBoot)
	row("containerd", r.Runtime.ContainerdVersion)
	row("runc", r.Runtime.RuncVersion)
	row("nvidia driver", r.GPU.DriverVersion)
	for _, d := range r.GPU.Devices {
		p := fmt.Sprintf("gpu %d", d.Index)
		row(p, fmt.Sprintf("%s %s serial %s vbios %s", d.UUID, d.Name, d.Serial, d.VBIOSVersion))
		row(p+" mig", d.MIGMode)
		for _, m := range d.MIGLayout {
			row(p+" instance", fmt.Sprintf("gi %d profile %d at %d+%d %s", m.GPUInstanceID, m.ProfileID, m.Start, m.Size, m.MIGUUID))
		}
		row(p+" GPU attestation", d.CC.Status)
	}
	if len(r.Leases) == 0 {
		row("leases", "(none)")
	}
	for _, l := range r.Leases {
		row("lease "+l.LeaseID, fmt.Sprintf("%s %s image %s", l.GPUUUID, l.MIGUUID, l.ImageDigest))
		for _, f := range l.Fences {
			row("lease "+l.LeaseID+" fence", fmt.Sprintf("%s %s program %d tag %s", f.Kind, f.Attach, f.ProgramID, f.Tag))
		}
	}
	row("tpm", r.TPM.Status)
	if q := r.TPM.Quote; q != nil {
		row("tpm attestation key sha256", attestation.AKPublicSHA256(q.AKPublic))
		for _, p := range q.PCRs {
			row(fmt.Sprintf("pcr %d", p.Index), p.SHA256)
		}
	}
	return w.Flush()
}

// oneLine keeps a value on its table row: evidence is outside input.
func oneLine(s string) string {
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, s)
}
