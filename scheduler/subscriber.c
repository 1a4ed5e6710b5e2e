/*
 * kvf-sched's events thread (docs/scheduler.md, "KV events"): one ZeroMQ SUB socket per engine
 * instance or storage node that publishes KV events, each batch applied to the index through
 * ingest.c under the daemon's lock, gaps in a publisher's sequence numbers detected and, where
 * the publisher has a replay socket, filled from it before the batch that revealed them.
 * Subscriptions are asked for by the HTTP thread (or startup) and made here, on the thread that
 * owns the sockets.
 */
#include "daemon.h"

#include "kvf/error.h"

#include "kvevents.h"

#include <inttypes.h>
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

/* Asks a publisher's replay socket for the batches from `from` on and applies those before
 * `upto` (the batch that revealed the gap, applied by the caller). vLLM's replay protocol: the
 * request is the 8-byte big-endian first sequence number; each answer is (sequence, payload), and
 * an empty payload ends the replay. Bounded: 200 ms of silence ends it too. Called with d->mu
 * held. */
static void replay_locked(kvf__sched_daemon *d, int i, uint64_t from, uint64_t upto)
{
    kvf__sched_sub *sb = &d->subs[i];
    if (kvf__zsubs_replay_ask(d->zs, i, from) != 0)
        return;
    uint64_t got = 0;
    for (int guard = 0; guard < 100000; guard++) {
        kvf__zmsg m;
        if (kvf__zsubs_replay_recv(d->zs, i, 200, &m) != 0)
            break;
        if (m.frames < 3 || m.len == 0 || m.seq_len != 8)
            break;
        uint64_t off = kvf__kve_seq_get(m.seq) - from; /* modulo 2^64, as kvf_seq_check() */
        if (off < upto - from) {
            char err[256] = "";
            kvf_sched_ingest(d->s, &sb->src, m.payload, m.len, &d->ingest, err, sizeof err);
            got++;
        }
        if (off + 1 >= upto - from && off < ((uint64_t)1 << 63))
            break;
    }
    d->replayed += got;
    kvf_info(&d->lg, "events from %s: replayed %" PRIu64 " of %" PRIu64 " missed batches",
             sb->endpoint, got, upto - from);
}

/* Makes the subscriptions the HTTP thread asked for. Called with d->mu held. */
static void subscribe_pending_locked(kvf__sched_daemon *d)
{
    for (int i = 0; i < d->n_pending && d->n_subs < KVF_SCHED_MAX_SUBS; i++) {
        char err[256] = "";
        int idx;
        if (kvf__zsubs_add(d->zs, d->pending_ep[i], d->pending_replay[i], &idx, err, sizeof err) !=
            0) {
            kvf_warn(&d->lg, "%s", err);
            continue;
        }
        if (err[0])
            kvf_warn(&d->lg, "%s", err);
        kvf__sched_sub *sb = &d->subs[idx];
        memset(sb, 0, sizeof *sb);
        sb->src = d->pending_src[i];
        snprintf(sb->endpoint, sizeof sb->endpoint, "%s", d->pending_ep[i]);
        snprintf(sb->replay_ep, sizeof sb->replay_ep, "%s", d->pending_replay[i]);
        d->n_subs = idx + 1;
        kvf_info(&d->lg, "events: subscribed to %s", sb->endpoint);
    }
    d->n_pending = 0;
}

static uint64_t add_sat(uint64_t a, uint64_t b)
{
    return a > UINT64_MAX - b ? UINT64_MAX : a + b;
}

/* One batch from publisher i: [topic,] sequence (8 bytes big-endian), payload. A gap in the
 * sequence asks the publisher's replay socket for what was missed first. Called with d->mu
 * held. */
static void on_batch_locked(kvf__sched_daemon *d, int i, const kvf__zmsg *m)
{
    kvf__sched_sub *sb = &d->subs[i];
    if (m->frames < 2 || m->seq_len != 8) {
        d->ingest.malformed++;
        kvf_warn(&d->lg, "events from %s: %d frames, expected topic, sequence, payload",
                 sb->endpoint, m->frames);
        return;
    }
    uint64_t from = 0, missed = sb->seq.missed, last = sb->seq.last;
    int v = kvf_seq_check(&sb->seq, m->seq, &from);
    if (v == KVF_SEQ_RESTART) {
        d->seq_restarts = add_sat(d->seq_restarts, 1);
        kvf_warn(&d->lg,
                 "events from %s: sequence number %" PRIu64 " after %" PRIu64
                 ", taken for a restarted publisher; nothing asked for",
                 sb->endpoint, sb->seq.last, last);
    } else if (v == KVF_SEQ_GAP) {
        int replay = kvf__zsubs_has_replay(d->zs, i);
        d->seq_gaps = add_sat(d->seq_gaps, 1);
        d->seq_missed = add_sat(d->seq_missed, sb->seq.missed - missed);
        kvf_warn(&d->lg, "events from %s: sequence gap, batches %" PRIu64 "..%" PRIu64 " missed%s",
                 sb->endpoint, from, sb->seq.last - 1,
                 replay ? "; asking the replay socket"
                        : "; no replay socket, the index may miss blocks until they are stored "
                          "again");
        if (replay)
            replay_locked(d, i, from, sb->seq.last);
    }
    char err[256] = "";
    uint64_t malformed = d->ingest.malformed;
    int rc = kvf_sched_ingest(d->s, &sb->src, m->payload, m->len, &d->ingest, err, sizeof err);
    if (rc)
        d->ingest.malformed++;
    if (rc || d->ingest.malformed != malformed)
        kvf_warn(&d->lg, "events from %s: %s", sb->endpoint, err[0] ? err : kvf_strerror(rc));
}

void *kvf__sched_events_main(void *arg)
{
    kvf__sched_daemon *d = arg;
    uint8_t ready[KVF_SCHED_MAX_SUBS];
    while (!atomic_load(&d->stop)) {
        pthread_mutex_lock(&d->mu);
        subscribe_pending_locked(d);
        int n = d->n_subs;
        pthread_mutex_unlock(&d->mu);
        if (n == 0) {
            usleep(50000);
            continue;
        }
        if (kvf__zsubs_poll(d->zs, 100, ready) <= 0)
            continue;
        for (int i = 0; i < n; i++) {
            kvf__zmsg m;
            if (!ready[i] || kvf__zsubs_recv(d->zs, i, &m) != 0)
                continue;
            pthread_mutex_lock(&d->mu);
            on_batch_locked(d, i, &m);
            pthread_mutex_unlock(&d->mu);
        }
    }
    return NULL;
}
