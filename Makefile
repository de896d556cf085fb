# gpuaas: `make demo` runs one lease end to end; `make test` runs every test.
# Both install what they need first (scripts/setup.sh).
GO       ?= go
export PATH := $(PATH):/usr/local/go/bin:/usr/sbin:/sbin
VERSION  ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -X main.version=$(VERSION)
TESTFLAGS ?=
# Package versions are semver: a tag vX.Y.Z gives X.Y.Z.
PKG_VERSION ?= $(shell git describe --tags --exact-match 2>/dev/null | sed 's/^v//')

.PHONY: all setup build test unit lint proto demo bench package clean

all: build

setup:
	@scripts/setup.sh

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/ ./agent/cmd/gpuaas-agent ./agent/cmd/gpuaas-logdriver ./controlplane/cmd/gpuaas-controlplane ./controlplane/cmd/gpuaasctl

proto: setup
	scripts/gen-proto.sh

lint: setup
	scripts/lint.sh

# Every test, including the end-to-end test against real containerd, and
# lint (go vet, staticcheck, buf lint, generated code current; go test does
# not repeat vet). Root is needed for containerd; in CI (CI=true) tests
# that cannot start their components fail instead of skipping.
# The slowest packages are named first so that they are built and started
# first: they mostly wait (containers, dpkg, kill -9 and restarts), and the
# rest of the suite compiles and runs beside them instead of after them.
# Lint runs beside the tests at the lowest priority, taking the CPU they
# leave idle while they wait, instead of before them (a cold run spent 6
# minutes in lint first). Its output follows the tests'; either failing
# fails make test.
SLOW_TESTS := ./test/e2e ./test/packaging ./agent/runtime ./test/crash ./agent/partition ./agent/lease
TEST_CMD := $(GO) test -race -vet=off -count=1 -timeout 30m $(TESTFLAGS) $(SLOW_TESTS) ./...
test: setup
	@mkdir -p .cache; nice -n 19 scripts/lint.sh > .cache/lint.log 2>&1 & lint=$$!; \
	echo "$(TEST_CMD) (lint beside it: .cache/lint.log)"; \
	$(TEST_CMD); rc=$$?; \
	wait $$lint; lrc=$$?; echo "scripts/lint.sh:"; cat .cache/lint.log; \
	if [ $$lrc != 0 ]; then echo "make test: lint failed (exit $$lrc)"; rc=1; fi; \
	exit $$rc

unit:
	$(GO) test -short -count=1 ./...

demo: setup build
	$(GO) run ./test/cmd/demo -bin bin

bench: setup build
	$(GO) test -run '^$$' -bench . -benchmem -count=1 ./...
	GPUAAS_FOOTPRINT=1 GPUAAS_FOOTPRINT_OUT=$(CURDIR)/bin/footprint.json $(GO) test -count=1 -timeout 20m -run '^TestAgentFootprint$$' -v ./test/footprint/
	GPUAAS_FLEETSIM=1 $(GO) test -count=1 -run '^TestFleetScale$$' -v -timeout 60m ./test/fleetsim/

# .deb and .rpm packages of the agent, the control plane and gpuaasctl in
# dist/ (nfpm, pinned in tools/nfpm).
package:
	VERSION=$(PKG_VERSION) scripts/package.sh

clean:
	rm -rf bin dist
