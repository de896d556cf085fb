// Package sanitize keeps secrets and tenant data out of logs and bounds what
// tenants may attach to a lease (contract 6 of the design).
//
// NewHandler wraps any slog.Handler and redacts before the wrapped handler
// sees a record: values under sensitive keys (IsSensitiveKey), whole groups
// under sensitive group names, environment variable values under env keys,
// and secret-looking text anywhere in messages and string values (Scrub).
// Logger builds the sanitized logger the daemons use.
//
// AllowMetadata and ValidateMetadata implement the lease metadata allowlist
// and its limits.
//
// What it must never do: pass a value under a sensitive key, a JWT, a PEM
// private key or a bearer token to the wrapped handler; echo a rejected
// metadata value in an error; import agent or controlplane code. Redaction
// errs on the side of hiding too much: a key that merely looks sensitive
// (such as "monkey" or "token_count") is redacted too.
package sanitize
