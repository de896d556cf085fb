#!/usr/bin/env bash
# Regenerates the Go code for proto/ with the pinned plugins (go.mod tool
# directives) and the system protoc. With OUT=dir it writes there instead of
# in place, which is how `make lint` checks the committed code is current.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.cache/bin
mkdir -p "$bin"
go build -o "$bin/" google.golang.org/protobuf/cmd/protoc-gen-go google.golang.org/grpc/cmd/protoc-gen-go-grpc
out=${OUT:-.}
mkdir -p "$out"
out=$(cd "$out" && pwd)
mapfile -t files < <(cd proto && find gpuaas -name '*.proto' | sort)
(cd proto && protoc -I . -I /usr/include \
  --plugin=protoc-gen-go="../$bin/protoc-gen-go" \
  --plugin=protoc-gen-go-grpc="../$bin/protoc-gen-go-grpc" \
  --go_out="$out" --go_opt=module=github.com/gpuaas/gpuaas \
  --go-grpc_out="$out" --go-grpc_opt=module=github.com/gpuaas/gpuaas \
  "${files[@]}")
