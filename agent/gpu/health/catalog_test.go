package health

import "testing"

func TestCatalog_CoversEveryXIDInOrder(t *testing.T) {
	for i, r := range catalog {
		if r.xid != uint64(i+1) {
			t.Fatalf("row %d is xid %d; want every xid from 1, ascending", i, r.xid)
		}
		if r.bucket == "" || (r.mnemonic == "" && r.xid != 162) {
			t.Errorf("xid %d: mnemonic %q, bucket %q", r.xid, r.mnemonic, r.bucket)
		}
	}
	if n := len(catalog); n != 162 {
		t.Errorf("%d rows, want 162 (the catalog's last xid)", n)
	}
}

func TestActionFor_FollowsTheCatalog(t *testing.T) {
	tests := []struct {
		xid        uint64
		resolution string
		want       Action
	}{
		// Application errors: the workload dies, the GPU is fine.
		{13, "RESTART_APP", RestartApplication},
		{31, "RESTART_APP", RestartApplication},
		{68, "RESTART_APP", RestartApplication},
		{94, "RESTART_APP", RestartApplication}, // contained ECC error
		{159, "CHECK_UVM", RestartApplication},
		// Informational.
		{43, "IGNORE", Ignore},
		{45, "WORKFLOW_XID_45", Ignore},
		{63, "IGNORE", Ignore}, // row remap recorded
		{92, "IGNORE", Ignore}, // excessive single-bit interrupts
		// The GPU needs a reset.
		{48, "WORKFLOW_XID_48", ResetGPU}, // double-bit ECC
		{64, "RESET_GPU", ResetGPU},       // row remap failed
		{74, "WORKFLOW_NVLINK_ERR", ResetGPU},
		{95, "RESET_GPU", ResetGPU}, // uncontained ECC error
		{109, "RESET_GPU", ResetGPU},
		{119, "RESET_GPU", ResetGPU}, // GSP RPC timeout
		{120, "RESET_GPU", ResetGPU},
		{140, "RESET_GPU", ResetGPU},
		{144, "WORKFLOW_NVLINK5_ERR", ResetGPU},
		{154, "XID_154", ResetGPU},
		{1, "CONTACT_SUPPORT", ResetGPU}, // unused: should never happen
		// Beyond the agent.
		{79, "RESTART_BM", RebootNode}, // fallen off the bus
		{160, "RESTART_BM", RebootNode},
		{151, "RESTART_VM", RebootNode},
		{54, "CHECK_MECHANICALS", RebootNode},
		{78, "UPDATE_SWFW", RebootNode},
	}
	for _, tt := range tests {
		x, ok := LookupXID(tt.xid)
		if !ok || x.Resolution != tt.resolution || x.Action != tt.want || ActionFor(tt.xid) != tt.want {
			t.Errorf("xid %d = %+v (known %t), want %s -> %s", tt.xid, x, ok, tt.resolution, tt.want)
		}
	}
}

func TestActionFor_UnknownXIDIsConservative(t *testing.T) {
	for _, xid := range []uint64{0, 163, 999, 1 << 40} {
		x, ok := LookupXID(xid)
		if ok || x.Action != DefaultAction || ActionFor(xid) != ResetGPU {
			t.Errorf("xid %d = %+v (known %t), want unknown with %s", xid, x, ok, DefaultAction)
		}
	}
}

// TestActionFor_AgreesWithDevicePluginOnApplicationErrors: the XIDs
// NVIDIA's k8s-device-plugin treats as application errors leave the GPU
// healthy here too, except 109, where the catalog (RESET_GPU) wins.
func TestActionFor_AgreesWithDevicePluginOnApplicationErrors(t *testing.T) {
	for _, xid := range []uint64{13, 31, 43, 45, 68} {
		if a := ActionFor(xid); a >= ResetGPU {
			t.Errorf("xid %d: %s, the device plugin keeps the GPU healthy", xid, a)
		}
	}
	if a := ActionFor(109); a != ResetGPU {
		t.Errorf("xid 109: %s, the catalog says RESET_GPU", a)
	}
}

func TestAction_String(t *testing.T) {
	for a, want := range map[Action]string{Ignore: "ignore", RestartApplication: "restart-application", ResetGPU: "reset-gpu", RebootNode: "reboot-node", 9: "action(9)"} {
		if a.String() != want {
			t.Errorf("%d.String() = %q, want %q", int(a), a.String(), want)
		}
	}
}
