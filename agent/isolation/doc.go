// Package isolation fences a lease's container with eBPF programs attached
// to its cgroup v2 directory: a device program that lets it open only the
// standard container devices and its own GPU nodes, and egress programs
// that keep its connections away from metadata services, private networks,
// the host, the control plane and other tenants. The programs are pinned,
// so they outlive the agent; a restarted agent adopts them. Every denial is
// reported, attributed to its lease, through one shared ring buffer.
//
// It must never leave a lease half fenced: Fence attaches all five programs
// or none (fail closed), and nothing here detaches a fence except Detach
// and Sweep.
//
// # Usage
//
//	enf, err := isolation.NewEnforcer(isolation.Config{Logger: log})
//	hosts, _ := isolation.HostAddresses()
//	p := isolation.Policy{
//		Devices:       rules, // isolation.CharDevice(n.Major, n.Minor, "rw") per gpu.DeviceNode
//		DenyPrefixes:  slices.Concat(isolation.DefaultDenyPrefixes(), hosts, controlPlane, otherTenants),
//		AllowPrefixes: leaseAllow,
//	}
//	desc, err := enf.Fence(leaseID, cgroupDir, p) // before the task starts
//	...
//	err = enf.UpdatePolicy(leaseID, p2)            // egress: map updates, no reattach
//	err = enf.UpdateDevices(leaseID, rules2)       // atomic swap of the device program
//	err = enf.Detach(leaseID)                      // after the task is gone
//
// After a restart: Fence (or Adopt) every lease the journal holds, then
// Sweep(keep) the rest. Events feeds an Aggregator whose summaries become
// audit entries and metrics. The executor depends on the Fencer interface;
// isolationtest.Fake implements it for tests that inject failures, and
// isolationtest.Run holds both to one contract.
//
// # Programs: asm, not C
//
// The programs are generated with cilium/ebpf's asm package in pure Go. A
// device program is compiled from its rule list (one compare-and-allow
// block per rule, as runc's devicefilter does), and each lease's programs
// carry its cookie as a constant, so they are built per lease at run time
// anyway; asm needs no clang, no generated objects to keep current, and
// the same code rebuilds a loaded program to check its kernel tag
// (Description.Verified).
//
// # Device fence
//
// The rule list is StandardDevices (runc's default allow list, exactly)
// followed by the lease's own nodes, minimized (duplicates merged, rules
// another covers dropped) and canonical. Rules only allow; anything no rule
// matches is denied with EPERM: other GPUs' nodes, other partitions' MIG
// capability nodes, every disk. A lease rule must name one node (no
// wildcards), so no rule can open a hole to a neighbour's device.
//
// # Egress policy
//
// connect4, connect6, sendmsg4 and sendmsg6 programs (TCP, UDP and ICMP
// connect; UDP sendto with a destination) look the destination up in four
// LPM tries: deny v4, deny v6, allow v4, allow v6. Precedence, as
// Policy.Allows specifies and the kernel tests check: the longest matching
// allow prefix wins over the longest matching deny prefix when it is at
// least as long (equal length: allow wins); a deny prefix more specific
// than every matching allow prefix denies; no deny match allows. A denied
// call fails with EPERM before any packet is sent.
//
// An IPv6 socket can reach IPv4 through ::ffff:a.b.c.d; the v6 programs
// therefore decide IPv4-mapped destinations with the IPv4 tries (the
// traffic is IPv4), and NAT64 destinations (64:ff9b::a.b.c.d) with both
// the IPv6 and the IPv4 tries. Without this a v4 deny list is bypassed by
// one socket option. (The kernel itself hands a v4-mapped UDP sendto to the
// sendmsg4 hook in IPv4 form, but a v4-mapped connect goes to connect6
// only.)
//
// Loopback is allowed by default: each lease has its own network
// namespace, whose loopback is the container's own (DefaultDenyPrefixes
// says more). Policy changes are map updates on the live tries, never a
// reattach (UpdatePolicy); device rule changes swap the device program in
// its link (UpdateDevices).
//
// Limits, for the runtime to cover: raw and packet sockets do not pass
// these hooks (the container must not have CAP_NET_RAW); UDP sends on a
// connected socket are checked at connect; the hooks see the destination,
// not the route, so the network namespace and CNI must still keep the
// lease off host and tenant networks.
//
// # Attachment
//
// Programs are attached with bpf_link (BPF_LINK_CREATE), which stacks with
// the runtime's own device program (BPF_F_ALLOW_MULTI: every program must
// allow), applies to every cgroup the container creates below its own, and
// cannot be removed with BPF_PROG_DETACH, with which runc and systemd clear
// the device programs they find on a cgroup. (By runc's source, a "runc
// update" of a fenced container's resources on a pure cgroup v2 host would
// therefore fail on our program; the fence stays.)
//
// # Pins, recovery, events
//
// Pins live under Config.PinRoot (see pin.go for the layout); a lease's
// directory is complete or absent. Deny events carry the lease's 64-bit
// cookie (derived from the lease id), the denied device or destination,
// the pid and comm; Events decodes them and Aggregator rate-limits them.
//
// The cgroup directory comes from the runtime: on a pure cgroup v2 host it
// is under /sys/fs/cgroup, on a hybrid one under /sys/fs/cgroup/unified
// (CgroupV2Root, CgroupDirOfPID).
package isolation
