#!/usr/bin/env bash
# Installs what `make test` and `make demo` need on a fresh Debian 12
# machine, idempotently: Debian packages (containerd, runc, busybox-static,
# protoc, docker-registry and skopeo for the image pull tests) and the
# pinned Go tools, cached under .cache/ keyed by version.
# Fast (well under a second) when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pair in containerd:containerd runc:runc busybox:busybox-static protoc:protobuf-compiler ip:iproute2 docker-registry:docker-registry skopeo:skopeo; do
  cmd=${pair%%:*} pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
[ -f /usr/include/google/protobuf/timestamp.proto ] || need+=(libprotobuf-dev)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: missing packages ${need[*]}; run as root (or install them)" >&2
    exit 1
  fi
  echo "setup: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Pinned Go tools. buf lives in tools/go.mod so its dependencies never mix
# with the product's; the binary is cached by version.
BUF_VERSION=$(awk '$1=="github.com/bufbuild/buf" {print $2}' tools/go.mod)
mkdir -p .cache/bin
if [ ! -x ".cache/bin/buf-$BUF_VERSION" ]; then
  echo "setup: building buf $BUF_VERSION (about a minute, cached afterwards)"
  (cd tools && go build -o "../.cache/bin/buf-$BUF_VERSION" github.com/bufbuild/buf/cmd/buf)
fi
ln -sf "buf-$BUF_VERSION" .cache/bin/buf
