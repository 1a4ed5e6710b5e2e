/*
 * kvf-sched's instance table (docs/scheduler.md, "HTTP API"): registrations, which may not take
 * over an id registered with other fields; heartbeats (a repeated registration or a load report);
 * expiry of the instances not heard from within --instance-ttl; and removal, which takes an
 * instance out of the core (its slot, its holdings in the index) and ends its subscriptions. The
 * events thread's loop lives here too: it expires instances between its rounds of events.
 *
 * Until callers are authenticated this is what keeps an anonymous caller from redirecting a
 * registered engine's requests to another endpoint, and from keeping the table full for good.
 */
#include "daemon.h"

#include "kvf/error.h"

#include "clock.h"

#include <stdio.h>
#include <string.h>

/* The first field in which b, registered with replay endpoint rb, differs from a, registered
 * with ra; its two values in va and vb. NULL when none does. */
static const char *first_difference(const kvf_instance_info *a, const char *ra,
                                    const kvf_instance_info *b, const char *rb, char *va, char *vb,
                                    size_t n)
{
    static const char *const roles[] = {"?", "prefill", "decode", "both"};
#define DIFF_STR(name, x, y)                    \
    do {                                        \
        if (strcmp((x), (y)) != 0) {            \
            snprintf(va, n, "\"%.150s\"", (x)); \
            snprintf(vb, n, "\"%.150s\"", (y)); \
            return name;                        \
        }                                       \
    } while (0)
    DIFF_STR("role", roles[a->role & 3], roles[b->role & 3]);
    DIFF_STR("endpoint", a->endpoint, b->endpoint);
    DIFF_STR("events", a->events, b->events);
    DIFF_STR("replay", ra, rb);
    DIFF_STR("capabilities", a->capabilities, b->capabilities);
    DIFF_STR("host", a->host, b->host);
    DIFF_STR("zone", a->zone, b->zone);
#undef DIFF_STR
    if (a->block_tokens != b->block_tokens) {
        snprintf(va, n, "%u", a->block_tokens);
        snprintf(vb, n, "%u", b->block_tokens);
        return "block_tokens";
    }
    if (a->capacity_blocks != b->capacity_blocks) {
        snprintf(va, n, "%llu", (unsigned long long)a->capacity_blocks);
        snprintf(vb, n, "%llu", (unsigned long long)b->capacity_blocks);
        return "capacity_blocks";
    }
    return NULL;
}

/* Says so where in publishes its events in other shards than this replica holds. */
static void shard_check(kvf__sched_daemon *d, const kvf_instance_info *in, uint32_t event_shards)
{
    uint32_t mine = d->shards > 1 ? d->shards : 1;
    if (event_shards && in->events[0] && event_shards != mine)
        kvf_warn(&d->lg,
                 "instance %s publishes its events in %u shard%s and this replica %s: none of "
                 "its blocks reach this index; give the engines --event-shards %u, or run the "
                 "replicas with --shard K/%u",
                 in->id, event_shards, event_shards == 1 ? "" : "s",
                 mine == 1 ? "holds the whole index" : "holds one shard of a split index", mine,
                 event_shards);
}

int kvf__sched_register_locked(kvf__sched_daemon *d, const kvf_instance_info *in,
                               const char *replay, uint32_t event_shards, int pinned, int *idx,
                               int *fresh, char *err, size_t errlen)
{
    *fresh = 0;
    int i = kvf_sched_instance_find(d->s, in->id);
    if (i >= 0) {
        char va[200], vb[200];
        const char *f = first_difference(kvf_sched_instance_get(d->s, i), d->reg[i].replay, in,
                                         replay, va, vb, sizeof va);
        if (f) {
            snprintf(err, errlen, "\"%s\" is registered with %s %s, not %s", in->id, f, va, vb);
            return KVF_EEXIST;
        }
        d->reg[i].seen_ns = kvf__now_ns();
        if (event_shards && event_shards != d->reg[i].event_shards) {
            d->reg[i].event_shards = event_shards; /* restarted with other --event-shards */
            shard_check(d, in, event_shards);
        }
        *idx = i;
        return 0;
    }
    /* an instance whose events could not be read would be placed on as if it held nothing */
    if (in->events[0] && kvf__sched_subscriptions_locked(d) + d->n_pending >= KVF_SCHED_MAX_SUBS) {
        snprintf(err, errlen,
                 "kvf-sched reads the events of %d publishers (instances and storage nodes) at "
                 "most, and has that many",
                 KVF_SCHED_MAX_SUBS);
        return KVF_E2BIG;
    }
    int rc = kvf_sched_instance_add(d->s, in, &i);
    if (rc)
        return rc;
    d->reg[i] =
        (kvf__sched_reg){.seen_ns = kvf__now_ns(), .pinned = pinned, .event_shards = event_shards};
    snprintf(d->reg[i].replay, sizeof d->reg[i].replay, "%s", replay);
    shard_check(d, in, event_shards);
    kvf_event_source src = {.instance = i, .store = -1};
    kvf__sched_subscribe_locked(d, &src, in->events, replay);
    *idx = i;
    *fresh = 1;
    return 0;
}

void kvf__sched_seen_locked(kvf__sched_daemon *d, int idx)
{
    d->reg[idx].seen_ns = kvf__now_ns();
}

int kvf__sched_remove_locked(kvf__sched_daemon *d, int idx)
{
    int rc = kvf_sched_instance_remove(d->s, idx);
    if (rc)
        return rc;
    kvf__sched_unsubscribe_locked(d, idx);
    kvf__sched_sent_forget_locked(d, idx);
    memset(&d->reg[idx], 0, sizeof d->reg[idx]);
    return 0;
}

void kvf__sched_expire_locked(kvf__sched_daemon *d)
{
    if (!d->ttl_ns)
        return;
    uint64_t now = kvf__now_ns();
    for (size_t i = 0; i < kvf_sched_instance_slots(d->s); i++) {
        const kvf_instance_info *in = kvf_sched_instance_get(d->s, (int)i);
        if (!in || d->reg[i].pinned || now - d->reg[i].seen_ns < d->ttl_ns)
            continue;
        kvf_warn(&d->lg, "instance %s expired: no load report or registration for %.1f s", in->id,
                 (double)(now - d->reg[i].seen_ns) / 1e9);
        kvf__sched_remove_locked(d, (int)i);
        d->expired++;
    }
}

void *kvf__sched_events_main(void *arg)
{
    kvf__sched_daemon *d = arg;
    while (!atomic_load(&d->stop)) {
        pthread_mutex_lock(&d->mu);
        kvf__sched_expire_locked(d);
        pthread_mutex_unlock(&d->mu);
        kvf__sched_events_round(d);
    }
    return NULL;
}
