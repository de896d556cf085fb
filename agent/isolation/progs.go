package isolation

import (
	"encoding/binary"
	"fmt"
	"io"
	"strconv"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
)

// Kernel ABI constants (include/uapi/linux/bpf.h).
const (
	devcgAccMknod = 1 // BPF_DEVCG_ACC_MKNOD
	devcgAccRead  = 2 // BPF_DEVCG_ACC_READ
	devcgAccWrite = 4 // BPF_DEVCG_ACC_WRITE
	devcgDevBlock = 1 // BPF_DEVCG_DEV_BLOCK
	devcgDevChar  = 2 // BPF_DEVCG_DEV_CHAR

	// struct bpf_cgroup_dev_ctx
	devCtxAccessType = 0 // (access << 16) | type
	devCtxMajor      = 4
	devCtxMinor      = 8

	// struct bpf_sock_addr
	sockCtxUserFamily = 0
	sockCtxUserIP4    = 4 // network byte order
	sockCtxUserIP6    = 8 // [4]u32, network byte order
	sockCtxUserPort   = 24
	sockCtxType       = 32
	sockCtxProtocol   = 36
)

// license is passed to the kernel; the programs use no GPL-only helper.
const license = "Apache-2.0"

// Event kinds as the programs write them (event.kind).
const (
	evKindDevice   = 1
	evKindConnect4 = 2
	evKindConnect6 = 3
	evKindSendmsg4 = 4
	evKindSendmsg6 = 5
)

// progFeatures are optional event fields, recorded in a lease's meta so a
// program can be rebuilt bit for bit (and its tag checked) later.
type progFeatures uint32

const (
	featPID  progFeatures = 1 << iota // bpf_get_current_pid_tgid
	featComm                          // bpf_get_current_comm
)

// The deny event, as the programs write it to the ring buffer (native
// byte order, addresses and port in network order):
//
//	0  u64 cookie       the lease's cookie (cookieOf)
//	8  u64 time         bpf_ktime_get_boot_ns
//	16 u32 kind         evKind*
//	20 u32 pid          thread group id, 0 without featPID
//	24 u32 a            device: access_type   net: user_family
//	28 u32 b            device: major         net: user_port
//	32 u32 c            device: minor         net: protocol
//	36 u32 d            net: socket type
//	40 [16]u8 addr      net: destination (IPv4 in the first 4 bytes)
//	56 [16]u8 comm      task comm, zero without featComm
const eventSize = 72

// Stack layout of every program, relative to the frame pointer.
const (
	stackEvent = -eventSize // the event being built
	stackKey6  = -96        // LPM key: u32 prefixlen + 16 address bytes
	stackKey4  = -104       // LPM key: u32 prefixlen + 4 address bytes
)

// attachPoint is one program of a fence: its hook, its program and pin
// names.
type attachPoint struct {
	role   string // pin file name, and Description's Attach
	attach ebpf.AttachType
	kind   uint32 // evKind*
	name   string // program name (at most 15 characters)
}

var attachPoints = []attachPoint{
	{"device", ebpf.AttachCGroupDevice, evKindDevice, "gpuaas_device"},
	{"connect4", ebpf.AttachCGroupInet4Connect, evKindConnect4, "gpuaas_conn4"},
	{"connect6", ebpf.AttachCGroupInet6Connect, evKindConnect6, "gpuaas_conn6"},
	{"sendmsg4", ebpf.AttachCGroupUDP4Sendmsg, evKindSendmsg4, "gpuaas_send4"},
	{"sendmsg6", ebpf.AttachCGroupUDP6Sendmsg, evKindSendmsg6, "gpuaas_send6"},
}

// mapFDs are the file descriptors the programs load map pointers from.
// For rebuilding a program to check its tag they are all zero: the kernel
// leaves map pointers out of the tag.
type mapFDs struct {
	events, deny4, deny6, allow4, allow6 int
}

// builder appends instructions and places labels on the next one.
type builder struct {
	insns   asm.Instructions
	pending string
}

func (b *builder) emit(insns ...asm.Instruction) {
	for _, ins := range insns {
		if b.pending != "" {
			ins = ins.WithSymbol(b.pending)
			b.pending = ""
		}
		b.insns = append(b.insns, ins)
	}
}

func (b *builder) label(name string) {
	if b.pending != "" {
		// Two labels on one instruction: give the first its own no-op
		// (an unconditional jump to the next instruction).
		b.emit(asm.Instruction{OpCode: asm.Ja.Op(asm.ImmSource)})
	}
	b.pending = name
}

// buildProgram returns the spec of one of a fence's programs.
func buildProgram(ap attachPoint, rules []DeviceRule, cookie uint64, fds mapFDs, feat progFeatures) (*ebpf.ProgramSpec, error) {
	var insns asm.Instructions
	var err error
	typ := ebpf.CGroupSockAddr
	attach := ap.attach
	switch ap.kind {
	case evKindDevice:
		typ, attach = ebpf.CGroupDevice, ebpf.AttachNone
		insns, err = deviceProgram(rules, cookie, fds.events, feat)
	case evKindConnect4, evKindSendmsg4:
		insns = egress4Program(ap.kind, cookie, fds, feat)
	case evKindConnect6, evKindSendmsg6:
		insns = egress6Program(ap.kind, cookie, fds, feat)
	default:
		err = fmt.Errorf("unknown program kind %d", ap.kind)
	}
	if err != nil {
		return nil, err
	}
	return &ebpf.ProgramSpec{
		Name:         ap.name,
		Type:         typ,
		AttachType:   attach,
		Instructions: insns,
		License:      license,
	}, nil
}

// deviceProgram compiles rules (already minimal, see compileDeviceRules)
// the way runc's devicefilter does: one block per rule that compares type,
// access, major and minor and allows on a full match, falling through to
// the next block otherwise; after the last block, deny. A denial is
// written to the event ring before returning 0 (EPERM for the caller).
func deviceProgram(rules []DeviceRule, cookie uint64, eventsFD int, feat progFeatures) (asm.Instructions, error) {
	var b builder
	b.emit(
		asm.Mov.Reg(asm.R6, asm.R1),
		asm.LoadMem(asm.R2, asm.R6, devCtxAccessType, asm.Word),
		asm.Mov.Reg32(asm.R3, asm.R2),
		asm.And.Imm32(asm.R3, 0xffff), // R3 = type
		asm.RSh.Imm32(asm.R2, 16),     // R2 = access
		asm.LoadMem(asm.R4, asm.R6, devCtxMajor, asm.Word),
		asm.LoadMem(asm.R5, asm.R6, devCtxMinor, asm.Word),
	)
	for i, r := range rules {
		next := "rule" + strconv.Itoa(i+1)
		if i+1 == len(rules) {
			next = "deny"
		}
		typ := int32(devcgDevChar)
		switch r.Type {
		case 'c':
		case 'b':
			typ = devcgDevBlock
		default:
			return nil, fmt.Errorf("device rule %s: type %q", r, r.Type)
		}
		access, err := accessBits(r.Access)
		if err != nil {
			return nil, fmt.Errorf("device rule %s: %w", r, err)
		}
		b.emit(asm.JNE.Imm(asm.R3, typ, next))
		if access != devcgAccMknod|devcgAccRead|devcgAccWrite {
			// The request must be a subset of the rule's access.
			b.emit(
				asm.Mov.Reg32(asm.R1, asm.R2),
				asm.And.Imm32(asm.R1, int32(^access&0xffff)),
				asm.JNE.Imm(asm.R1, 0, next),
			)
		}
		if r.Major != Wildcard {
			b.emit(asm.JNE.Imm(asm.R4, int32(r.Major), next))
		}
		if r.Minor != Wildcard {
			b.emit(asm.JNE.Imm(asm.R5, int32(r.Minor), next))
		}
		b.emit(asm.Mov.Imm(asm.R0, 1), asm.Return())
		b.label(next)
	}
	if len(rules) == 0 {
		b.label("deny")
	}
	emitDeny(&b, evKindDevice, cookie, eventsFD, feat, func() {
		for _, f := range []int16{devCtxAccessType, devCtxMajor, devCtxMinor} {
			b.emit(
				asm.LoadMem(asm.R1, asm.R6, f, asm.Word),
				asm.StoreMem(asm.RFP, stackEvent+24+f, asm.R1, asm.Word),
			)
		}
	})
	return b.insns, nil
}

// egress4Program is connect4 or sendmsg4: decide on the IPv4 destination.
func egress4Program(kind uint32, cookie uint64, fds mapFDs, feat progFeatures) asm.Instructions {
	var b builder
	b.emit(
		asm.Mov.Reg(asm.R6, asm.R1),
		asm.LoadMem(asm.R7, asm.R6, sockCtxUserIP4, asm.Word),
		asm.StoreImm(asm.RFP, stackKey4, 32, asm.Word),
		asm.StoreMem(asm.RFP, stackKey4+4, asm.R7, asm.Word),
	)
	emitVerdict(&b, stackKey4, fds.deny4, fds.allow4, "allow", "deny")
	emitNetDeny(&b, kind, cookie, fds.events, feat, false)
	return b.insns
}

// v4MappedWord2 and nat64Word0 are user_ip6 words as loaded (native order)
// for ::ffff:0:0/96 (word 2 = 00 00 ff ff) and 64:ff9b::/96 (word 0 =
// 00 64 ff 9b).
var (
	v4MappedWord2 = binary.NativeEndian.Uint32([]byte{0, 0, 0xff, 0xff})
	nat64Word0    = binary.NativeEndian.Uint32([]byte{0, 0x64, 0xff, 0x9b})
)

// egress6Program is connect6 or sendmsg6. See Policy.Allows for the
// decision, including IPv4-mapped and NAT64 addresses.
func egress6Program(kind uint32, cookie uint64, fds mapFDs, feat progFeatures) asm.Instructions {
	var b builder
	b.emit(
		asm.Mov.Reg(asm.R6, asm.R1),
		asm.StoreImm(asm.RFP, stackKey6, 128, asm.Word),
		asm.LoadMem(asm.R7, asm.R6, sockCtxUserIP6, asm.Word),
		asm.StoreMem(asm.RFP, stackKey6+4, asm.R7, asm.Word),
		asm.LoadMem(asm.R8, asm.R6, sockCtxUserIP6+4, asm.Word),
		asm.StoreMem(asm.RFP, stackKey6+8, asm.R8, asm.Word),
		asm.LoadMem(asm.R9, asm.R6, sockCtxUserIP6+8, asm.Word),
		asm.StoreMem(asm.RFP, stackKey6+12, asm.R9, asm.Word),
		asm.LoadMem(asm.R1, asm.R6, sockCtxUserIP6+12, asm.Word),
		asm.StoreMem(asm.RFP, stackKey6+16, asm.R1, asm.Word),
		// The embedded IPv4 address as an IPv4 key, used when mapped or NAT64.
		asm.StoreImm(asm.RFP, stackKey4, 32, asm.Word),
		asm.StoreMem(asm.RFP, stackKey4+4, asm.R1, asm.Word),
		// ::ffff:a.b.c.d: IPv4 on the wire, decided by the IPv4 lists only.
		asm.JNE.Imm32(asm.R7, 0, "not_mapped"),
		asm.JNE.Imm32(asm.R8, 0, "not_mapped"),
		asm.JNE.Imm32(asm.R9, int32(v4MappedWord2), "not_mapped"),
	)
	emitVerdict(&b, stackKey4, fds.deny4, fds.allow4, "allow", "deny")
	// 64:ff9b::a.b.c.d: both the IPv4 and the IPv6 lists must allow.
	b.label("not_mapped")
	b.emit(
		asm.JNE.Imm32(asm.R7, int32(nat64Word0), "v6"),
		asm.JNE.Imm32(asm.R8, 0, "v6"),
		asm.JNE.Imm32(asm.R9, 0, "v6"),
	)
	emitVerdict(&b, stackKey4, fds.deny4, fds.allow4, "v6", "deny")
	b.label("v6")
	emitVerdict(&b, stackKey6, fds.deny6, fds.allow6, "allow", "deny")
	emitNetDeny(&b, kind, cookie, fds.events, feat, true)
	return b.insns
}

// emitVerdict looks the key at keyOff up in the deny and allow tries (whose
// values are the matched prefix length) and jumps to onDeny when the
// longest deny match is longer than the longest allow match, else to
// onAllow. Clobbers R0-R5 and R8.
func emitVerdict(b *builder, keyOff int16, denyFD, allowFD int, onAllow, onDeny string) {
	b.emit(
		asm.LoadMapPtr(asm.R1, denyFD),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, int32(keyOff)),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, onAllow), // no deny prefix matches
		asm.LoadMem(asm.R8, asm.R0, 0, asm.Word),
		asm.LoadMapPtr(asm.R1, allowFD),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, int32(keyOff)),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, onDeny), // denied, no exception
		asm.LoadMem(asm.R1, asm.R0, 0, asm.Word),
		asm.JGE.Reg(asm.R1, asm.R8, onAllow), // allow at least as specific
		asm.Ja.Label(onDeny),
	)
}

// emitNetDeny emits the "deny" block (event, return 0) and the "allow"
// block (return 1) of an egress program.
func emitNetDeny(b *builder, kind uint32, cookie uint64, eventsFD int, feat progFeatures, v6 bool) {
	b.label("deny")
	emitDeny(b, kind, cookie, eventsFD, feat, func() {
		for _, f := range []struct{ ctx, ev int16 }{
			{sockCtxUserFamily, 24}, {sockCtxUserPort, 28}, {sockCtxProtocol, 32}, {sockCtxType, 36},
		} {
			b.emit(
				asm.LoadMem(asm.R1, asm.R6, f.ctx, asm.Word),
				asm.StoreMem(asm.RFP, stackEvent+f.ev, asm.R1, asm.Word),
			)
		}
		if !v6 {
			b.emit(
				asm.LoadMem(asm.R1, asm.R6, sockCtxUserIP4, asm.Word),
				asm.StoreMem(asm.RFP, stackEvent+40, asm.R1, asm.Word),
			)
			return
		}
		for i := int16(0); i < 4; i++ {
			b.emit(
				asm.LoadMem(asm.R1, asm.R6, sockCtxUserIP6+4*i, asm.Word),
				asm.StoreMem(asm.RFP, stackEvent+40+4*i, asm.R1, asm.Word),
			)
		}
	})
	b.label("allow")
	b.emit(asm.Mov.Imm(asm.R0, 1), asm.Return())
}

// emitDeny builds the event on the stack (fill writes the kind-specific
// fields from the context in R6), outputs it to the ring buffer and
// returns 0. A full ring drops the event, never the verdict.
func emitDeny(b *builder, kind uint32, cookie uint64, eventsFD int, feat progFeatures, fill func()) {
	b.emit(asm.Mov.Imm(asm.R1, 0))
	for off := int16(0); off < eventSize; off += 8 {
		b.emit(asm.StoreMem(asm.RFP, stackEvent+off, asm.R1, asm.DWord))
	}
	b.emit(
		asm.LoadImm(asm.R1, int64(cookie), asm.DWord),
		asm.StoreMem(asm.RFP, stackEvent, asm.R1, asm.DWord),
		asm.FnKtimeGetBootNs.Call(),
		asm.StoreMem(asm.RFP, stackEvent+8, asm.R0, asm.DWord),
		asm.StoreImm(asm.RFP, stackEvent+16, int64(kind), asm.Word),
	)
	if feat&featPID != 0 {
		b.emit(
			asm.FnGetCurrentPidTgid.Call(),
			asm.RSh.Imm(asm.R0, 32),
			asm.StoreMem(asm.RFP, stackEvent+20, asm.R0, asm.Word),
		)
	}
	fill()
	if feat&featComm != 0 {
		b.emit(
			asm.Mov.Reg(asm.R1, asm.RFP),
			asm.Add.Imm(asm.R1, stackEvent+56),
			asm.Mov.Imm(asm.R2, 16),
			asm.FnGetCurrentComm.Call(),
		)
	}
	b.emit(
		asm.LoadMapPtr(asm.R1, eventsFD),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, stackEvent),
		asm.Mov.Imm(asm.R3, eventSize),
		asm.Mov.Imm(asm.R4, 0),
		asm.FnRingbufOutput.Call(),
		asm.Mov.Imm(asm.R0, 0),
		asm.Return(),
	)
}

// programMatches reports whether the kernel's tag for a loaded program is
// the tag of spec's instructions (resolved the way the loader resolves
// them; map pointers do not count).
func programMatches(spec *ebpf.ProgramSpec, tag string) (bool, error) {
	insns := spec.Instructions
	if err := insns.Marshal(io.Discard, hostOrder); err != nil {
		return false, fmt.Errorf("resolve program %s: %w", spec.Name, err)
	}
	return insns.HasTag(tag, hostOrder)
}

// hostOrder is binary.LittleEndian or binary.BigEndian, whichever the host
// is: asm marshals only with those two.
var hostOrder binary.ByteOrder = func() binary.ByteOrder {
	if binary.NativeEndian.Uint16([]byte{1, 0}) == 1 {
		return binary.LittleEndian
	}
	return binary.BigEndian
}()
