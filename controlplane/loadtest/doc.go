// Package loadtest holds the control plane's in-process load benchmarks:
// the real gRPC edge (mTLS with the dev PKI, the authorizer, the lease
// server) over the lease service and fleet registry, on each store
// backend. It has no production code; see its _test.go files.
package loadtest
