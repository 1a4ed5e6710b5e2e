/*
 * kvf-sched's events thread (docs/scheduler.md, "KV events"): one ZeroMQ SUB socket per engine
 * instance or storage node that publishes KV events, each batch applied to the index through
 * ingest.c under the daemon's lock, gaps in a publisher's sequence numbers detected and, where
 * the publisher has a replay socket, filled from it before the batch that revealed them. The
 * thread never waits on the network with the lock held: a replay request and its answers happen
 * outside it, so placements never wait behind a replay socket that does not answer.
 * Subscriptions are asked for by the HTTP thread (or startup) and made here, on the thread that
 * owns the sockets.
 */
#include "daemon.h"

#include "kvf/error.h"
#include "kvf/events.h"

#include "clock.h"
#include "kvevents.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

void kvf__sched_subscribe_locked(kvf__sched_daemon *d, const kvf_event_source *src, const char *ep,
                                 const char *replay)
{
    if (!ep[0] || d->n_pending == KVF_SCHED_MAX_SUBS)
        return;
    d->pending_src[d->n_pending] = *src;
    snprintf(d->pending_ep[d->n_pending], sizeof d->pending_ep[0], "%s", ep);
    snprintf(d->pending_replay[d->n_pending], sizeof d->pending_replay[0], "%s",
             replay ? replay : "");
    d->n_pending++;
}

/* Ends the subscriptions, made or pending, of instance slot `instance`, or (instance -1) of
 * storage node `store`. */
static void unsubscribe_where(kvf__sched_daemon *d, int instance, int store)
{
    for (int i = 0; i < d->n_subs; i++)
        if (d->subs[i].used && d->subs[i].src.instance == instance &&
            (instance >= 0 || d->subs[i].src.store == store))
            d->subs[i].dead = 1;
    int k = 0;
    for (int i = 0; i < d->n_pending; i++) {
        const kvf_event_source *p = &d->pending_src[i];
        if (p->instance == instance && (instance >= 0 || p->store == store))
            continue;
        if (k != i) {
            d->pending_src[k] = d->pending_src[i];
            memcpy(d->pending_ep[k], d->pending_ep[i], sizeof d->pending_ep[k]);
            memcpy(d->pending_replay[k], d->pending_replay[i], sizeof d->pending_replay[k]);
        }
        k++;
    }
    d->n_pending = k;
}

void kvf__sched_unsubscribe_locked(kvf__sched_daemon *d, int idx)
{
    unsubscribe_where(d, idx, -1);
}

void kvf__sched_unsubscribe_store_locked(kvf__sched_daemon *d, int node)
{
    unsubscribe_where(d, -1, node);
}

int kvf__sched_subscriptions_locked(const kvf__sched_daemon *d)
{
    int n = 0;
    for (int i = 0; i < d->n_subs; i++)
        n += d->subs[i].used && !d->subs[i].dead;
    return n;
}

static uint64_t add_sat(uint64_t a, uint64_t b)
{
    return a > UINT64_MAX - b ? UINT64_MAX : a + b;
}

/* A replay ends after REPLAY_SILENCE_MS without an answer or REPLAY_DEADLINE_MS in all; a replay
 * socket that does not answer is put in back-off (kvf_replay_back_off). It is not cut at its
 * round's end: cut in parts, a replay that applies history again (from a late join's 0, a
 * relay's window that begins with its AllBlocksCleared) left the index rolled back between two
 * rounds, with removals and stores applied since missing (seen in loaded sanitizer runs). */
#define REPLAY_SILENCE_MS  200
#define REPLAY_DEADLINE_MS 2000

/* The time a round of the events thread spends asking snapshots, first contacts and owed replays
 * before it reads the live streams again (it may run over by the one asked last). */
#define ROUND_ASKS_MS 100

/* Charges a replay of sb's that started at t0 to its budget (kvf_replay_charge). */
static void charge_replay(kvf__sched_sub *sb, uint64_t t0)
{
    uint64_t until = kvf_replay_charge(&sb->credit, t0, kvf__now_ns());
    if (until > sb->replay_down_until_ns)
        sb->replay_down_until_ns = until;
}

/* Puts a source's replay socket in back-off after a request that was not answered whole. */
static void back_off(kvf__sched_sub *sb)
{
    sb->replay_down_until_ns = kvf_replay_back_off(&sb->replay_backoff_ms, kvf__now_ns());
}

/* Logs a warning about a batch of sb's (below). */
static void warn_batch(kvf__sched_daemon *d, kvf__sched_sub *sb, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Batches of a gap are lost for good (the replay window does not reach back to them, the replay
 * skipped some or ended early): what the index holds of this source may be stale (a removal
 * among the lost). A full resync: the engine's blocks are dropped, and what the replay still
 * brings and the live stream build them again. Without d->mu. */
static void resync(kvf__sched_daemon *d, kvf__sched_sub *sb, uint64_t first_lost, const char *why)
{
    pthread_mutex_lock(&d->mu);
    int engine = !sb->dead && sb->src.instance >= 0;
    if (engine)
        kvf_sched_all_cleared(d->s, sb->src.instance);
    d->resyncs = add_sat(d->resyncs, 1);
    pthread_mutex_unlock(&d->mu);
    /* once a second at most, on a limiter of its own (a gap's warning just before must not hide
     * it), with the count of those not told */
    uint64_t quiet;
    if (!kvf__log_due(&sb->warned_resync, kvf__now_ns(), &quiet))
        return;
    char more[64] = "";
    if (quiet)
        snprintf(more, sizeof more, " (and %" PRIu64 " more resyncs since the last)", quiet);
    kvf_warn(&d->lg, "events from %s: batches from %" PRIu64 " are lost (%s)%s%s", sb->endpoint,
             first_lost, why,
             engine ? "; the engine's blocks are dropped from the index and learnt again"
                    : "; the store's chunks are learnt again as they are stored or evicted",
             more);
}

/* Applies one replayed batch m of publisher i, taking the lock for it (counted in
 * batches_replayed). Returns -1 when its instance was removed while the lock was free (nothing
 * applied), else 0. Called on the events thread without d->mu. */
static int apply_replayed(kvf__sched_daemon *d, int i, const kvf__zmsg *m)
{
    kvf__sched_sub *sb = &d->subs[i];
    char err[256] = "";
    const kvf_kve *ev = NULL;
    size_t n = 0;
    uint64_t malformed = 0;
    int drc =
        kvf__kve_decode_batch(d->dec, m->payload, m->len, &ev, &n, &malformed, err, sizeof err);
    pthread_mutex_lock(&d->mu);
    int dead = sb->dead;
    if (!dead) {
        if (drc == 0)
            kvf_sched_apply(d->s, &sb->src, ev, n, malformed, &d->ingest, err, sizeof err);
        else
            d->ingest.malformed++;
        d->replayed++;
    }
    pthread_mutex_unlock(&d->mu);
    return dead ? -1 : 0;
}

/* Asks a publisher's replay socket for the batches from `from` on and applies those before
 * `upto` (the batch that revealed the gap, applied by the caller afterwards). vLLM's replay
 * protocol: the request is the 8-byte big-endian first sequence number; each answer is
 * (sequence, payload), and an empty payload ends the replay. Bounded: silence or the deadline
 * ends it too, and a socket that gave no answer is put in back-off. Sequence numbers are
 * compared modulo 2^64, as kvf_seq_check() does.
 *
 * Called on the events thread WITHOUT d->mu: it waits on the network, and the HTTP thread must
 * not wait behind it. It takes the lock only to apply each replayed batch and to count. */
static void replay(kvf__sched_daemon *d, int i, uint64_t from, uint64_t upto, int cleared)
{
    kvf__sched_sub *sb = &d->subs[i];
    uint64_t want = upto - from, got = 0, lost = 0;
    kvf_replay_walk walk;
    kvf_replay_walk_init(&walk, from, upto, cleared);
    kvf__zmsg m;
    kvf_replay_drain(d->zs, i);
    sb->debt_unasked = 0;
    uint64_t t0 = kvf__now_ns();
    int rc = kvf__zsubs_replay_ask(d->zs, i, from), answered = 0, ended = 0;
    uint64_t deadline = t0 + (uint64_t)REPLAY_DEADLINE_MS * 1000000u;
    for (uint64_t guard = 0;
         rc == 0 && guard < want + 16 && !atomic_load(&d->stop) && kvf__now_ns() < deadline;
         guard++) {
        if ((rc = kvf__zsubs_replay_recv(d->zs, i, REPLAY_SILENCE_MS, &m)) != 0)
            break;
        answered = 1;
        if (m.frames < 3 || m.len == 0 || m.seq_len != 8) {
            ended = kvf_replay_is_end(&m);
            break;
        }
        unsigned step = kvf_replay_walk_step(&walk, kvf__kve_seq_get(m.seq), &lost);
        if (step & KVF_REPLAY_HOLE)
            resync(d, sb, lost,
                   step & KVF_REPLAY_PAST ? "the replay window starts after them"
                                          : "the replay window skips them");
        if (step & KVF_REPLAY_APPLY) {
            if (apply_replayed(d, i, &m) != 0) {
                kvf__zsubs_replay_reset(d->zs, i);
                return; /* its instance was removed while the lock was free */
            }
            got++;
        }
        if (step & KVF_REPLAY_DONE)
            break; /* reached the batch in hand, or past it */
    }
    if (!atomic_load(&d->stop))
        kvf_replay_settle(d->zs, i, answered, ended, REPLAY_SILENCE_MS, deadline);
    if (answered) {
        /* Answers that stopped without the end marker (silence, the deadline) came from a slow
         * publisher, not from a window without the rest: the rest is owed (asked at the next
         * round, taken in order after what was applied), not a resync, which would drop blocks
         * that are still true. A window that ended before them is a resync, not a debt. */
        uint64_t rest = 0;
        int rest_cleared = 0;
        int cut =
            !ended && !atomic_load(&d->stop) && kvf_replay_walk_cut(&walk, &rest, &rest_cleared);
        sb->debt.owed = 0;
        if (cut)
            kvf_replay_owe(&sb->debt, rest, rest_cleared);
        else if (!atomic_load(&d->stop) && kvf_replay_walk_short(&walk, &lost))
            resync(d, sb, lost, "the replay ended before them");
        if (cut && !got)
            back_off(sb); /* no progress: not asked again at once */
        else
            sb->replay_backoff_ms = 0;
        charge_replay(sb, t0);
        kvf_info(&d->lg, "events from %s: replayed %" PRIu64 " of %" PRIu64 " missed batches%s",
                 sb->endpoint, got, want,
                 cut ? "; the answers stopped before the rest, asked for next" : "");
        return;
    }
    if (atomic_load(&d->stop))
        return;
    kvf_replay_owe(&sb->debt, from, cleared);
    back_off(sb);
    pthread_mutex_lock(&d->mu);
    d->replay_timeouts++;
    pthread_mutex_unlock(&d->mu);
    kvf_warn(&d->lg,
             "events from %s: the replay socket %s %s; batches from %" PRIu64
             " asked again in %u ms",
             sb->endpoint, sb->replay_ep,
             rc == 0 || rc == KVF_ETIMEDOUT ? "did not answer" : kvf_strerror(rc), sb->debt.from,
             sb->replay_backoff_ms);
}

/* A snapshot ends after SNAPSHOT_SILENCE_MS without an answer, SNAPSHOT_DEADLINE_MS in all or
 * SNAPSHOT_MAX_BATCHES batches (4,096 chunks each: 2^32 chunks). */
#define SNAPSHOT_SILENCE_MS  3000
#define SNAPSHOT_DEADLINE_MS 60000
#define SNAPSHOT_MAX_BATCHES (1u << 20)
#define SNAPSHOT_SLICE_MS    10 /* read a round at most */

/* A storage node's snapshot: its snapshot socket asked for everything the node holds now, and
 * the index made to say exactly that: the node's holdings are dropped at the first answer, then
 * each batch (its ChunksAdmitted, by tier) applied. It is read a slice a round (snapshot_step(),
 * SNAPSHOT_SLICE_MS), so a node that answers slowly holds no other publisher's batches back; the
 * node's own stream is left queued meanwhile (the poll leaves it out) and applied over the snapshot
 * after it (its events set a chunk's state, in order: the state they end in is the node's). A
 * snapshot that ends without its end marker (SNAPSHOT_SILENCE_MS of silence, the deadline, the node
 * gone) leaves what arrived, puts the socket in back-off and is asked again; placements meanwhile
 * see part of the node. Called on the events thread without d->mu, as replay(). */

/* Ends storage node i's snapshot: ended (its end marker came), or not (rc: why). */
static void snapshot_end(kvf__sched_daemon *d, int i, int ended, int rc)
{
    kvf__sched_sub *sb = &d->subs[i];
    sb->snap_active = 0;
    pthread_mutex_lock(&d->mu);
    int dead = sb->dead;
    if (ended && !dead) {
        if (!sb->snap_cleared) /* the node holds nothing */
            kvf_sched_store_cleared(d->s, sb->src.store);
        d->snapshots = add_sat(d->snapshots, 1);
    } else if (!dead) {
        d->snapshot_failures = add_sat(d->snapshot_failures, 1);
    }
    uint64_t chunks = sb->snap_chunks;
    pthread_mutex_unlock(&d->mu);
    if (dead)
        return;
    if (ended) {
        sb->snapped = 1;
        sb->replay_backoff_ms = 0;
        kvf_info(&d->lg,
                 "events from %s: a snapshot of %" PRIu64 " chunk(s) in %" PRIu64
                 " batch(es) from %s",
                 sb->endpoint, chunks, sb->snap_batches, sb->replay_ep);
        return;
    }
    kvf__zsubs_replay_reset(d->zs, i); /* its late answers are not the next snapshot's */
    back_off(sb);
    kvf_warn(&d->lg,
             "events from %s: the snapshot socket %s %s after %" PRIu64
             " batch(es); asked again in %u ms",
             sb->endpoint, sb->replay_ep,
             rc == 0 || rc == KVF_ETIMEDOUT ? "did not finish" : kvf_strerror(rc), sb->snap_batches,
             sb->replay_backoff_ms);
}

/* Asks storage node i's snapshot socket for a snapshot (read by snapshot_step()). */
static void snapshot_start(kvf__sched_daemon *d, int i)
{
    kvf__sched_sub *sb = &d->subs[i];
    kvf_replay_drain(d->zs, i);
    uint64_t now = kvf__now_ns();
    sb->snapped = 0; /* until this one ends: one that fails is asked again after the back-off */
    sb->snap_active = 1;
    sb->snap_cleared = 0;
    sb->snap_batches = sb->snap_chunks = 0;
    sb->snap_heard_ns = now;
    sb->snap_deadline_ns = now + (uint64_t)SNAPSHOT_DEADLINE_MS * 1000000u;
    int rc = kvf__zsubs_replay_ask(d->zs, i, 0);
    if (rc)
        snapshot_end(d, i, 0, rc);
}

/* Reads what storage node i's snapshot socket has sent, until `until` (once at least), and ends
 * the snapshot at its end marker, its silence or its deadline. */
static void snapshot_step(kvf__sched_daemon *d, int i, uint64_t until)
{
    kvf__sched_sub *sb = &d->subs[i];
    for (uint64_t guard = 0; sb->snap_active && guard < SNAPSHOT_MAX_BATCHES; guard++) {
        uint64_t now = kvf__now_ns();
        if (atomic_load(&d->stop) || (guard && now >= until))
            return;
        if (sb->snap_batches >= SNAPSHOT_MAX_BATCHES || now >= sb->snap_deadline_ns) {
            snapshot_end(d, i, 0, KVF_ETIMEDOUT);
            return;
        }
        kvf__zmsg m;
        int rc = kvf__zsubs_replay_recv(d->zs, i, 0, &m);
        if (rc == KVF_ETIMEDOUT) {
            if (now - sb->snap_heard_ns >= (uint64_t)SNAPSHOT_SILENCE_MS * 1000000u)
                snapshot_end(d, i, 0, rc);
            return; /* the next round's */
        }
        if (rc != 0 || m.frames < 3 || m.seq_len != 8) {
            snapshot_end(d, i, 0, rc);
            return;
        }
        sb->snap_heard_ns = now;
        if (m.len == 0) {
            sb->snap_seq = kvf__kve_seq_get(m.seq);
            snapshot_end(d, i, 1, 0);
            return;
        }
        char err[256] = "";
        const kvf_kve *ev = NULL;
        size_t n = 0;
        uint64_t malformed = 0;
        int drc =
            kvf__kve_decode_batch(d->dec, m.payload, m.len, &ev, &n, &malformed, err, sizeof err);
        pthread_mutex_lock(&d->mu);
        if (sb->dead) {
            pthread_mutex_unlock(&d->mu);
            sb->snap_active = 0;
            return;
        }
        if (!sb->snap_cleared) {
            kvf_sched_store_cleared(d->s, sb->src.store);
            sb->snap_cleared = 1;
        }
        uint64_t chunks0 = d->ingest.chunks;
        if (drc == 0)
            drc = kvf_sched_apply(d->s, &sb->src, ev, n, malformed, &d->ingest, err, sizeof err);
        sb->snap_chunks += d->ingest.chunks - chunks0;
        if (drc)
            d->ingest.malformed++;
        pthread_mutex_unlock(&d->mu);
        if (drc)
            kvf_warn(&d->lg, "snapshot of %s: %s", sb->endpoint, err[0] ? err : kvf_strerror(drc));
        sb->snap_batches++;
    }
}

/* One batch of an engine's first contact, applied as replay() applies its answers. */
typedef struct contact_ctx {
    kvf__sched_daemon *d;
    int i;
} contact_ctx;

static int contact_apply(void *ud, const kvf__zmsg *m)
{
    contact_ctx *x = ud;
    return apply_replayed(x->d, x->i, m);
}

static void contact_hole(void *ud, uint64_t lost)
{
    contact_ctx *x = ud;
    resync(x->d, &x->d->subs[x->i], lost, "the first contact's answers skip them");
}

/* First contact with engine i's replay socket, made as soon as it is subscribed to: what the
 * engine published before (kvf-sched restarted, or the engine registered after warming up, and
 * is idle now) is applied at once, not at its next batch. Called on the events thread without
 * d->mu, as replay(). */
static void first_contact(kvf__sched_daemon *d, int i)
{
    kvf__sched_sub *sb = &d->subs[i];
    contact_ctx x = {d, i};
    uint64_t t0 = kvf__now_ns();
    long got = kvf_contact_run(&sb->contact, d->zs, i, &sb->seq, contact_apply, contact_hole, &x,
                               REPLAY_SILENCE_MS, REPLAY_DEADLINE_MS, &d->stop);
    if (got == KVF_CONTACT_NOT_YET)
        return;
    if (got == KVF_CONTACT_NO_ANSWER) {
        back_off(sb);
        pthread_mutex_lock(&d->mu);
        d->replay_timeouts++;
        pthread_mutex_unlock(&d->mu);
        kvf_warn(&d->lg,
                 "events from %s: the replay socket %s did not answer the first contact; "
                 "asked again in %u ms",
                 sb->endpoint, sb->replay_ep, sb->replay_backoff_ms);
        return;
    }
    sb->replay_backoff_ms = 0;
    charge_replay(sb, t0);
    if (got > 0) {
        pthread_mutex_lock(&d->mu);
        d->late_joins = add_sat(d->late_joins, 1);
        pthread_mutex_unlock(&d->mu);
        kvf_info(&d->lg,
                 "events from %s: first contact: %ld batch(es) published before this "
                 "subscription, up to %" PRIu64 ", from the replay socket",
                 sb->endpoint, got, sb->seq.last);
    }
    if (sb->contact.first_lost)
        kvf_warn(&d->lg,
                 "events from %s: the replay window starts at batch %" PRIu64
                 ": the blocks stored by those before it stay unknown until stored again",
                 sb->endpoint, sb->contact.first_lost);
}

/* Closes the subscriptions that were ended, then makes those the HTTP thread asked for, in the
 * numbers freed first. Called with d->mu held. */
static void subscribe_pending_locked(kvf__sched_daemon *d)
{
    for (int i = 0; i < d->n_subs; i++) {
        if (d->subs[i].used && d->subs[i].dead) {
            kvf_info(&d->lg, "events: unsubscribed from %s", d->subs[i].endpoint);
            kvf__zsubs_drop(d->zs, i);
            memset(&d->subs[i], 0, sizeof d->subs[i]);
        }
    }
    while (d->n_subs > 0 && !d->subs[d->n_subs - 1].used)
        d->n_subs--;
    for (int i = 0; i < d->n_pending; i++) {
        char err[256] = "", topic[64] = "";
        int idx;
        /* A shard's replica takes its shard's topic of every engine (a store's chunks are in
         * every shard). */
        if (d->shards > 1 && d->pending_src[i].instance >= 0)
            snprintf(topic, sizeof topic, "%s%u/", KVF_EVENTS_SHARD_TOPIC, d->shard);
        if (kvf__zsubs_add_topic(d->zs, d->pending_ep[i], d->pending_replay[i], topic, &idx, err,
                                 sizeof err) != 0) {
            kvf_warn(&d->lg, "%s", err);
            continue;
        }
        if (err[0])
            kvf_warn(&d->lg, "%s", err);
        kvf__sched_sub *sb = &d->subs[idx];
        memset(sb, 0, sizeof *sb);
        sb->src = d->pending_src[i];
        sb->used = 1;
        snprintf(sb->endpoint, sizeof sb->endpoint, "%s", d->pending_ep[i]);
        snprintf(sb->replay_ep, sizeof sb->replay_ep, "%s", d->pending_replay[i]);
        sb->snapshots = sb->src.store >= 0 && sb->src.instance < 0 && sb->replay_ep[0];
        if (idx >= d->n_subs)
            d->n_subs = idx + 1;
        kvf_info(&d->lg, "events: subscribed to %s%s%s", sb->endpoint, topic[0] ? ", topic " : "",
                 topic);
    }
    d->n_pending = 0;
}

/* Logs a warning about a batch of sb's (printf-style), unless one was logged less than a second
 * ago: then it is only counted (nothing formatted), and the count said with the next. */
static void warn_batch(kvf__sched_daemon *d, kvf__sched_sub *sb, const char *fmt, ...)
{
    uint64_t quiet;
    if (!kvf__log_due(&sb->warned, kvf__now_ns(), &quiet))
        return;
    char what[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    if (quiet)
        kvf_warn(&d->lg, "events from %s: %s (and %" PRIu64 " more warnings since the last)",
                 sb->endpoint, what, quiet);
    else
        kvf_warn(&d->lg, "events from %s: %s", sb->endpoint, what);
}

/* Checks the sequence number of one batch from publisher i ([topic,] sequence (8 bytes
 * big-endian), payload) and counts what it reveals. Returns -1 for a malformed batch (counted,
 * to be dropped), 1 when the batch revealed a gap that the replay socket should be asked for
 * (*from and *upto: the missing numbers, upto excluded), 2 the same after the publisher's
 * blocks were dropped (it restarted), else 0. Called with d->mu held. */
static int check_batch_locked(kvf__sched_daemon *d, int i, const kvf__zmsg *m, int spent,
                              uint64_t *from, uint64_t *upto)
{
    kvf__sched_sub *sb = &d->subs[i];
    if (sb->dead)
        return -1; /* its instance was removed: nothing of it is applied */
    if (m->frames < 2 || m->seq_len != 8) {
        d->ingest.malformed++;
        warn_batch(d, sb, "%d frames, expected topic, sequence, payload", m->frames);
        return -1;
    }
    size_t stl = sizeof KVF_EVENTS_SHARD_TOPIC - 1;
    if (d->shards < 2 && m->topic && m->topic_len >= stl &&
        !memcmp(m->topic, KVF_EVENTS_SHARD_TOPIC, stl)) {
        /* Each shard's batches are numbered on their own: interleaved, they are no one stream. */
        d->sharded_dropped = add_sat(d->sharded_dropped, 1);
        if (!sb->warned_sharded)
            kvf_warn(&d->lg,
                     "events from %s are sharded (kvf_events_opts.shards) and this replica holds "
                     "the whole index: they are dropped; run a replica per shard with --shard K/N",
                     sb->endpoint);
        sb->warned_sharded = 1;
        return -1;
    }
    if (!sb->snapshots && kvf_contact_stale(&sb->contact, kvf__kve_seq_get(m->seq), kvf__now_ns()))
        return -1; /* applied by the first contact already */
    uint64_t missed = sb->seq.missed, last = sb->seq.last;
    int first = !sb->seq.seen;
    int v = kvf_seq_check(&sb->seq, m->seq, from);
    if (sb->snapshots) {
        /* A storage node: a first contact not yet covered by a snapshot, or a gap, asks for
         * one (the stream applied over it from this batch on). */
        int lost = v == KVF_SEQ_GAP || v == KVF_SEQ_RESTART;
        if (lost) {
            d->seq_gaps = add_sat(d->seq_gaps, v == KVF_SEQ_GAP);
            d->seq_missed = add_sat(d->seq_missed, sb->seq.missed - missed);
            d->seq_restarts = add_sat(d->seq_restarts, v == KVF_SEQ_RESTART);
        }
        /* the first batch seen: numbered 2 or more with no snapshot yet (a late join), or past
         * the one after the snapshot (batches sent before this subscription connected) */
        uint64_t past = sb->seq.last - sb->snap_seq;
        int late =
            first && (sb->snapped ? past > 1 && past < ((uint64_t)1 << 63) : sb->seq.last >= 2);
        if (late && !sb->snapped)
            d->late_joins = add_sat(d->late_joins, 1);
        if (late || lost) {
            if (kvf__now_ns() < sb->replay_down_until_ns)
                return 0;
            kvf_info(&d->lg, "events from %s: batch %" PRIu64 " %s; asking for a snapshot",
                     sb->endpoint, sb->seq.last, lost ? "follows a gap" : "is the first seen");
            return 1;
        }
        return 0;
    }
    if (first) {
        /* A late join: the publisher was publishing before this subscription (kvf-sched
         * restarted, the engine registered after warming up). What came before is asked for
         * from the start, where there is a replay socket; its window decides how much. */
        int replay = kvf__zsubs_has_replay(d->zs, i);
        if (sb->seq.last < 2 || !replay)
            return 0; /* 1 is the first batch of publishers that count from 1 (kvfabric's) */
        d->late_joins = add_sat(d->late_joins, 1);
        if (kvf__now_ns() < sb->replay_down_until_ns) {
            kvf_replay_owe(&sb->debt, 0, 0); /* asked when the back-off ends */
            return 0;
        }
        *from = 0;
        *upto = sb->seq.last;
        kvf_info(&d->lg,
                 "events from %s: the first batch seen is %" PRIu64
                 "; %s the replay socket for those before it",
                 sb->endpoint, sb->seq.last,
                 spent ? "owed to a later round (this one's asking time is spent), asking"
                       : "asking");
        return 1;
    }
    if (v == KVF_SEQ_RESTART) {
        d->seq_restarts = add_sat(d->seq_restarts, 1);
        /* Backwards: the publisher started again (an engine restarted, with nothing cached; a
         * relay restarted). What the index holds of it is from before: dropped, and what the new
         * stream published before this batch asked of the replay socket, as at a late join. A
         * jump far ahead is only counted. */
        int again = sb->seq.last - last >= ((uint64_t)1 << 63) && sb->src.instance >= 0;
        int replay = again && sb->seq.last >= 2 && kvf__zsubs_has_replay(d->zs, i);
        if (again) {
            kvf_sched_all_cleared(d->s, sb->src.instance);
            d->resyncs = add_sat(d->resyncs, 1);
            sb->debt.owed = 0; /* what the earlier life owed is gone with its blocks */
            sb->debt_unasked = 0;
        }
        if (replay && kvf__now_ns() < sb->replay_down_until_ns) {
            kvf_replay_owe(&sb->debt, 0, 1); /* the new life's: asked when the back-off ends */
            replay = 0;
        }
        kvf_warn(&d->lg,
                 "events from %s: sequence number %" PRIu64 " after %" PRIu64
                 ", taken for a %s publisher%s",
                 sb->endpoint, sb->seq.last, last, again ? "restarted" : "renumbered",
                 !again             ? "; nothing asked for"
                 : replay && !spent ? "; its blocks dropped, the batches before this one asked for"
                 : replay || sb->debt.owed
                     ? "; its blocks dropped, the batches before this one owed"
                     : "; its blocks dropped");
        if (!replay)
            return 0;
        *from = 0;
        *upto = sb->seq.last;
        return 2; /* cleared already */
    }
    if (v != KVF_SEQ_GAP)
        return 0;
    *upto = sb->seq.last;
    d->seq_gaps = add_sat(d->seq_gaps, 1);
    d->seq_missed = add_sat(d->seq_missed, sb->seq.missed - missed);
    int replay = kvf__zsubs_has_replay(d->zs, i);
    int down = replay && kvf__now_ns() < sb->replay_down_until_ns;
    warn_batch(d, sb, "sequence gap, batches %" PRIu64 "..%" PRIu64 " missed%s", *from, *upto - 1,
               !replay ? "; no replay socket, the index may miss blocks until they are stored again"
               : down  ? "; the replay socket is held off (a timeout, or its replays' time spent): "
                         "asked when that ends"
               : spent ? "; owed to a later round (this round's asking time is spent)"
                       : "; asking the replay socket");
    if (down)
        kvf_replay_owe(&sb->debt, *from, 0);
    return replay && !down;
}

/* Applies the next slice of one batch of publisher i (*cur: where it is), checked by
 * check_batch_locked() and decoded (drc: the decode's result; ev, n and malformed what it gave;
 * err its reason). Called with d->mu held: only this part, the index's, holds the lock that
 * placements wait for. A batch that does not decode, or whose publisher was removed meanwhile,
 * is done at once. */
static void apply_slice_locked(kvf__sched_daemon *d, int i, int drc, const kvf_kve *ev, size_t n,
                               uint64_t malformed, kvf_apply_cursor *cur, char *err, size_t errlen)
{
    kvf__sched_sub *sb = &d->subs[i];
    if (sb->dead) {
        cur->event = n;
        return;
    }
    uint64_t before = d->ingest.malformed;
    int rc = drc ? drc
                 : kvf_sched_apply_some(d->s, &sb->src, ev, n, malformed, cur,
                                        KVF_SCHED_APPLY_SLICE, &d->ingest, err, errlen);
    if (rc) {
        d->ingest.malformed++;
        cur->event = n;
    }
    if (rc || d->ingest.malformed != before)
        warn_batch(d, sb, "%s", err[0] ? err : kvf_strerror(rc));
}

/* One batch from publisher i: a gap in its sequence is filled from the replay socket first, with
 * the lock released while the replay socket is asked (see replay()), then the batch is decoded,
 * still without the lock, and applied with it. m stays valid throughout: replay answers are
 * received into a slot of their own. */
static void on_batch(kvf__sched_daemon *d, int i, const kvf__zmsg *m)
{
    uint64_t from = 0, upto = 0;
    int spent = kvf__now_ns() >= d->round_until_ns; /* this round's asking time */
    pthread_mutex_lock(&d->mu);
    int ask = check_batch_locked(d, i, m, spent, &from, &upto);
    pthread_mutex_unlock(&d->mu);
    if (ask < 0)
        return;
    if (ask && d->subs[i].snapshots) {
        snapshot_start(d, i); /* read from the next round on; this batch applied now, under it */
    } else if (ask && spent) {
        /* The round's asking time is spent (other sockets' snapshots, contacts or replays, this
         * round's gaps before this one): the gap is owed, asked in a later round's turn, and
         * this batch applied now; the replay then applies it again after the gap, in order. */
        kvf__sched_sub *sb = &d->subs[i];
        sb->debt_unasked = !sb->debt.owed || sb->debt_unasked;
        kvf_replay_owe(&sb->debt, from, ask == 2);
        pthread_mutex_lock(&d->mu);
        d->asks_deferred = add_sat(d->asks_deferred, 1);
        pthread_mutex_unlock(&d->mu);
    } else if (ask) {
        kvf__sched_sub *sb = &d->subs[i];
        if (sb->debt.owed) { /* one replay for what was owed too, from the earlier start */
            kvf_replay_owe(&sb->debt, from, ask == 2);
            from = sb->debt.from;
            ask = sb->debt.cleared ? 2 : 1;
        }
        replay(d, i, from, upto, ask == 2);
    }
    char err[256] = "";
    const kvf_kve *ev = NULL;
    size_t n = 0;
    uint64_t malformed = 0;
    int drc =
        kvf__kve_decode_batch(d->dec, m->payload, m->len, &ev, &n, &malformed, err, sizeof err);
    /* Applied a slice at a time, the lock released between slices: a placement waits for one
     * slice, not for a whole batch (64 blocks of vLLM's, 4,096 keys of a store's). */
    kvf_apply_cursor cur = {0, 0};
    do {
        pthread_mutex_lock(&d->mu);
        apply_slice_locked(d, i, drc, ev, n, malformed, &cur, err, sizeof err);
        pthread_mutex_unlock(&d->mu);
    } while (!drc && cur.event < n);
}

void kvf__sched_events_round(kvf__sched_daemon *d)
{
    uint8_t ready[KVF_SCHED_MAX_SUBS];
    pthread_mutex_lock(&d->mu);
    subscribe_pending_locked(d);
    int n = d->n_subs;
    pthread_mutex_unlock(&d->mu);
    if (n == 0) {
        usleep(50000);
        return;
    }
    /* Storage nodes not yet learnt whole (just subscribed, or a snapshot that failed): asked
     * now, so that an idle node's holdings are known without waiting for its next change. */
    /* Engines not yet contacted: their replay sockets asked for what they published before. */
    uint8_t learn[KVF_SCHED_MAX_SUBS] = {0}, contact[KVF_SCHED_MAX_SUBS] = {0},
            owed[KVF_SCHED_MAX_SUBS] = {0}, snapping[KVF_SCHED_MAX_SUBS] = {0};
    uint64_t now = kvf__now_ns();
    pthread_mutex_lock(&d->mu);
    for (int i = 0; i < n; i++) {
        const kvf__sched_sub *sb = &d->subs[i];
        int live = sb->used && !sb->dead && now >= sb->replay_down_until_ns;
        learn[i] = live && sb->snapshots && !sb->snapped && !sb->snap_active;
        snapping[i] = sb->used && !sb->dead && sb->snap_active;
        /* (not an engine whose record says its events are sharded, on a replica that holds the
         * whole index: a replay answer carries no topic, and its live batches are dropped) */
        contact[i] = live && !sb->snapshots && sb->src.instance >= 0 && !sb->contact.done &&
                     !sb->seq.seen && kvf__zsubs_has_replay(d->zs, i) &&
                     (d->shards > 1 || d->reg[sb->src.instance].event_shards <= 1);
        /* what a replay owes, asked again up to the last batch applied (see owe()) */
        owed[i] = live && !sb->snapshots && sb->debt.owed && sb->seq.seen &&
                  kvf__zsubs_has_replay(d->zs, i);
    }
    pthread_mutex_unlock(&d->mu);
    /* Asked one at a time, each waiting on its socket, so a round asks for ROUND_ASKS_MS at
     * most before the live streams are read again (a socket that never answers costs its 200 ms
     * of silence; forty of them at once held every engine's batches back 8 s), from where the
     * last round stopped, so that every socket has its turn. */
    uint64_t until = now + (uint64_t)ROUND_ASKS_MS * 1000000u;
    d->round_until_ns = until; /* the gaps of the batches read below share it (on_batch) */
    int from = d->asks_from < n ? d->asks_from : 0, asked = 0, deferred = 0;
    d->asks_from = 0;
    for (int k = 0; k < n; k++) {
        int i = (from + k) % n;
        kvf__sched_sub *sb = &d->subs[i];
        if (!learn[i] && !contact[i] && !owed[i] && !snapping[i])
            continue;
        if (asked && kvf__now_ns() >= until) {
            d->asks_from = i; /* this one and those after it: next round */
            deferred = 1;
            uint64_t left = 0;
            for (int j = k; j < n; j++) {
                int q = (from + j) % n;
                left += learn[q] || contact[q] || owed[q] || snapping[q];
            }
            pthread_mutex_lock(&d->mu);
            d->asks_deferred = add_sat(d->asks_deferred, left);
            pthread_mutex_unlock(&d->mu);
            break;
        }
        asked = 1;
        if (learn[i])
            snapshot_start(d, i);
        if (learn[i] || snapping[i]) /* a short slice: the live streams are read a batch each
                                      * a round meanwhile */
            snapshot_step(d, i, kvf__now_ns() + (uint64_t)SNAPSHOT_SLICE_MS * 1000000u);
        else if (contact[i])
            first_contact(d, i);
        else {
            /* (a gap owed for a round's time was never asked: its first ask is no retry) */
            pthread_mutex_lock(&d->mu);
            d->replays_owed_retried = add_sat(d->replays_owed_retried, !sb->debt_unasked);
            pthread_mutex_unlock(&d->mu);
            replay(d, i, sb->debt.from, sb->seq.last + 1, sb->debt.cleared);
        }
    }
    /* a storage node's stream waits while its snapshot is read; its answers wake the poll */
    for (int i = 0; i < n; i++) /* (dead is the HTTP thread's to write: not read here) */
        snapping[i] = d->subs[i].used && d->subs[i].snap_active;
    /* what the asks left of the round's asking time goes to the gaps of the batches read now
     * (the poll's own wait is not asking time) */
    uint64_t asked_ns = kvf__now_ns() - now;
    if (kvf__zsubs_poll_held(d->zs, deferred ? 0 : 100, snapping, ready) <= 0)
        return;
    uint64_t round_ns = (uint64_t)ROUND_ASKS_MS * 1000000u;
    d->round_until_ns = kvf__now_ns() + (asked_ns < round_ns ? round_ns - asked_ns : 0);
    for (int i = 0; i < n; i++) {
        kvf__zmsg m;
        if (!ready[i] || kvf__zsubs_recv(d->zs, i, &m) != 0)
            continue;
        on_batch(d, i, &m);
    }
}
