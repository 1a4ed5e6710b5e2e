/*
 * kvf probe: fills this host's capability record by executing tiny actions, not by declaration:
 * bind a TCP listener, list RDMA devices through libibverbs and open each, lock and unlock a
 * small buffer, load the CUDA runtime as libkvf does and count its devices, read telemetry.
 */
#ifndef KVF_CLUSTER_PROBE_H
#define KVF_CLUSTER_PROBE_H

#include "kvf/cuda.h"
#include "kvf/feasibility.h"
#include "kvf/telemetry.h"

typedef struct kvf_probe_step {
    const char *name;
    int ok;
    char detail[160];
} kvf_probe_step;

typedef struct kvf_probe_report {
    kvf_caps caps;
    kvf_telemetry telemetry;
    int rdma_listed;
    int rdma_opened; /* devices that opened and registered a buffer for remote access */
    int cuda_devices;
    kvf_cuda_info cuda; /* what libkvf's CUDA loader found (kvf/cuda.h) */
    int verbs_built;    /* libkvf was built with libibverbs */
    kvf_probe_step steps[8];
    int n_steps;
} kvf_probe_report;

/* Runs every probe. engine names the record's engine ("" for a bare host). Returns 0. */
int kvf__probe_host(kvf_probe_report *r, const char *engine);

#endif
