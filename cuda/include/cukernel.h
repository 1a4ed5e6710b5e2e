/*
 * Kernels compiled at run time (cuda/kernel.c): NVRTC (libnvrtc.so.<runtime major>, loaded on
 * first use) turns CUDA C into PTX for the device's compute capability, and the runtime loads it
 * as a library. The page-copy kernel is the one libkvf uses; benchmarks compile their own.
 */
#ifndef KVF_CUDA_CUKERNEL_H
#define KVF_CUDA_CUKERNEL_H

#include "cu.h"

/* NVRTC's version (1000 * major + 10 * minor), or 0 with why in err when it cannot be loaded. */
int kvf__nvrtc_version(const kvf__cu *cu, char *err, size_t errlen);

/* Compiles src for device dev and returns the kernel `name` (extern "C") in *k. The library
 * stays loaded for the process. 0, or KVF_ENOTSUP (no NVRTC, no kernel loading in this runtime),
 * KVF_EINVAL (a compile error: the log's first line in err), or the runtime's error. */
int kvf__cu_compile(const kvf__cu *cu, int dev, const char *src, const char *name, kvf__cukernel *k,
                    char *err, size_t errlen);

/* The page-copy kernel of device dev (compiled on first use, then cached):
 *   kvf_copy_pages(const uint64_t *pairs, unsigned n, uint64_t bytes)
 * copies n runs of `bytes` bytes, run i from pairs[2i] to pairs[2i+1] (device or mapped host
 * addresses), one block per run. */
int kvf__cu_copy_kernel(const kvf__cu *cu, int dev, kvf__cukernel *k, char *err, size_t errlen);

#endif
