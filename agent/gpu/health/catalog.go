package health

import (
	"fmt"
	"sort"
)

// Action is what an XID asks of the host, from least to most disruptive;
// the Tracker turns it into health.
type Action int

const (
	// Ignore: informational; nothing to do.
	Ignore Action = iota
	// RestartApplication: the workload that hit the error was (or must
	// be) stopped; the hardware is fine and may take new work at once.
	RestartApplication
	// ResetGPU: the GPU must be reset (every partition on it goes) before
	// it takes new work. Tracker.Reset clears it.
	ResetGPU
	// RebootNode: the GPU cannot be recovered by this agent (fallen off
	// the bus, or the catalog wants a power cycle or an operator's
	// inspection); only a node reboot, which starts a fresh agent, clears
	// it.
	RebootNode
)

func (a Action) String() string {
	switch a {
	case Ignore:
		return "ignore"
	case RestartApplication:
		return "restart-application"
	case ResetGPU:
		return "reset-gpu"
	case RebootNode:
		return "reboot-node"
	default:
		return fmt.Sprintf("action(%d)", int(a))
	}
}

// DefaultAction is the action for an XID the catalog table does not list
// (one a newer driver introduced): fail closed, but recoverably. The GPU
// takes no new leases until it has been reset, the least disruptive
// action that clears any state a GPU-level error can leave; RebootNode
// would turn every unknown, possibly benign XID into an outage that needs
// an operator. The "Unused"/CONTACT_SUPPORT rows get the same treatment.
const DefaultAction = ResetGPU

// bucket is a value of the catalog's "Resolution Bucket (Immediate
// Action)" column.
type bucket string

const (
	bucketIgnore     bucket = "IGNORE"
	bucketRestartApp bucket = "RESTART_APP"
	bucketResetGPU   bucket = "RESET_GPU"
	bucketRestartBM  bucket = "RESTART_BM"
	bucketRestartVM  bucket = "RESTART_VM"
	bucketCheckUVM   bucket = "CHECK_UVM"
	bucketUpdateSWFW bucket = "UPDATE_SWFW"
	bucketXID154     bucket = "XID_154" // "follow the guidance of the XID it reports"
	// bucketContactSupport is what the catalog gives XIDs it lists as
	// unused or legacy (NVSentinel's mapping calls it
	// UNEXPECTED_ERR_REPORT_ISSUE): they should never occur.
	bucketContactSupport   bucket = "CONTACT_SUPPORT"
	bucketCheckMechanicals bucket = "CHECK_MECHANICALS"
	bucketWorkflowXID45    bucket = "WORKFLOW_XID_45"
	bucketWorkflowXID48    bucket = "WORKFLOW_XID_48"
	bucketWorkflowNVLink   bucket = "WORKFLOW_NVLINK_ERR"
	bucketWorkflowNVLink5  bucket = "WORKFLOW_NVLINK5_ERR"
)

// action maps a resolution bucket to what the agent can do about it.
//
//   - IGNORE, WORKFLOW_XID_45 (preemptive cleanup: logged when a process
//     is killed, the consequence of another error or of a plain Ctrl-C;
//     k8s-device-plugin ignores 45 too): Ignore.
//   - RESTART_APP, CHECK_UVM (a host UVM problem surfaced to one
//     application): RestartApplication.
//   - RESET_GPU, WORKFLOW_XID_48 (an uncorrectable ECC error: the row
//     remap it triggers activates on reset), WORKFLOW_NVLINK_ERR and
//     WORKFLOW_NVLINK5_ERR (both workflows end in a GPU reset), XID_154
//     (the recovery action changed; NVML's event does not say to what, and
//     a reset is what it asks for on these GPUs), CONTACT_SUPPORT (should
//     never happen; see DefaultAction): ResetGPU.
//   - RESTART_BM, RESTART_VM (the bare-metal equivalent),
//     CHECK_MECHANICALS and UPDATE_SWFW (an operator has to fix power,
//     cooling or firmware; nothing the agent does clears them): RebootNode.
func (b bucket) action() Action {
	switch b {
	case bucketIgnore, bucketWorkflowXID45:
		return Ignore
	case bucketRestartApp, bucketCheckUVM:
		return RestartApplication
	case bucketRestartBM, bucketRestartVM, bucketCheckMechanicals, bucketUpdateSWFW:
		return RebootNode
	default:
		return ResetGPU
	}
}

// XID is one row of the catalog table.
type XID struct {
	XID uint64
	// Mnemonic is the driver's name for it (nverror.h), e.g.
	// "ROBUST_CHANNEL_UNCONTAINED_ERROR".
	Mnemonic string
	// Resolution is the catalog's immediate-action bucket, verbatim.
	Resolution string
	// Action is what the agent does about it.
	Action Action
}

// LookupXID returns the catalog row of an XID; ok is false for one the
// table does not list (its action is DefaultAction).
func LookupXID(xid uint64) (XID, bool) {
	i := sort.Search(len(catalog), func(i int) bool { return catalog[i].xid >= xid })
	if i == len(catalog) || catalog[i].xid != xid {
		return XID{XID: xid, Action: DefaultAction}, false
	}
	r := catalog[i]
	return XID{XID: r.xid, Mnemonic: r.mnemonic, Resolution: string(r.bucket), Action: r.bucket.action()}, true
}

// ActionFor is the action for an XID: the catalog's, or DefaultAction for
// one it does not list.
func ActionFor(xid uint64) Action {
	x, _ := LookupXID(xid)
	return x.Action
}

type catalogRow struct {
	xid      uint64
	mnemonic string
	bucket   bucket
}

// catalog is NVIDIA's XID catalog for Ampere and later GPUs: XID, driver
// mnemonic and the "Resolution Bucket (Immediate Action)" column, by XID.
//
// Source: NVIDIA, "Analyzing Xid Errors with the Xid Catalog",
// https://docs.nvidia.com/deploy/xid-errors/analyzing-xid-catalog.html
// (the downloadable spreadsheet), as NVIDIA's own NVSentinel ships it in
// machine-readable form
// (github.com/NVIDIA/NVSentinel, distros/kubernetes/nvsentinel/charts/
// gpu-health-monitor/xiderrorsmapping.csv, which names the catalog's
// CONTACT_SUPPORT rows UNEXPECTED_ERR_REPORT_ISSUE). Memory-error XIDs
// (48, 63, 64, 94, 95) agree with "GPU Memory Error Management",
// https://docs.nvidia.com/deploy/a100-gpu-mem-error-mgmt/.
//
// Where NVIDIA's tools disagree the catalog wins. k8s-device-plugin
// (internal/rm/health.go) marks a GPU unhealthy on every XID except 13,
// 31, 43, 45, 68 and 109: the table agrees on 13, 31, 68 (RESTART_APP:
// no health change) and 43, 45 (IGNORE), but keeps 109 (context switch
// timeout) at the catalog's RESET_GPU, where the plugin treats it as an
// application error, and unlike the plugin ignores the catalog's other
// IGNORE rows (63, 92, 93, ...) and RESTART_APP rows (94, the CE and
// NVDEC/NVJPG engine errors, ...). Operators who want the plugin's
// behaviour set Options.Overrides.
var catalog = []catalogRow{
	{1, "ROBUST_CHANNEL_FIFO_ERROR_FIFO_METHOD", bucketContactSupport},
	{2, "ROBUST_CHANNEL_FIFO_ERROR_SW_METHOD", bucketContactSupport},
	{3, "ROBUST_CHANNEL_FIFO_ERROR_UNK_METHOD", bucketContactSupport},
	{4, "ROBUST_CHANNEL_FIFO_ERROR_CHANNEL_BUSY", bucketContactSupport},
	{5, "ROBUST_CHANNEL_FIFO_ERROR_RUNOUT_OVERFLOW", bucketContactSupport},
	{6, "ROBUST_CHANNEL_FIFO_ERROR_PARSE_ERR", bucketContactSupport},
	{7, "ROBUST_CHANNEL_FIFO_ERROR_PTE_ERR", bucketContactSupport},
	{8, "ROBUST_CHANNEL_FIFO_ERROR_IDLE_TIMEOUT", bucketRestartApp},
	{9, "ROBUST_CHANNEL_GR_ERROR_INSTANCE", bucketContactSupport},
	{10, "ROBUST_CHANNEL_GR_ERROR_SINGLE_STEP", bucketContactSupport},
	{11, "ROBUST_CHANNEL_GR_ERROR_MISSING_HW", bucketRestartApp},
	{12, "ROBUST_CHANNEL_GR_ERROR_SW_METHOD", bucketContactSupport},
	{13, "ROBUST_CHANNEL_GR_EXCEPTION", bucketRestartApp},
	{14, "ROBUST_CHANNEL_FAKE_ERROR", bucketIgnore},
	{15, "ROBUST_CHANNEL_SCANLINE_TIMEOUT", bucketContactSupport},
	{16, "ROBUST_CHANNEL_VBLANK_CALLBACK_TIMEOUT", bucketContactSupport},
	{17, "ROBUST_CHANNEL_PARAMETER_ERROR", bucketContactSupport},
	{18, "ROBUST_CHANNEL_BUS_MASTER_TIMEOUT_ERROR", bucketContactSupport},
	{19, "ROBUST_CHANNEL_DISP_MISSED_NOTIFIER", bucketContactSupport},
	{20, "ROBUST_CHANNEL_MPEG_ERROR_SW_METHOD", bucketContactSupport},
	{21, "ROBUST_CHANNEL_ME_ERROR_SW_METHOD", bucketContactSupport},
	{22, "ROBUST_CHANNEL_VP_ERROR_SW_METHOD", bucketContactSupport},
	{23, "ROBUST_CHANNEL_RC_LOGGING_ENABLED", bucketContactSupport},
	{24, "ROBUST_CHANNEL_GR_SEMAPHORE_TIMEOUT", bucketContactSupport},
	{25, "ROBUST_CHANNEL_GR_ILLEGAL_NOTIFY", bucketRestartApp},
	{26, "ROBUST_CHANNEL_FIFO_ERROR_FBISTATE_TIMEOUT", bucketContactSupport},
	{27, "ROBUST_CHANNEL_VP_ERROR", bucketContactSupport},
	{28, "ROBUST_CHANNEL_VP2_ERROR", bucketContactSupport},
	{29, "ROBUST_CHANNEL_BSP_ERROR", bucketContactSupport},
	{30, "ROBUST_CHANNEL_BAD_ADDR_ACCESS", bucketContactSupport},
	{31, "ROBUST_CHANNEL_FIFO_ERROR_MMU_ERR_FLT", bucketRestartApp},
	{32, "ROBUST_CHANNEL_PBDMA_ERROR", bucketRestartApp},
	{33, "ROBUST_CHANNEL_SEC_ERROR", bucketContactSupport},
	{34, "ROBUST_CHANNEL_MSVLD_ERROR", bucketContactSupport},
	{35, "ROBUST_CHANNEL_MSPDEC_ERROR", bucketContactSupport},
	{36, "ROBUST_CHANNEL_MSPPP_ERROR", bucketContactSupport},
	{37, "ROBUST_CHANNEL_FECS_ERR_UNIMP_FIRMWARE_METHOD", bucketIgnore},
	{38, "ROBUST_CHANNEL_FECS_ERR_WATCHDOG_TIMEOUT", bucketIgnore},
	{39, "ROBUST_CHANNEL_CE0_ERROR", bucketRestartApp},
	{40, "ROBUST_CHANNEL_CE1_ERROR", bucketRestartApp},
	{41, "ROBUST_CHANNEL_CE2_ERROR", bucketRestartApp},
	{42, "ROBUST_CHANNEL_VIC_ERROR", bucketContactSupport},
	{43, "ROBUST_CHANNEL_RESETCHANNEL_VERIF_ERROR", bucketIgnore},
	{44, "ROBUST_CHANNEL_GR_FAULT_DURING_CTXSW", bucketIgnore},
	{45, "ROBUST_CHANNEL_PREEMPTIVE_REMOVAL", bucketWorkflowXID45},
	{46, "ROBUST_CHANNEL_GPU_TIMEOUT_ERROR", bucketResetGPU},
	{47, "ROBUST_CHANNEL_NVENC0_ERROR", bucketContactSupport},
	{48, "ROBUST_CHANNEL_GPU_ECC_DBE", bucketWorkflowXID48},
	{49, "SILENT_RUNNING_CONSTANT_LEVEL_SET_BY_REGISTRY", bucketContactSupport},
	{50, "SILENT_RUNNING_LEVEL_TRANSITION_DUE_TO_RC_ERROR", bucketContactSupport},
	{51, "SILENT_RUNNING_STRESS_TEST_FAILURE", bucketContactSupport},
	{52, "SILENT_RUNNING_LEVEL_TRANS_DUE_TO_TEMP_RISE", bucketContactSupport},
	{53, "SILENT_RUNNING_TEMP_REDUCED_CLOCKING", bucketContactSupport},
	{54, "SILENT_RUNNING_PWR_REDUCED_CLOCKING", bucketCheckMechanicals},
	{55, "SILENT_RUNNING_TEMPERATURE_READ_ERROR", bucketContactSupport},
	{56, "DISPLAY_CHANNEL_EXCEPTION", bucketContactSupport},
	{57, "FB_LINK_TRAINING_FAILURE_ERROR", bucketContactSupport},
	{58, "FB_MEMORY_ERROR", bucketContactSupport},
	{59, "PMU_ERROR", bucketContactSupport},
	{60, "ROBUST_CHANNEL_SEC2_ERROR", bucketRestartApp},
	{61, "PMU_BREAKPOINT", bucketContactSupport},
	{62, "PMU_HALT_ERROR", bucketResetGPU},
	{63, "INFOROM_DRAM_RETIREMENT_EVENT", bucketIgnore},
	{64, "INFOROM_DRAM_RETIREMENT_FAILURE", bucketResetGPU},
	{65, "ROBUST_CHANNEL_NVENC1_ERROR", bucketContactSupport},
	{66, "ROBUST_CHANNEL_FECS_ERR_REG_ACCESS_VIOLATION", bucketIgnore},
	{67, "ROBUST_CHANNEL_FECS_ERR_VERIF_VIOLATION", bucketIgnore},
	{68, "ROBUST_CHANNEL_NVDEC0_ERROR", bucketRestartApp},
	{69, "ROBUST_CHANNEL_GR_CLASS_ERROR", bucketRestartApp},
	{70, "ROBUST_CHANNEL_CE3_ERROR", bucketRestartApp},
	{71, "ROBUST_CHANNEL_CE4_ERROR", bucketRestartApp},
	{72, "ROBUST_CHANNEL_CE5_ERROR", bucketRestartApp},
	{73, "ROBUST_CHANNEL_NVENC2_ERROR", bucketContactSupport},
	{74, "NVLINK_ERROR", bucketWorkflowNVLink},
	{75, "ROBUST_CHANNEL_CE6_ERROR", bucketRestartApp},
	{76, "ROBUST_CHANNEL_CE7_ERROR", bucketRestartApp},
	{77, "ROBUST_CHANNEL_CE8_ERROR", bucketRestartApp},
	{78, "VGPU_START_ERROR", bucketUpdateSWFW},
	{79, "ROBUST_CHANNEL_GPU_HAS_FALLEN_OFF_THE_BUS", bucketRestartBM},
	{80, "PBDMA_PUSHBUFFER_CRC_MISMATCH", bucketRestartApp},
	{81, "ROBUST_CHANNEL_VGA_SUBSYSTEM_ERROR", bucketContactSupport},
	{82, "ROBUST_CHANNEL_NVJPG0_ERROR", bucketRestartApp},
	{83, "ROBUST_CHANNEL_NVDEC1_ERROR", bucketRestartApp},
	{84, "ROBUST_CHANNEL_NVDEC2_ERROR", bucketRestartApp},
	{85, "ROBUST_CHANNEL_CE9_ERROR", bucketRestartApp},
	{86, "ROBUST_CHANNEL_OFA0_ERROR", bucketRestartApp},
	{87, "NVTELEMETRY_DRIVER_REPORT", bucketContactSupport},
	{88, "ROBUST_CHANNEL_NVDEC3_ERROR", bucketRestartApp},
	{89, "ROBUST_CHANNEL_NVDEC4_ERROR", bucketRestartApp},
	{90, "LTC_ERROR", bucketContactSupport},
	{91, "RESERVED_XID", bucketContactSupport},
	{92, "EXCESSIVE_SBE_INTERRUPTS", bucketIgnore},
	{93, "INFOROM_ERASE_LIMIT_EXCEEDED", bucketIgnore},
	{94, "ROBUST_CHANNEL_CONTAINED_ERROR", bucketRestartApp},
	{95, "ROBUST_CHANNEL_UNCONTAINED_ERROR", bucketResetGPU},
	{96, "ROBUST_CHANNEL_NVDEC5_ERROR", bucketRestartApp},
	{97, "ROBUST_CHANNEL_NVDEC6_ERROR", bucketRestartApp},
	{98, "ROBUST_CHANNEL_NVDEC7_ERROR", bucketRestartApp},
	{99, "ROBUST_CHANNEL_NVJPG1_ERROR", bucketRestartApp},
	{100, "ROBUST_CHANNEL_NVJPG2_ERROR", bucketRestartApp},
	{101, "ROBUST_CHANNEL_NVJPG3_ERROR", bucketRestartApp},
	{102, "ROBUST_CHANNEL_NVJPG4_ERROR", bucketRestartApp},
	{103, "ROBUST_CHANNEL_NVJPG5_ERROR", bucketRestartApp},
	{104, "ROBUST_CHANNEL_NVJPG6_ERROR", bucketRestartApp},
	{105, "ROBUST_CHANNEL_NVJPG7_ERROR", bucketRestartApp},
	{106, "SMBPBI_TEST_MESSAGE", bucketIgnore},
	{107, "SMBPBI_TEST_MESSAGE_SILENT", bucketIgnore},
	{108, "DESTINATION_FLA_TRANSLATION_ERROR", bucketContactSupport},
	{109, "ROBUST_CHANNEL_CTXSW_TIMEOUT_ERROR", bucketResetGPU},
	{110, "SEC_FAULT_ERROR", bucketResetGPU},
	{111, "BUNDLE_ERROR_EVENT", bucketContactSupport},
	{112, "DISP_SUPERVISOR_ERROR", bucketContactSupport},
	{113, "DP_LT_FAILURE", bucketContactSupport},
	{114, "HEAD_RG_UNDERFLOW", bucketContactSupport},
	{115, "CORE_CHANNEL_REGS", bucketContactSupport},
	{116, "WINDOW_CHANNEL_REGS", bucketContactSupport},
	{117, "CURSOR_CHANNEL_REGS", bucketContactSupport},
	{118, "HEAD_REGS", bucketContactSupport},
	{119, "GSP_RPC_TIMEOUT", bucketResetGPU},
	{120, "GSP_ERROR", bucketResetGPU},
	{121, "C2C_ERROR", bucketIgnore},
	{122, "SPI_PMU_RPC_READ_FAIL", bucketContactSupport},
	{123, "SPI_PMU_RPC_WRITE_FAIL", bucketContactSupport},
	{124, "SPI_PMU_RPC_ERASE_FAIL", bucketContactSupport},
	{125, "INFOROM_FS_ERROR", bucketContactSupport},
	{126, "ROBUST_CHANNEL_CE10_ERROR", bucketRestartApp},
	{127, "ROBUST_CHANNEL_CE11_ERROR", bucketRestartApp},
	{128, "ROBUST_CHANNEL_CE12_ERROR", bucketRestartApp},
	{129, "ROBUST_CHANNEL_CE13_ERROR", bucketRestartApp},
	{130, "ROBUST_CHANNEL_CE14_ERROR", bucketRestartApp},
	{131, "ROBUST_CHANNEL_CE15_ERROR", bucketRestartApp},
	{132, "ROBUST_CHANNEL_CE16_ERROR", bucketRestartApp},
	{133, "ROBUST_CHANNEL_CE17_ERROR", bucketRestartApp},
	{134, "ROBUST_CHANNEL_CE18_ERROR", bucketRestartApp},
	{135, "ROBUST_CHANNEL_CE19_ERROR", bucketRestartApp},
	{136, "ALI_TRAINING_FAIL", bucketResetGPU},
	{137, "NVLINK_FLA_PRIV_ERR", bucketIgnore},
	{138, "ROBUST_CHANNEL_DLA_ERROR", bucketContactSupport},
	{139, "ROBUST_CHANNEL_OFA1_ERROR", bucketRestartApp},
	{140, "UNRECOVERABLE_ECC_ERROR_ESCAPE", bucketResetGPU},
	{141, "ROBUST_CHANNEL_FAST_PATH_ERROR", bucketIgnore},
	{142, "ROBUST_CHANNEL_NVENC3_ERROR", bucketContactSupport},
	{143, "GPU_INIT_ERROR", bucketResetGPU},
	{144, "NVLINK_SAW_ERROR", bucketWorkflowNVLink5},
	{145, "NVLINK_RLW_ERROR", bucketWorkflowNVLink5},
	{146, "NVLINK_TLW_ERROR", bucketWorkflowNVLink5},
	{147, "NVLINK_TREX_ERROR", bucketWorkflowNVLink5},
	{148, "NVLINK_NVLPW_CTRL_ERROR", bucketWorkflowNVLink5},
	{149, "NVLINK_NETIR_ERROR", bucketWorkflowNVLink5},
	{150, "NVLINK_MSE_ERROR", bucketWorkflowNVLink5},
	{151, "ROBUST_CHANNEL_KEY_ROTATION_ERROR", bucketRestartVM},
	{152, "ROBUST_CHANNEL_DLA_SMMU_ERROR", bucketIgnore},
	{153, "ROBUST_CHANNEL_DLA_TIMEOUT", bucketIgnore},
	{154, "GPU_RECOVERY_ACTION_CHANGED", bucketXID154},
	{155, "NVLINK_SW_DEFINED_ERROR", bucketResetGPU},
	{156, "RESOURCE_RETIREMENT_EVENT", bucketResetGPU},
	{157, "RESOURCE_RETIREMENT_FAILURE", bucketIgnore},
	{158, "GPU_FATAL_TIMEOUT", bucketResetGPU},
	{159, "ROBUST_CHANNEL_CHI_NON_DATA_ERROR", bucketCheckUVM},
	{160, "CHANNEL_RETIREMENT_EVENT", bucketRestartBM},
	{161, "CHANNEL_RETIREMENT_FAILURE", bucketIgnore},
	{162, "", bucketResetGPU},
}
