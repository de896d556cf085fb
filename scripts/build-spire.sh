#!/usr/bin/env bash
# Builds spire-server and spire-agent of the release pinned in
# tools/spire/go.mod into OUT_DIR, for the SPIRE tests only (scripts/setup.sh
# runs it in the background). The build is made for a test run's speed, not
# for production:
#   - tools/spire/trimcatalog shortens the catalogs of built-in plugins to
#     the ones test/spire configures (join_token, memory and disk key
#     managers, unix workload attestor, uniqueid credential composer, the
#     sql datastore), in a copy of the
#     release's source: the cloud, Kubernetes, Vault, Docker and TPM plugins
#     and their SDKs are not compiled (about 1,100 packages instead of
#     2,300). The plugins kept are the release's source unchanged.
#   - no optimization, inlining or debug information (-N -l, -dwarf=false,
#     -s -w), and SQLite's C code at -O1: a test's SPIRE serves a handful
#     of SVIDs.
set -euo pipefail
out=$1
cd "$(dirname "$0")/../tools/spire"
unset GOFLAGS
go mod download github.com/spiffe/spire
src=$(go list -m -f '{{.Dir}}' github.com/spiffe/spire)
[ -d "$src" ] || { echo "build-spire: no source for github.com/spiffe/spire" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r "$src" "$work/spire"
chmod -R u+w "$work/spire"
go run ./trimcatalog "$work/spire"
cp go.mod go.sum "$work/"
echo "replace github.com/spiffe/spire => $work/spire" >> "$work/go.mod"
CGO_CFLAGS=-O1 go build -modfile "$work/go.mod" -trimpath \
  -gcflags='all=-N -l -dwarf=false' -ldflags='-s -w' \
  -o "$out/" github.com/spiffe/spire/cmd/spire-server github.com/spiffe/spire/cmd/spire-agent
