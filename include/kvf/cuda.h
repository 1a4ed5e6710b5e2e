/*
 * kvf/cuda.h - what libkvf finds of CUDA on this host (docs/cuda.md).
 *
 * libkvf loads the CUDA runtime when it is first needed (dlopen of libcudart.so.13 or .so.12, or
 * of the library $KVF_CUDART names), so one binary runs on hosts with and without CUDA. A
 * connector moves KV pages registered as KVF_MEM_CUDA only where this probe finds a usable
 * runtime and a device.
 */
#ifndef KVF_CUDA_H
#define KVF_CUDA_H

#include "kvf/export.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvf_cuda_info {
    int usable;          /* the runtime loaded, its functions resolved and a device is present */
    int runtime_version; /* 1000 * major + 10 * minor, e.g. 13000; 0 where not loaded */
    int driver_version;  /* the CUDA version the driver supports, same encoding; 0 if unknown */
    int devices;
    int cc_major, cc_minor; /* device 0's compute capability */
    int sm_count;           /* device 0's multiprocessors */
    int batch_copy;         /* cudaMemcpyBatchAsync is there (runtime 12.8 and later) */
    int nvrtc_version;      /* the NVRTC that compiles the page-copy kernel; 0: none */
    char library[160];      /* the runtime library loaded */
    char why[240];          /* why it is not usable, or what is missing */
} kvf_cuda_info;

/* Fills out (loading the runtime if needed). Returns 0 when usable, else KVF_ENOTSUP with the
 * reason in out->why. */
KVF_API int kvf_cuda_probe(kvf_cuda_info *out);

#ifdef __cplusplus
}
#endif
#endif
