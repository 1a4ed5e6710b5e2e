/* The host's cores, the "auto" thread counts, and threads that leave signals to the main
 * thread (cpus.h). */
#define _GNU_SOURCE
#include "cpus.h"

#include <sched.h>
#include <signal.h>
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

int kvf__thread_start(pthread_t *t, void *(*fn)(void *), void *arg)
{
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(t, NULL, fn, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return rc;
}
