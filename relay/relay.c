/*
 * kvf-relay's loop (relay.h): the engine's batches checked against its numbering (a late join,
 * a gap and a restart handled as kvf-sched handles them, through the engine's replay socket),
 * decoded, and each event published again by the relay's sharded publisher, which puts it under
 * the topic of its sequence's shard and numbers each shard on its own. Batches the replay socket
 * cannot give back are lost for good: what the engine holds may then differ from what was said,
 * so the relay publishes AllBlocksCleared in every shard and the replicas learn the engine again
 * from what follows (kvf-sched's full resync); so does a restart of the engine's numbering.
 */
#include "relay.h"

#include "kvf/error.h"

#include "clock.h"
#include "ingest.h"
#include "kvevents.h"
#include "pubsub.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* As kvf-sched's events thread (scheduler/subscriber.c): a replay ends after REPLAY_SILENCE_MS
 * without an answer or REPLAY_DEADLINE_MS in all; a replay socket that did not answer is put in
 * back-off (kvf_replay_back_off). */
#define REPLAY_SILENCE_MS  200
#define REPLAY_DEADLINE_MS 2000
#define HALF               ((uint64_t)1 << 63)

struct kvf__relay {
    kvf_log *lg;
    kvf__zsubs *zs;
    int idx, has_replay;
    kvf__kve_decoder *dec;
    kvf_events *out;
    char from[160];
    kvf_seq_tracker seq;
    kvf_contact contact; /* the first contact with the engine's replay socket */
    uint64_t replay_down_until_ns;
    unsigned backoff_ms;
    kvf_replay_debt debt;     /* what a replay still owes: asked again when the back-off ends */
    kvf_replay_credit credit; /* the replays' share of the relay's thread (ingest.h) */
    int warned_sharded;
    kvf__log_quiet bad; /* warnings of malformed batches: at most one a second */
    pthread_mutex_t mu; /* st, read by the HTTP threads */
    kvf__relay_stats st;
};

static void count(kvf__relay *r, uint64_t *field, uint64_t n)
{
    pthread_mutex_lock(&r->mu);
    *field = *field > UINT64_MAX - n ? UINT64_MAX : *field + n;
    pthread_mutex_unlock(&r->mu);
}

/* Publishes one decoded event again. 0, or KVF_EPROTO for an event that does not add up. */
static int relay_event(kvf__relay *r, const kvf_kve *ev)
{
    const char *medium = ev->host_tier ? "CPU" : "GPU";
    int rc;
    switch (ev->type) {
    case KVF_KVE_BLOCK_STORED:
        /* the publisher reads n_hashes * block_size ids: the event must hold exactly that many */
        if (!ev->block_size || !ev->n_hashes || ev->n_hashes > SIZE_MAX / ev->block_size ||
            ev->n_tokens != ev->n_hashes * ev->block_size)
            return KVF_EPROTO;
        rc = kvf_events_publish(r->out, NULL, 0, ev->hashes, ev->n_hashes, ev->has_parent,
                                ev->parent, ev->tokens, ev->block_size, medium);
        if (!rc)
            count(r, &r->st.stored, ev->n_hashes);
        break;
    case KVF_KVE_BLOCK_REMOVED:
        rc = kvf_events_publish(r->out, ev->hashes, ev->n_hashes, NULL, 0, 0, 0, NULL, 0, medium);
        if (!rc)
            count(r, &r->st.removed, ev->n_hashes);
        break;
    case KVF_KVE_ALL_CLEARED:
        rc = kvf_events_clear(r->out, 1);
        if (!rc)
            count(r, &r->st.cleared, 1);
        break;
    default:
        count(r, &r->st.skipped, 1);
        return 0;
    }
    if (rc) {
        count(r, &r->st.publish_errors, 1);
        kvf_warn(r->lg, "publishing an event of %s again: %s", r->from, kvf_strerror(rc));
    }
    return 0;
}

/* Decodes one of the engine's batches and publishes its events again. A malformed batch is
 * warned of at most once a second (an engine that sends nothing else would fill the log); every
 * one is counted in the stats. */
static void relay_batch(kvf__relay *r, const void *payload, size_t len)
{
    uint64_t unsaid = 0;
    char err[256] = "";
    const kvf_kve *ev = NULL;
    size_t n = 0;
    uint64_t malformed = 0;
    count(r, &r->st.batches, 1);
    if (kvf__kve_decode_batch(r->dec, payload, len, &ev, &n, &malformed, err, sizeof err) != 0) {
        count(r, &r->st.malformed, 1);
        if (kvf__log_due(&r->bad, kvf__now_ns(), &unsaid))
            kvf_warn(r->lg,
                     "events from %s: %s (%" PRIu64 " malformed batch(es) not told since "
                     "the last warning)",
                     r->from, err[0] ? err : "not a batch", unsaid);
        return;
    }
    for (size_t i = 0; i < n; i++)
        if (relay_event(r, &ev[i]) == KVF_EPROTO) {
            malformed++;
            snprintf(err, sizeof err, "BlockStored: its token ids are not its blocks' ids");
        }
    if (malformed) {
        count(r, &r->st.malformed, malformed);
        if (kvf__log_due(&r->bad, kvf__now_ns(), &unsaid))
            kvf_warn(r->lg,
                     "events from %s: %" PRIu64 " malformed event(s) skipped: %s (%" PRIu64
                     " malformed batch(es) not told since the last warning)",
                     r->from, malformed, err, unsaid);
    }
}

/* What the replicas learnt of the engine may no longer be what it holds (batches lost, or it
 * restarted): every replica drops the engine's blocks and learns them again from what follows.
 * forget: the engine holds nothing any more (it restarted); else it still holds blocks that it
 * will not announce again, whose continuations must still go to their sequences' shards. */
static void clear_all(kvf__relay *r, int forget, const char *why)
{
    int rc = kvf_events_clear(r->out, forget);
    count(r, rc ? &r->st.publish_errors : &r->st.cleared, 1);
    kvf_warn(r->lg, "events from %s: %s; AllBlocksCleared published in every shard%s%s", r->from,
             why, rc ? ": " : "", rc ? kvf_strerror(rc) : "");
}

/* The replay socket gave no answer: left alone for a while, longer each time in a row. */
static void back_off(kvf__relay *r)
{
    r->replay_down_until_ns = kvf_replay_back_off(&r->backoff_ms, kvf__now_ns());
}

/* Charges a replay that started at t0 to the engine's budget (kvf_replay_charge): one that
 * answers slowly, or opens a gap every moment, does not take the thread from the live stream. */
static void charge(kvf__relay *r, uint64_t t0)
{
    uint64_t until = kvf_replay_charge(&r->credit, t0, kvf__now_ns());
    if (until > r->replay_down_until_ns)
        r->replay_down_until_ns = until;
}

/* Asks the engine's replay socket for batches from..upto-1 and relays them in order (vLLM's
 * replay protocol, as kvf-sched asks it: the request is the first number wanted; the answers
 * are (sequence, payload); an empty payload ends them). Bounded by answers, silence and a
 * deadline; a socket that never answered is put in back-off. */
static void replay(kvf__relay *r, uint64_t from, uint64_t upto, int cleared, const atomic_int *stop)
{
    uint64_t want = upto - from, got = 0, lost = 0;
    kvf_replay_walk walk;
    kvf_replay_walk_init(&walk, from, upto, cleared);
    int answered = 0, ended = 0;
    kvf__zmsg m;
    kvf_replay_drain(r->zs, r->idx);
    uint64_t t0 = kvf__now_ns();
    int rc = kvf__zsubs_replay_ask(r->zs, r->idx, from);
    uint64_t deadline = t0 + (uint64_t)REPLAY_DEADLINE_MS * 1000000u;
    for (uint64_t guard = 0;
         rc == 0 && guard < want + 16 && !atomic_load(stop) && kvf__now_ns() < deadline; guard++) {
        if ((rc = kvf__zsubs_replay_recv(r->zs, r->idx, REPLAY_SILENCE_MS, &m)) != 0)
            break;
        answered = 1;
        if (m.frames < 3 || m.len == 0 || m.seq_len != 8) {
            ended = kvf_replay_is_end(&m);
            break; /* the end */
        }
        unsigned step = kvf_replay_walk_step(&walk, kvf__kve_seq_get(m.seq), &lost);
        if (step & KVF_REPLAY_HOLE) {
            clear_all(r, 0,
                      step & KVF_REPLAY_PAST
                          ? "batches were lost (the replay window starts after them)"
                          : "batches were lost (the replay window skips them)");
            count(r, &r->st.lost, 1);
        }
        if (step & KVF_REPLAY_APPLY) {
            relay_batch(r, m.payload, m.len);
            count(r, &r->st.replayed, 1); /* as relayed: a replica may see it before the end */
            got++;
        }
        if (step & KVF_REPLAY_DONE)
            break;
    }
    if (atomic_load(stop))
        return; /* cut short by a stop: nothing is known lost, nothing cleared */
    /* a replay that did not come to its end: its late answers are not the next request's */
    kvf_replay_settle(r->zs, r->idx, answered, ended, REPLAY_SILENCE_MS, deadline);
    if (answered) {
        /* answers that stopped without the end marker: the rest is owed (as kvf-sched's
         * replay()); a window that ended before them is a loss, not a debt */
        uint64_t rest = 0;
        int rest_cleared = 0, cut = !ended && kvf_replay_walk_cut(&walk, &rest, &rest_cleared);
        r->debt.owed = 0;
        if (cut) {
            kvf_replay_owe(&r->debt, rest, rest_cleared);
        } else if (kvf_replay_walk_short(&walk, &lost)) {
            clear_all(r, 0, "batches were lost (the replay ended before them)");
            count(r, &r->st.lost, 1);
        }
        if (cut && !got)
            back_off(r); /* no progress: not asked again at once */
        else
            r->backoff_ms = 0;
        charge(r, t0);
        kvf_info(r->lg, "events from %s: replayed %" PRIu64 " of %" PRIu64 " batch(es)%s", r->from,
                 got, want, cut ? "; the answers stopped before the rest, asked for next" : "");
        return;
    }
    kvf_replay_owe(&r->debt, from, cleared);
    back_off(r);
    count(r, &r->st.replay_timeouts, 1);
    kvf_warn(r->lg,
             "events from %s: the replay socket %s; batches from %" PRIu64 " asked again in %u ms",
             r->from, rc == 0 || rc == KVF_ETIMEDOUT ? "did not answer" : kvf_strerror(rc),
             r->debt.from, r->backoff_ms);
}

/* Asks for the batches from..upto-1, and for what an earlier replay still owes with them (one
 * replay from the earlier start: the batches relayed live since are relayed again after the
 * owed ones, in the engine's order). cleared: as replay()'s. */
static void replay_owed_too(kvf__relay *r, uint64_t from, uint64_t upto, int cleared,
                            const atomic_int *stop)
{
    if (r->debt.owed) {
        kvf_replay_owe(&r->debt, from, cleared);
        from = r->debt.from;
        cleared = r->debt.cleared;
    }
    replay(r, from, upto, cleared, stop);
}

static int contact_relay(void *ud, const kvf__zmsg *m)
{
    kvf__relay *r = ud;
    relay_batch(r, m->payload, m->len);
    count(r, &r->st.replayed, 1);
    return 0;
}

/* A hole in the first contact's answers: what was relayed before it may be stale. */
static void contact_hole(void *ud, uint64_t lost)
{
    kvf__relay *r = ud;
    (void)lost;
    clear_all(r, 0, "batches were lost (the first contact's answers skip them)");
    count(r, &r->st.lost, 1);
}

/* First contact with the engine's replay socket, as soon as the relay subscribes (kvf-sched does
 * the same, scheduler/contact.c): what the engine published before the relay existed is relayed
 * at once, not when the engine next publishes (it may be idle). */
static void first_contact(kvf__relay *r, const atomic_int *stop)
{
    uint64_t t0 = kvf__now_ns();
    long got = kvf_contact_run(&r->contact, r->zs, r->idx, &r->seq, contact_relay, contact_hole, r,
                               REPLAY_SILENCE_MS, REPLAY_DEADLINE_MS, stop);
    if (got == KVF_CONTACT_NOT_YET)
        return;
    if (got == KVF_CONTACT_NO_ANSWER) {
        back_off(r);
        count(r, &r->st.replay_timeouts, 1);
        kvf_warn(r->lg,
                 "events from %s: the replay socket did not answer the first contact; asked "
                 "again in %u ms",
                 r->from, r->backoff_ms);
        return;
    }
    r->backoff_ms = 0;
    charge(r, t0);
    pthread_mutex_lock(&r->mu);
    r->st.last_seq = r->seq.last;
    pthread_mutex_unlock(&r->mu);
    if (got > 0) {
        count(r, &r->st.late_joins, 1);
        kvf_info(r->lg,
                 "events from %s: first contact: %ld batch(es) published before the relay, up "
                 "to %" PRIu64 ", from the replay socket",
                 r->from, got, r->seq.last);
    }
    if (r->contact.first_lost) {
        count(r, &r->st.lost, 1);
        kvf_warn(r->lg,
                 "events from %s: the replay window starts at batch %" PRIu64
                 ": the blocks stored by those before it stay unknown until stored again",
                 r->from, r->contact.first_lost);
    }
}

/* One live batch: its number checked (what came before it asked for where it is missing), then
 * relayed. */
static void on_batch(kvf__relay *r, const kvf__zmsg *m, const atomic_int *stop)
{
    if (m->frames < 2 || m->seq_len != 8) {
        count(r, &r->st.malformed, 1);
        return;
    }
    size_t stl = sizeof KVF_EVENTS_SHARD_TOPIC - 1;
    if (m->topic && m->topic_len >= stl && !memcmp(m->topic, KVF_EVENTS_SHARD_TOPIC, stl)) {
        /* already sharded (a kvfabric engine run with --event-shards): each shard numbered on its
         * own, so no one stream; such an engine needs no relay */
        count(r, &r->st.sharded_upstream, 1);
        if (!r->warned_sharded)
            kvf_warn(r->lg,
                     "events from %s are sharded already: dropped; point the replicas at "
                     "the engine itself",
                     r->from);
        r->warned_sharded = 1;
        return;
    }
    if (kvf_contact_stale(&r->contact, kvf__kve_seq_get(m->seq), kvf__now_ns()))
        return; /* relayed by the first contact already */
    uint64_t last = r->seq.last, missed = r->seq.missed, from = 0;
    int first = !r->seq.seen;
    int v = kvf_seq_check(&r->seq, m->seq, &from);
    uint64_t now = kvf__now_ns();
    int can_ask = r->has_replay && now >= r->replay_down_until_ns;
    pthread_mutex_lock(&r->mu);
    r->st.last_seq = r->seq.last;
    pthread_mutex_unlock(&r->mu);
    if (first && r->seq.last >= 2 && r->has_replay) {
        /* a late join: the engine published before the relay subscribed (the first contact
         * was not answered, or came after this batch was queued) */
        count(r, &r->st.late_joins, 1);
        kvf_info(r->lg,
                 "events from %s: the first batch seen is %" PRIu64
                 "; the replay socket %s for those before it",
                 r->from, r->seq.last,
                 can_ask ? "asked" : "is held off after a timeout: asked when that ends");
        if (can_ask)
            replay(r, 0, r->seq.last, 0, stop);
        else
            kvf_replay_owe(&r->debt, 0, 0);
    } else if (v == KVF_SEQ_RESTART) {
        count(r, &r->st.restarts, 1);
        /* backwards: the engine started again, with nothing cached; far ahead: numbering lost */
        int again = r->seq.last - last >= HALF;
        clear_all(r, again,
                  again ? "the engine's numbering started again"
                        : "the engine's numbering jumped "
                          "far ahead");
        if (again)
            r->debt.owed = 0; /* what the earlier life owed is gone with its blocks */
        /* what it published since it started again: asked now, or when the back-off ends */
        if (again && r->seq.last >= 2 && can_ask)
            replay(r, 0, r->seq.last, 1, stop);
        else if (again && r->seq.last >= 2 && r->has_replay)
            kvf_replay_owe(&r->debt, 0, 1);
    } else if (v == KVF_SEQ_GAP) {
        count(r, &r->st.gaps, 1);
        count(r, &r->st.missed, r->seq.missed - missed);
        kvf_warn(r->lg, "events from %s: batches %" PRIu64 "..%" PRIu64 " missed; %s", r->from,
                 from, r->seq.last - 1,
                 can_ask         ? "asking the replay socket"
                 : r->has_replay ? "the replay socket is held off after a timeout: asked when "
                                   "that ends"
                                 : "no replay socket: the replicas may miss blocks until they are "
                                   "stored again");
        /* without a replay socket, as kvf-sched does: what was said stays (a block missed is
         * learnt when stored again), rather than every block of the engine dropped */
        if (can_ask)
            replay_owed_too(r, from, r->seq.last, 0, stop);
        else if (r->has_replay)
            kvf_replay_owe(&r->debt, from, 0);
    }
    relay_batch(r, m->payload, m->len);
}

int kvf__relay_open(kvf__relay **out, const kvf__relay_opts *o, kvf_log *lg, char *err,
                    size_t errlen)
{
    kvf__relay *r = calloc(1, sizeof *r);
    *out = r;
    if (!r) {
        snprintf(err, errlen, "out of memory");
        return KVF_ENOMEM;
    }
    pthread_mutex_init(&r->mu, NULL);
    r->lg = lg;
    r->idx = -1;
    snprintf(r->from, sizeof r->from, "%s", o->from);
    int rc = kvf_events_open(&r->out, &o->out, err, errlen);
    if (!rc && (kvf__zsubs_open(&r->zs) != 0 || kvf__kve_decoder_new(&r->dec) != 0)) {
        snprintf(err, errlen, "out of memory");
        rc = KVF_ENOMEM;
    }
    if (!rc) {
        err[0] = '\0';
        rc = kvf__zsubs_add(r->zs, o->from, o->from_replay, &r->idx, err, errlen);
        if (!rc && err[0])
            kvf_warn(lg, "%s", err); /* the replay socket is left out */
        r->has_replay = !rc && kvf__zsubs_has_replay(r->zs, r->idx);
    }
    /* The relay's stream starts clean: a replica that followed an earlier relay of this engine
     * (this one restarted) drops what it learnt there; what the engine holds is relayed anew
     * (the late join). The replicas see the new numbering and ask for it from its start. */
    if (!rc && (rc = kvf_events_clear(r->out, 1)) != 0)
        snprintf(err, errlen, "publishing the first AllBlocksCleared: %s", kvf_strerror(rc));
    else if (!rc)
        r->st.cleared++;
    return rc;
}

void kvf__relay_round(kvf__relay *r, const atomic_int *stop)
{
    if (r->has_replay && !r->contact.done && !r->seq.seen &&
        kvf__now_ns() >= r->replay_down_until_ns)
        first_contact(r, stop);
    /* what a replay owes, asked again through the last batch relayed (kvf_replay_debt) */
    if (r->debt.owed && r->seq.seen && kvf__now_ns() >= r->replay_down_until_ns) {
        count(r, &r->st.replay_retries, 1);
        replay(r, r->debt.from, r->seq.last + 1, r->debt.cleared, stop);
    }
    uint8_t ready[KVF_ZSUBS_MAX];
    if (kvf__zsubs_poll(r->zs, 100, ready) <= 0 || !ready[r->idx])
        return;
    kvf__zmsg m;
    /* a bounded burst, so that a stop is seen soon under any rate */
    for (int i = 0; i < 1024 && !atomic_load(stop) && kvf__zsubs_recv(r->zs, r->idx, &m) == 0; i++)
        on_batch(r, &m, stop);
}

void kvf__relay_stats_get(kvf__relay *r, kvf__relay_stats *st)
{
    pthread_mutex_lock(&r->mu);
    *st = r->st;
    pthread_mutex_unlock(&r->mu);
}

uint64_t kvf__relay_published(kvf__relay *r)
{
    return kvf_events_sequence(r->out);
}

uint64_t kvf__relay_unknown_parents(kvf__relay *r)
{
    return kvf_events_unknown_parents(r->out);
}

const char *kvf__relay_endpoint(const kvf__relay *r)
{
    return kvf_events_endpoint(r->out);
}

const char *kvf__relay_replay_endpoint(const kvf__relay *r)
{
    return kvf_events_replay_endpoint(r->out);
}

void kvf__relay_close(kvf__relay **p)
{
    kvf__relay *r = p ? *p : NULL;
    if (!r)
        return;
    kvf__zsubs_close(&r->zs);
    kvf__kve_decoder_free(&r->dec);
    kvf_events_close(&r->out);
    pthread_mutex_destroy(&r->mu);
    free(r);
    *p = NULL;
}
