/*
 * Clocks. Timeouts, leases and latencies use the monotonic clock. Code whose behaviour depends on
 * time (lease expiry, deadlines) takes a kvf_clock so that tests can drive a fake one.
 */
#ifndef KVF_CORE_CLOCK_H
#define KVF_CORE_CLOCK_H

#include <pthread.h>
#include <stdint.h>

/* Nanoseconds on CLOCK_MONOTONIC. */
uint64_t kvf__now_ns(void);

static inline uint64_t kvf__now_us(void)
{
    return kvf__now_ns() / 1000u;
}

typedef struct kvf_clock {
    uint64_t (*now_ns)(void *ud); /* monotonic nanoseconds */
    void *ud;
} kvf_clock;

/* The real monotonic clock. Borrowed; static. */
const kvf_clock *kvf__clock_monotonic(void);

static inline uint64_t kvf__clock_now(const kvf_clock *c)
{
    return c ? c->now_ns(c->ud) : kvf__now_ns();
}

/* A settable clock for tests: now_ns returns *(uint64_t *)ud. */
uint64_t kvf__clock_fake_now(void *ud);

/* Waits on cv (mu held) for at most ms milliseconds of the realtime clock pthread uses. */
void kvf__cond_wait_ms(pthread_cond_t *cv, pthread_mutex_t *mu, int ms);

#endif
