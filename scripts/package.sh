#!/usr/bin/env bash
# Builds the .deb and .rpm packages of gpuaas-agent, gpuaas-controlplane and
# gpuaasctl into OUT_DIR (default dist/), with nfpm built from the pinned
# tools/nfpm module and cached under .cache/bin by version.
#
#   VERSION   package and binary version, semver (default 0.1.0-git.<sha>)
#   OUT_DIR   where the packages go (default dist)
#   PACKAGES  which of agent controlplane gpuaasctl (default all)
#   FORMATS   deb rpm (default both)
set -euo pipefail
cd "$(dirname "$0")/.."

NFPM_VERSION=$(awk '$1=="github.com/goreleaser/nfpm/v2" {print $2}' tools/nfpm/go.mod)
NFPM=.cache/bin/nfpm-$NFPM_VERSION/nfpm
if [ ! -x "$NFPM" ]; then
  echo "package: building nfpm $NFPM_VERSION (about 30 s, cached afterwards)"
  mkdir -p "$(dirname "$NFPM")"
  (cd tools/nfpm && go build -o "../../$NFPM" github.com/goreleaser/nfpm/v2/cmd/nfpm)
fi

VERSION=${VERSION:-0.1.0-git.$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
OUT_DIR=${OUT_DIR:-dist}
PACKAGES=${PACKAGES:-agent controlplane gpuaasctl}
FORMATS=${FORMATS:-deb rpm}
BIN_DIR=$(mktemp -d)
trap 'rm -rf "$BIN_DIR"' EXIT

export GOARCH=${GOARCH:-$(go env GOARCH)} CGO_ENABLED=${CGO_ENABLED:-1}
# Release builds are -trimpath (no build paths in the binaries). The
# packaging test sets TRIMPATH=0: what it tests is the packages, and a
# -trimpath build recompiles every dependency a cold CI run has compiled
# already.
trim=-trimpath
[ "${TRIMPATH:-1}" = 0 ] && trim=
go build $trim -ldflags "-s -w -X main.version=$VERSION" -o "$BIN_DIR/" \
  ./agent/cmd/gpuaas-agent ./agent/cmd/gpuaas-logdriver \
  ./controlplane/cmd/gpuaas-controlplane ./controlplane/cmd/gpuaasctl

# The control plane ships an attestation policy that allows exactly the
# agent binary of this release (operators add the next release's digest
# before they roll it out).
AGENT_SHA256=$(sha256sum "$BIN_DIR/gpuaas-agent" | cut -d' ' -f1)
sed "s/\"allowed_agent_sha256\": \[\]/\"allowed_agent_sha256\": [\"$AGENT_SHA256\"]/" \
  packaging/config/attestation-policy.json > "$BIN_DIR/attestation-policy.json"
grep -q "$AGENT_SHA256" "$BIN_DIR/attestation-policy.json"

mkdir -p "$OUT_DIR"
export VERSION BIN_DIR
for p in $PACKAGES; do
  for f in $FORMATS; do
    "$NFPM" package --config "packaging/nfpm/$p.yaml" --packager "$f" --target "$OUT_DIR/" >/dev/null
  done
done
ls -1 "$OUT_DIR"
