/*
 * An engine's KV events publisher (include/kvf/events.h): the sockets of transport/pubsub.c, the
 * encoding of proto/kvevents.c and the CURVE identity of proto/auth.c behind one handle, so that
 * kvf-engine and engines in other languages (the Python package) publish the same stream.
 */
#include "kvf/events.h"

#include "kvf/error.h"

#include "auth.h"
#include "bytes.h"
#include "errf.h"
#include "kvevents.h"
#include "pubsub.h"
#include "tcp.h"
#include "tenants.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

/* A sharded publisher's memory of which shard each block it stored belongs to (that of its
 * sequence's first block): open addressing on the block's hash, linear probing, deletion by
 * shifting back. A slot whose shard is NO_SHARD is empty (shards are fewer). A block stored
 * twice before it is removed (a copy on the GPU and one in host memory, or two requests that
 * computed it at once) is counted: it is forgotten at its last removal, not its first. */
typedef struct roots {
    uint64_t *key;
    uint16_t *shard, *refs;
    size_t cap, n; /* cap a power of two, or 0 */
} roots;

#define NO_SHARD UINT16_MAX
_Static_assert(KVF_EVENTS_MAX_SHARDS < NO_SHARD, "a shard number is never NO_SHARD");

struct kvf_events {
    pthread_mutex_t mu; /* one thread at a time on the socket, the sequences and the roots */
    kvf__zpub *pub;
    kvf__tenants *tenants;
    uint64_t seq;
    char endpoint[160], topic[128], replay[160];
    /* sharded (opts.shards > 1): each shard's topic and sequence, and the blocks' shards */
    uint32_t shards;
    char (*topics)[192];
    uint64_t *shard_seq;
    roots rt;
    uint64_t unknown_parents; /* continuations whose parent this sharded publisher never stored */
    size_t roots_max;         /* opts.shard_roots_max, or ROOTS_MAX */
};

/* The blocks a sharded publisher remembers at most (about 12 bytes each at the table's load of a
 * half: 400 MB). An engine holds far fewer; the table grows past them only where removals were
 * missed (a relay whose upstream dropped them) or by a publisher that never removes: then every
 * shard is told AllBlocksCleared and the table starts again, so that subscribers drop what they
 * can no longer be told the end of (the engine's blocks are indexed again as they are stored). */
#define ROOTS_MAX ((size_t)16 << 20) /* kvf_events_opts.shard_roots_max's default */

uint32_t kvf_events_shard_of(uint64_t first_block_hash, uint32_t shards)
{
    return shards < 2 ? 0 : (uint32_t)(kvf__fmix64(first_block_hash) % shards);
}

static void roots_free(roots *r)
{
    free(r->key), free(r->shard), free(r->refs);
    *r = (roots){0};
}

static int roots_find(const roots *r, uint64_t h, size_t *at)
{
    if (!r->cap)
        return 0;
    size_t i = (size_t)kvf__fmix64(h) & (r->cap - 1);
    while (r->shard[i] != NO_SHARD) {
        if (r->key[i] == h) {
            *at = i;
            return 1;
        }
        i = (i + 1) & (r->cap - 1);
    }
    *at = i;
    return 0;
}

/* Room for `more` new entries at a load of at most one half. 0 or KVF_ENOMEM. */
static int roots_reserve(roots *r, size_t more)
{
    if ((r->n + more) * 2 <= r->cap)
        return 0;
    if (more > ((size_t)1 << 40) || r->n > ((size_t)1 << 40))
        return KVF_ENOMEM; /* no engine holds this many blocks: a size that would overflow */
    size_t cap = r->cap ? r->cap : 1024;
    while ((r->n + more) * 2 > cap)
        cap *= 2;
    roots g = {.key = malloc(cap * sizeof *g.key),
               .shard = malloc(cap * sizeof *g.shard),
               .refs = malloc(cap * sizeof *g.refs),
               .cap = cap};
    if (!g.key || !g.shard || !g.refs) {
        free(g.key), free(g.shard), free(g.refs);
        return KVF_ENOMEM;
    }
    memset(g.shard, 0xff, cap * sizeof *g.shard); /* every slot NO_SHARD: empty */
    for (size_t i = 0; i < r->cap; i++) {
        size_t at;
        if (r->shard[i] != NO_SHARD && !roots_find(&g, r->key[i], &at)) {
            g.key[at] = r->key[i], g.shard[at] = r->shard[i], g.refs[at] = r->refs[i];
            g.n++;
        }
    }
    roots_free(r);
    *r = g;
    return 0;
}

/* Sets h's shard (room reserved before), or counts one more store of it where it is known (its
 * shard stays: the same block is in the same sequence). */
static void roots_put(roots *r, uint64_t h, uint32_t shard)
{
    size_t at;
    if (roots_find(r, h, &at)) {
        r->refs[at] += r->refs[at] < UINT16_MAX; /* saturated: never forgotten, never wrong */
        return;
    }
    r->key[at] = h;
    r->n++;
    r->shard[at] = (uint16_t)shard;
    r->refs[at] = 1;
}

/* h's shard (a removed block) into *shard, forgotten at the removal of its last store: 1, or 0
 * when h is not known. */
static int roots_take(roots *r, uint64_t h, uint32_t *shard)
{
    size_t i;
    if (!roots_find(r, h, &i))
        return 0;
    *shard = r->shard[i];
    if (r->refs[i] > 1 && r->refs[i] < UINT16_MAX) {
        r->refs[i]--;
        return 1;
    }
    if (r->refs[i] == UINT16_MAX)
        return 1;
    r->n--;
    size_t m = r->cap - 1;
    for (size_t j = (i + 1) & m; r->shard[j] != NO_SHARD; j = (j + 1) & m) {
        size_t home = (size_t)kvf__fmix64(r->key[j]) & m;
        /* j's entry may move back to i unless its home lies cyclically in (i, j] */
        int stays = i <= j ? (i < home && home <= j) : (i < home || home <= j);
        if (!stays) {
            r->key[i] = r->key[j], r->shard[i] = r->shard[j], r->refs[i] = r->refs[j];
            i = j;
        }
    }
    r->shard[i] = NO_SHARD;
    return 1;
}

static int allow(void *ud, const uint8_t pk[32], char *name, size_t namelen, int *admin)
{
    return kvf__tenants_curve_allow(ud, pk, name, namelen, admin);
}

/* The CURVE secret of o->credential, the tenants and the topic of the engine's tenant into sec,
 * ev->tenants and ev->topic. */
static int secure(kvf_events *ev, const kvf_events_opts *o, kvf__zsec *sec, char *err,
                  size_t errlen)
{
    kvf_credential c;
    uint8_t pk[32];
    if (!o->tenants)
        return kvf__errf(err, errlen, KVF_EINVAL, "a secured publisher needs a tenants file");
    int rc = kvf__cred_load(o->credential, &c, err, errlen);
    if (!rc && kvf__auth_curve_pair(&c, pk, sec->secret) != 0)
        rc = kvf__errf(err, errlen, KVF_EINVAL, "%s: no CURVE key in it", o->credential);
    kvf__auth_wipe(&c, sizeof c);
    if (!rc)
        rc = kvf__tenants_open(&ev->tenants, o->tenants, err, errlen);
    const char *mine = o->tenant_credential ? o->tenant_credential : getenv("KVF_CREDENTIAL");
    if (!rc && !mine)
        rc = kvf__errf(err, errlen, KVF_EINVAL,
                       "needs the engine's credential ($KVF_CREDENTIAL): the events go under its "
                       "tenant's topic");
    if (!rc)
        rc = kvf__cred_load(mine, &c, err, errlen);
    if (rc)
        return rc;
    snprintf(ev->topic, sizeof ev->topic, "kv-events/t/%s/", c.tenant);
    kvf__auth_wipe(&c, sizeof c);
    sec->allow = allow;
    sec->ud = ev->tenants;
    sec->tenant_prefix = "kv-events/t/";
    return 0;
}

int kvf_events_open(kvf_events **out, const kvf_events_opts *o, char *err, size_t errlen)
{
    char host[128];
    uint16_t port;
    *out = NULL;
    if (!o || !o->listen || kvf__addr_parse(o->listen, host, sizeof host, &port) != 0)
        return kvf__errf(err, errlen, KVF_EINVAL, "events address: expected HOST:PORT, got \"%s\"",
                         o && o->listen ? o->listen : "(none)");
    kvf_events *ev = calloc(1, sizeof *ev);
    if (!ev)
        return kvf__errf(err, errlen, KVF_ENOMEM, "out of memory");
    pthread_mutex_init(&ev->mu, NULL);
    snprintf(ev->topic, sizeof ev->topic, "kv-events");
    kvf__zsec sec = {0};
    int rc = o->credential ? secure(ev, o, &sec, err, errlen) : 0;
    if (!rc)
        rc = o->credential ? kvf__zpub_open_secure(&ev->pub, host, port, 0, &sec, ev->endpoint,
                                                   sizeof ev->endpoint, err, errlen)
                           : kvf__zpub_open(&ev->pub, host, port, 0, ev->endpoint,
                                            sizeof ev->endpoint, err, errlen);
    kvf__auth_wipe(sec.secret, sizeof sec.secret);
    if (!rc && o->replay) {
        char rh[128];
        uint16_t rp;
        if (kvf__addr_parse(o->replay, rh, sizeof rh, &rp) != 0)
            rc = kvf__errf(err, errlen, KVF_EINVAL,
                           "replay address: expected HOST:PORT, got \"%s\"", o->replay);
        else
            rc = kvf__zpub_replay(ev->pub, rh, rp, o->replay_batches ? o->replay_batches : 4096,
                                  o->replay_bytes ? o->replay_bytes : (size_t)64 << 20, ev->replay,
                                  sizeof ev->replay, err, errlen);
    }
    if (!rc && o->shards > KVF_EVENTS_MAX_SHARDS)
        rc = kvf__errf(err, errlen, KVF_EINVAL, "events: %u shards, at most %u", o->shards,
                       KVF_EVENTS_MAX_SHARDS);
    if (!rc && o->shards > 1) {
        ev->shards = o->shards;
        ev->roots_max = o->shard_roots_max ? o->shard_roots_max : ROOTS_MAX;
        ev->topics = calloc(o->shards, sizeof *ev->topics);
        ev->shard_seq = calloc(o->shards, sizeof *ev->shard_seq);
        if (!ev->topics || !ev->shard_seq)
            rc = kvf__errf(err, errlen, KVF_ENOMEM, "out of memory");
        /* the shard first, so that an admin subscriber of shard K takes every tenant's with one
         * prefix: "kv-events/s/K/", then "t/TENANT/" where secured */
        const char *tenant = strncmp(ev->topic, "kv-events/", 10) == 0 ? ev->topic + 10 : "";
        for (uint32_t k = 0; !rc && k < o->shards; k++)
            snprintf(ev->topics[k], sizeof ev->topics[k], "%s%u/%s", KVF_EVENTS_SHARD_TOPIC, k,
                     tenant);
    }
    if (rc) {
        kvf_events_close(&ev);
        return rc;
    }
    *out = ev;
    return 0;
}

const char *kvf_events_replay_endpoint(const kvf_events *ev)
{
    return ev ? ev->replay : "";
}

const char *kvf_events_endpoint(const kvf_events *ev)
{
    return ev ? ev->endpoint : "";
}

const char *kvf_events_topic(const kvf_events *ev)
{
    return ev ? ev->topic : "";
}

int kvf_events_hash_blocks(const uint32_t *tokens, size_t n_blocks, uint32_t block_tokens,
                           uint64_t parent, uint64_t *out)
{
    if (!block_tokens || (n_blocks && (!tokens || !out)))
        return KVF_EINVAL;
    for (size_t b = 0; b < n_blocks; b++)
        parent = out[b] = XXH3_64bits_withSeed(tokens + b * block_tokens,
                                               (size_t)block_tokens * sizeof *tokens, parent);
    return 0;
}

/* One batch's payload: BlockRemoved of removed[0..n_removed) (if any), then BlockStored of
 * stored[0..n_stored) (if any), into *data and *len (valid until kvf__kve_enc_free(e)). 0 or the
 * error; *e to be freed either way. */
static int encode(kvf__kve_enc **e, const uint64_t *removed, size_t n_removed,
                  const uint64_t *stored, size_t n_stored, int has_parent, uint64_t parent,
                  const uint32_t *tokens, uint32_t block_tokens, const char *medium,
                  const void **data, size_t *len)
{
    int rc = kvf__kve_enc_begin(e, (n_removed > 0) + (n_stored > 0));
    if (!rc && n_removed)
        kvf__kve_enc_block_removed(*e, removed, n_removed, medium);
    if (!rc && n_stored)
        kvf__kve_enc_block_stored(*e, stored, n_stored, has_parent, parent, tokens, block_tokens,
                                  medium);
    return rc ? rc : kvf__kve_enc_end(*e, data, len);
}

/* One batch of a sharded publisher: removed[0..n_removed) and, where n_stored, the stored
 * blocks, under shard k's topic and next number. ev->mu held. */
static int send_shard(kvf_events *ev, uint32_t k, const uint64_t *removed, size_t n_removed,
                      const uint64_t *stored, size_t n_stored, int has_parent, uint64_t parent,
                      const uint32_t *tokens, uint32_t block_tokens, const char *medium)
{
    kvf__kve_enc *e = NULL;
    const void *data;
    size_t len;
    int rc = encode(&e, removed, n_removed, stored, n_stored, has_parent, parent, tokens,
                    block_tokens, medium, &data, &len);
    ++ev->seq;
    ++ev->shard_seq[k]; /* a batch that could not be encoded leaves a gap the subscriber sees */
    if (!rc)
        rc = kvf__zpub_send(ev->pub, ev->topics[k], ev->shard_seq[k], data, len);
    kvf__kve_enc_free(&e);
    return rc;
}

static int clear_locked(kvf_events *ev, int forget);

/* kvf_events_publish of a sharded publisher: the removed blocks grouped by their shard (each
 * forgotten), the stored ones in the shard of their sequence (each remembered). */
static int publish_sharded(kvf_events *ev, const uint64_t *removed, size_t n_removed,
                           const uint64_t *stored, size_t n_stored, int has_parent, uint64_t parent,
                           const uint32_t *tokens, uint32_t block_tokens, const char *medium)
{
    uint32_t S = ev->shards;
    uint64_t *by = n_removed ? malloc(n_removed * sizeof *by) : NULL;
    uint32_t *of = n_removed ? malloc(n_removed * sizeof *of) : NULL;
    size_t start[KVF_EVENTS_MAX_SHARDS + 1] = {0};
    int rc = n_removed && (!by || !of) ? KVF_ENOMEM : 0;
    pthread_mutex_lock(&ev->mu);
    if (!rc && ev->rt.n + n_stored > ev->roots_max)
        rc = clear_locked(ev, 1); /* past the bound: every shard clears, the table starts again */
    if (!rc)
        rc = roots_reserve(&ev->rt, n_stored);
    if (!rc) {
        /* a block not remembered (stored before this publisher, or never) goes where its own
         * hash says: a shard that does not hold it ignores the removal */
        for (size_t i = 0; i < n_removed; i++)
            if (!roots_take(&ev->rt, removed[i], &of[i]))
                of[i] = kvf_events_shard_of(removed[i], S);
        for (size_t i = 0; i < n_removed; i++)
            start[of[i] + 1]++;
        for (uint32_t k = 0; k < S; k++)
            start[k + 1] += start[k];
        for (size_t i = 0; i < n_removed; i++)
            by[start[of[i]]++] = removed[i];
        for (uint32_t k = S; k > 0; k--) /* back to the first of each shard */
            start[k] = start[k - 1];
        start[0] = 0;
        /* The stored blocks' shard: their parent's; for a sequence's first block, that of its
         * hash in kvfabric's chain (kvf_events_hash_blocks), which is what routers hash a
         * prompt with, whatever hash the engine publishes (a relay's vLLM engine has its own). */
        uint32_t home = 0;
        size_t at;
        if (n_stored && has_parent && roots_find(&ev->rt, parent, &at)) {
            home = ev->rt.shard[at];
        } else if (n_stored && roots_find(&ev->rt, stored[0], &at)) {
            /* stored again (another copy) after its parent was forgotten: where it is known to
             * be, so that its removals, which go there, find it */
            home = ev->rt.shard[at];
        } else if (n_stored && has_parent) {
            ev->unknown_parents++;
            home = kvf_events_shard_of(parent, S);
        } else if (n_stored) {
            uint64_t first = XXH3_64bits_withSeed(tokens, (size_t)block_tokens * sizeof *tokens, 0);
            home = kvf_events_shard_of(first, S);
        }
        for (size_t i = 0; i < n_stored; i++)
            roots_put(&ev->rt, stored[i], home);
        for (uint32_t k = 0; k < S; k++) {
            size_t nr = start[k + 1] - start[k];
            size_t ns = n_stored && k == home ? n_stored : 0;
            if (!nr && !ns)
                continue;
            int r = send_shard(ev, k, by + start[k], nr, stored, ns, has_parent, parent, tokens,
                               block_tokens, medium);
            rc = rc ? rc : r;
        }
    }
    pthread_mutex_unlock(&ev->mu);
    free(by), free(of);
    return rc;
}

int kvf_events_publish(kvf_events *ev, const uint64_t *removed, size_t n_removed,
                       const uint64_t *stored, size_t n_stored, int has_parent, uint64_t parent,
                       const uint32_t *tokens, uint32_t block_tokens, const char *medium)
{
    if (!ev || (n_removed && !removed) || (n_stored && (!stored || !tokens || !block_tokens)))
        return KVF_EINVAL;
    if (!n_removed && !n_stored)
        return 0;
    medium = medium ? medium : "GPU";
    if (ev->shards > 1)
        return publish_sharded(ev, removed, n_removed, stored, n_stored, has_parent, parent, tokens,
                               block_tokens, medium);
    kvf__kve_enc *e = NULL;
    const void *data;
    size_t len;
    int rc = encode(&e, removed, n_removed, stored, n_stored, has_parent, parent, tokens,
                    block_tokens, medium, &data, &len);
    pthread_mutex_lock(&ev->mu);
    ++ev->seq; /* a batch that could not be encoded leaves a gap the subscriber sees */
    if (!rc)
        rc = kvf__zpub_send(ev->pub, ev->topic, ev->seq, data, len);
    pthread_mutex_unlock(&ev->mu);
    kvf__kve_enc_free(&e);
    return rc;
}

/* kvf_events_clear, ev->mu held. */
static int clear_locked(kvf_events *ev, int forget)
{
    kvf__kve_enc *e = NULL;
    const void *data;
    size_t len;
    int rc = kvf__kve_enc_begin(&e, 1);
    if (!rc) {
        kvf__kve_enc_all_cleared(e);
        rc = kvf__kve_enc_end(e, &data, &len);
    }
    if (ev->shards > 1) {
        for (uint32_t k = 0; k < ev->shards; k++) {
            ++ev->seq;
            ++ev->shard_seq[k]; /* as send_shard: a batch not sent leaves a gap that is seen */
            int r = rc ? rc : kvf__zpub_send(ev->pub, ev->topics[k], ev->shard_seq[k], data, len);
            rc = rc ? rc : r;
        }
        if (forget)
            roots_free(&ev->rt);
    } else {
        ++ev->seq;
        if (!rc)
            rc = kvf__zpub_send(ev->pub, ev->topic, ev->seq, data, len);
    }
    kvf__kve_enc_free(&e);
    return rc;
}

int kvf_events_clear(kvf_events *ev, int forget)
{
    if (!ev)
        return KVF_EINVAL;
    pthread_mutex_lock(&ev->mu);
    int rc = clear_locked(ev, forget);
    pthread_mutex_unlock(&ev->mu);
    return rc;
}

uint64_t kvf_events_unknown_parents(const kvf_events *ev)
{
    if (!ev)
        return 0;
    pthread_mutex_lock((pthread_mutex_t *)&ev->mu);
    uint64_t n = ev->unknown_parents;
    pthread_mutex_unlock((pthread_mutex_t *)&ev->mu);
    return n;
}

uint64_t kvf_events_sequence(const kvf_events *ev)
{
    if (!ev)
        return 0;
    pthread_mutex_lock((pthread_mutex_t *)&ev->mu);
    uint64_t s = ev->seq;
    pthread_mutex_unlock((pthread_mutex_t *)&ev->mu);
    return s;
}

void kvf_events_close(kvf_events **p)
{
    kvf_events *ev = p ? *p : NULL;
    if (!ev)
        return;
    kvf__zpub_close(&ev->pub);
    kvf__tenants_close(&ev->tenants);
    free(ev->topics);
    free(ev->shard_seq);
    roots_free(&ev->rt);
    pthread_mutex_destroy(&ev->mu);
    free(ev);
    *p = NULL;
}
