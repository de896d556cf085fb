package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/gpuaas/gpuaas/pkg/seal"
)

// secretsCmd manages the keys that seal secrets at rest (pkg/seal).
func secretsCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "secrets", Short: "Keys that seal tenant env values at rest"}
	var kid, file string
	keygen := &cobra.Command{
		Use:   "keygen",
		Short: "Generate a sealing key; with --file, put it first in the key file (the others keep opening)",
		Long: "keygen writes a new key line \"KID BASE64KEY\". With --file it is put first in that file\n" +
			"(created 0600 if missing), which makes it the key that seals; the keys after it still open\n" +
			"what they sealed. Remove an old key only once nothing sealed with it is left.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			line, err := seal.GenerateKeyLine(kid)
			if err != nil {
				return err
			}
			if file == "" {
				_, err := fmt.Fprintln(g.stdout, line)
				return err
			}
			old, err := os.ReadFile(file)
			if err != nil && !os.IsNotExist(err) {
				return err
			}
			body := append([]byte(line+"\n"), old...)
			if _, err := seal.ParseKeyring(body); err != nil {
				return err
			}
			tmp := filepath.Join(filepath.Dir(file), "."+filepath.Base(file)+".tmp")
			if err := os.WriteFile(tmp, body, 0o600); err != nil {
				return err
			}
			if err := os.Rename(tmp, file); err != nil {
				os.Remove(tmp)
				return err
			}
			_, err = fmt.Fprintf(g.stdout, "key %s now seals; %s\n", kid, file)
			return err
		},
	}
	keygen.Flags().StringVar(&kid, "kid", "", "key id (1-32 of [A-Za-z0-9_-]), e.g. the date")
	keygen.Flags().StringVar(&file, "file", "", "key file to put the new key first in")
	_ = keygen.MarkFlagRequired("kid")
	cmd.AddCommand(keygen)
	return cmd
}
