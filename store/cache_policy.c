/*
 * The cache's eviction policies (cache_int.h's ops table), over queues doubly linked through
 * entry indices:
 *   lru     one recency list; hits move an entry to the head, victims come from the tail.
 *   s3fifo  "FIFO queues are all you need for cache eviction", J. Yang et al., SOSP 2023: a small
 *           FIFO (10% of the bytes) that filters one-hit wonders, a main FIFO with lazy promotion
 *           (a 2-bit frequency, reinsertion instead of moves on hit), and a ghost of recently
 *           evicted keys whose return goes straight to the main queue.
 */
#include "cache_int.h"

#include "kvf/error.h"

/* ------------------------------------------------------------------------------------------ */
/* Queues (doubly linked through entry indices) */

static void q_push_head(kvf_cache *c, queue *q, uint32_t i, uint8_t which)
{
    entry *x = &c->e[i];
    x->prev = NONE;
    x->next = q->head;
    if (q->head != NONE)
        c->e[q->head].prev = i;
    q->head = i;
    if (q->tail == NONE)
        q->tail = i;
    q->count++;
    q->bytes += x->len;
    x->queue = which;
}

static void q_remove(kvf_cache *c, queue *q, uint32_t i)
{
    entry *x = &c->e[i];
    if (x->prev != NONE)
        c->e[x->prev].next = x->next;
    else
        q->head = x->next;
    if (x->next != NONE)
        c->e[x->next].prev = x->prev;
    else
        q->tail = x->prev;
    x->prev = x->next = NONE;
    q->count--;
    q->bytes -= x->len;
    x->queue = Q_NONE;
}

queue *kvf__cache_q_of(kvf_cache *c, const entry *x)
{
    return x->queue == Q_SMALL ? &c->q_small : &c->q_main;
}

int kvf__cache_evictable(const kvf_cache *c, const entry *x, uint64_t t)
{
    return x->state == ST_READY && x->refs == 0 && !(x->pins && x->deadline_ns > t);
}

/* ------------------------------------------------------------------------------------------ */
/* LRU */

static void lru_insert(kvf_cache *c, uint32_t i)
{
    q_push_head(c, &c->q_main, i, Q_MAIN);
}

static void lru_touch(kvf_cache *c, uint32_t i)
{
    q_remove(c, &c->q_main, i);
    q_push_head(c, &c->q_main, i, Q_MAIN);
}

static void lru_unlink(kvf_cache *c, uint32_t i)
{
    q_remove(c, &c->q_main, i);
}

static int lru_victim(kvf_cache *c, uint32_t *out)
{
    uint64_t t = now(c);
    /* Entries that cannot go now (pinned, being read) rotate to the head, so a pinned tail does
     * not make every allocation rescan it; one full pass bounds the work. */
    for (uint64_t n = c->q_main.count; n > 0; n--) {
        uint32_t i = c->q_main.tail;
        if (kvf__cache_evictable(c, &c->e[i], t)) {
            *out = i;
            return 0;
        }
        lru_touch(c, i);
    }
    return KVF_ENOSPC;
}

const evict_ops kvf__cache_lru_ops = {
    .name = "lru",
    .insert = lru_insert,
    .touch = lru_touch,
    .unlink = lru_unlink,
    .victim = lru_victim,
};

/* ------------------------------------------------------------------------------------------ */
/* S3-FIFO */

static uint64_t ghost_fp(const entry *x)
{
    uint64_t h = x->key.lo ^ (x->ns * 0x9E3779B97F4A7C15ull);
    return h ? h : 1;
}

static void s3_insert(kvf_cache *c, uint32_t i)
{
    entry *x = &c->e[i];
    uint64_t fp = ghost_fp(x);
    x->freq = 0;
    if (c->ghost[fp & c->ghost_mask] == fp) {
        c->ghost[fp & c->ghost_mask] = 0;
        q_push_head(c, &c->q_main, i, Q_MAIN);
    } else {
        q_push_head(c, &c->q_small, i, Q_SMALL);
    }
}

static void s3_touch(kvf_cache *c, uint32_t i)
{
    entry *x = &c->e[i];
    if (x->freq < 3)
        x->freq++;
}

static void s3_unlink(kvf_cache *c, uint32_t i)
{
    q_remove(c, kvf__cache_q_of(c, &c->e[i]), i);
}

static int s3_victim(kvf_cache *c, uint32_t *out)
{
    uint64_t t = now(c);
    uint64_t small_target = c->mem_size / 10;
    /* Each entry is looked at most 5 times (one pass through the small queue, up to 3 frequency
     * decrements and one final look in the main queue) before the scan gives up. */
    uint64_t budget = 5 * (c->q_small.count + c->q_main.count) + 1;
    while (budget--) {
        int from_small =
            c->q_small.count && (c->q_small.bytes >= small_target || c->q_main.count == 0);
        queue *q = from_small ? &c->q_small : &c->q_main;
        if (q->tail == NONE)
            return KVF_ENOSPC;
        uint32_t i = q->tail;
        entry *x = &c->e[i];
        if (!kvf__cache_evictable(c, x, t)) {
            q_remove(c, q, i);
            q_push_head(c, q, i, from_small ? Q_SMALL : Q_MAIN);
            continue;
        }
        if (from_small) {
            if (x->freq >= 1) {
                q_remove(c, q, i);
                x->freq = 0;
                q_push_head(c, &c->q_main, i, Q_MAIN);
                continue;
            }
            uint64_t fp = ghost_fp(x);
            c->ghost[fp & c->ghost_mask] = fp;
            *out = i;
            return 0;
        }
        if (x->freq > 0) {
            x->freq--;
            q_remove(c, q, i);
            q_push_head(c, q, i, Q_MAIN);
            continue;
        }
        *out = i;
        return 0;
    }
    return KVF_ENOSPC;
}

const evict_ops kvf__cache_s3fifo_ops = {
    .name = "s3fifo",
    .insert = s3_insert,
    .touch = s3_touch,
    .unlink = s3_unlink,
    .victim = s3_victim,
};
