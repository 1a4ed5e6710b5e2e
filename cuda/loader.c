/*
 * Loading the CUDA runtime (cuda/include/cu.h, docs/cuda.md): dlopen, then every function by its
 * versioned name, with the signature of that major version.
 */
/* dlvsym: a GNU extension. */
#define _GNU_SOURCE
#include "cu.h"

#include "kvf/error.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The oldest runtime whose functions (cudaLibraryLoadData among them) this library uses. */
#define OLDEST_RUNTIME 12000

static kvf__cu the_cu;
static const kvf__cu *loaded;
static char load_err[768];
static pthread_once_t once = PTHREAD_ONCE_INIT;

/* The symbol `name` of version node `ver` ("": a library without symbol versions). */
static void *sym(void *h, const char *ver, const char *name)
{
    return *ver ? dlvsym(h, name, ver) : dlsym(h, name);
}

/* Opens the runtime at path (or, when path is NULL, the first of the sonames), and says which
 * version node its symbols carry. NULL with why in load_err. */
static void *open_runtime(const char *path, char *ver, size_t verlen)
{
    static const char *const sonames[] = {"libcudart.so.13", "libcudart.so.12"};
    char tried[200] = "";
    for (size_t i = 0; i < sizeof sonames / sizeof sonames[0]; i++) {
        const char *lib = path ? path : sonames[i];
        void *h = dlopen(lib, RTLD_NOW | RTLD_LOCAL);
        if (!h) {
            size_t n = strlen(tried);
            snprintf(tried + n, sizeof tried - n, "%s%s", n ? ", " : "", lib);
            if (path)
                break;
            continue;
        }
        /* The version node tells the major version (and so the ABI) of this library. */
        for (size_t j = 0; j < sizeof sonames / sizeof sonames[0]; j++) {
            if (sym(h, sonames[j], "cudaRuntimeGetVersion")) {
                snprintf(ver, verlen, "%s", sonames[j]);
                snprintf(the_cu.lib, sizeof the_cu.lib, "%s", lib);
                return h;
            }
        }
        /* A library built without symbol versions (a runtime of its own, a test's): its
         * functions are taken by name, with the ABI of the version it reports. */
        if (dlsym(h, "cudaRuntimeGetVersion")) {
            ver[0] = 0;
            snprintf(the_cu.lib, sizeof the_cu.lib, "%s", lib);
            return h;
        }
        snprintf(load_err, sizeof load_err, "%s exports no cudaRuntimeGetVersion", lib);
        dlclose(h);
        return NULL;
    }
    snprintf(load_err, sizeof load_err, "no CUDA runtime: cannot load %s", tried);
    return NULL;
}

#define REQUIRE(field, name)                                                               \
    do {                                                                                   \
        *(void **)&cu->field = sym(h, ver, name);                                          \
        if (!cu->field) {                                                                  \
            snprintf(load_err, sizeof load_err, "%s lacks %s (version %s)", cu->lib, name, \
                     *ver ? ver : "none");                                                 \
            goto fail;                                                                     \
        }                                                                                  \
    } while (0)
#define OPTIONAL(field, name) (*(void **)&cu->field = sym(h, ver, name))

static void load(void)
{
    kvf__cu *cu = &the_cu;
    char ver[32];
    const char *path = getenv("KVF_CUDART");
    void *h = open_runtime(path && *path ? path : NULL, ver, sizeof ver);
    if (!h)
        return;
    REQUIRE(RuntimeGetVersion, "cudaRuntimeGetVersion");
    REQUIRE(DriverGetVersion, "cudaDriverGetVersion");
    REQUIRE(GetErrorName, "cudaGetErrorName");
    int v = 0;
    if (cu->RuntimeGetVersion(&v) != 0 || v <= 0) {
        snprintf(load_err, sizeof load_err, "%s: cudaRuntimeGetVersion failed", cu->lib);
        goto fail;
    }
    cu->runtime_version = v;
    cu->major = v / 1000;
    if (v < OLDEST_RUNTIME) {
        snprintf(load_err, sizeof load_err,
                 "%s is CUDA runtime %d.%d: kvfabric needs %d.%d or later", cu->lib, v / 1000,
                 v % 1000 / 10, OLDEST_RUNTIME / 1000, OLDEST_RUNTIME % 1000 / 10);
        goto fail;
    }
    if ((*ver && strcmp(ver, cu->major >= 13 ? "libcudart.so.13" : "libcudart.so.12") != 0) ||
        cu->major > 13) {
        snprintf(load_err, sizeof load_err,
                 "%s reports runtime %d.%d under symbol version %s: an ABI this build does not "
                 "know",
                 cu->lib, v / 1000, v % 1000 / 10, *ver ? ver : "(none)");
        goto fail;
    }
    REQUIRE(GetLastError, "cudaGetLastError");
    REQUIRE(GetDeviceCount, "cudaGetDeviceCount");
    REQUIRE(SetDevice, "cudaSetDevice");
    REQUIRE(DeviceGetAttribute, "cudaDeviceGetAttribute");
    REQUIRE(PointerGetAttributes, "cudaPointerGetAttributes");
    REQUIRE(Malloc, "cudaMalloc");
    REQUIRE(Free, "cudaFree");
    REQUIRE(HostAlloc, "cudaHostAlloc");
    REQUIRE(FreeHost, "cudaFreeHost");
    REQUIRE(HostRegister, "cudaHostRegister");
    REQUIRE(HostUnregister, "cudaHostUnregister");
    REQUIRE(Memcpy, "cudaMemcpy");
    REQUIRE(MemcpyAsync, "cudaMemcpyAsync");
    REQUIRE(Memset, "cudaMemset");
    REQUIRE(StreamCreateWithFlags, "cudaStreamCreateWithFlags");
    REQUIRE(StreamDestroy, "cudaStreamDestroy");
    REQUIRE(StreamSynchronize, "cudaStreamSynchronize");
    REQUIRE(StreamWaitEvent, "cudaStreamWaitEvent");
    REQUIRE(EventCreateWithFlags, "cudaEventCreateWithFlags");
    REQUIRE(EventDestroy, "cudaEventDestroy");
    REQUIRE(EventRecord, "cudaEventRecord");
    REQUIRE(EventSynchronize, "cudaEventSynchronize");
    /* cudaMemcpyBatchAsync: 12.8 added it with failIdx; 13.0 dropped failIdx. */
    if (cu->major == 12 && v >= 12080)
        OPTIONAL(MemcpyBatchAsync12, "cudaMemcpyBatchAsync");
    else if (cu->major == 13)
        OPTIONAL(MemcpyBatchAsync13, "cudaMemcpyBatchAsync");
    OPTIONAL(LibraryLoadData, "cudaLibraryLoadData");
    OPTIONAL(LibraryUnload, "cudaLibraryUnload");
    OPTIONAL(LibraryGetKernel, "cudaLibraryGetKernel");
    OPTIONAL(LaunchKernel, "cudaLaunchKernel");
    if (!cu->LibraryLoadData || !cu->LibraryUnload || !cu->LibraryGetKernel || !cu->LaunchKernel)
        cu->LibraryLoadData = NULL; /* no kernels: the copy engine does every copy */
    (void)cu->DriverGetVersion(&cu->driver_version);
    int n = 0;
    int e = cu->GetDeviceCount(&n);
    if (e != 0 || n <= 0) {
        snprintf(load_err, sizeof load_err, "%s (runtime %d.%d): %s", cu->lib, v / 1000,
                 v % 1000 / 10, e ? cu->GetErrorName(e) : "no CUDA device");
        (void)cu->GetLastError();
        goto fail;
    }
    cu->devices = n;
    loaded = cu;
    return; /* the library stays loaded for the process */

fail:
    /* Keep the versions for the probe's report; nothing else of a failed load is used. */
    dlclose(h);
}

const kvf__cu *kvf__cuda(char *err, size_t errlen)
{
    pthread_once(&once, load);
    if (!loaded && err)
        snprintf(err, errlen, "%s", load_err);
    return loaded;
}

int kvf__cu_err(const kvf__cu *cu, kvf__cuerr e, const char *what, char *err, size_t errlen)
{
    if (e == 0)
        return 0;
    const char *name = e == KVF__CU_ERR_INJECTED ? "injected fault (KVF_CUDA_FAULT)"
                       : cu && cu->GetErrorName  ? cu->GetErrorName(e)
                                                 : "cudaError";
    if (err)
        snprintf(err, errlen, "%s: %s (%d)", what, name ? name : "cudaError", e);
    switch (e) {
    case KVF__CU_ERR_INVALID_VALUE:
        return KVF_EINVAL;
    case KVF__CU_ERR_MEMORY_ALLOCATION:
        return KVF_ENOMEM;
    case KVF__CU_ERR_NO_DEVICE:
        return KVF_ENODEV;
    case KVF__CU_ERR_INSUFFICIENT_DRIVER:
        return KVF_EVERSION;
    case KVF__CU_ERR_NOT_SUPPORTED:
        return KVF_ENOTSUP;
    case KVF__CU_ERR_NOT_READY:
        return KVF_EAGAIN;
    default:
        return KVF_EIO;
    }
}

static atomic_long fault_at, fault_count;
static pthread_once_t fault_once = PTHREAD_ONCE_INIT;

static void fault_parse(void)
{
    const char *s = getenv("KVF_CUDA_FAULT");
    long n = 0;
    if (s && sscanf(s, "copy:%ld", &n) == 1 && n > 0)
        atomic_store(&fault_at, n);
}

void kvf__cu_fault_arm(long n)
{
    pthread_once(&fault_once, fault_parse);
    atomic_store(&fault_at, n > 0 ? atomic_load(&fault_count) + n : 0);
}

kvf__cuerr kvf__cu_fault(void)
{
    pthread_once(&fault_once, fault_parse);
    long at = atomic_load(&fault_at);
    if (at <= 0)
        return 0;
    return atomic_fetch_add(&fault_count, 1) + 1 == at ? KVF__CU_ERR_INJECTED : 0;
}

int kvf__cu_device_of(const kvf__cu *cu, const void *p, int *dev, char *err, size_t errlen)
{
    /* struct cudaPointerAttributes begins {enum cudaMemoryType type; int device; ...}; what
     * follows has grown across versions, so it is read into room to spare. */
    union {
        struct {
            int type, device;
        } head;
        unsigned char room[256];
    } a;
    memset(&a, 0, sizeof a);
    int e = cu->PointerGetAttributes(&a, p);
    if (e) {
        (void)cu->GetLastError();
        return kvf__cu_err(cu, e, "cudaPointerGetAttributes", err, errlen) ? KVF_EINVAL : 0;
    }
    if (a.head.type != KVF__CU_MEMTYPE_DEVICE && a.head.type != KVF__CU_MEMTYPE_MANAGED) {
        snprintf(err, errlen, "%p is not CUDA device memory (cudaMemoryType %d)", p, a.head.type);
        return KVF_EINVAL;
    }
    *dev = a.head.device;
    return 0;
}
