#include "clock.h"

#include <time.h>

uint64_t kvf__now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t mono_now(void *ud)
{
    (void)ud;
    return kvf__now_ns();
}

static const kvf_clock mono_clock = {.now_ns = mono_now, .ud = 0};

const kvf_clock *kvf__clock_monotonic(void)
{
    return &mono_clock;
}

uint64_t kvf__clock_fake_now(void *ud)
{
    return *(const uint64_t *)ud;
}

void kvf__cond_wait_ms(pthread_cond_t *cv, pthread_mutex_t *mu, int ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_cond_timedwait(cv, mu, &ts);
}
