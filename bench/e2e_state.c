/*
 * The state every run of kvf-bench e2e starts from (e2e.h): the warm-up, once, and before each
 * run the stores, the engines' pages and the owners table put back as the warm-up left them, so
 * that every repetition of every mode starts from the same state.
 *
 * The stores: after the warm-up they hold its chunks (W); a run with kvfabric adds the chunks of
 * the measured requests that W lacks, and evicting exactly those puts the stores back. The
 * engines: an engine's own cache is the KV of its last sequence (keep_prefix), so a prompt of one
 * token empties it (no whole chunk) and prefilling the last prompt of its warm-up share gives it
 * what the whole warm-up left there, through the mode's own reuse.
 */
#include "e2e.h"
#include "bench_util.h"

#include "kvf/kvf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Keys per exists or evict call, to keep each request to the stores small. */
#define KEY_BATCH 1024

/* ------------------------------------------------------------------------------------------ */
/* Who computed which chunk */

int e2e_owners_init(e2e_owners *o, uint32_t chunk_tokens)
{
    memset(o, 0, sizeof *o);
    pthread_mutex_init(&o->mu, NULL);
    o->mask = (1u << 20) - 1;
    o->chunk_tokens = chunk_tokens;
    o->key = calloc(o->mask + 1, sizeof *o->key);
    o->eng = calloc(o->mask + 1, sizeof *o->eng);
    o->saved_key = calloc(o->mask + 1, sizeof *o->saved_key);
    o->saved_eng = calloc(o->mask + 1, sizeof *o->saved_eng);
    return o->key && o->eng && o->saved_key && o->saved_eng ? 0 : -1;
}

void e2e_owners_free(e2e_owners *o)
{
    free(o->key);
    free(o->eng);
    free(o->saved_key);
    free(o->saved_eng);
    pthread_mutex_destroy(&o->mu);
}

static size_t owner_slot(const e2e_owners *o, uint64_t h)
{
    size_t i = (size_t)h & o->mask;
    while (o->key[i] && o->key[i] != h)
        i = (i + 1) & o->mask;
    return i;
}

size_t e2e_owners_note(e2e_owners *o, const e2e_rec *q, const kvfe_router_engine *e,
                       size_t n_loaded, size_t saved)
{
    if (!o)
        return 0;
    size_t cross = 0;
    pthread_mutex_lock(&o->mu);
    for (size_t c = 0; c < q->rt.n_keys; c++) {
        uint64_t h = (q->keys[c].lo ^ q->keys[c].hi) | 1; /* keys are hashes already */
        size_t i = owner_slot(o, h);
        if (c < n_loaded / o->chunk_tokens && o->key[i] && o->eng[i] != e)
            cross += o->chunk_tokens;
        if (c < saved / o->chunk_tokens && !o->key[i] && o->used < o->mask / 2) {
            o->key[i] = h;
            o->eng[i] = e;
            o->used++;
        }
    }
    pthread_mutex_unlock(&o->mu);
    return cross;
}

/* Copies the table to its saved copy (back: the saved copy to the table). No run is going on. */
static void owners_copy(e2e_owners *o, int back)
{
    size_t n = o->mask + 1;
    memcpy(back ? o->key : o->saved_key, back ? o->saved_key : o->key, n * sizeof *o->key);
    memcpy(back ? o->eng : o->saved_eng, back ? o->saved_eng : o->eng, n * sizeof *o->eng);
    if (back)
        o->used = o->saved_used;
    else
        o->saved_used = o->used;
}

/* ------------------------------------------------------------------------------------------ */
/* Key sets */

static int key_cmp(const void *a, const void *b)
{
    const kvf_key *x = a, *y = b;
    if (x->hi != y->hi)
        return x->hi < y->hi ? -1 : 1;
    return x->lo < y->lo ? -1 : x->lo > y->lo;
}

/* The chunk keys of n requests, sorted and without repeats, in *out (caller frees); those that
 * are in the sorted set not (n_not keys, may be 0) are left out. Returns the count, or -1. */
static long key_set(const e2e_rec *r, size_t n, const kvf_key * not, size_t n_not, kvf_key **out)
{
    size_t total = 0, k = 0;
    for (size_t i = 0; i < n; i++)
        total += r[i].rt.n_keys;
    *out = malloc((total ? total : 1) * sizeof **out);
    if (!*out)
        return -1;
    for (size_t i = 0; i < n; i++)
        for (size_t c = 0; c < r[i].rt.n_keys; c++)
            if (!n_not || !bsearch(&r[i].keys[c], not, n_not, sizeof *not, key_cmp))
                (*out)[k++] = r[i].keys[c];
    qsort(*out, k, sizeof **out, key_cmp);
    size_t u = 0;
    for (size_t i = 0; i < k; i++)
        if (!u || key_cmp(&(*out)[u - 1], &(*out)[i]) != 0)
            (*out)[u++] = (*out)[i];
    return (long)u;
}

/* How many of n keys the stores hold, or -1 when they could not be asked. */
static long count_held(kvf_client *cl, const kvf_key *keys, size_t n)
{
    uint8_t present[KEY_BATCH];
    long held = 0;
    for (size_t at = 0; at < n; at += KEY_BATCH) {
        size_t m = n - at < KEY_BATCH ? n - at : KEY_BATCH;
        if (kvf_client_exists(cl, m, keys + at, present, 10000) != 0)
            return -1;
        for (size_t i = 0; i < m; i++)
            held += present[i];
    }
    return held;
}

/* Moves the warm-up's keys that the stores do not hold (a save that did not land) from wkeys to
 * extra, so that a run that saves them has them evicted too. Returns how many stay, or -1 when the
 * stores could not be asked or there is no memory. */
static long keep_held(e2e_start *s)
{
    uint8_t present[KEY_BATCH];
    size_t kept = 0, n_extra = s->n_extra;
    kvf_key *ex = realloc(s->extra, (s->n_extra + s->n_wkeys + 1) * sizeof *ex);
    if (!ex)
        return -1;
    s->extra = ex;
    for (size_t at = 0; at < s->n_wkeys; at += KEY_BATCH) {
        size_t m = s->n_wkeys - at < KEY_BATCH ? s->n_wkeys - at : KEY_BATCH;
        if (kvf_client_exists(s->cl, m, s->wkeys + at, present, 10000) != 0)
            return -1;
        for (size_t i = 0; i < m; i++) {
            if (present[i])
                s->wkeys[kept++] = s->wkeys[at + i];
            else
                ex[n_extra++] = s->wkeys[at + i];
        }
    }
    s->n_wkeys = kept;
    s->n_extra = n_extra;
    return (long)kept;
}

/* Evicts n keys from the stores (a key they do not hold is no failure). Returns 0 or -1. */
static int evict_keys(kvf_client *cl, const kvf_key *keys, size_t n)
{
    int status[KEY_BATCH];
    for (size_t at = 0; at < n; at += KEY_BATCH) {
        size_t m = n - at < KEY_BATCH ? n - at : KEY_BATCH;
        if (kvf_client_evict(cl, m, keys + at, status, 10000) != 0)
            return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Opening */

int e2e_start_open(e2e_start *s, json_t *stores, const kvf_layout *L, kvfe_router *rt,
                   e2e_rec *warm, size_t n_warm, const e2e_rec *meas, size_t n_meas,
                   e2e_owners *own, char *err, size_t errlen)
{
    *s = (e2e_start){
        .rt = rt, .warm = warm, .n_warm = n_warm, .meas = meas, .n_meas = n_meas, .own = own};
    const char *nodes[64];
    size_t nn = 0;
    for (size_t i = 0; i < json_array_size(stores) && nn < 64; i++)
        nodes[nn++] = json_string_value(json_array_get(stores, i));
    kvf_keyspace ks;
    if (bench_keyspace(&ks, L, err, errlen) != 0)
        return -1;
    kvf_client_opts co = {.nodes = nodes, .n_nodes = nn, .ns = ks.seed};
    if (nn && kvf_client_open(&s->cl, &co, err, errlen) != 0)
        return -1;
    long nw = key_set(warm, n_warm, NULL, 0, &s->wkeys);
    long ne = nw < 0 ? -1 : key_set(meas, n_meas, s->wkeys, (size_t)nw, &s->extra);
    if (nw < 0 || ne < 0) {
        snprintf(err, errlen, "out of memory for the requests' chunk keys");
        return -1;
    }
    s->n_wkeys = (size_t)nw;
    s->n_extra = (size_t)ne;
    for (size_t i = 0; i < kvfe_router_engine_count(rt) && s->k < E2E_MAX_WARM; i++)
        if (strcmp(kvfe_router_engine_at(rt, i)->role, "decode") != 0)
            s->eng[s->k++] = kvfe_router_engine_at(rt, i);
    return 0;
}

void e2e_start_close(e2e_start *s)
{
    kvf_client_close(&s->cl);
    free(s->wkeys);
    free(s->extra);
    s->wkeys = s->extra = NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* The engines */

/* Empties every engine's own cache: a one-token prompt, with no reuse, holds no whole chunk (its
 * KV events remove the blocks the pages held). Returns 0 or -1 (said on stderr). */
static int reset_engines(kvfe_router *rt)
{
    static const uint32_t one = 0;
    int rc = 0;
    for (size_t i = 0; i < kvfe_router_engine_count(rt); i++) {
        const kvfe_router_engine *e = kvfe_router_engine_at(rt, i);
        kvfe_route q = {.tokens = &one, .n = 1, .max_tokens = 1};
        if (kvfe_router_generate(rt, e, KVFE_REUSE_NONE, &q) != 0) {
            fprintf(stderr, "kvf-bench e2e: resetting %s: %s\n", e->id, q.err);
            rc = -1;
        }
        kvfe_route_release(&q);
    }
    return rc;
}

/* The warm-up's threads: thread t of k prefills requests t, t + k, t + 2k, ... on engine t. */
typedef struct warm {
    e2e_start *s;
    atomic_int next_thread;
    atomic_size_t done;
    atomic_int failed;
} warm;

static void *warm_main(void *arg)
{
    warm *w = arg;
    e2e_start *s = w->s;
    int t = atomic_fetch_add(&w->next_thread, 1);
    for (size_t i = (size_t)t; i < s->n_warm; i += (size_t)s->k) {
        kvfe_route *q = &s->warm[i].rt;
        if (kvfe_router_prefill(s->rt, s->eng[t], KVFE_REUSE_ALL, q) != 0)
            atomic_fetch_add(&w->failed, 1);
        else
            e2e_owners_note(s->own, &s->warm[i], s->eng[t], 0, q->saved_tokens);
        kvfe_route_release(q);
        atomic_fetch_add(&w->done, 1);
    }
    return NULL;
}

/* The whole warm-up, with a progress line every 5 s. Returns 0 or -1. */
static int warm_all(e2e_start *s)
{
    pthread_t th[E2E_MAX_WARM];
    warm w = {.s = s};
    for (int i = 0; i < s->k; i++)
        pthread_create(&th[i], NULL, warm_main, &w);
    double t0 = bench_now(), last = t0;
    while (atomic_load(&w.done) < s->n_warm) {
        usleep(100000);
        if (bench_now() - last >= 5) {
            last = bench_now();
            bench_progress("e2e", "warm-up: %zu/%zu prefilled (%.0f s)", atomic_load(&w.done),
                           s->n_warm, last - t0);
        }
    }
    for (int i = 0; i < s->k; i++)
        pthread_join(th[i], NULL);
    bench_progress("e2e", "warm-up: %zu requests prefilled into the stores in %.1f s, %d failed",
                   s->n_warm, bench_now() - t0, atomic_load(&w.failed));
    return atomic_load(&w.failed) ? -1 : 0;
}

/* Prefills, on each warm-up engine, the last request of its share, with reuse. Returns 0 or -1. */
static int prefill_last_of_shares(e2e_start *s, kvfe_reuse reuse)
{
    int rc = 0;
    for (int t = 0; t < s->k && (size_t)t < s->n_warm; t++) {
        size_t last = (size_t)t + (s->n_warm - 1 - (size_t)t) / (size_t)s->k * (size_t)s->k;
        kvfe_route *q = &s->warm[last].rt;
        if (kvfe_router_prefill(s->rt, s->eng[t], reuse, q) != 0) {
            fprintf(stderr, "kvf-bench e2e: warm-up request %zu on %s: %s\n", last, s->eng[t]->id,
                    q->err);
            rc = -1;
        }
        kvfe_route_release(q);
    }
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* Warm-up and restore */

int e2e_start_warm(e2e_start *s)
{
    uint64_t removed = 0;
    int rc = s->cl ? kvf_client_clear(s->cl, &removed, 10000) : 0;
    if (rc) {
        fprintf(stderr, "kvf-bench e2e: clearing the stores: %s\n", kvf_strerror(rc));
        return -1;
    }
    if (s->n_warm && !s->k) {
        fprintf(stderr, "kvf-bench e2e: no engine to warm up: every engine is decode-only\n");
        return -1;
    }
    if (reset_engines(s->rt) != 0)
        return -1;
    if (s->n_warm && warm_all(s) != 0)
        return -1;
    size_t n_warm_keys = s->n_wkeys;
    long held = s->cl ? keep_held(s) : 0;
    if (held < 0) {
        fprintf(stderr, "kvf-bench e2e: the stores did not answer which chunks they hold\n");
        return -1;
    }
    s->warm_held = (size_t)held;
    owners_copy(s->own, 0);
    bench_progress("e2e", "the stores hold %zu of the warm-up's %zu chunks", s->warm_held,
                   n_warm_keys);
    return 0;
}

int e2e_start_restore(e2e_start *s, kvfe_reuse reuse)
{
    double t0 = bench_now();
    long held = 0, extra = 0;
    if (s->cl) {
        if (evict_keys(s->cl, s->extra, s->n_extra) != 0) {
            fprintf(stderr, "kvf-bench e2e: evicting the measured requests' chunks failed\n");
            return -1;
        }
        held = count_held(s->cl, s->wkeys, s->n_wkeys);
        extra = count_held(s->cl, s->extra, s->n_extra);
    }
    if (held < 0 || extra < 0) {
        fprintf(stderr, "kvf-bench e2e: the stores did not answer which chunks they hold\n");
        return -1;
    }
    if ((size_t)held != s->warm_held || extra != 0) {
        fprintf(stderr,
                "kvf-bench e2e: the stores hold %ld of the warm-up's chunks (%zu after it) and "
                "%ld others: they evicted for room (give them more memory)\n",
                held, s->warm_held, extra);
        return -1;
    }
    owners_copy(s->own, 1);
    if (reset_engines(s->rt) != 0 || prefill_last_of_shares(s, reuse) != 0)
        return -1;
    bench_progress("e2e",
                   "start state: the stores hold the warm-up's %ld chunks and no other; engines "
                   "reset, %d holding the last prompt of their warm-up share (%.1f s)",
                   held, s->k < (int)s->n_warm ? s->k : (int)s->n_warm, bench_now() - t0);
    return 0;
}
