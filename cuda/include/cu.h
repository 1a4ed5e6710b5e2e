/*
 * The CUDA runtime, loaded at run time (cuda/loader.c, docs/cuda.md): libkvf has no build-time
 * dependency on CUDA. The few types and functions used are declared here with their ABI, which
 * is chosen by the runtime's major version: libcudart.so.13 and libcudart.so.12 export every
 * symbol under a version node of their soname (cudaMemcpyBatchAsync@@libcudart.so.13), and the
 * loader asks for that exact version (dlvsym), so a symbol is never called with another major
 * version's signature. cudaMemcpyBatchAsync is the one whose signature differs: 12.8 to 12.9
 * take a failIdx argument before the stream, 13.x do not.
 *
 * Every value below was read from the CUDA 12 and 13 headers' declarations; nothing of those
 * headers is included.
 */
#ifndef KVF_CUDA_CU_H
#define KVF_CUDA_CU_H

#include <stddef.h>
#include <stdint.h>

#include "kvf/cuda.h"

/* ABI types */
typedef int kvf__cuerr;       /* cudaError_t */
typedef void *kvf__custream;  /* cudaStream_t */
typedef void *kvf__cuevent;   /* cudaEvent_t */
typedef void *kvf__culibrary; /* cudaLibrary_t */
typedef void *kvf__cukernel;  /* cudaKernel_t */
typedef struct kvf__cudim3 {  /* dim3 */
    unsigned x, y, z;
} kvf__cudim3;

/* struct cudaMemLocation and struct cudaMemcpyAttributes (CUDA 12.8 and later) */
typedef struct kvf__cumemloc {
    int type; /* enum cudaMemLocationType */
    int id;
} kvf__cumemloc;
typedef struct kvf__cucpyattr {
    int src_access_order; /* enum cudaMemcpySrcAccessOrder */
    kvf__cumemloc src_hint, dst_hint;
    unsigned flags;
} kvf__cucpyattr;

enum {
    KVF__CU_SUCCESS = 0,
    KVF__CU_ERR_INVALID_VALUE = 1,
    KVF__CU_ERR_MEMORY_ALLOCATION = 2,
    KVF__CU_ERR_INSUFFICIENT_DRIVER = 35,
    KVF__CU_ERR_NO_DEVICE = 100,
    KVF__CU_ERR_NOT_READY = 600,
    KVF__CU_ERR_HOST_MEMORY_ALREADY_REGISTERED = 712,
    KVF__CU_ERR_NOT_SUPPORTED = 801,
    KVF__CU_ERR_UNKNOWN = 999,
    /* Not CUDA's: a failure injected by KVF_CUDA_FAULT (docs/cuda.md). */
    KVF__CU_ERR_INJECTED = 0x4b5646,
};

/* cudaMemcpyDefault: the direction inferred from the pointers (unified addressing) */
#define KVF__CU_MEMCPY_DEFAULT 4

/* The connector's events: no timing, and a host thread that waits for one sleeps until the
 * device signals it (cudaEventBlockingSync) instead of spinning on a core for the whole wait (the
 * default: a save beside a forward pass kept one core per worker busy for the whole pass). */
#define KVF__CU_EVENT_FLAGS (KVF__CU_EVENT_DISABLE_TIMING | KVF__CU_EVENT_BLOCKING_SYNC)

#define KVF__CU_STREAM_NON_BLOCKING          0x01u
#define KVF__CU_EVENT_BLOCKING_SYNC          0x01u
#define KVF__CU_EVENT_DISABLE_TIMING         0x02u
#define KVF__CU_HOST_ALLOC_PORTABLE          0x01u
#define KVF__CU_HOST_ALLOC_MAPPED            0x02u
#define KVF__CU_HOST_REGISTER_PORTABLE       0x01u
#define KVF__CU_HOST_REGISTER_MAPPED         0x02u
#define KVF__CU_HOST_REGISTER_READ_ONLY      0x08u
#define KVF__CU_SRC_ACCESS_ORDER_STREAM      1
#define KVF__CU_ATTR_SM_COUNT                16
#define KVF__CU_ATTR_CC_MAJOR                75
#define KVF__CU_ATTR_CC_MINOR                76
#define KVF__CU_ATTR_HOST_PTR_FOR_REGISTERED 91 /* cudaDevAttrCanUseHostPointerForRegisteredMem */
/* enum cudaMemoryType, in struct cudaPointerAttributes' first field */
#define KVF__CU_MEMTYPE_DEVICE  2
#define KVF__CU_MEMTYPE_MANAGED 3

/* The runtime's functions this library calls (Memcpy and Memset: its tests and benchmarks).
 * Those marked optional may be NULL. */
typedef struct kvf__cu {
    int runtime_version, driver_version; /* e.g. 13000 */
    int major;                           /* the ABI in use: 12 or 13 */
    int devices;
    char lib[160];
    kvf__cuerr (*RuntimeGetVersion)(int *);
    kvf__cuerr (*DriverGetVersion)(int *);
    const char *(*GetErrorName)(kvf__cuerr);
    kvf__cuerr (*GetLastError)(void);
    kvf__cuerr (*GetDeviceCount)(int *);
    kvf__cuerr (*SetDevice)(int);
    kvf__cuerr (*DeviceGetAttribute)(int *, int, int);
    kvf__cuerr (*PointerGetAttributes)(void *, const void *);
    kvf__cuerr (*Malloc)(void **, size_t);
    kvf__cuerr (*Free)(void *);
    kvf__cuerr (*HostAlloc)(void **, size_t, unsigned);
    kvf__cuerr (*FreeHost)(void *);
    kvf__cuerr (*HostRegister)(void *, size_t, unsigned);
    kvf__cuerr (*HostUnregister)(void *);
    kvf__cuerr (*Memcpy)(void *, const void *, size_t, int);
    kvf__cuerr (*MemcpyAsync)(void *, const void *, size_t, int, kvf__custream);
    kvf__cuerr (*Memset)(void *, int, size_t);
    kvf__cuerr (*StreamCreateWithFlags)(kvf__custream *, unsigned);
    kvf__cuerr (*StreamDestroy)(kvf__custream);
    kvf__cuerr (*StreamSynchronize)(kvf__custream);
    kvf__cuerr (*StreamWaitEvent)(kvf__custream, kvf__cuevent, unsigned);
    kvf__cuerr (*EventCreateWithFlags)(kvf__cuevent *, unsigned);
    kvf__cuerr (*EventDestroy)(kvf__cuevent);
    kvf__cuerr (*EventRecord)(kvf__cuevent, kvf__custream);
    kvf__cuerr (*EventSynchronize)(kvf__cuevent);
    /* optional: 12.8 and later (the two signatures) */
    kvf__cuerr (*MemcpyBatchAsync12)(void *const *, const void *const *, const size_t *, size_t,
                                     kvf__cucpyattr *, size_t *, size_t, size_t *, kvf__custream);
    kvf__cuerr (*MemcpyBatchAsync13)(void *const *, const void *const *, const size_t *, size_t,
                                     kvf__cucpyattr *, size_t *, size_t, kvf__custream);
    /* optional: kernels compiled at run time (12.0 and later) */
    kvf__cuerr (*LibraryLoadData)(kvf__culibrary *, const void *, void *, void **, unsigned, void *,
                                  void **, unsigned);
    kvf__cuerr (*LibraryUnload)(kvf__culibrary);
    kvf__cuerr (*LibraryGetKernel)(kvf__cukernel *, kvf__culibrary, const char *);
    kvf__cuerr (*LaunchKernel)(const void *, kvf__cudim3, kvf__cudim3, void **, size_t,
                               kvf__custream);
} kvf__cu;

/* The runtime, loaded once per process ($KVF_CUDART, else libcudart.so.13, else .so.12). NULL when
 * it cannot be used; err (may be NULL) then gets why. The result lives until the process ends. */
const kvf__cu *kvf__cuda(char *err, size_t errlen);

/* A CUDA error as a KVF_E* code (0 for success), with "what: cudaErrorName" in err (may be
 * NULL). */
int kvf__cu_err(const kvf__cu *cu, kvf__cuerr e, const char *what, char *err, size_t errlen);

/* A copy (or kernel launch) may fail on purpose: KVF_CUDA_FAULT="copy:N" fails the Nth submission
 * of the process (counted from 1) with KVF__CU_ERR_INJECTED, for tests of failure paths on a real
 * GPU. Returns that error when this submission is the one, else 0. */
kvf__cuerr kvf__cu_fault(void);
/* Arms the fault for the nth submission from now (n <= 0: disarms), for tests. */
void kvf__cu_fault_arm(long n);

/* The device that holds p (device or managed memory): 0 and *dev, or KVF_EINVAL with why in err
 * (a host pointer, or memory no CUDA context knows). */
int kvf__cu_device_of(const kvf__cu *cu, const void *p, int *dev, char *err, size_t errlen);

#endif
