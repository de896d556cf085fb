#!/usr/bin/env bash
# The project's static gates: gofmt, go vet, staticcheck, buf lint, and generated code
# that matches its .proto sources.
set -euo pipefail
cd "$(dirname "$0")/.."
fail=0
unformatted=$(git ls-files -co --exclude-standard '*.go' | grep -v '\.pb\.go$' | xargs -r gofmt -l)
if [ -n "$unformatted" ]; then
  echo "lint: gofmt would change:"; echo "$unformatted"; fail=1
fi
go vet ./... || fail=1
SC_VERSION=$(awk '$1=="honnef.co/go/tools" {print $2}' tools/staticcheck/go.mod)
".cache/bin/staticcheck-$SC_VERSION/staticcheck" ./... || { echo "lint: staticcheck failed"; fail=1; }
(cd proto && ../.cache/bin/buf lint) || { echo "lint: buf lint failed"; fail=1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
OUT="$tmp" scripts/gen-proto.sh
while IFS= read -r f; do
  if ! cmp -s "$tmp/$f" "$f"; then
    echo "lint: $f is not current: run make proto"; fail=1
  fi
done < <(cd "$tmp" && find . -name '*.pb.go' | sed 's#^\./##')
if [ "$(cd "$tmp" && find . -name '*.pb.go' | wc -l)" != "$(find proto -name '*.pb.go' | wc -l)" ]; then
  echo "lint: generated file set differs from proto/: run make proto"; fail=1
fi
[ $fail = 0 ] && echo "lint: gofmt, go vet, staticcheck, buf lint and generated code: ok"
exit $fail
