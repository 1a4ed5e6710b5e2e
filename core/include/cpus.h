/*
 * The cores this process may run on, and the thread counts derived from them ("auto") for the
 * store's event loops, the client's I/O engines and the connector's workers (docs/store.md,
 * "Threads: auto").
 */
#ifndef KVF_CORE_CPUS_H
#define KVF_CORE_CPUS_H

#include <pthread.h>

/* The CPUs in this process's affinity mask (what a container or taskset grants), or the online
 * count where the mask cannot be read; at least 1. */
int kvf__cores(void);

/* A thread count for work that scales with cores: a quarter of them, at least 1 and at most 8.
 * Measured (docs/benchmarks.md): on 2 cores one store loop and one client I/O thread are fastest
 * (each thread more competes for the same two cores); on 16, four of each moved 15 GB/s of 16 MiB
 * GETs where one moved 3.6, while eight gained less than the CPU they took. */
int kvf__auto_threads(void);

/* pthread_create with every signal blocked in the new thread: a daemon's signals reach its main
 * thread only, whose handler then never runs beside the shutdown it starts (a handler on a helper
 * thread could write to a wake pipe the main thread is closing). */
int kvf__thread_start(pthread_t *t, void *(*fn)(void *), void *arg);

#endif
