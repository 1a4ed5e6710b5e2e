/*
 * First contact with a publisher's replay socket (ingest.h; docs/scheduler.md, "Late join"):
 * kvf-sched and kvf-relay ask a new publisher's replay socket for everything its window holds as
 * soon as they subscribe, before any live batch, so that an engine that published before they
 * existed and is idle now is known at once, not at its next batch. Live batches that the replay
 * gave already (queued while it ran) are skipped after it.
 */
#include "ingest.h"

#include "kvf/error.h"

#include "clock.h"
#include "kvevents.h"
#include "pubsub.h"

/* Live batches numbered at or below the replay's last are skipped for this long from the first
 * live batch read after the replay (not from the replay's end: a round of first contacts with
 * many publishers may take longer than this before the live streams are read again): a stale
 * batch comes among the first ones read or never; a publisher that restarts meanwhile is found
 * by its first batch after the window (a number that went backwards). */
#define CONTACT_SKIP_MS 2000

#define HALF ((uint64_t)1 << 63)

int kvf_replay_is_end(const kvf__zmsg *m)
{
    return m->frames >= 3 && m->seq_len == 8 && m->len == 0;
}

void kvf_replay_drain(kvf__zsubs *zs, int idx)
{
    kvf__zmsg m;
    for (int guard = 0; guard < 4096 && kvf__zsubs_replay_recv(zs, idx, 0, &m) == 0; guard++)
        ;
}

uint64_t kvf_replay_back_off(unsigned *ms, uint64_t now_ns)
{
    *ms = *ms ? 2 * *ms : KVF_REPLAY_BACKOFF_MIN_MS;
    if (*ms > KVF_REPLAY_BACKOFF_MAX_MS)
        *ms = KVF_REPLAY_BACKOFF_MAX_MS;
    return now_ns + (uint64_t)*ms * 1000000u;
}

void kvf_replay_settle(kvf__zsubs *zs, int idx, int answered, int ended, int silence_ms,
                       uint64_t deadline_ns)
{
    kvf__zmsg m;
    for (uint32_t guard = 0;
         answered && !ended && guard < (1u << 16) && kvf__now_ns() < deadline_ns; guard++) {
        if (kvf__zsubs_replay_recv(zs, idx, silence_ms, &m) != 0)
            break;
        if (kvf_replay_is_end(&m))
            ended = 1;
        else if (m.frames < 3 || m.seq_len != 8)
            break; /* not an answer: what follows is not known either */
    }
    if (!ended)
        kvf__zsubs_replay_reset(zs, idx);
}

long kvf_contact_run(kvf_contact *c, kvf__zsubs *zs, int idx, kvf_seq_tracker *t,
                     kvf_contact_apply_fn apply, kvf_contact_hole_fn hole, void *ud, int silence_ms,
                     int deadline_ms, const atomic_int *stop)
{
    kvf__zmsg m;
    kvf_replay_drain(zs, idx);
    int rc = kvf__zsubs_replay_ask(zs, idx, 0);
    if (rc == KVF_EAGAIN)
        return KVF_CONTACT_NOT_YET; /* the socket has no peer yet: asked again next round */
    if (rc)
        return KVF_CONTACT_NO_ANSWER;
    long applied = 0;
    int answered = 0, ended = 0;
    uint64_t deadline = kvf__now_ns() + (uint64_t)deadline_ms * 1000000u;
    for (uint64_t guard = 0;
         guard < ((uint64_t)1 << 24) && !(stop && atomic_load(stop)) && kvf__now_ns() < deadline;
         guard++) {
        if (kvf__zsubs_replay_recv(zs, idx, silence_ms, &m) != 0)
            break;
        answered = 1;
        if (m.frames < 3 || m.seq_len != 8 || m.len == 0) {
            ended = kvf_replay_is_end(&m);
            break; /* the end marker (an empty payload), or not an answer */
        }
        uint64_t seq = kvf__kve_seq_get(m.seq);
        /* in order only: a repeat or an older answer changes nothing already applied */
        if (t->seen && (seq == t->last || seq - t->last >= HALF))
            continue;
        /* a hole (answers dropped on the way: a ROUTER's queue was full): what was applied before
         * it may be stale */
        if (t->seen && seq != t->last + 1 && hole)
            hole(ud, t->last + 1);
        if (!t->seen && seq >= 2) /* publishers count from 0 or 1: those before are gone */
            c->first_lost = seq;
        t->seen = 1;
        t->last = seq;
        if (apply(ud, &m) != 0)
            break; /* the publisher was removed meanwhile */
        applied++;
    }
    if (!(stop && atomic_load(stop)))
        kvf_replay_settle(zs, idx, answered, ended, silence_ms, deadline);
    if (!answered)
        return KVF_CONTACT_NO_ANSWER;
    c->done = 1;
    if (applied) {
        c->have = 1;
        c->upto = t->last;
        c->skip_until_ns = 0; /* the window starts at the first live batch read */
    }
    return applied;
}

int kvf_contact_stale(kvf_contact *c, uint64_t seq, uint64_t now_ns)
{
    if (!c->have)
        return 0;
    if (!c->skip_until_ns)
        c->skip_until_ns = now_ns + (uint64_t)CONTACT_SKIP_MS * 1000000u;
    if (now_ns >= c->skip_until_ns || seq - c->upto - 1 < HALF) {
        c->have = 0; /* past the window, or the stream has gone beyond the replay */
        return 0;
    }
    return 1;
}
