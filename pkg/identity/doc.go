// Package identity is the SPIFFE identity layer shared by gpuaas-agent,
// gpuaas-controlplane and gpuaasctl: the SPIFFE ID scheme
// (spiffe://TD/gpuaas/agent/NODE, spiffe://TD/gpuaas/controlplane,
// spiffe://TD/gpuaas/operator/NAME), X509-SVID sources (files that are
// reloaded when they rotate; any go-spiffe source such as
// workloadapi.X509Source also satisfies Source), TLS 1.3 mTLS configurations
// for servers and clients, gRPC peer identity, and a development PKI.
//
// All certificate checks are go-spiffe's (x509svid, x509bundle, tlsconfig);
// this package adds the ID scheme, file handling and policy on top and never
// hand-rolls chain verification.
//
// What it must never do: accept a peer whose SVID does not chain to the trust
// bundle; fall back to TLS below 1.3 or to a connection without a client
// certificate; swap in a rotated SVID that is half written, mismatched with
// its key, outside the trust domain or expired; log or return key material;
// import agent or controlplane code. The development PKI (WriteDevPKI, CA) is
// for development and tests only and must never back a production fleet.
package identity
