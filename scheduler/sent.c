/*
 * Placements sent and not yet seen in their engine's load report (daemon.h).
 *
 * A placement adds its request's work to the chosen instance's load at once (place.c), so that a
 * burst spreads. The engine's next load report replaces that load with the engine's own figures,
 * and a report can be taken before the request reaches the engine: the client is still sending
 * it, or the engine is still reading it. Without this file the request's work then vanished from
 * kvf-sched's view until the engine's following report, and the next requests of the burst piled
 * onto the same instance. So each placement gets a ticket; the router passes it on to the engine
 * with the request, and the engine's load reports list the tickets of the requests it took in
 * recently ("tickets"). A report's figures are taken with the work of every placement of that
 * instance that the report does not list added back (its prompt's tokens and seconds, and its
 * decode where it decodes there too), as long as the report comes within --placement-ack-s of
 * the placement (a client that never sent it is forgotten then). A decode placed on another
 * engine (disaggregated) is kept there under the same ticket, which the router passes on with
 * the decode request, from the placement to twice the prefill's expected TTFT plus the window. A
 * report without "tickets" replaces the load as before: engines that do not know tickets, and
 * engines that have not yet been given one (their clients do not pass tickets on).
 */
#include "daemon.h"

#include "clock.h"

#include <math.h>
#include <sodium.h>
#include <stdlib.h>
#include <string.h>

/* A decode placed on another engine than the prefill arrives there after the prefill: it is kept
 * for the window plus twice the prefill's expected TTFT, at most this much more. */
#define MAX_LATER_S 60.0

void kvf__sched_sent_init(kvf__sched_daemon *d)
{
    uint64_t seed = kvf__now_ns();
    if (sodium_init() >= 0)
        randombytes_buf(&seed, sizeof seed);
    /* 53 bits at most, so that every JSON reader keeps a ticket exact; a random start below
     * 2^52 (room for 2^52 placements above it), so that two replicas' tickets, which an engine
     * lists to both, hardly ever meet (and where they did, a placement would only be taken as
     * counted early: the figures before tickets) */
    d->next_ticket = (seed & ((1ull << 52) - 1)) + 1;
    d->sent_head = d->sent_n = 0;
}

static kvf__sched_sent *at(kvf__sched_daemon *d, size_t i)
{
    return &d->sent[(d->sent_head + i) % KVF__SCHED_SENT_MAX];
}

/* Drops the oldest entry, counted as expired unless it was answered. */
static void drop_oldest(kvf__sched_daemon *d)
{
    d->sent_expired += at(d, 0)->slot >= 0;
    d->sent_head = (d->sent_head + 1) % KVF__SCHED_SENT_MAX;
    d->sent_n--;
}

/* Drops the oldest entries that are answered (slot -1) or past their time. (An entry behind one
 * still kept may be past its time too: kvf__sched_sent_apply_locked() skips it.) */
static void prune(kvf__sched_daemon *d, uint64_t now)
{
    while (d->sent_n && (at(d, 0)->slot < 0 || now >= at(d, 0)->until_ns))
        drop_oldest(d);
}

uint64_t kvf__sched_sent_note_locked(kvf__sched_daemon *d, uint64_t ticket, int slot, double tokens,
                                     double seconds, uint32_t decodes, double later_s)
{
    if (!ticket)
        ticket = d->next_ticket++;
    if (!d->sent_window_ns)
        return ticket; /* not kept: every report replaces the load */
    uint64_t now = kvf__now_ns();
    prune(d, now);
    if (d->sent_n == KVF__SCHED_SENT_MAX) /* full: the oldest goes, unanswered */
        drop_oldest(d);
    later_s = later_s > 0 ? fmin(later_s, MAX_LATER_S) : 0; /* NaN too: 0 */
    *at(d, d->sent_n++) =
        (kvf__sched_sent){.ticket = ticket,
                          .until_ns = now + d->sent_window_ns + (uint64_t)(later_s * 1e9),
                          .slot = slot,
                          .tokens = tokens,
                          .seconds = seconds,
                          .decodes = decodes};
    return ticket;
}

static int by_ticket(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* sorted, so that a report's list costs log(n) per placement kept, whatever its length */
void kvf__sched_sent_sort(uint64_t *acks, size_t n_acks)
{
    qsort(acks, n_acks, sizeof *acks, by_ticket);
}

void kvf__sched_sent_apply_locked(kvf__sched_daemon *d, int slot, const uint64_t *acks,
                                  size_t n_acks, int has_acks, kvf_instance_load *L)
{
    uint64_t now = kvf__now_ns();
    prune(d, now);
    int added = 0;
    for (size_t i = 0; i < d->sent_n; i++) {
        kvf__sched_sent *e = at(d, i);
        if (e->slot != slot)
            continue;
        if (now >= e->until_ns) { /* never listed in time */
            d->sent_expired++;
            e->slot = -1;
            continue;
        }
        int acked = n_acks && bsearch(&e->ticket, acks, n_acks, sizeof *acks, by_ticket);
        if (acked || !has_acks) { /* in the engine's figures, or the engine does not say */
            d->sent_acked += acked;
            e->slot = -1;
            continue;
        }
        L->queued_prefill_tokens += e->tokens;
        L->queued_prefill_s += e->seconds;
        L->active_decodes += e->decodes;
        d->sent_readded++;
        added = 1;
    }
    d->sent_reports_behind += added;
    prune(d, kvf__now_ns());
}

size_t kvf__sched_sent_pending_locked(kvf__sched_daemon *d)
{
    uint64_t now = kvf__now_ns();
    prune(d, now);
    size_t n = 0;
    for (size_t i = 0; i < d->sent_n; i++)
        n += at(d, i)->slot >= 0 && now < at(d, i)->until_ns;
    return n;
}

void kvf__sched_sent_forget_locked(kvf__sched_daemon *d, int slot)
{
    for (size_t i = 0; i < d->sent_n; i++)
        if (at(d, i)->slot == slot)
            at(d, i)->slot = -1;
    prune(d, kvf__now_ns());
}
