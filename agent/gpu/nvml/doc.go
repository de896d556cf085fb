// Package nvml is the real GPU backend: gpu.Backend and gpu.Observer on the
// NVIDIA driver's management library (libnvidia-ml.so.1) through go-nvml.
//
// The library is loaded and initialised by New; a host without the driver
// gets an error wrapping gpu.ErrDriverUnavailable that names the library,
// never a panic. Every NVML return code is mapped to the gpu error classes
// by one function (mapReturn); a call that panics inside go-nvml (an
// nvml.Interface that does not implement a function) becomes an error too.
// A C symbol the loaded library lacks would kill the process outright (the
// dynamic loader aborts on an unresolved lazy symbol, which no recover can
// catch), so New checks that the library exports every function the backend
// calls unconditionally, and optional newer functions are looked up before
// each use.
//
// The package must never change a GPU except through the mutating
// gpu.Backend methods (SetMIGMode, Create*/Destroy*): inventory, listing,
// telemetry and events are read-only, so the read-only conformance suite
// (gputest.RunReadOnly) may run against a production host.
//
// MIG profiles are keyed by the id the driver reports
// (GpuInstanceProfileInfo.Id, e.g. 19 for 1g), which is what pkg/mig calls
// mig.ProfileID; names are derived from sizes and informational only.
//
// The package needs cgo (go-nvml does); built without it, New reports that
// the driver is unavailable.
package nvml
