/*
 * Host memory telemetry (include/kvf/telemetry.h).
 */
#include "kvf/telemetry.h"

#include "kvf/error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef __APPLE__
#include <mach/mach.h>
#include <sys/sysctl.h>
#endif

#ifndef __APPLE__
static int read_u64_file(const char *path, uint64_t *out)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    char buf[64];
    int rc = -1;
    if (fgets(buf, sizeof buf, f)) {
        if (!strncmp(buf, "max", 3)) {
            *out = UINT64_MAX;
            rc = 0;
        } else {
            char *end;
            unsigned long long v = strtoull(buf, &end, 10);
            if (end != buf) {
                *out = v;
                rc = 0;
            }
        }
    }
    fclose(f);
    return rc;
}
#endif

int kvf_telemetry_read(kvf_telemetry *t)
{
    memset(t, 0, sizeof *t);
#ifdef __APPLE__
    uint64_t memsize = 0;
    size_t len = sizeof memsize;
    if (sysctlbyname("hw.memsize", &memsize, &len, NULL, 0) != 0)
        return KVF_EIO;
    t->mem_total = memsize;
    vm_statistics64_data_t vm;
    mach_msg_type_number_t count = HOST_VM_INFO64_COUNT;
    if (host_statistics64(mach_host_self(), HOST_VM_INFO64, (host_info64_t)&vm, &count) ==
        KERN_SUCCESS) {
        uint64_t page = (uint64_t)vm_page_size;
        t->mem_available =
            ((uint64_t)vm.free_count + vm.inactive_count + vm.purgeable_count) * page;
    }
    int level = 0;
    len = sizeof level;
    if (sysctlbyname("kern.memorystatus_vm_pressure_level", &level, &len, NULL, 0) == 0)
        t->macos_pressure_level = level;
    return 0;
#else
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f)
        return KVF_EIO;
    char line[256];
    while (fgets(line, sizeof line, f)) {
        unsigned long long kb;
        if (sscanf(line, "MemTotal: %llu kB", &kb) == 1)
            t->mem_total = kb * 1024;
        else if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1)
            t->mem_available = kb * 1024;
    }
    fclose(f);
    if (!t->mem_total)
        return KVF_EIO;
    f = fopen("/proc/pressure/memory", "r");
    if (f) {
        while (fgets(line, sizeof line, f)) {
            double v;
            if (sscanf(line, "some avg10=%lf", &v) == 1) {
                t->psi_some_avg10 = v;
                t->have_psi = 1;
            } else if (sscanf(line, "full avg10=%lf", &v) == 1) {
                t->psi_full_avg10 = v;
            }
        }
        fclose(f);
    }
    /* cgroup v2: this process's own group, from /proc/self/cgroup ("0::/path"). */
    char cg[512] = "";
    f = fopen("/proc/self/cgroup", "r");
    if (f) {
        while (fgets(line, sizeof line, f))
            if (!strncmp(line, "0::", 3)) {
                line[strcspn(line, "\n")] = '\0';
                snprintf(cg, sizeof cg, "%s", line + 3);
            }
        fclose(f);
    }
    char pmax[600], pcur[600];
    snprintf(pmax, sizeof pmax, "/sys/fs/cgroup%s/memory.max", strcmp(cg, "/") ? cg : "");
    snprintf(pcur, sizeof pcur, "/sys/fs/cgroup%s/memory.current", strcmp(cg, "/") ? cg : "");
    if (read_u64_file(pmax, &t->cgroup_limit) == 0 && read_u64_file(pcur, &t->cgroup_usage) == 0)
        t->have_cgroup = 1;
    else if (read_u64_file("/sys/fs/cgroup/memory/memory.limit_in_bytes", &t->cgroup_limit) == 0 &&
             read_u64_file("/sys/fs/cgroup/memory/memory.usage_in_bytes", &t->cgroup_usage) == 0)
        t->have_cgroup = 1;
    return 0;
#endif
}

double kvf_telemetry_pressure(const kvf_telemetry *t)
{
    double used = 0;
    if (t->mem_total)
        used = 1.0 - (double)t->mem_available / (double)t->mem_total;
    if (t->have_cgroup && t->cgroup_limit && t->cgroup_limit != UINT64_MAX) {
        double cg = (double)t->cgroup_usage / (double)t->cgroup_limit;
        if (cg > used)
            used = cg;
    }
    double psi = t->have_psi ? t->psi_some_avg10 / 100.0 : 0;
    double p = used > psi ? used : psi;
    return p < 0 ? 0 : p > 1 ? 1 : p;
}
