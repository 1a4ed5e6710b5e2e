/*
 * KV event ingestion: decodes vLLM's and kvfabric's msgpack event batches and applies them to the
 * scheduler's index; tracks ZeroMQ sequence numbers to detect gaps.
 */
#ifndef KVF_SCHED_EVENTS_H
#define KVF_SCHED_EVENTS_H

#include <stddef.h>
#include <stdatomic.h>
#include <stdint.h>

#include "kvevents.h"
#include "scheduler.h"

/* Who published a batch: an engine instance (index) or a storage node (number); the other -1. */
typedef struct kvf_event_source {
    int instance;
    int store;
} kvf_event_source;

typedef struct kvf_ingest_stats {
    uint64_t batches, stored, removed, cleared, chunks;
    uint64_t malformed;       /* events skipped for their shape, with a logged reason */
    uint64_t unknown_parents; /* BlockStored whose parent the index never saw */
    uint64_t unknown_types;   /* event kinds this version does not know: skipped */
} kvf_ingest_stats;

/* Decodes one msgpack batch and applies its events. A malformed event is skipped (counted, the
 * last reason in err); a payload that is not a batch at all returns KVF_EPROTO. */
int kvf_sched_ingest(kvf_sched *s, const kvf_event_source *src, const void *payload, size_t len,
                     kvf_ingest_stats *st, char *err, size_t errlen);

/* The second half of kvf_sched_ingest(), for callers that decode with a decoder of their own
 * (kvf__kve_decode_batch) outside the lock that guards s, and take the lock for this part only:
 * applies the n events of one decoded batch from src to the index and counts the batch, its
 * events, and the malformed ones the decode skipped (malformed) or this refuses (an event that does
 * not fit its publisher's kind). */
int kvf_sched_apply(kvf_sched *s, const kvf_event_source *src, const kvf_kve *events, size_t n,
                    uint64_t malformed, kvf_ingest_stats *st, char *err, size_t errlen);

/* Where kvf_sched_apply_some() is in a decoded batch: the event, and the blocks (or keys) of it
 * already applied. Start from {0, 0}. */
typedef struct kvf_apply_cursor {
    size_t event, off;
} kvf_apply_cursor;

/* kvf_sched_apply() in slices: applies events from *cur on, at most `blocks` blocks (BlockStored
 * and BlockRemoved hashes, chunk keys) in all, splitting an event where the budget ends (the rest
 * of a BlockStored goes on from its last block applied, as its parent), and moves *cur; the batch
 * is done when cur->event == n. The caller takes the lock that guards s for each call and may
 * release it between them, so that a placement waits for one slice, not for a whole batch. The
 * batch and the decode's malformed events are counted by the first call. Returns as
 * kvf_sched_apply(). */
int kvf_sched_apply_some(kvf_sched *s, const kvf_event_source *src, const kvf_kve *events, size_t n,
                         uint64_t malformed, kvf_apply_cursor *cur, size_t blocks,
                         kvf_ingest_stats *st, char *err, size_t errlen);

/* Blocks a slice of kvf_sched_apply_some() takes, as kvf-sched's events thread applies them. */
#define KVF_SCHED_APPLY_SLICE 16

/* A publisher's sequence numbers as seen so far. Counters saturate at UINT64_MAX; they never
 * wrap. */
typedef struct kvf_seq_tracker {
    uint64_t last;
    int seen;
    uint64_t gaps, missed; /* plausible gaps, and the batches they skipped */
    uint64_t restarts;     /* numbers that went backwards or jumped beyond KVF_SEQ_MAX_GAP */
} kvf_seq_tracker;

/* The largest gap counted as batches missed (about 17 minutes of one batch a millisecond). A
 * number further ahead than this is taken for a publisher that restarted or changed its
 * numbering, as is one that goes backwards: the tracker starts again from it. */
#define KVF_SEQ_MAX_GAP ((uint64_t)1 << 20)

/* What kvf_seq_check() made of a sequence number. */
typedef enum kvf_seq_verdict {
    KVF_SEQ_NEXT = 0,    /* the first seen, the next (2^64 - 1 is followed by 0), or a repeat */
    KVF_SEQ_GAP = 1,     /* 1..KVF_SEQ_MAX_GAP skipped, from *missing_from to the new last - 1 */
    KVF_SEQ_RESTART = 2, /* backwards, or an implausible jump ahead: nothing counted as missed */
} kvf_seq_verdict;

/* Checks an 8-byte big-endian sequence number against the last one, in unsigned 64-bit
 * arithmetic modulo 2^64. Returns a kvf_seq_verdict; on KVF_SEQ_GAP, *missing_from is the first
 * skipped number (a gap to recover through the replay socket). */
int kvf_seq_check(kvf_seq_tracker *t, const void *seq8, uint64_t *missing_from);

/* A replay of the batches from..upto-1 walked answer by answer, as kvf-sched and kvf-relay walk
 * one: which answers to apply, where batches were lost (each hole said once), and when it is
 * done. A late join (from 0) may start at 1, the first number of publishers that count from 1. */
typedef struct kvf_replay_walk {
    uint64_t from, want, next; /* next: the offset from `from` expected next */
    uint64_t cleared_at;       /* the offset of the last loss said, or UINT64_MAX */
    int done;                  /* KVF_REPLAY_DONE was returned */
} kvf_replay_walk;

/* cleared: the caller has just dropped what it held (a restart), so a loss at the start is not
 * said again. */
void kvf_replay_walk_init(kvf_replay_walk *w, uint64_t from, uint64_t upto, int cleared);

#define KVF_REPLAY_APPLY 1u /* the answer is one asked for: apply it */
#define KVF_REPLAY_HOLE  2u /* batches before it were lost, from *lost_from on */
#define KVF_REPLAY_PAST  4u /* (with HOLE) the window starts after the batches asked for */
#define KVF_REPLAY_DONE  8u /* the walk has reached the batch in hand, or past it */

/* The answer numbered seq. Returns the KVF_REPLAY_* bits that hold (0: before the first one
 * asked for). */
unsigned kvf_replay_walk_step(kvf_replay_walk *w, uint64_t seq, uint64_t *lost_from);
/* After the answers: 1 with *lost_from when the replay ended before the batches asked for and
 * that loss was not said already. */
int kvf_replay_walk_short(const kvf_replay_walk *w, uint64_t *lost_from);
/* After answers that stopped without the end marker (silence, the deadline: a slow publisher, not
 * a window that lacks them): 1 when the batches asked for were not all reached, with the first
 * one not reached in *rest and in *cleared whether a loss was said just before it (the walk to
 * continue from there is kvf_replay_walk_init(rest, upto, cleared)). 0 once the walk is done,
 * a window that starts past the batches asked for included (a loss said, nothing to go on
 * with). */
int kvf_replay_walk_cut(const kvf_replay_walk *w, uint64_t *rest, int *cleared);

/* A subscriber's thread waits on one replay socket at a time, so each publisher's replays (and
 * first contact) draw on a budget of the thread's time: KVF_REPLAY_CREDIT_MS at most, refilled
 * at 1 / KVF_REPLAY_SHARE of the time that passes. A publisher whose replays have spent it (one
 * that answers slowly, or opens a gap every moment) is not asked again until the budget is back
 * above zero: it takes about a tenth of the thread over time, and the others' batches are not
 * held up behind it for long. An engine's replays of a few milliseconds never come near it. */
#define KVF_REPLAY_CREDIT_MS 1000
#define KVF_REPLAY_SHARE     10
typedef struct kvf_replay_credit {
    int64_t left_ns; /* may go below zero */
    uint64_t at_ns;  /* when it was last counted (0: never, the whole budget) */
} kvf_replay_credit;

/* Charges a replay that started at t0 and ended at now. Returns the time before which the
 * publisher is not asked again (0 when its budget is left). */
uint64_t kvf_replay_charge(kvf_replay_credit *c, uint64_t t0, uint64_t now);

/* Batches a replay still owes a subscriber (kvf-sched's and kvf-relay's): a gap, restart or late
 * join whose replay got no answer, or was not asked while the replay socket was held off. Asked
 * again, from `from` through the last batch taken live, once the back-off ends; the batches
 * taken live since are taken again after the owed ones, so that everything ends in the
 * publisher's order (a block stored in the gap and removed after it ends removed). cleared: the
 * subscriber dropped what it held at a restart, as kvf_replay_walk_init's. Without it those
 * batches were lost for good: an engine's prefixes left invisible, or a removal among them
 * stale. */
typedef struct kvf_replay_debt {
    int owed, cleared;
    uint64_t from;
} kvf_replay_debt;

/* Records that the batches from `from` on are owed. A restart (cleared) replaces what the
 * publisher's earlier life owed; otherwise the earlier start of the two is kept (modulo 2^64),
 * so one replay covers both. */
void kvf_replay_owe(kvf_replay_debt *d, uint64_t from, int cleared);

/* First contact with a publisher's replay socket (contact.c): asked for everything its window
 * holds as soon as the subscription is made, before any live batch. */
typedef struct kvf_contact {
    int done; /* the replay socket answered the first contact */
    int have; /* it gave batches, up to `upto`: live batches at or below it are stale */
    uint64_t upto;
    uint64_t skip_until_ns; /* ... until then (0: the window starts at the next live batch) */
    /* the window's first batch when it is 2 or more: the batches before it were published and
     * are gone from the window (what they stored stays unknown until stored again); else 0 */
    uint64_t first_lost;
} kvf_contact;

struct kvf__zsubs;
struct kvf__zmsg;
/* Applies one replayed batch (m: its sequence and payload). 0, or -1 to end the contact (the
 * publisher was removed meanwhile). */
typedef int (*kvf_contact_apply_fn)(void *ud, const struct kvf__zmsg *m);
/* Told that the answers skipped batches from `lost` on (a hole, after some were applied): what
 * was applied before it may be stale (a removal among the lost), to be dropped and learnt again. */
typedef void (*kvf_contact_hole_fn)(void *ud, uint64_t lost);

#define KVF_CONTACT_NOT_YET   (-1) /* the replay socket has no peer yet: ask again soon */
#define KVF_CONTACT_NO_ANSWER (-2) /* asked and not answered: back off */

/* Asks replay socket idx of zs for every batch from 0 and applies the answers in order through
 * apply (repeats and older ones skipped; t's last and seen follow them; a hole told to hole
 * first), until the end marker, silence_ms without an answer, deadline_ms in all, or *stop.
 * Returns the batches applied (0: the publisher has published nothing the window holds), or
 * KVF_CONTACT_NOT_YET or KVF_CONTACT_NO_ANSWER (c unchanged). A contact that did not end with the
 * end marker leaves the replay socket replaced (kvf_replay_settle). */
long kvf_contact_run(kvf_contact *c, struct kvf__zsubs *zs, int idx, kvf_seq_tracker *t,
                     kvf_contact_apply_fn apply, kvf_contact_hole_fn hole, void *ud, int silence_ms,
                     int deadline_ms, const atomic_int *stop);
/* Takes and drops the answers waiting on publisher idx's replay socket (4,096 at most): sent to a
 * request that was given up on, or unasked, they would be taken for the next request's. */
void kvf_replay_drain(struct kvf__zsubs *zs, int idx);

/* A replay socket that gave no answer is left alone from KVF_REPLAY_BACKOFF_MIN_MS, twice as long
 * after each further timeout, up to KVF_REPLAY_BACKOFF_MAX_MS; an answer ends the back-off (the
 * caller sets *ms to 0). Doubles *ms and returns when the back-off ends. */
#define KVF_REPLAY_BACKOFF_MIN_MS 2000
#define KVF_REPLAY_BACKOFF_MAX_MS 60000
uint64_t kvf_replay_back_off(unsigned *ms, uint64_t now_ns);

/* After a replay request: answered says an answer came, ended that its end marker was read. If
 * answered and not ended, the answers still coming are read and dropped up to the end marker
 * (silence_ms between them, until deadline_ns). A replay socket that did not come to its end
 * (unanswered included) is replaced (kvf__zsubs_replay_reset), so that its late answers are never
 * taken for the next request's. */
void kvf_replay_settle(struct kvf__zsubs *zs, int idx, int answered, int ended, int silence_ms,
                       uint64_t deadline_ns);
/* Whether m is a replay's end marker (an empty payload after an 8-byte sequence). */
int kvf_replay_is_end(const struct kvf__zmsg *m);
/* Whether the live batch numbered seq was applied by the first contact already (skip it). */
int kvf_contact_stale(kvf_contact *c, uint64_t seq, uint64_t now_ns);

#endif
