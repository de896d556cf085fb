package isolation

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
)

// probe is the kernel feature probe NewEnforcer runs; tests replace it to
// see NewEnforcer fail closed.
var probe = probeKernel

// probeKernel checks that the kernel can run a fence and returns the
// optional event fields it supports. Errors wrap ErrUnsupported and name
// what is missing.
func probeKernel() (progFeatures, error) {
	unsupported := func(what string, err error) error {
		if errors.Is(err, ebpf.ErrNotSupported) {
			return fmt.Errorf("%w: kernel lacks %s", ErrUnsupported, what)
		}
		return fmt.Errorf("%w: probe %s (root with CAP_BPF, CAP_SYS_ADMIN and CAP_NET_ADMIN is needed): %w", ErrUnsupported, what, err)
	}
	for _, pt := range []ebpf.ProgramType{ebpf.CGroupDevice, ebpf.CGroupSockAddr} {
		if err := features.HaveProgramType(pt); err != nil {
			return 0, unsupported(pt.String()+" programs", err)
		}
	}
	for _, mt := range []ebpf.MapType{ebpf.LPMTrie, ebpf.RingBuf, ebpf.Array} {
		if err := features.HaveMapType(mt); err != nil {
			return 0, unsupported(mt.String()+" maps", err)
		}
	}
	required := []asm.BuiltinFunc{asm.FnRingbufOutput, asm.FnKtimeGetBootNs}
	optional := map[asm.BuiltinFunc]progFeatures{asm.FnGetCurrentPidTgid: featPID, asm.FnGetCurrentComm: featComm}
	feat := featPID | featComm
	for _, pt := range []ebpf.ProgramType{ebpf.CGroupDevice, ebpf.CGroupSockAddr} {
		for _, fn := range required {
			if err := features.HaveProgramHelper(pt, fn); err != nil {
				return 0, unsupported(fmt.Sprintf("helper %s in %s programs", fn, pt), err)
			}
		}
		for fn, f := range optional {
			if features.HaveProgramHelper(pt, fn) != nil {
				feat &^= f
			}
		}
	}
	if err := features.HaveProgramHelper(ebpf.CGroupSockAddr, asm.FnMapLookupElem); err != nil {
		return 0, unsupported("map lookups in cgroup_sock_addr programs", err)
	}
	return feat, nil
}
