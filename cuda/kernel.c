/*
 * Kernels compiled at run time with NVRTC (cuda/include/cukernel.h, docs/cuda.md).
 */
/* dlvsym: a GNU extension. */
#define _GNU_SOURCE
#include "cukernel.h"

#include "kvf/error.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef void *nvrtc_prog;
typedef struct nvrtc {
    int version;
    int (*Version)(int *, int *);
    int (*CreateProgram)(nvrtc_prog *, const char *, const char *, int, const char *const *,
                         const char *const *);
    int (*CompileProgram)(nvrtc_prog, int, const char *const *);
    int (*GetPTXSize)(nvrtc_prog, size_t *);
    int (*GetPTX)(nvrtc_prog, char *);
    int (*GetProgramLogSize)(nvrtc_prog, size_t *);
    int (*GetProgramLog)(nvrtc_prog, char *);
    int (*DestroyProgram)(nvrtc_prog *);
    const char *(*GetErrorString)(int);
} nvrtc;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static nvrtc rtc;
static int rtc_state; /* 0 not tried, 1 loaded, -1 failed */
static char rtc_err[200];

/* Loads NVRTC of the runtime's major version, by versioned symbols as the runtime. mu held. */
static int rtc_load_locked(const kvf__cu *cu)
{
    if (rtc_state)
        return rtc_state > 0 ? 0 : KVF_ENOTSUP;
    rtc_state = -1;
    char soname[32];
    snprintf(soname, sizeof soname, "libnvrtc.so.%d", cu->major);
    const char *env = getenv("KVF_NVRTC");
    const char *lib = env && *env ? env : soname;
    void *h = dlopen(lib, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        snprintf(rtc_err, sizeof rtc_err, "no NVRTC: cannot load %s", lib);
        return KVF_ENOTSUP;
    }
    struct {
        void **slot;
        const char *name;
    } fns[] = {
        {(void **)&rtc.Version, "nvrtcVersion"},
        {(void **)&rtc.CreateProgram, "nvrtcCreateProgram"},
        {(void **)&rtc.CompileProgram, "nvrtcCompileProgram"},
        {(void **)&rtc.GetPTXSize, "nvrtcGetPTXSize"},
        {(void **)&rtc.GetPTX, "nvrtcGetPTX"},
        {(void **)&rtc.GetProgramLogSize, "nvrtcGetProgramLogSize"},
        {(void **)&rtc.GetProgramLog, "nvrtcGetProgramLog"},
        {(void **)&rtc.DestroyProgram, "nvrtcDestroyProgram"},
        {(void **)&rtc.GetErrorString, "nvrtcGetErrorString"},
    };
    for (size_t i = 0; i < sizeof fns / sizeof fns[0]; i++) {
        *fns[i].slot = dlvsym(h, fns[i].name, soname);
        if (!*fns[i].slot) /* a build without symbol versions */
            *fns[i].slot = dlsym(h, fns[i].name);
        if (!*fns[i].slot) {
            snprintf(rtc_err, sizeof rtc_err, "%s lacks %s (version %s)", lib, fns[i].name, soname);
            dlclose(h);
            return KVF_ENOTSUP;
        }
    }
    int maj = 0, min = 0;
    if (rtc.Version(&maj, &min) != 0 || maj != cu->major) {
        snprintf(rtc_err, sizeof rtc_err, "%s is NVRTC %d.%d, the runtime is %d.x", lib, maj, min,
                 cu->major);
        dlclose(h);
        return KVF_ENOTSUP;
    }
    rtc.version = maj * 1000 + min * 10;
    rtc_state = 1;
    return 0;
}

int kvf__nvrtc_version(const kvf__cu *cu, char *err, size_t errlen)
{
    pthread_mutex_lock(&mu);
    int rc = rtc_load_locked(cu);
    int v = rc ? 0 : rtc.version;
    if (rc && err)
        snprintf(err, errlen, "%s", rtc_err);
    pthread_mutex_unlock(&mu);
    return v;
}

int kvf__cu_compile(const kvf__cu *cu, int dev, const char *src, const char *name, kvf__cukernel *k,
                    char *err, size_t errlen)
{
    if (!cu->LibraryLoadData) {
        snprintf(err, errlen, "CUDA runtime %d.%d cannot load kernels (cudaLibraryLoadData)",
                 cu->runtime_version / 1000, cu->runtime_version % 1000 / 10);
        return KVF_ENOTSUP;
    }
    pthread_mutex_lock(&mu);
    int rc = rtc_load_locked(cu);
    pthread_mutex_unlock(&mu);
    if (rc) {
        snprintf(err, errlen, "%s", rtc_err);
        return rc;
    }
    int maj = 0, min = 0;
    if (cu->SetDevice(dev) || cu->DeviceGetAttribute(&maj, KVF__CU_ATTR_CC_MAJOR, dev) ||
        cu->DeviceGetAttribute(&min, KVF__CU_ATTR_CC_MINOR, dev)) {
        (void)cu->GetLastError();
        snprintf(err, errlen, "device %d: cannot read its compute capability", dev);
        return KVF_ENODEV;
    }
    char arch[48];
    snprintf(arch, sizeof arch, "--gpu-architecture=compute_%d%d", maj, min);
    const char *opts[] = {arch, "--std=c++17", "-default-device"};
    nvrtc_prog p = NULL;
    int r = rtc.CreateProgram(&p, src, name, 0, NULL, NULL);
    if (r) {
        snprintf(err, errlen, "nvrtcCreateProgram: %s", rtc.GetErrorString(r));
        return KVF_ENOMEM;
    }
    r = rtc.CompileProgram(p, (int)(sizeof opts / sizeof opts[0]), opts);
    if (r) {
        size_t n = 0;
        char *log = NULL;
        if (rtc.GetProgramLogSize(p, &n) == 0 && n && (log = malloc(n + 1)) &&
            rtc.GetProgramLog(p, log) == 0) {
            log[n] = 0;
            char *nl = strchr(log, '\n');
            if (nl)
                *nl = 0;
        }
        snprintf(err, errlen, "nvrtcCompileProgram (%s): %s: %s", arch, rtc.GetErrorString(r),
                 log ? log : "");
        free(log);
        rtc.DestroyProgram(&p);
        return KVF_EINVAL;
    }
    size_t n = 0;
    char *ptx = NULL;
    if (rtc.GetPTXSize(p, &n) != 0 || !(ptx = malloc(n + 1)) || rtc.GetPTX(p, ptx) != 0) {
        free(ptx);
        rtc.DestroyProgram(&p);
        snprintf(err, errlen, "nvrtcGetPTX failed");
        return KVF_ENOMEM;
    }
    rtc.DestroyProgram(&p);
    kvf__culibrary lib = NULL;
    int e = cu->LibraryLoadData(&lib, ptx, NULL, NULL, 0, NULL, NULL, 0);
    free(ptx);
    if (e)
        return kvf__cu_err(cu, e, "cudaLibraryLoadData", err, errlen);
    e = cu->LibraryGetKernel(k, lib, name);
    if (e) {
        cu->LibraryUnload(lib);
        return kvf__cu_err(cu, e, "cudaLibraryGetKernel", err, errlen);
    }
    return 0;
}

/* One block per run; the run's two addresses are read once into shared memory (the list may be
 * mapped host memory), then the block's threads copy it in 16-byte words where both ends and
 * the size allow, else byte by byte. */
static const char copy_src[] =
    "extern \"C\" __global__ void kvf_copy_pages(const unsigned long long *pairs, unsigned n,\n"
    "                                            unsigned long long bytes)\n"
    "{\n"
    "    __shared__ unsigned long long sp[2];\n"
    "    for (unsigned i = blockIdx.x; i < n; i += gridDim.x) {\n"
    "        if (threadIdx.x < 2)\n"
    "            sp[threadIdx.x] = pairs[2ull * i + threadIdx.x];\n"
    "        __syncthreads();\n"
    "        unsigned long long s = sp[0], d = sp[1];\n"
    "        if (((s | d | bytes) & 15ull) == 0) {\n"
    "            const uint4 *s4 = (const uint4 *)s;\n"
    "            uint4 *d4 = (uint4 *)d;\n"
    "            for (unsigned long long w = threadIdx.x; w < bytes / 16; w += blockDim.x)\n"
    "                d4[w] = s4[w];\n"
    "        } else {\n"
    "            const unsigned char *s1 = (const unsigned char *)s;\n"
    "            unsigned char *d1 = (unsigned char *)d;\n"
    "            for (unsigned long long w = threadIdx.x; w < bytes; w += blockDim.x)\n"
    "                d1[w] = s1[w];\n"
    "        }\n"
    "        __syncthreads();\n"
    "    }\n"
    "}\n";

#define MAX_DEVICES 64
static kvf__cukernel copy_k[MAX_DEVICES];
static int copy_state[MAX_DEVICES]; /* 0 not tried, 1 ready, < 0 failed with that code */
static char copy_err[MAX_DEVICES][200];
static pthread_mutex_t copy_mu = PTHREAD_MUTEX_INITIALIZER;

int kvf__cu_copy_kernel(const kvf__cu *cu, int dev, kvf__cukernel *k, char *err, size_t errlen)
{
    if (dev < 0 || dev >= MAX_DEVICES) {
        snprintf(err, errlen, "device %d out of range", dev);
        return KVF_ENODEV;
    }
    pthread_mutex_lock(&copy_mu);
    if (!copy_state[dev]) {
        int rc = kvf__cu_compile(cu, dev, copy_src, "kvf_copy_pages", &copy_k[dev], copy_err[dev],
                                 sizeof copy_err[dev]);
        copy_state[dev] = rc ? rc : 1;
    }
    int rc = copy_state[dev] > 0 ? 0 : copy_state[dev];
    if (rc)
        snprintf(err, errlen, "%s", copy_err[dev]);
    else
        *k = copy_k[dev];
    pthread_mutex_unlock(&copy_mu);
    return rc;
}
