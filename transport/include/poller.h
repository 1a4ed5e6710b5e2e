/*
 * One readiness poller behind an ops table, with epoll (Linux), kqueue (macOS and the BSDs,
 * compiled only there) and poll (everywhere) back-ends. Level-triggered: an event is reported on
 * every wait while its condition holds. A poller is used by one thread.
 */
#ifndef KVF_TRANSPORT_POLLER_H
#define KVF_TRANSPORT_POLLER_H

#include <stdint.h>

#define KVF_POLL_IN  0x1u
#define KVF_POLL_OUT 0x2u
#define KVF_POLL_ERR 0x4u /* error or hang-up; reported whether asked for or not */

typedef struct kvf_poll_event {
    void *ud;
    uint32_t events;
} kvf_poll_event;

typedef struct kvf_poller kvf_poller;

/* Opens a poller of the named back-end ("epoll", "kqueue", "poll") or, with NULL, the best one this
 * platform has. Returns 0, KVF_ENOTSUP for a back-end not built here, or KVF_ENOMEM/KVF_E* from the
 * system. Caller owns the result; free with kvf__poller_close(). */
int kvf__poller_open(kvf_poller **out, const char *backend);
/* Accepts NULL and clears *p. */
void kvf__poller_close(kvf_poller **p);
const char *kvf__poller_name(const kvf_poller *p);

/* Watches fd for events (KVF_POLL_IN | KVF_POLL_OUT), reporting ud with each event. */
int kvf__poller_add(kvf_poller *p, int fd, uint32_t events, void *ud);
int kvf__poller_mod(kvf_poller *p, int fd, uint32_t events, void *ud);
int kvf__poller_del(kvf_poller *p, int fd);
/* Waits up to timeout_ms (-1: forever) and fills up to max events. Returns their number (0 on
 * timeout or a signal) or a negative KVF_E* code. */
int kvf__poller_wait(kvf_poller *p, kvf_poll_event *evs, int max, int timeout_ms);

#endif
