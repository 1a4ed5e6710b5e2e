/*
 * What the files of the scheduler core share (docs/scheduler.md). Not a public interface: the
 * daemon, the engine, the replay and the tests use scheduler.h.
 */
#ifndef KVF_SCHED_INT_H
#define KVF_SCHED_INT_H

#include <stddef.h>
#include <stdint.h>

#include "scheduler.h"

/* ------------------------------------------------------------------------------------------ */
/* The cost model's estimates (cost.c), in seconds. */

/* Prefill of an n-token prompt whose first `cached` tokens need no compute: the uncached tokens
 * at the linear rate plus the quadratic attention term over them. */
double kvf__sched_prefill_s(const kvf_sched_cost *c, double n, double cached);
/* Expected wait behind an instance's queue: its cache-aware estimate when it reported one, else
 * its raw queued tokens at the prefill rate (an upper bound: cache hits only shorten it). */
double kvf__sched_queue_s(const kvf_sched_cost *c, const kvf_instance_load *load);
/* Loading `tokens` tokens of KV from the stores. */
double kvf__sched_load_s(const kvf_sched_cost *c, double tokens);
/* Handing `tokens` tokens of KV from the prefill instance to the decode instance. */
double kvf__sched_handoff_s(const kvf_sched_cost *c, double tokens);

#endif
