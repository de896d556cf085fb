#!/usr/bin/env bash
# Installs what `make test` and `make demo` need on a fresh Debian 12
# machine, idempotently: Debian packages (containerd, runc, busybox-static,
# protoc, docker-registry and skopeo for the image pull tests, the CNI
# plugins and iptables for the leases' bridge network) and the
# pinned Go tools, cached under .cache/ keyed by version.
# Fast (well under a second) when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pair in containerd:containerd runc:runc busybox:busybox-static protoc:protobuf-compiler ip:iproute2 docker-registry:docker-registry skopeo:skopeo iptables:iptables systemd-analyze:systemd dpkg-deb:dpkg; do
  cmd=${pair%%:*} pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need+=("$pkg")
done
# The CNI plugins (bridge, host-local, portmap, loopback) are not commands.
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
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
# The same release's prebuilt binary from npm (tools/buf-npm: the lock pins
# it by sha512) takes seconds where building it takes minutes on 2 cores;
# without npm, or if its version differs, buf is built from tools/go.mod.
if [ ! -x ".cache/bin/buf-$BUF_VERSION" ] && command -v npm >/dev/null 2>&1; then
  npmdir=".cache/npm/buf-$BUF_VERSION"
  rm -rf "$npmdir" && mkdir -p "$npmdir"
  cp tools/buf-npm/package.json tools/buf-npm/package-lock.json "$npmdir/"
  if (cd "$npmdir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null 2>&1) &&
     [ "$("$npmdir/node_modules/@bufbuild/buf-linux-x64/bin/buf" --version 2>/dev/null)" = "${BUF_VERSION#v}" ]; then
    echo "setup: buf $BUF_VERSION from npm (tools/buf-npm)"
    cp "$npmdir/node_modules/@bufbuild/buf-linux-x64/bin/buf" ".cache/bin/buf-$BUF_VERSION"
  fi
fi
if [ ! -x ".cache/bin/buf-$BUF_VERSION" ]; then
  echo "setup: building buf $BUF_VERSION (about a minute, cached afterwards)"
  (cd tools && go build -o "../.cache/bin/buf-$BUF_VERSION" github.com/bufbuild/buf/cmd/buf)
fi
ln -sf "buf-$BUF_VERSION" .cache/bin/buf

# The other pinned tools, each in its own module under tools/ (their
# dependency graphs clash with the product's) and cached by version:
# staticcheck (lint) and nfpm (packages); SPIRE (identity tests) below.
tool() { # name module-path package... (first package names the binary dir)
  local dir=$1 mod=$2; shift 2
  local v
  v=$(awk -v m="$mod" '$1==m {print $2}' "tools/$dir/go.mod")
  [ -n "$v" ] || { echo "setup: $mod not pinned in tools/$dir/go.mod" >&2; exit 1; }
  local out=".cache/bin/$dir-$v"
  local missing=0
  for p in "$@"; do [ -x "$out/$(basename "$p")" ] || missing=1; done
  if [ $missing = 1 ]; then
    echo "setup: building $dir $v (cached afterwards)"
    rm -rf "$out.tmp" && mkdir -p "$out.tmp"
    (cd "tools/$dir" && go build -o "../../$out.tmp/" "$@")
    rm -rf "$out" && mv "$out.tmp" "$out"
  fi
}
tool staticcheck honnef.co/go/tools honnef.co/go/tools/cmd/staticcheck
tool nfpm github.com/goreleaser/nfpm/v2 github.com/goreleaser/nfpm/v2/cmd/nfpm

# promtool validates both daemons' /metrics (test/metrics). It comes from
# Debian's prometheus package, which is NOT installed (its postinst would
# start a Prometheus server): the .deb is downloaded and only usr/bin/promtool
# is extracted, into .cache/bin/promtool-<Debian version>/.
PROM_VERSION=$(apt-cache policy prometheus 2>/dev/null | awk '$1=="Candidate:" {print $2}')
if { [ -z "$PROM_VERSION" ] || [ "$PROM_VERSION" = "(none)" ]; } && [ "$(id -u)" = 0 ]; then
  apt-get update -qq
  PROM_VERSION=$(apt-cache policy prometheus 2>/dev/null | awk '$1=="Candidate:" {print $2}')
fi
if [ -z "$PROM_VERSION" ] || [ "$PROM_VERSION" = "(none)" ]; then
  echo "setup: no prometheus package in the apt sources; promtool is missing (test/metrics fails under CI)" >&2
elif [ ! -x ".cache/bin/promtool-$PROM_VERSION/promtool" ]; then
  echo "setup: extracting promtool from prometheus $PROM_VERSION (cached afterwards)"
  PROM_OUT=".cache/bin/promtool-$PROM_VERSION"
  PROM_TMP=$(mktemp -d)
  trap 'rm -rf "$PROM_TMP"' EXIT
  (cd "$PROM_TMP" && apt-get download -qq -o APT::Sandbox::User=root "prometheus=$PROM_VERSION")
  deb=$(ls "$PROM_TMP"/prometheus_*.deb)
  got=$(dpkg-deb -f "$deb" Version)
  [ "$got" = "$PROM_VERSION" ] || { echo "setup: downloaded prometheus $got, want $PROM_VERSION" >&2; exit 1; }
  mkdir -p "$PROM_TMP/root"
  dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$PROM_TMP/root" ./usr/bin/promtool
  "$PROM_TMP/root/usr/bin/promtool" --version >/dev/null
  rm -rf "$PROM_OUT.tmp" && mkdir -p "$PROM_OUT.tmp"
  mv "$PROM_TMP/root/usr/bin/promtool" "$PROM_OUT.tmp/promtool"
  rm -rf "$PROM_OUT" && mv "$PROM_OUT.tmp" "$PROM_OUT"
  rm -rf "$PROM_TMP"
  trap - EXIT
fi
if [ -n "$PROM_VERSION" ] && [ -x ".cache/bin/promtool-$PROM_VERSION/promtool" ]; then
  ln -sfn "promtool-$PROM_VERSION/promtool" .cache/bin/promtool
fi

# SPIRE is by far the slowest (scripts/build-spire.sh: about 1,100
# packages, trimmed to the plugins the tests use) and only the SPIRE tests
# need it: it builds in the background at low priority while the rest of
# the suite compiles and runs, and test/spire waits for it (the .building
# file holds the builder's pid; the log is .cache/spire-build.log).
SPIRE_VERSION=$(awk '$1=="github.com/spiffe/spire" {print $2}' tools/spire/go.mod)
SPIRE_OUT=".cache/bin/spire-$SPIRE_VERSION"
# The build's recipe (the script and the catalog trimmer) is stamped into
# the output: a change to it, a plugin kept for a new test say, rebuilds.
SPIRE_RECIPE=$(cat scripts/build-spire.sh tools/spire/trimcatalog/main.go | sha256sum | cut -c1-16)
if { [ ! -x "$SPIRE_OUT/spire-server" ] || [ ! -x "$SPIRE_OUT/spire-agent" ] ||
     [ "$(cat "$SPIRE_OUT/recipe" 2>/dev/null)" != "$SPIRE_RECIPE" ]; } &&
   ! { [ -f "$SPIRE_OUT.building" ] && kill -0 "$(cat "$SPIRE_OUT.building")" 2>/dev/null; }; then
  echo "setup: building spire $SPIRE_VERSION in the background (log: .cache/spire-build.log)"
  mkdir -p .cache/bin
  setsid nohup nice -n 19 bash -c '
    set -e
    out=$1; rm -rf "$out.tmp" "$out"; mkdir -p "$out.tmp"
    scripts/build-spire.sh "$PWD/$out.tmp"
    echo "$2" > "$out.tmp/recipe"
    mv "$out.tmp" "$out"
  ' spire-build "$SPIRE_OUT" "$SPIRE_RECIPE" > .cache/spire-build.log 2>&1 < /dev/null &
  echo $! > "$SPIRE_OUT.building"
fi
