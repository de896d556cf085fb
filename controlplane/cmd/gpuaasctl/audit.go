package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/mod/sumdb/note"
	"google.golang.org/grpc"

	"github.com/gpuaas/gpuaas/controlplane/audit"
	"github.com/gpuaas/gpuaas/controlplane/audit/sink"
	"github.com/gpuaas/gpuaas/controlplane/store"
	"github.com/gpuaas/gpuaas/pkg/auditlog"
	"github.com/gpuaas/gpuaas/pkg/identity"
	"github.com/gpuaas/gpuaas/pkg/sanitize"
	auditv1 "github.com/gpuaas/gpuaas/proto/gpuaas/audit/v1"
)

const defaultDB = "/var/lib/gpuaas-controlplane/state.db"

func auditCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "audit", Short: "Verify, prove, read and receive the audit log"}
	cmd.AddCommand(auditVerifyCmd(g), auditListCmd(g), auditTailCmd(g), auditSearchCmd(g),
		auditProofCmd(g), auditCheckProofCmd(g), auditKeygenCmd(g), auditSinkCmd(g))
	return cmd
}

// openReadOnly opens a control plane state file without writing to it
// (store.OpenBoltReadOnly): an auditor's evidence must not change by being
// verified, and a file a running control plane holds is refused.
func openReadOnly(path string) (store.Store, error) {
	st, err := store.OpenBoltReadOnly(path, 2*time.Second)
	if errors.Is(err, store.ErrLocked) {
		return nil, fmt.Errorf("%w (stop the control plane or verify a copy)", err)
	}
	return st, err
}

func withDB(path string, fn func(store.Store) error) error {
	st, err := openReadOnly(path)
	if err != nil {
		return err
	}
	defer st.Close()
	return fn(st)
}

func loadTrusted(path string) (note.Verifiers, error) {
	if path == "" {
		return nil, nil
	}
	return auditlog.LoadVerifiers(path)
}

func auditVerifyCmd(g *globals) *cobra.Command {
	var db, dir, key, origin string
	cmd := &cobra.Command{
		Use:   "verify",
		Short: "Verify the audit log offline: recompute the Merkle tree, check every checkpoint",
		Long: "Verify reads a control plane state file (--db, opened read-only) or an audit sink's\n" +
			"directory (--sink), recomputes the RFC 6962 tree from every entry and checks that every\n" +
			"checkpoint has its root and is signed by a key in --key (verifier keys, one per line).\n" +
			"Without --key the roots are checked but not the signatures, and the output says so.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			trusted, err := loadTrusted(key)
			if err != nil {
				return err
			}
			if dir != "" {
				if trusted == nil || origin == "" {
					return errors.New("--sink needs --key and --origin: a sink directory is only evidence with its signatures")
				}
				res, err := sink.VerifyDir(dir, origin, trusted)
				if err != nil {
					return fmt.Errorf("audit log INVALID: %w", err)
				}
				latest := "none"
				if res.Latest != nil {
					latest = res.Latest.String()
				}
				fmt.Fprintf(g.stdout, "audit log OK: %d entries in %d batches, latest %s, signatures verified\n", res.Entries, res.Batches, latest)
				return nil
			}
			return withDB(db, func(st store.Store) error {
				res, err := audit.Verify(cmd.Context(), st, audit.VerifyOptions{Trusted: trusted, Origin: origin})
				if err != nil {
					return fmt.Errorf("audit log INVALID: %w", err)
				}
				sigs := "signatures verified"
				if !res.SignaturesChecked {
					sigs = "signatures NOT checked (no --key)"
				}
				fmt.Fprintf(g.stdout, "audit log OK: %d entries, root %s, %d checkpoints, %s\n", res.Entries, res.Root, res.Checkpoints, sigs)
				return nil
			})
		},
	}
	cmd.Flags().StringVar(&db, "db", defaultDB, "control plane state file")
	cmd.Flags().StringVar(&dir, "sink", "", "an audit sink's directory instead of --db")
	cmd.Flags().StringVar(&key, "key", "", "file of trusted checkpoint verifier keys (note format, one per line)")
	cmd.Flags().StringVar(&origin, "origin", "", "the log's checkpoint origin (required with --sink)")
	return cmd
}

func (g *globals) printEntries(es []auditlog.Entry) error {
	if err := g.checkOutput(); err != nil {
		return err
	}
	if g.output == "json" {
		enc := json.NewEncoder(g.stdout)
		enc.SetIndent("", "  ")
		if es == nil {
			es = []auditlog.Entry{}
		}
		return enc.Encode(es)
	}
	w := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "SEQ\tTIME\tACTOR\tACTION\tRESOURCE\tOUTCOME\tREASON")
	for _, e := range es {
		fmt.Fprintf(w, "%d\t%s\t%s\t%s\t%s\t%s\t%s\n", e.Seq, e.Time.Local().Format(time.TimeOnly+".000"), filepath.Base(e.Actor), e.Action, e.Resource, e.Outcome, e.Reason)
	}
	return w.Flush()
}

func auditListCmd(g *globals) *cobra.Command {
	var db string
	var after uint64
	var limit int
	var remote bool
	cmd := &cobra.Command{
		Use:   "list",
		Short: "Print audit entries from a control plane state file (offline), or with --remote from a running control plane",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if remote {
				return g.remoteAuditList(cmd, after, limit)
			}
			return withDB(db, func(st store.Store) error {
				es, err := audit.List(cmd.Context(), st, after, limit)
				if err != nil {
					return err
				}
				return g.printEntries(es)
			})
		},
	}
	cmd.Flags().StringVar(&db, "db", defaultDB, "control plane state file")
	cmd.Flags().Uint64Var(&after, "after", 0, "only entries after this sequence number")
	cmd.Flags().IntVar(&limit, "limit", 0, "at most this many (0: all)")
	cmd.Flags().BoolVar(&remote, "remote", false, "read through the control plane's AuditLogService (scope audit:read; each read is audited)")
	return cmd
}

// remoteAuditList pages through AuditLogService.
func (g *globals) remoteAuditList(cmd *cobra.Command, after uint64, limit int) error {
	if err := g.checkOutput(); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), g.timeout)
	defer cancel()
	conn, closeConn, err := g.dial(ctx)
	if err != nil {
		return err
	}
	defer closeConn()
	ac := auditv1.NewAuditLogServiceClient(conn)
	var es []auditlog.Entry
	for {
		page := int32(1000)
		if limit > 0 && limit-len(es) < 1000 {
			page = int32(limit - len(es))
		}
		resp, err := ac.ListAuditEntries(ctx, &auditv1.ListAuditEntriesRequest{After: after, PageSize: page})
		if err != nil {
			return err
		}
		for _, raw := range resp.GetEntries() {
			e, err := auditlog.Decode(raw)
			if err != nil {
				return fmt.Errorf("entry from the control plane: %w", err)
			}
			es = append(es, e)
		}
		after = resp.GetNextAfter()
		if after == 0 || (limit > 0 && len(es) >= limit) {
			return g.printEntries(es)
		}
	}
}

func auditTailCmd(g *globals) *cobra.Command {
	var db string
	var n int
	cmd := &cobra.Command{
		Use:   "tail",
		Short: "Print the last audit entries from a control plane state file (offline)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if n <= 0 {
				return fmt.Errorf("-n must be positive, not %d", n)
			}
			return withDB(db, func(st store.Store) error {
				es, err := audit.Tail(cmd.Context(), st, n)
				if err != nil {
					return err
				}
				return g.printEntries(es)
			})
		},
	}
	cmd.Flags().StringVar(&db, "db", defaultDB, "control plane state file")
	cmd.Flags().IntVarP(&n, "lines", "n", 20, "how many entries")
	return cmd
}

func auditSearchCmd(g *globals) *cobra.Command {
	var db, since, until string
	var f audit.Filter
	cmd := &cobra.Command{
		Use:   "search",
		Short: "Find audit entries by actor, action, resource, tenant, outcome, request id or time (offline)",
		Long: "Text filters match exactly, or by prefix when they end in '*' (--resource 'lease/abc*').\n" +
			"--since and --until take RFC 3339 times or durations back from now (--since 1h).",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var err error
			if f.Since, err = parseWhen(since); err != nil {
				return fmt.Errorf("--since: %w", err)
			}
			if f.Until, err = parseWhen(until); err != nil {
				return fmt.Errorf("--until: %w", err)
			}
			return withDB(db, func(st store.Store) error {
				es, err := audit.Search(cmd.Context(), st, f)
				if err != nil {
					return err
				}
				return g.printEntries(es)
			})
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&db, "db", defaultDB, "control plane state file")
	fl.StringVar(&f.Actor, "actor", "", "actor SPIFFE ID or token subject")
	fl.StringVar(&f.Action, "action", "", "action, e.g. lease.create")
	fl.StringVar(&f.Resource, "resource", "", "resource, e.g. lease/ID")
	fl.StringVar(&f.Tenant, "tenant", "", "tenant")
	fl.StringVar(&f.Outcome, "outcome", "", "success, failure or denied")
	fl.StringVar(&f.RequestID, "request-id", "", "request id")
	fl.StringVar(&since, "since", "", "entries at or after this time")
	fl.StringVar(&until, "until", "", "entries before this time")
	fl.IntVar(&f.Limit, "limit", 0, "at most this many (0: all)")
	return cmd
}

func parseWhen(s string) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	if d, err := time.ParseDuration(s); err == nil {
		return time.Now().Add(-d), nil
	}
	return time.Parse(time.RFC3339, s)
}

func auditProofCmd(g *globals) *cobra.Command {
	var db string
	cmd := &cobra.Command{
		Use:   "proof SEQ",
		Short: "Print an inclusion proof of entry SEQ against the latest signed checkpoint (JSON)",
		Long: "The proof holds the entry's canonical encoding, its leaf index, the audit path and the\n" +
			"signed checkpoint: anyone with the log's verifier key checks it with\n" +
			"`gpuaasctl audit check-proof`, or with any RFC 6962 and signed-note implementation.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var seq uint64
			if _, err := fmt.Sscan(args[0], &seq); err != nil || seq == 0 {
				return fmt.Errorf("SEQ must be an entry's sequence number (from 1), not %q", args[0])
			}
			return withDB(db, func(st store.Store) error {
				b, err := audit.Prove(cmd.Context(), st, seq)
				if err != nil {
					return err
				}
				enc := json.NewEncoder(g.stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(b)
			})
		},
	}
	cmd.Flags().StringVar(&db, "db", defaultDB, "control plane state file")
	return cmd
}

func auditCheckProofCmd(g *globals) *cobra.Command {
	var key, origin string
	cmd := &cobra.Command{
		Use:   "check-proof [FILE]",
		Short: "Check an inclusion proof offline (from FILE or standard input)",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			trusted, err := loadTrusted(key)
			if err != nil {
				return err
			}
			if trusted == nil {
				return errors.New("--key is required: a proof is only as good as the key its checkpoint is checked with")
			}
			var r io.Reader = cmd.InOrStdin()
			if len(args) == 1 && args[0] != "-" {
				f, err := os.Open(args[0])
				if err != nil {
					return err
				}
				defer f.Close()
				r = f
			}
			data, err := io.ReadAll(io.LimitReader(r, auditlog.MaxBundleSize+1))
			if err != nil {
				return err
			}
			b, err := auditlog.ParseInclusionBundle(data)
			if err != nil {
				return err
			}
			e, c, err := b.Verify(origin, trusted)
			if err != nil {
				return fmt.Errorf("proof INVALID: %w", err)
			}
			fmt.Fprintf(g.stdout, "proof OK: entry %d is in %s\n%s\n", e.Seq, c, e.Describe())
			return nil
		},
	}
	cmd.Flags().StringVar(&key, "key", "", "file of trusted checkpoint verifier keys (note format, one per line)")
	cmd.Flags().StringVar(&origin, "origin", "", "the log's checkpoint origin (any if empty)")
	return cmd
}

func auditKeygenCmd(g *globals) *cobra.Command {
	var dir, name string
	cmd := &cobra.Command{
		Use:   "keygen",
		Short: "Write a new Ed25519 checkpoint signing key and its verifier key",
		Long: "Writes DIR/audit-signing.key (secret, 0600: the control plane's audit.signing_key) and\n" +
			"DIR/audit-signing.pub (the verifier key auditors and sinks trust). --name is the log's\n" +
			"origin, e.g. gpuaas.test/audit. An existing signing key is never overwritten; to rotate,\n" +
			"write the new key elsewhere, append its line to the control plane's key file (it then\n" +
			"signs with both) and its verifier key to every verifier's list before removing the old.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if name == "" {
				name = g.trustDomain + "/audit"
			}
			if err := os.MkdirAll(dir, 0o700); err != nil {
				return err
			}
			skey, vkey := filepath.Join(dir, "audit-signing.key"), filepath.Join(dir, "audit-signing.pub")
			v, err := auditlog.WriteKeyPair(name, skey, vkey)
			if err != nil {
				return err
			}
			fmt.Fprintf(g.stdout, "signing key   %s\nverifier key  %s\n%s\n", skey, vkey, v)
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "pki", "directory to write into")
	cmd.Flags().StringVar(&name, "name", "", "the log's origin and key name (default TRUST_DOMAIN/audit)")
	return cmd
}

func auditSinkCmd(g *globals) *cobra.Command {
	var dir, listen, logKey, origin string
	var allow []string
	cmd := &cobra.Command{
		Use:   "sink",
		Short: "Run the reference audit sink: receive, verify and store signed batches over mTLS",
		Long: "The sink serves gpuaas.audit.v1.AuditSinkService on --listen with the SVID in --cert/--key/\n" +
			"--bundle, admits only the SPIFFE IDs in --allow (default the control plane's), verifies\n" +
			"every batch against --log-key and stores it under --dir. It runs until interrupted.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			td, err := spiffeid.TrustDomainFromString(g.trustDomain)
			if err != nil {
				return fmt.Errorf("--trust-domain: %w", err)
			}
			trusted, err := loadTrusted(logKey)
			if err != nil {
				return err
			}
			if trusted == nil || origin == "" || dir == "" {
				return errors.New("--dir, --log-key and --origin are required")
			}
			if g.cert == "" || g.key == "" || g.bundle == "" {
				return errors.New("--cert, --key and --bundle (the sink's SVID) are required")
			}
			ids := []spiffeid.ID{identity.ControlPlaneID(td)}
			if len(allow) > 0 {
				ids = ids[:0]
				for _, a := range allow {
					id, err := spiffeid.FromString(a)
					if err != nil {
						return fmt.Errorf("--allow %q: %w", a, err)
					}
					ids = append(ids, id)
				}
			}
			log := sanitize.Logger(cmd.ErrOrStderr(), slog.LevelInfo, false)
			s, err := sink.Open(sink.Options{Dir: dir, Origin: origin, Trusted: trusted, Logger: log})
			if err != nil {
				return err
			}
			src, err := identity.NewFileSource(cmd.Context(), identity.FileSourceConfig{CertPath: g.cert, KeyPath: g.key, BundlePath: g.bundle, TrustDomain: td})
			if err != nil {
				return err
			}
			defer src.Close()
			lis, err := net.Listen("tcp", listen)
			if err != nil {
				return err
			}
			srv := grpc.NewServer(grpc.Creds(identity.ServerCredentials(src, sink.AuthorizeSenders(ids...))), grpc.MaxRecvMsgSize(64<<20))
			auditv1.RegisterAuditSinkServiceServer(srv, &sink.Server{Sink: s})
			go func() { <-cmd.Context().Done(); srv.GracefulStop() }()
			size, _, _ := s.State(origin)
			names := make([]string, len(ids))
			for i, id := range ids {
				names[i] = id.String()
			}
			log.Info("audit sink serving", "origin", origin, "addr", lis.Addr().String(), "entries", size, "senders", strings.Join(names, ","))
			err = srv.Serve(lis)
			if errors.Is(err, grpc.ErrServerStopped) {
				return nil
			}
			return err
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "directory the batches are stored in")
	cmd.Flags().StringVar(&listen, "listen", "127.0.0.1:7444", "gRPC address")
	cmd.Flags().StringVar(&logKey, "log-key", "", "file of the log's checkpoint verifier keys")
	cmd.Flags().StringVar(&origin, "origin", "", "the log's checkpoint origin")
	cmd.Flags().StringSliceVar(&allow, "allow", nil, "SPIFFE IDs allowed to deliver (default the control plane's)")
	return cmd
}
