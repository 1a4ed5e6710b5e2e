/*
 * The prefix index (docs/scheduler.md, "The index"): which engine instance holds which KV block,
 * and which storage node holds which chunk.
 *
 * One open-addressing table (linear probing, backward-shift deletion: Knuth, TAOCP vol. 3, 6.4,
 * algorithm R) maps a block hash to its holders: engine instances (with a tier) and storage nodes.
 * Block hashes are the index's own: XXH3-64 over (parent hash, block size, the block's token ids),
 * chained from 0, so equal hashes mean equal token prefixes at one block size. A store chunk's
 * entry is keyed by its chunk key, mixed. A second table maps (instance, engine block hash) to the
 * index's hash, to follow the engine's parents and removals. Engines' and stores' events change the
 * tables here; matching (match.c) reads them through the block lookups that sched_int.h inlines
 * and the chunk lookup at the end.
 */
#include "sched_int.h"

#include "kvf/error.h"

#include "bytes.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <xxhash.h>

typedef kvf__sched_bent bent;

/* An entry of the engine-hash map. */
typedef struct kvf__sched_ement {
    uint64_t key; /* the instance's slot + 1 in the top EKEY_WHO_BITS bits, a mix of (slot,
                   * engine hash) in the rest (ekey); 0: empty */
    uint64_t ours;
} ement;

/* The engine-hash map's keys name their instance in their top bits, so that removing an instance
 * finds its entries (kvf__sched_index_drop); the other 51 bits tell its blocks apart. */
#define EKEY_WHO_BITS  13
#define EKEY_HASH_BITS (64 - EKEY_WHO_BITS)
_Static_assert(KVF_SCHED_MAX_INSTANCES < (1u << EKEY_WHO_BITS), "slot + 1 must fit the key's top");

/* ------------------------------------------------------------------------------------------ */
/* Hash tables */

static int grow_blocks(kvf_sched *s);

static bent *bfind(kvf_sched *s, uint64_t h, int create)
{
    if (create && (s->bcount + 1) * 4 > (s->bmask + 1) * 3 && grow_blocks(s) != 0)
        return NULL;
    uint64_t i = kvf__sched_mix(h) & s->bmask;
    for (;;) {
        bent *e = &s->bt[i];
        if (e->h == h)
            return e;
        if (e->h == 0) {
            if (!create)
                return NULL;
            memset(e, 0, sizeof *e);
            e->h = h;
            e->cap = KVF_SCHED_INLINE_HOLDERS;
            s->bcount++;
            s->st.blocks++;
            return e;
        }
        i = (i + 1) & s->bmask;
    }
}

static void bdelete(kvf_sched *s, bent *e)
{
    if (e->cap > KVF_SCHED_INLINE_HOLDERS) {
        free(e->u.heap);
        s->bheap--;
    }
    uint64_t i = (uint64_t)(e - s->bt);
    uint64_t j = i;
    for (;;) {
        j = (j + 1) & s->bmask;
        bent *n = &s->bt[j];
        if (n->h == 0)
            break;
        uint64_t home = kvf__sched_mix(n->h) & s->bmask;
        int stays = (i <= j) ? (i < home && home <= j) : (i < home || home <= j);
        if (!stays) {
            s->bt[i] = *n;
            i = j;
        }
    }
    memset(&s->bt[i], 0, sizeof s->bt[i]);
    s->bcount--;
    s->st.blocks--;
}

/* The index's hash tables: 2 MiB-aligned and, where the kernel offers transparent huge pages
 * on request (madvise mode), backed by them, so that a prefix walk's random accesses into a
 * table of hundreds of MiB miss the cache but not also the TLB. Zeroed by a memset here, at
 * creation, rather than page by page at first touch: ingest then never stops on a fault, and under
 * ThreadSanitizer a full pass (an instance's removal, a store's clear) does not first fault in
 * the sanitizer's shadow of the whole table (on two cores that made an expiry 2 s late). Free with
 * free(). */
#define TABLE_HUGE ((size_t)2 << 20)

static void *table_alloc(size_t n, size_t size)
{
    if (n > SIZE_MAX / size)
        return NULL;
    size_t bytes = n * size;
    if (bytes < 2 * TABLE_HUGE)
        return calloc(n, size);
    bytes = (bytes + TABLE_HUGE - 1) & ~(TABLE_HUGE - 1);
    void *p = aligned_alloc(TABLE_HUGE, bytes);
    if (!p)
        return NULL;
#ifdef MADV_HUGEPAGE
    madvise(p, bytes, MADV_HUGEPAGE); /* advice: without it the table works the same */
#endif
    memset(p, 0, bytes);
    return p;
}

static int grow_blocks(kvf_sched *s)
{
    uint64_t ncap = (s->bmask + 1) * 2;
    bent *old = s->bt;
    uint64_t oldn = s->bmask + 1;
    bent *nt = table_alloc(ncap, sizeof *nt);
    if (!nt)
        return KVF_ENOMEM;
    s->bt = nt;
    s->bmask = ncap - 1;
    for (uint64_t i = 0; i < oldn; i++) {
        if (!old[i].h)
            continue;
        uint64_t j = kvf__sched_mix(old[i].h) & s->bmask;
        while (nt[j].h)
            j = (j + 1) & s->bmask;
        nt[j] = old[i];
    }
    free(old);
    return 0;
}

static int holder_add(kvf_sched *s, bent *e, uint32_t who, uint32_t tier)
{
    uint32_t *h = kvf__sched_bent_holders(e);
    uint32_t v = who | (tier << 24);
    for (uint16_t i = 0; i < e->n; i++) {
        if ((h[i] & ~(0x7fu << 24)) == who) {
            h[i] = v; /* tier update */
            return 0;
        }
    }
    if (e->n == e->cap) {
        uint16_t ncap = (uint16_t)(e->cap * 2);
        uint32_t *nh = malloc(ncap * sizeof *nh);
        if (!nh)
            return KVF_ENOMEM;
        memcpy(nh, h, e->n * sizeof *nh);
        if (e->cap > KVF_SCHED_INLINE_HOLDERS)
            free(e->u.heap);
        else
            s->bheap++;
        e->u.heap = nh;
        e->cap = ncap;
        h = nh;
    }
    h[e->n++] = v;
    s->st.holdings++;
    return 1;
}

/* Removes who from e; deletes e when nobody holds it. Returns 1 if it was there. */
static int holder_del(kvf_sched *s, bent *e, uint32_t who)
{
    uint32_t *h = kvf__sched_bent_holders(e);
    for (uint16_t i = 0; i < e->n; i++) {
        if ((h[i] & ~(0x7fu << 24)) == who) {
            h[i] = h[--e->n];
            s->st.holdings--;
            if (e->n == 0)
                bdelete(s, e);
            return 1;
        }
    }
    return 0;
}

static uint64_t ekey(int idx, uint64_t engine_hash)
{
    uint64_t mix = kvf__sched_mix(engine_hash * 0x9E3779B97F4A7C15ull ^
                                  ((uint64_t)idx + 1) * 0xC2B2AE3D27D4EB4Full);
    return ((uint64_t)idx + 1) << EKEY_HASH_BITS | (mix & ((1ull << EKEY_HASH_BITS) - 1));
}

static int grow_emap(kvf_sched *s);

static ement *efind(kvf_sched *s, uint64_t key, int create)
{
    if (create && (s->ecount + 1) * 4 > (s->emask + 1) * 3 && grow_emap(s) != 0)
        return NULL;
    uint64_t i = key & s->emask;
    for (;;) {
        ement *e = &s->et[i];
        if (e->key == key)
            return e;
        if (e->key == 0) {
            if (!create)
                return NULL;
            e->key = key;
            s->ecount++;
            return e;
        }
        i = (i + 1) & s->emask;
    }
}

static void edelete(kvf_sched *s, ement *e)
{
    uint64_t i = (uint64_t)(e - s->et), j = i;
    for (;;) {
        j = (j + 1) & s->emask;
        ement *n = &s->et[j];
        if (n->key == 0)
            break;
        uint64_t home = n->key & s->emask;
        int stays = (i <= j) ? (i < home && home <= j) : (i < home || home <= j);
        if (!stays) {
            s->et[i] = *n;
            i = j;
        }
    }
    s->et[i].key = 0;
    s->ecount--;
}

static int grow_emap(kvf_sched *s)
{
    uint64_t ncap = (s->emask + 1) * 2, oldn = s->emask + 1;
    ement *old = s->et, *nt = table_alloc(ncap, sizeof *nt);
    if (!nt)
        return KVF_ENOMEM;
    s->et = nt;
    s->emask = ncap - 1;
    for (uint64_t i = 0; i < oldn; i++) {
        if (!old[i].key)
            continue;
        uint64_t j = old[i].key & s->emask;
        while (nt[j].key)
            j = (j + 1) & s->emask;
        nt[j] = old[i];
    }
    free(old);
    return 0;
}

/* The index's hash of a block: XXH3-64 of its tokens, seeded with the parent's hash and the block
 * size, so the hash depends on the whole prefix. One-shot hashing: a 16-token block is 64 bytes,
 * where the streaming API's set-up would cost more than the hash itself. Internal to the index
 * (not a published format). */
static uint64_t block_hash(uint64_t parent, uint32_t block_tokens, const uint32_t *tokens)
{
    uint64_t seed = parent ^ ((uint64_t)block_tokens * 0x9E3779B97F4A7C15ull);
    uint64_t h;
    if (kvf__host_is_le()) {
        h = XXH3_64bits_withSeed(tokens, (size_t)block_tokens * 4, seed);
    } else {
        uint8_t *tmp = malloc((size_t)block_tokens * 4);
        if (!tmp)
            return 1;
        for (uint32_t i = 0; i < block_tokens; i++)
            kvf__put_u32(tmp + 4 * i, tokens[i]);
        h = XXH3_64bits_withSeed(tmp, (size_t)block_tokens * 4, seed);
        free(tmp);
    }
    return h ? h : 1;
}

void kvf__sched_chain_hash(uint64_t parent, uint32_t bt, const uint32_t *tokens, size_t nb,
                           uint64_t *out)
{
    for (size_t b = 0; b < nb; b++)
        parent = out[b] = block_hash(parent, bt, tokens + b * bt);
}

/* ------------------------------------------------------------------------------------------ */
/* The tables' life */

int kvf__sched_index_open(kvf_sched *s, size_t expected_blocks)
{
    uint64_t want = expected_blocks ? expected_blocks : (1u << 20);
    uint64_t cap = 1024;
    while (cap * 3 / 4 < want)
        cap *= 2;
    s->bt = table_alloc(cap, sizeof *s->bt);
    s->bmask = cap - 1;
    s->et = table_alloc(cap, sizeof *s->et);
    s->emask = cap - 1;
    return s->bt && s->et ? 0 : KVF_ENOMEM;
}

void kvf__sched_index_close(kvf_sched *s)
{
    /* (a pass over the whole table only where some entry's holders are on the heap: a large
     * table's pages untouched so far stay so) */
    for (uint64_t i = 0; s->bt && s->bheap && i <= s->bmask; i++)
        if (s->bt[i].h && s->bt[i].cap > KVF_SCHED_INLINE_HOLDERS) {
            free(s->bt[i].u.heap);
            s->bheap--;
        }
    free(s->bt);
    free(s->et);
    s->bt = NULL;
    s->et = NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Events */

int kvf_sched_block_stored(kvf_sched *s, int idx, const uint64_t *engine_hashes, size_t n_blocks,
                           int has_parent, uint64_t engine_parent, const uint32_t *tokens,
                           size_t n_tokens, uint32_t block_tokens, kvf_tier tier)
{
    if (!kvf__sched_live(s, idx))
        return KVF_ENOENT;
    if (block_tokens == 0 || n_tokens != (size_t)n_blocks * block_tokens ||
        (tier != KVF_TIER_DEVICE && tier != KVF_TIER_HOST))
        return KVF_EINVAL;
    s->st.events++;
    uint64_t parent = 0;
    if (has_parent) {
        ement *pe = efind(s, ekey(idx, engine_parent), 0);
        if (!pe)
            return KVF_ENOENT; /* its prefix is unknown here: these blocks cannot be matched */
        parent = pe->ours;
    }
    /* In groups: the group's hashes first (a chain: each block's depends on the one before), the
     * table slots they land on prefetched, then the inserts, whose cache misses then overlap
     * instead of coming one after the other (the tables are far larger than the caches). */
    enum { GROUP = 32 };
    uint64_t hs[GROUP], ks[GROUP];
    for (size_t g = 0; g < n_blocks; g += GROUP) {
        size_t n = n_blocks - g < GROUP ? n_blocks - g : GROUP;
        for (size_t b = 0; b < n; b++) {
            parent = hs[b] = block_hash(parent, block_tokens, tokens + (g + b) * block_tokens);
            ks[b] = ekey(idx, engine_hashes[g + b]);
            __builtin_prefetch(&s->bt[kvf__sched_mix(hs[b]) & s->bmask], 1);
            __builtin_prefetch(&s->et[ks[b] & s->emask], 1);
        }
        for (size_t b = 0; b < n; b++) {
            bent *e = bfind(s, hs[b], 1);
            ement *m = efind(s, ks[b], 1);
            if (!e || !m)
                return KVF_ENOMEM;
            int added = holder_add(s, e, (uint32_t)idx, tier);
            if (added < 0)
                return added;
            s->inst[idx].blocks += (uint64_t)added;
            m->ours = hs[b];
        }
    }
    return 0;
}

int kvf_sched_block_removed(kvf_sched *s, int idx, const uint64_t *engine_hashes, size_t n_blocks)
{
    if (!kvf__sched_live(s, idx))
        return KVF_ENOENT;
    s->st.events++;
    for (size_t b = 0; b < n_blocks; b++) {
        ement *m = efind(s, ekey(idx, engine_hashes[b]), 0);
        if (!m) {
            s->st.unknown_removals++;
            continue;
        }
        bent *e = bfind(s, m->ours, 0);
        if (e && holder_del(s, e, (uint32_t)idx))
            s->inst[idx].blocks--;
        edelete(s, m);
    }
    return 0;
}

/* Removes instance idx from every block's holders. Rare (an engine reset, an instance removed):
 * a full pass. Deleting shifts entries back into the current slot, so the slot is examined again
 * before moving on. */
static void holdings_drop(kvf_sched *s, int idx)
{
    /* (until the instance's last block: its count is exact) */
    for (uint64_t i = 0; s->inst[idx].blocks && i <= s->bmask;) {
        bent *e = &s->bt[i];
        if (e->h && holder_del(s, e, (uint32_t)idx)) {
            s->inst[idx].blocks--;
            continue;
        }
        i++;
    }
}

int kvf_sched_all_cleared(kvf_sched *s, int idx)
{
    if (!kvf__sched_live(s, idx))
        return KVF_ENOENT;
    s->st.events++;
    holdings_drop(s, idx);
    return 0;
}

void kvf__sched_index_drop(kvf_sched *s, int idx)
{
    holdings_drop(s, idx);
    /* The same full pass over the engine-hash map, for the entries whose key names idx. */
    uint64_t who = (uint64_t)idx + 1;
    for (uint64_t i = 0; i <= s->emask;) {
        ement *e = &s->et[i];
        if (e->key && e->key >> EKEY_HASH_BITS == who) {
            edelete(s, e);
            continue;
        }
        i++;
    }
}

/* A node's holder entry for a chunk: its tiers (KVF__STORE_*) in bits 24..30. */
static uint32_t *store_holder(bent *e, uint32_t who)
{
    uint32_t *h = kvf__sched_bent_holders(e);
    for (uint16_t i = 0; i < e->n; i++)
        if ((h[i] & ~(0x7fu << 24)) == who)
            return &h[i];
    return NULL;
}

int kvf_sched_store_chunks(kvf_sched *s, int node, const kvf_key *keys, size_t n, int admitted,
                           int disk)
{
    if (node < 0 || node >= KVF_SCHED_MAX_STORES)
        return KVF_EINVAL;
    s->st.events++;
    uint32_t who = KVF_SCHED_HOLDER_STORE | (uint32_t)node;
    uint32_t tier = disk ? KVF__STORE_DISK : KVF__STORE_DRAM;
    for (size_t i = 0; i < n; i++) {
        uint64_t h = kvf__sched_mix(keys[i].lo ^ keys[i].hi);
        bent *e = bfind(s, h, admitted);
        if (!e) {
            if (admitted)
                return KVF_ENOMEM;
            continue;
        }
        uint32_t *hv = store_holder(e, who);
        uint32_t was = hv ? (*hv >> 24) & 0x7fu : 0;
        uint32_t tiers = admitted ? was | tier : was & ~tier;
        if ((was ^ tiers) & tier) {
            uint64_t *count = disk ? &s->st.store_disk_chunks : &s->st.store_dram_chunks;
            *count = admitted ? *count + 1 : *count - 1;
        }
        if (tiers && hv)
            *hv = who | (tiers << 24);
        else if (tiers && holder_add(s, e, who, tiers) < 0)
            return KVF_ENOMEM;
        else if (!tiers && hv)
            holder_del(s, e, who);
    }
    return 0;
}

int kvf_sched_store_cleared(kvf_sched *s, int node)
{
    if (node < 0 || node >= KVF_SCHED_MAX_STORES)
        return KVF_EINVAL;
    s->st.events++;
    uint32_t who = KVF_SCHED_HOLDER_STORE | (uint32_t)node;
    /* A full pass, as holdings_drop: a deletion shifts entries back into the slot. */
    for (uint64_t i = 0; i <= s->bmask;) {
        bent *e = &s->bt[i];
        uint32_t *hv = e->h ? store_holder(e, who) : NULL;
        if (hv) {
            uint32_t tiers = (*hv >> 24) & 0x7fu;
            s->st.store_dram_chunks -= (tiers & KVF__STORE_DRAM) != 0;
            s->st.store_disk_chunks -= (tiers & KVF__STORE_DISK) != 0;
            holder_del(s, e, who);
            continue;
        }
        i++;
    }
    return 0;
}

int kvf_sched_store_rates(kvf_sched *s, int node, double disk_read_bytes_per_s)
{
    if (node < 0 || node >= KVF_SCHED_MAX_STORES || !(disk_read_bytes_per_s > 0))
        return KVF_EINVAL;
    double *r = &s->disk_bps[node];
    double was = *r;
    *r = was > 0 ? 0.5 * was + 0.5 * disk_read_bytes_per_s : disk_read_bytes_per_s;
    /* the mean over rated nodes, kept here rather than summed at every placement */
    double sum = s->disk_rate * s->disk_rated - was + *r;
    s->disk_rated += was > 0 ? 0 : 1;
    s->disk_rate = sum / s->disk_rated;
    return 0;
}

void kvf_sched_index_stats(const kvf_sched *s, kvf_index_stats *st)
{
    *st = s->st;
    st->bytes = (s->bmask + 1) * sizeof(bent) + (s->emask + 1) * sizeof(ement);
}

/* ------------------------------------------------------------------------------------------ */
/* Lookups for matching */

size_t kvf__sched_store_holders(kvf_sched *s, const kvf_key *key, uint32_t *out, size_t max)
{
    bent *e = bfind(s, kvf__sched_mix(key->lo ^ key->hi), 0);
    size_t n = 0;
    for (uint16_t i = 0; e && i < e->n && n < max; i++) {
        uint32_t h = kvf__sched_bent_holders(e)[i];
        if (h & KVF_SCHED_HOLDER_STORE)
            out[n++] = h & ~KVF_SCHED_HOLDER_STORE;
    }
    return n;
}

unsigned kvf__sched_store_holds(kvf_sched *s, const kvf_key *key)
{
    bent *e = bfind(s, kvf__sched_mix(key->lo ^ key->hi), 0);
    unsigned tiers = 0;
    for (uint16_t i = 0; e && i < e->n; i++) {
        uint32_t h = kvf__sched_bent_holders(e)[i];
        if (h & KVF_SCHED_HOLDER_STORE)
            tiers |= (h >> 24) & 0x7fu;
    }
    return tiers;
}
