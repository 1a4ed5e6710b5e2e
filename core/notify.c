/*
 * Readiness and liveness for a service manager (notify.h).
 */
#include "notify.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#ifdef KVF_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>

static pthread_t dog;
static int dog_running;
static atomic_int dog_stop;
static uint64_t dog_usec;

/* Pings at half the watchdog interval until stopped; a daemon whose loops hang stops answering
 * requests, not this thread: the ping says the process lives, its readiness was said once. */
static void *dog_main(void *arg)
{
    (void)arg;
    uint64_t step = dog_usec / 2;
    while (!atomic_load(&dog_stop)) {
        sd_notify(0, "WATCHDOG=1");
        struct timespec ts = {.tv_sec = (time_t)(step / 1000000),
                              .tv_nsec = (long)(step % 1000000) * 1000};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

void kvf__notify_ready(const kvf_log *lg, const char *status)
{
    if (!getenv("NOTIFY_SOCKET"))
        return;
    int rc = status ? sd_notifyf(0, "READY=1\nSTATUS=%s", status) : sd_notify(0, "READY=1");
    if (rc < 0)
        kvf_warn(lg, "sd_notify READY=1 failed (%d)", rc);
    uint64_t usec = 0;
    if (sd_watchdog_enabled(0, &usec) > 0 && usec >= 2000 && !dog_running) {
        dog_usec = usec;
        atomic_store(&dog_stop, 0);
        dog_running = pthread_create(&dog, NULL, dog_main, NULL) == 0;
        if (dog_running)
            kvf_info(lg, "watchdog: pinging every %.1f s", (double)usec / 2e6);
    }
}

void kvf__notify_stopping(void)
{
    if (!getenv("NOTIFY_SOCKET"))
        return;
    sd_notify(0, "STOPPING=1");
    if (dog_running) {
        atomic_store(&dog_stop, 1);
        pthread_join(dog, NULL);
        dog_running = 0;
    }
}

#else

void kvf__notify_ready(const kvf_log *lg, const char *status)
{
    (void)status;
    if (getenv("NOTIFY_SOCKET"))
        kvf_warn(lg, "a service manager waits for READY=1 (Type=notify), but this build has no "
                     "libsystemd: use Type=simple, or build with libsystemd-dev installed");
}

void kvf__notify_stopping(void)
{
}

#endif
