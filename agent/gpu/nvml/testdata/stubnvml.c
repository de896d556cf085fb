/*
 * A stand-in for libnvidia-ml.so.1, for tests on machines without an
 * NVIDIA driver. It lets the backend's real cgo path (go-nvml's dlopen,
 * versioned symbol selection, struct layouts, string conversion) run
 * against one idle H200 with no GPU instances.
 *
 * It exports only the functions the backend lists as required, plus two
 * optional ones (nvmlDeviceGetRemappedRows and the older
 * nvmlDeviceGetCurrentClocksThrottleReasons), and only the newest version
 * of versioned ones, as a current driver does. A call to any other
 * function kills the test process with "symbol lookup error", which is the
 * point: that is what the backend must never do.
 *
 * Environment:
 *   GPUAAS_STUB_MIG=1          MIG mode current and pending (default off)
 *   GPUAAS_STUB_INIT_RETURN=N  nvmlInit_v2 returns N
 *   GPUAAS_STUB_XID=N          each event set's first wait delivers XID N,
 *                              as every NVML event set gets every event
 * Compile with -DSTUB_OMIT_PLACEMENT to leave out
 * nvmlDeviceCreateGpuInstanceWithPlacement (a driver older than R470).
 *
 * Struct layouts are those of nvml.h as go-nvml's types_gen.go mirrors
 * them.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int nvmlReturn_t;
enum {
	NVML_SUCCESS = 0,
	NVML_ERROR_INVALID_ARGUMENT = 2,
	NVML_ERROR_NOT_SUPPORTED = 3,
	NVML_ERROR_NOT_FOUND = 6,
	NVML_ERROR_INSUFFICIENT_SIZE = 7,
	NVML_ERROR_TIMEOUT = 10,
};

typedef struct nvmlDevice_st { int index; } *nvmlDevice_t;
typedef struct nvmlGpuInstance_st *nvmlGpuInstance_t;
typedef struct nvmlComputeInstance_st *nvmlComputeInstance_t;
typedef struct nvmlEventSet_st { int xid_delivered; } *nvmlEventSet_t;

typedef struct {
	char busIdLegacy[16];
	unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
	char busId[32];
} nvmlPciInfo_t;

typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;

typedef struct {
	unsigned int id, isP2pSupported, sliceCount, instanceCount, multiprocessorCount;
	unsigned int copyEngineCount, decoderCount, encoderCount, jpegCount, ofaCount;
	unsigned long long memorySizeMB;
} nvmlGpuInstanceProfileInfo_t;

typedef struct { unsigned int start, size; } nvmlGpuInstancePlacement_t;

typedef struct {
	nvmlDevice_t device;
	unsigned long long eventType, eventData;
	unsigned int gpuInstanceId, computeInstanceId;
} nvmlEventData_t;

#define STUB_UUID "GPU-5fb4e2d1-7a3c-4e9b-8d2f-0a1b2c3d4e5f"
#define MIB (1024ULL * 1024ULL)
#define STUB_MEMORY_MIB 143771ULL

static struct nvmlDevice_st gpu0 = {0};

static int mig_on(void) {
	const char *s = getenv("GPUAAS_STUB_MIG");
	return s != NULL && s[0] == '1';
}

static nvmlReturn_t copy_string(const char *s, char *out, unsigned int n) {
	if (out == NULL || strlen(s) + 1 > n)
		return NVML_ERROR_INSUFFICIENT_SIZE;
	strcpy(out, s);
	return NVML_SUCCESS;
}

static nvmlReturn_t check_device(nvmlDevice_t d) {
	return d == &gpu0 ? NVML_SUCCESS : NVML_ERROR_INVALID_ARGUMENT;
}

/* The H200's profiles: enumerator, id, slices, count, SMs, MiB, placements. */
struct profile {
	unsigned int index, id, slices, count, sms;
	unsigned long long mib;
	unsigned int nstarts, starts[7], size;
};
static const struct profile profiles[] = {
	{0, 19, 1, 7, 16, 16384, 7, {0, 1, 2, 3, 4, 5, 6}, 1},
	{7, 20, 1, 1, 16, 16384, 7, {0, 1, 2, 3, 4, 5, 6}, 1},
	{9, 15, 1, 4, 26, 33024, 4, {0, 2, 4, 6}, 2},
	{1, 14, 2, 3, 32, 33024, 3, {0, 2, 4}, 2},
	{2, 9, 3, 2, 60, 71168, 2, {0, 4}, 4},
	{3, 5, 4, 1, 64, 71168, 1, {0}, 4},
	{4, 0, 7, 1, 132, 143104, 1, {0}, 8},
};
#define NPROFILES (sizeof(profiles) / sizeof(profiles[0]))
#define PROFILE_ENUMERATORS 18

static const struct profile *profile_by_id(unsigned int id) {
	for (unsigned int i = 0; i < NPROFILES; i++)
		if (profiles[i].id == id)
			return &profiles[i];
	return NULL;
}

nvmlReturn_t nvmlInit_v2(void) {
	const char *s = getenv("GPUAAS_STUB_INIT_RETURN");
	return s != NULL ? atoi(s) : NVML_SUCCESS;
}
nvmlReturn_t nvmlShutdown(void) { return NVML_SUCCESS; }
const char *nvmlErrorString(nvmlReturn_t r) { (void)r; return "stub error"; }
nvmlReturn_t nvmlSystemGetDriverVersion(char *v, unsigned int n) { return copy_string("570.172.08-stub", v, n); }

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *n) { *n = 1; return NVML_SUCCESS; }
nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int i, nvmlDevice_t *d) {
	if (i != 0)
		return NVML_ERROR_INVALID_ARGUMENT;
	*d = &gpu0;
	return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *d) {
	if (strcmp(uuid, STUB_UUID) != 0)
		return NVML_ERROR_NOT_FOUND;
	*d = &gpu0;
	return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *s, unsigned int n) {
	return check_device(d) ? check_device(d) : copy_string(STUB_UUID, s, n);
}
nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *s, unsigned int n) {
	return check_device(d) ? check_device(d) : copy_string("NVIDIA H200", s, n);
}
nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t d, nvmlPciInfo_t *p) {
	if (check_device(d))
		return check_device(d);
	memset(p, 0, sizeof(*p));
	strcpy(p->busIdLegacy, "0000:18:00.0");
	strcpy(p->busId, "00000000:18:00.0");
	p->bus = 0x18;
	p->pciDeviceId = 0x233510DE;
	p->pciSubSystemId = 0x18B010DE;
	return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t d, nvmlMemory_t *m) {
	if (check_device(d))
		return check_device(d);
	m->total = STUB_MEMORY_MIB * MIB;
	m->used = 612 * MIB;
	m->free = m->total - m->used;
	return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetSerial(nvmlDevice_t d, char *s, unsigned int n) {
	return check_device(d) ? check_device(d) : copy_string("1652823054321", s, n);
}
nvmlReturn_t nvmlDeviceGetVbiosVersion(nvmlDevice_t d, char *s, unsigned int n) {
	return check_device(d) ? check_device(d) : copy_string("96.00.A5.00.01", s, n);
}
nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t d, unsigned int *m) {
	if (check_device(d))
		return check_device(d);
	*m = 0;
	return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t d, unsigned int *cur, unsigned int *pend) {
	if (check_device(d))
		return check_device(d);
	*cur = *pend = mig_on();
	return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceSetMigMode(nvmlDevice_t d, unsigned int mode, nvmlReturn_t *activation) {
	(void)d; (void)mode; (void)activation;
	return NVML_ERROR_NOT_SUPPORTED;
}
nvmlReturn_t nvmlDeviceGetGpuInstanceProfileInfo(nvmlDevice_t d, unsigned int index, nvmlGpuInstanceProfileInfo_t *info) {
	if (check_device(d))
		return check_device(d);
	if (index >= PROFILE_ENUMERATORS)
		return NVML_ERROR_INVALID_ARGUMENT;
	if (!mig_on())
		return NVML_ERROR_NOT_SUPPORTED;
	for (unsigned int i = 0; i < NPROFILES; i++) {
		const struct profile *p = &profiles[i];
		if (p->index != index)
			continue;
		memset(info, 0, sizeof(*info));
		info->id = p->id;
		info->isP2pSupported = 1;
		info->sliceCount = p->slices;
		info->instanceCount = p->count;
		info->multiprocessorCount = p->sms;
		info->memorySizeMB = p->mib;
		return NVML_SUCCESS;
	}
	return NVML_ERROR_NOT_SUPPORTED;
}
nvmlReturn_t nvmlDeviceGetGpuInstancePossiblePlacements_v2(nvmlDevice_t d, unsigned int id,
		nvmlGpuInstancePlacement_t *out, unsigned int *count) {
	const struct profile *p = profile_by_id(id);
	if (check_device(d) || p == NULL || !mig_on())
		return check_device(d) ? check_device(d) : (mig_on() ? NVML_ERROR_INVALID_ARGUMENT : NVML_ERROR_NOT_SUPPORTED);
	if (out == NULL) {
		*count = p->nstarts;
		return NVML_SUCCESS;
	}
	if (*count < p->nstarts)
		return NVML_ERROR_INSUFFICIENT_SIZE;
	for (unsigned int i = 0; i < p->nstarts; i++) {
		out[i].start = p->starts[i];
		out[i].size = p->size;
	}
	*count = p->nstarts;
	return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetGpuInstanceRemainingCapacity(nvmlDevice_t d, unsigned int id, unsigned int *count) {
	const struct profile *p = profile_by_id(id);
	if (check_device(d) || p == NULL || !mig_on())
		return NVML_ERROR_INVALID_ARGUMENT;
	*count = p->count; /* no instances exist */
	return NVML_SUCCESS;
}
#ifndef STUB_OMIT_PLACEMENT
nvmlReturn_t nvmlDeviceCreateGpuInstanceWithPlacement(nvmlDevice_t d, unsigned int id,
		const nvmlGpuInstancePlacement_t *at, nvmlGpuInstance_t *gi) {
	(void)d; (void)id; (void)at; (void)gi;
	return NVML_ERROR_NOT_SUPPORTED;
}
#endif
nvmlReturn_t nvmlDeviceGetGpuInstances(nvmlDevice_t d, unsigned int id, nvmlGpuInstance_t *gis, unsigned int *count) {
	(void)gis;
	if (check_device(d) || profile_by_id(id) == NULL || !mig_on())
		return NVML_ERROR_INVALID_ARGUMENT;
	*count = 0;
	return NVML_SUCCESS;
}

/* GPU and compute instances never exist here; these are exported because
 * the backend requires them, and are never reached by a read-only test. */
nvmlReturn_t nvmlGpuInstanceGetInfo(nvmlGpuInstance_t gi, void *info) { (void)gi; (void)info; return NVML_ERROR_INVALID_ARGUMENT; }
nvmlReturn_t nvmlGpuInstanceDestroy(nvmlGpuInstance_t gi) { (void)gi; return NVML_ERROR_INVALID_ARGUMENT; }
nvmlReturn_t nvmlGpuInstanceGetComputeInstanceProfileInfo(nvmlGpuInstance_t gi, unsigned int p, unsigned int e, void *info) {
	(void)gi; (void)p; (void)e; (void)info;
	return NVML_ERROR_INVALID_ARGUMENT;
}
nvmlReturn_t nvmlGpuInstanceCreateComputeInstance(nvmlGpuInstance_t gi, unsigned int p, nvmlComputeInstance_t *ci) {
	(void)gi; (void)p; (void)ci;
	return NVML_ERROR_INVALID_ARGUMENT;
}
nvmlReturn_t nvmlGpuInstanceGetComputeInstances(nvmlGpuInstance_t gi, unsigned int p, nvmlComputeInstance_t *cis, unsigned int *n) {
	(void)gi; (void)p; (void)cis; (void)n;
	return NVML_ERROR_INVALID_ARGUMENT;
}
nvmlReturn_t nvmlComputeInstanceGetInfo_v2(nvmlComputeInstance_t ci, void *info) { (void)ci; (void)info; return NVML_ERROR_INVALID_ARGUMENT; }
nvmlReturn_t nvmlComputeInstanceDestroy(nvmlComputeInstance_t ci) { (void)ci; return NVML_ERROR_INVALID_ARGUMENT; }

nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t d, unsigned int *is) {
	if (check_device(d))
		return check_device(d);
	*is = 0;
	return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t d, unsigned int *n) {
	if (check_device(d))
		return check_device(d);
	*n = mig_on() ? 7 : 0;
	return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t d, unsigned int i, nvmlDevice_t *md) {
	(void)i; (void)md;
	return check_device(d) ? check_device(d) : NVML_ERROR_NOT_FOUND;
}
nvmlReturn_t nvmlDeviceGetGpuInstanceId(nvmlDevice_t d, unsigned int *id) { (void)d; (void)id; return NVML_ERROR_NOT_SUPPORTED; }
nvmlReturn_t nvmlDeviceGetComputeInstanceId(nvmlDevice_t d, unsigned int *id) { (void)d; (void)id; return NVML_ERROR_NOT_SUPPORTED; }

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t d, nvmlUtilization_t *u) {
	if (check_device(d))
		return check_device(d);
	if (mig_on())
		return NVML_ERROR_NOT_SUPPORTED; /* per MIG device only, through DCGM */
	u->gpu = 37;
	u->memory = 12;
	return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t d, unsigned int *mw) {
	if (check_device(d))
		return check_device(d);
	*mw = 312000;
	return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t d, int sensor, unsigned int *c) {
	if (check_device(d) || sensor != 0)
		return NVML_ERROR_INVALID_ARGUMENT;
	*c = 41;
	return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t d, int type, int counter, unsigned long long *n) {
	if (check_device(d) || counter != 0)
		return NVML_ERROR_INVALID_ARGUMENT;
	*n = type == 0 ? 3 : 0;
	return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetRemappedRows(nvmlDevice_t d, unsigned int *corr, unsigned int *unc,
		unsigned int *pending, unsigned int *failed) {
	if (check_device(d))
		return check_device(d);
	*corr = 2;
	*unc = 0;
	*pending = 1;
	*failed = 0;
	return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t d, int type, unsigned int *mhz) {
	if (check_device(d))
		return check_device(d);
	switch (type) {
	case 1: *mhz = 1980; return NVML_SUCCESS; /* SM */
	case 2: *mhz = 3201; return NVML_SUCCESS; /* memory */
	default: return NVML_ERROR_INVALID_ARGUMENT;
	}
}
nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t d, unsigned long long *r) {
	if (check_device(d))
		return check_device(d);
	*r = 1; /* GPU idle */
	return NVML_SUCCESS;
}

nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set) {
	*set = calloc(1, sizeof(**set));
	return *set != NULL ? NVML_SUCCESS : NVML_ERROR_INVALID_ARGUMENT;
}
nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t d, unsigned long long *types) {
	if (check_device(d))
		return check_device(d);
	*types = 0x1 | 0x2 | 0x4 | 0x8; /* SBE, DBE, P-state, XID */
	return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t d, unsigned long long types, nvmlEventSet_t set) {
	if (check_device(d) || set == NULL || (types & ~0xBULL) != 0)
		return NVML_ERROR_INVALID_ARGUMENT;
	return NVML_SUCCESS;
}
nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeout_ms) {
	const char *xid = getenv("GPUAAS_STUB_XID");
	if (set == NULL)
		return NVML_ERROR_INVALID_ARGUMENT;
	if (xid != NULL && !__atomic_exchange_n(&set->xid_delivered, 1, __ATOMIC_SEQ_CST)) {
		memset(data, 0, sizeof(*data));
		data->device = &gpu0;
		data->eventType = 0x8;
		data->eventData = strtoull(xid, NULL, 10);
		data->gpuInstanceId = 0xFFFFFFFF;
		data->computeInstanceId = 0xFFFFFFFF;
		return NVML_SUCCESS;
	}
	struct timespec ts = {timeout_ms / 1000, (long)(timeout_ms % 1000) * 1000000L};
	nanosleep(&ts, NULL);
	return NVML_ERROR_TIMEOUT;
}
nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set) {
	free(set);
	return NVML_SUCCESS;
}
