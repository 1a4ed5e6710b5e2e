/*
 * kvf_cuda_probe (include/kvf/cuda.h): what the loader found.
 */
#include "kvf/cuda.h"

#include "kvf/error.h"

#include "cu.h"
#include "cukernel.h"

#include <stdio.h>
#include <string.h>

int kvf_cuda_probe(kvf_cuda_info *out)
{
    memset(out, 0, sizeof *out);
    const kvf__cu *cu = kvf__cuda(out->why, sizeof out->why);
    if (!cu)
        return KVF_ENOTSUP;
    out->usable = 1;
    out->runtime_version = cu->runtime_version;
    out->driver_version = cu->driver_version;
    out->devices = cu->devices;
    snprintf(out->library, sizeof out->library, "%s", cu->lib);
    (void)cu->DeviceGetAttribute(&out->cc_major, KVF__CU_ATTR_CC_MAJOR, 0);
    (void)cu->DeviceGetAttribute(&out->cc_minor, KVF__CU_ATTR_CC_MINOR, 0);
    (void)cu->DeviceGetAttribute(&out->sm_count, KVF__CU_ATTR_SM_COUNT, 0);
    (void)cu->GetLastError();
    out->batch_copy = cu->MemcpyBatchAsync12 || cu->MemcpyBatchAsync13;
    char why[200] = "";
    out->nvrtc_version = cu->LibraryLoadData ? kvf__nvrtc_version(cu, why, sizeof why) : 0;
    if (!out->batch_copy || !out->nvrtc_version)
        snprintf(out->why, sizeof out->why, "%s%s%s",
                 out->batch_copy ? ""
                                 : "no cudaMemcpyBatchAsync (runtime before 12.8): one copy "
                                   "per page",
                 !out->batch_copy && !out->nvrtc_version ? "; " : "",
                 out->nvrtc_version ? ""
                 : cu->LibraryLoadData
                     ? why
                     : "the runtime cannot load kernels: small pages go on the copy engine");
    return 0;
}
