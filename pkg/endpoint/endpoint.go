// Package endpoint is how a client names the control plane: one or more
// host:port addresses of its replicas, dialled as one gRPC target that
// fails over between them (pick-first: the first address that answers,
// then the next when it stops answering).
package endpoint

import (
	"fmt"
	"net"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
)

// MaxAddresses bounds a list.
const MaxAddresses = 16

// Parse splits a comma-separated list of host:port addresses (spaces
// around commas allowed) and checks each; duplicates are refused.
func Parse(list string) ([]string, error) {
	var out []string
	seen := map[string]bool{}
	for _, a := range strings.Split(list, ",") {
		a = strings.TrimSpace(a)
		host, port, err := net.SplitHostPort(a)
		if err != nil {
			return nil, fmt.Errorf("%q must be host:port: %w", a, err)
		}
		if host == "" || port == "" {
			return nil, fmt.Errorf("%q must be host:port with both parts", a)
		}
		if seen[a] {
			return nil, fmt.Errorf("%q is listed twice", a)
		}
		seen[a] = true
		out = append(out, a)
	}
	if len(out) > MaxAddresses {
		return nil, fmt.Errorf("%d addresses, at most %d", len(out), MaxAddresses)
	}
	return out, nil
}

// Target returns the gRPC target and the option that resolves it for
// addrs: a single address is dialled as given (the DNS resolver still
// fails over between its records); several are one target over all of them.
func Target(addrs []string) (string, []grpc.DialOption) {
	if len(addrs) == 1 {
		return addrs[0], nil
	}
	r := manual.NewBuilderWithScheme("gpuaas-endpoints")
	st := resolver.State{}
	for _, a := range addrs {
		st.Addresses = append(st.Addresses, resolver.Address{Addr: a})
	}
	r.InitialState(st)
	return r.Scheme() + ":///controlplane", []grpc.DialOption{grpc.WithResolvers(r)}
}
