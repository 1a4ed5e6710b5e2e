/* The host's cores and the "auto" thread counts (cpus.h). */
#define _GNU_SOURCE
#include "cpus.h"

#include <sched.h>
#include <unistd.h>

int kvf__cores(void)
{
#ifdef CPU_COUNT
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0)
        return CPU_COUNT(&set);
#endif
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

int kvf__auto_threads(void)
{
    int t = kvf__cores() / 4;
    return t < 1 ? 1 : t > 8 ? 8 : t;
}
