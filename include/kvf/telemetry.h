/*
 * kvf/telemetry.h - the host's memory state, as the feasibility model and the soak benchmark
 * read it: available memory, memory pressure, and the control group's limit and usage.
 *
 * Linux reads /proc/meminfo (MemAvailable), /proc/pressure/memory (PSI "some" and "full" avg10)
 * and the cgroup v2 files memory.max / memory.current (v1: memory.limit_in_bytes /
 * memory.usage_in_bytes). macOS reads host_statistics64 and the kern.memorystatus_vm_pressure_level
 * sysctl; that code is compiled only on macOS and has not run on this project's Linux machines.
 */
#ifndef KVF_TELEMETRY_H
#define KVF_TELEMETRY_H

#include <stdint.h>

#include "kvf/export.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvf_telemetry {
    uint64_t mem_total;     /* bytes */
    uint64_t mem_available; /* bytes the kernel can give without swapping */
    int have_psi;
    double psi_some_avg10; /* % of time some task stalled on memory, last 10 s */
    double psi_full_avg10; /* % of time all tasks stalled */
    int have_cgroup;
    uint64_t cgroup_limit;    /* bytes; UINT64_MAX when unlimited */
    uint64_t cgroup_usage;    /* bytes */
    int macos_pressure_level; /* macOS: 1 normal, 2 warning, 4 critical; 0 elsewhere */
} kvf_telemetry;

/* Reads the current state. Fields that cannot be read on this host stay 0 with their have_* flag
 * clear. Returns 0, or KVF_EIO when not even the memory totals could be read. */
KVF_API int kvf_telemetry_read(kvf_telemetry *t);

/* A pressure figure in 0..1 for the cost model: the larger of the fraction of memory in use (of
 * the cgroup limit when there is one) and PSI "some" avg10 / 100. */
KVF_API double kvf_telemetry_pressure(const kvf_telemetry *t);

#ifdef __cplusplus
}
#endif
#endif
