/* A stand-in for NVIDIA's libnvidia-ml.so.1 on machines without a GPU.
 *
 * It answers the NVML calls clinic-edge makes (through pynvml and through the preflight's ctypes reader) the way the
 * NVML API reference documents them: return codes from nvml.h (0 success, 2 invalid argument, 3 not supported,
 * 7 insufficient size, 9 driver not loaded, 13 function not found is pynvml's own), structures laid out as nvml.h
 * lays them out. Which GPUs it reports comes from the file named by FAKE_NVML_CONFIG, read at every nvmlInit:
 *
 *     driver 580.95.05          nvmlSystemGetDriverVersion
 *     cuda 13000                nvmlSystemGetCudaDriverVersion(_v2)
 *     init 9                    nvmlInit fails with this code (9: NVML_ERROR_DRIVER_NOT_LOADED)
 *     gpu NAME|TOTAL|USED|FABRIC_STATE|FABRIC_STATUS
 *
 * one "gpu" line per device: TOTAL 0 makes nvmlDeviceGetMemoryInfo answer NOT_SUPPORTED (as GB10 does); FABRIC_STATE
 * is NVML_GPU_FABRIC_STATE_* (0 not supported, 1 not started, 2 in progress, 3 completed) or -1 for a device whose
 * nvmlDeviceGetGpuFabricInfo answers NOT_SUPPORTED (pre-Hopper); FABRIC_STATUS is the nvmlReturn_t the fabric probe
 * ended with (checked only when the state is completed).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_NOT_FOUND 6
#define MAX_GPUS 16

typedef struct {
    char name[96];
    unsigned long long total, used;
    int fabric_state, fabric_status;
} fake_gpu;

typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef struct {
    unsigned char clusterUuid[16];
    int status;
    unsigned int cliqueId;
    unsigned int state;
} nvmlGpuFabricInfo_t;

static fake_gpu gpus[MAX_GPUS];
static unsigned int gpu_count;
static char driver[32] = "580.95.05";
static int cuda = 13000;
static int init_code;
static int initialized;

static int load(void) {
    const char *path = getenv("FAKE_NVML_CONFIG");
    FILE *f = path ? fopen(path, "r") : NULL;
    char line[256];
    gpu_count = 0;
    init_code = 0;
    if (!f) return 9; /* no configuration: behave like a box whose driver is not loaded */
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        if (!strncmp(line, "driver ", 7)) snprintf(driver, sizeof driver, "%.31s", line + 7);
        else if (!strncmp(line, "cuda ", 5)) cuda = atoi(line + 5);
        else if (!strncmp(line, "init ", 5)) init_code = atoi(line + 5);
        else if (!strncmp(line, "gpu ", 4) && gpu_count < MAX_GPUS) {
            fake_gpu *g = &gpus[gpu_count];
            char *fields[5] = {0};
            char *rest = line + 4;
            for (int i = 0; i < 5; i++) fields[i] = strsep(&rest, "|");
            if (!fields[4]) continue;
            snprintf(g->name, sizeof g->name, "%.95s", fields[0]);
            g->total = strtoull(fields[1], NULL, 10);
            g->used = strtoull(fields[2], NULL, 10);
            g->fabric_state = atoi(fields[3]);
            g->fabric_status = atoi(fields[4]);
            gpu_count++;
        }
    }
    fclose(f);
    return init_code;
}

static int copy(char *dst, unsigned int len, const char *src) {
    if (strlen(src) + 1 > len) return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(dst, src);
    return NVML_SUCCESS;
}

static fake_gpu *dev(void *handle) {
    unsigned long i = (unsigned long)handle;
    return (initialized && i >= 1 && i <= gpu_count) ? &gpus[i - 1] : NULL;
}

int nvmlInitWithFlags(unsigned int flags) { (void)flags; int rc = load(); initialized = rc == 0; return rc; }
int nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
int nvmlInit(void) { return nvmlInitWithFlags(0); }
int nvmlShutdown(void) { initialized = 0; return NVML_SUCCESS; }
const char *nvmlErrorString(int result) {
    switch (result) {
    case 0: return "Success";
    case 2: return "Invalid Argument";
    case 3: return "Not Supported";
    case 7: return "Insufficient Size";
    case 9: return "Driver Not Loaded";
    default: return "Unknown Error";
    }
}
int nvmlSystemGetDriverVersion(char *version, unsigned int len) {
    return initialized ? copy(version, len, driver) : NVML_ERROR_UNINITIALIZED;
}
int nvmlSystemGetCudaDriverVersion(int *v) { if (!initialized) return NVML_ERROR_UNINITIALIZED; *v = cuda; return 0; }
int nvmlSystemGetCudaDriverVersion_v2(int *v) { return nvmlSystemGetCudaDriverVersion(v); }
int nvmlDeviceGetCount_v2(unsigned int *count) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    *count = gpu_count;
    return NVML_SUCCESS;
}
int nvmlDeviceGetHandleByIndex_v2(unsigned int index, void **handle) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    if (index >= gpu_count || !handle) return NVML_ERROR_INVALID_ARGUMENT;
    *handle = (void *)(unsigned long)(index + 1);
    return NVML_SUCCESS;
}
int nvmlDeviceGetName(void *h, char *name, unsigned int len) {
    fake_gpu *g = dev(h);
    return g ? copy(name, len, g->name) : NVML_ERROR_INVALID_ARGUMENT;
}
int nvmlDeviceGetUUID(void *h, char *uuid, unsigned int len) {
    char text[80];
    fake_gpu *g = dev(h);
    if (!g) return NVML_ERROR_INVALID_ARGUMENT;
    snprintf(text, sizeof text, "GPU-fake0000-0000-0000-0000-%012lu", (unsigned long)h);
    return copy(uuid, len, text);
}
int nvmlDeviceGetMemoryInfo(void *h, nvmlMemory_t *mem) {
    fake_gpu *g = dev(h);
    if (!g || !mem) return NVML_ERROR_INVALID_ARGUMENT;
    if (g->total == 0) return NVML_ERROR_NOT_SUPPORTED;
    mem->total = g->total;
    mem->used = g->used;
    mem->free = g->total - g->used;
    return NVML_SUCCESS;
}
int nvmlDeviceGetUtilizationRates(void *h, nvmlUtilization_t *u) {
    if (!dev(h) || !u) return NVML_ERROR_INVALID_ARGUMENT;
    u->gpu = 0;
    u->memory = 0;
    return NVML_SUCCESS;
}
/* No process runs on a fake GPU: the documented answer is success with a count of 0. */
static int no_processes(void *h, unsigned int *count, void *infos) {
    (void)infos;
    if (!dev(h) || !count) return NVML_ERROR_INVALID_ARGUMENT;
    *count = 0;
    return NVML_SUCCESS;
}
int nvmlDeviceGetComputeRunningProcesses_v3(void *h, unsigned int *c, void *i) { return no_processes(h, c, i); }
int nvmlDeviceGetGraphicsRunningProcesses_v3(void *h, unsigned int *c, void *i) { return no_processes(h, c, i); }
int nvmlDeviceGetGpuFabricInfo(void *h, nvmlGpuFabricInfo_t *info) {
    fake_gpu *g = dev(h);
    if (!g || !info) return NVML_ERROR_INVALID_ARGUMENT;
    if (g->fabric_state < 0) return NVML_ERROR_NOT_SUPPORTED;
    memset(info, 0, sizeof *info);
    info->state = (unsigned int)g->fabric_state;
    info->status = g->fabric_status;
    return NVML_SUCCESS;
}
