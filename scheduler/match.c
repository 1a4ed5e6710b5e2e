/*
 * Prefix matching against the index (docs/scheduler.md, "The index"): how many of a request's
 * leading blocks each instance holds, and how many leading chunks the storage nodes hold.
 *
 * The walk goes through the request's blocks in order, keeping the set of instances that have
 * held every block so far; an instance's prefix ends where it drops out. The cost is the sum of
 * that set's sizes, not instances x blocks. The slots of the blocks ahead are prefetched, so the
 * table's cache misses overlap instead of following one another.
 */
#include "sched_int.h"

#include "kvf/error.h"

#include <stdlib.h>
#include <string.h>

#define MAX_BLOCK_SIZES 8  /* distinct engine block sizes matched per request; more are ignored */
#define PREFETCH_AHEAD  16 /* blocks whose index slots are fetched ahead of the match walk */

int kvf__sched_walk_open(kvf_sched *s)
{
    s->depth = calloc(KVF_SCHED_MAX_INSTANCES + KVF_SCHED_MAX_STORES, sizeof *s->depth);
    s->alive = calloc(KVF_SCHED_MAX_INSTANCES + KVF_SCHED_MAX_STORES, sizeof *s->alive);
    s->alive2 = calloc(KVF_SCHED_MAX_INSTANCES + KVF_SCHED_MAX_STORES, sizeof *s->alive2);
    s->stamp = calloc(KVF_SCHED_MAX_INSTANCES, sizeof *s->stamp);
    return s->depth && s->alive && s->alive2 && s->stamp ? 0 : KVF_ENOMEM;
}

void kvf__sched_walk_close(kvf_sched *s)
{
    free(s->hashes);
    free(s->sdisk);
    s->sdisk = NULL;
    s->sdcap = 0;
    free(s->shold);
    free(s->shold_n);
    free(s->srem);
    s->shold = NULL;
    s->shold_n = NULL;
    s->srem = NULL;
    s->shcap = 0;
    free(s->depth);
    free(s->alive);
    free(s->alive2);
    free(s->stamp);
    s->hashes = NULL;
    s->depth = NULL;
    s->stamp = NULL;
    s->alive = s->alive2 = NULL;
}

/* The index hashes of the request's full blocks of bt tokens, into s->hashes. Returns their
 * number, or 0 when the scratch cannot grow. */
static size_t hash_blocks(kvf_sched *s, uint32_t bt, const uint32_t *tokens, size_t n)
{
    size_t nb = n / bt;
    if (nb > s->hcap) {
        uint64_t *h = realloc(s->hashes, nb * sizeof *h);
        if (!h)
            return 0;
        s->hashes = h;
        s->hcap = nb;
    }
    kvf__sched_chain_hash(0, bt, tokens, nb, s->hashes);
    return nb;
}

/* Starts the walk at the first block: every instance of block size bt that holds it is alive,
 * at depth 1. Returns the number alive. */
static int walk_start(kvf_sched *s, uint32_t bt)
{
    kvf__sched_bent *e = kvf__sched_block_find(s, s->hashes[0]);
    if (!e)
        return 0;
    const uint32_t *h = kvf__sched_bent_holders(e);
    int na = 0;
    for (uint16_t i = 0; i < e->n; i++) {
        if (h[i] & KVF_SCHED_HOLDER_STORE)
            continue;
        int who = (int)(h[i] & KVF_SCHED_HOLDER_WHO);
        if (s->inst[who].info.block_tokens != bt)
            continue;
        s->alive[na++] = who;
        s->depth[who] = 1;
    }
    return na;
}

/* One step of the walk: of the na instances alive, those among the n holders h of the next
 * block stay alive, one block deeper. Marks this block's holders, then keeps the instances still
 * alive that are marked: linear in holders + alive, where comparing every pair was quadratic for
 * a prefix that hundreds of instances hold. Returns the number still alive. */
static int walk_step(kvf_sched *s, const uint32_t *h, uint16_t n, int na)
{
    if (++s->step == 0) {
        memset(s->stamp, 0, KVF_SCHED_MAX_INSTANCES * sizeof *s->stamp);
        s->step = 1;
    }
    for (uint16_t i = 0; i < n; i++)
        if (!(h[i] & KVF_SCHED_HOLDER_STORE))
            s->stamp[h[i] & KVF_SCHED_HOLDER_WHO] = s->step;
    int nn = 0;
    for (int a = 0; a < na; a++) {
        if (s->stamp[s->alive[a]] == s->step) {
            s->alive2[nn++] = s->alive[a];
            s->depth[s->alive[a]]++;
        }
    }
    int *t = s->alive;
    s->alive = s->alive2;
    s->alive2 = t;
    return nn;
}

/* Fills depth[i] with the cached prefix, in blocks of bt tokens, of every instance i whose block
 * size is bt. */
static void match_blocks(kvf_sched *s, uint32_t bt, const uint32_t *tokens, size_t n)
{
    size_t nb = hash_blocks(s, bt, tokens, n);
    if (nb == 0)
        return;
    /* Every block's slot is known now: start fetching the first few, so that the walk below
     * overlaps its cache misses instead of taking them one after another. */
    for (size_t b = 0; b < nb && b < PREFETCH_AHEAD; b++)
        __builtin_prefetch(kvf__sched_block_slot(s, s->hashes[b]));
    int na = walk_start(s, bt);
    for (size_t b = 1; b < nb && na > 0; b++) {
        if (b + PREFETCH_AHEAD < nb)
            __builtin_prefetch(kvf__sched_block_slot(s, s->hashes[b + PREFETCH_AHEAD]));
        kvf__sched_bent *e = kvf__sched_block_find(s, s->hashes[b]);
        if (!e)
            break;
        na = walk_step(s, kvf__sched_bent_holders(e), e->n, na);
    }
}

void kvf__sched_match_sizes(kvf_sched *s, const uint32_t *tokens, size_t n)
{
    memset(s->depth, 0, s->n_inst * sizeof *s->depth);
    uint32_t sizes[MAX_BLOCK_SIZES];
    int nsizes = 0;
    for (size_t i = 0; i < s->n_inst; i++) {
        if (!s->inst[i].live)
            continue;
        uint32_t bt = s->inst[i].info.block_tokens;
        int seen = 0;
        for (int k = 0; k < nsizes; k++)
            seen |= sizes[k] == bt;
        if (!seen && nsizes < MAX_BLOCK_SIZES) {
            sizes[nsizes++] = bt;
            match_blocks(s, bt, tokens, n);
        }
    }
}

size_t kvf_sched_match(kvf_sched *s, int idx, const uint32_t *tokens, size_t n)
{
    if (!kvf__sched_live(s, idx))
        return 0;
    memset(s->depth, 0, s->n_inst * sizeof *s->depth);
    uint32_t bt = s->inst[idx].info.block_tokens;
    match_blocks(s, bt, tokens, n);
    return (size_t)s->depth[idx] * bt;
}

size_t kvf__sched_match_store(kvf_sched *s, const kvf_key *keys, size_t n)
{
    if (n + 1 > s->sdcap) {
        uint32_t *d = realloc(s->sdisk, (n + 1) * sizeof *d);
        if (d) {
            s->sdisk = d;
            s->sdcap = n + 1;
        }
    }
    uint32_t *cum = n + 1 <= s->sdcap ? s->sdisk : NULL;
    s->sdisk_ok = cum != NULL;
    size_t run = 0;
    uint32_t disk = 0;
    if (cum)
        cum[0] = 0;
    for (unsigned t; run < n && (t = kvf__sched_store_holds(s, &keys[run])) != 0;) {
        disk += !(t & KVF__STORE_DRAM);
        if (cum)
            cum[run + 1] = disk;
        run++;
    }
    return run;
}
