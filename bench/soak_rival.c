/*
 * The soak's rival tenant (soak_rival.h). Its object for id is a function of id alone (seeded
 * bytes, a valid object with its own checksums), so whatever it reads back under a key must be
 * exactly that object: a hit with other bytes is a wrong byte across tenants.
 */
#include "soak_rival.h"

#include "bytes.h"
#include "kvf/object.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#define RIVAL_MAX 64

struct soak_rival {
    soak_rival_opts o;
    kvf_client *cl;
    pthread_t th;
    atomic_int stop;
    uint64_t seg, cap, rng;
    uint8_t *objs[RIVAL_MAX], *bufs[RIVAL_MAX], *raw;
    uint64_t lens[RIVAL_MAX], caps[RIVAL_MAX], out_lens[RIVAL_MAX];
    kvf_key keys[RIVAL_MAX];
    uint64_t ids[RIVAL_MAX];
    int st[RIVAL_MAX];
    soak_rival_totals t;
};

/* The rival's object for id into dst. */
static void rival_object(soak_rival *r, uint64_t id, uint8_t *dst, uint64_t *len)
{
    uint64_t s = id ^ 0x717a1ull;
    for (uint64_t i = 0; i + 8 <= r->seg * (uint64_t)r->o.layers; i += 8) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        kvf__put_u64(r->raw + i, s);
    }
    const void *segs[16];
    for (int l = 0; l < r->o.layers; l++)
        segs[l] = r->raw + (uint64_t)l * r->seg;
    kvf_key k = r->o.key_of(id);
    size_t out = 0;
    kvf_obj_encode(&k, 1, 512, (uint32_t)r->o.layers, segs, r->seg, KVF_CODEC_NONE, dst, r->cap,
                   &out, NULL);
    *len = out;
}

/* n ids below the churn's next one, within its window. */
static int pick(soak_rival *r, int n)
{
    uint64_t next = atomic_load(r->o.next_id);
    uint64_t lo = next > r->o.window ? next - r->o.window : 0;
    if (next == lo)
        return 0;
    for (int i = 0; i < n; i++) {
        r->rng = r->rng * 6364136223846793005ull + 1442695040888963407ull;
        r->ids[i] = lo + (r->rng >> 11) % (next - lo);
        r->keys[i] = r->o.key_of(r->ids[i]);
    }
    return n;
}

/* One round: put its objects under some of the churn's keys, read them back, evict some. */
static void rival_round(soak_rival *r)
{
    int n = pick(r, r->o.batch);
    if (n == 0)
        return;
    for (int i = 0; i < n; i++)
        rival_object(r, r->ids[i], r->objs[i], &r->lens[i]);
    kvf_batch put = {.n = (size_t)n,
                     .keys = r->keys,
                     .objs = (const void *const *)r->objs,
                     .lens = r->lens,
                     .status = r->st};
    if (kvf_client_put(r->cl, &put) != 0) {
        r->t.errors++;
        return;
    }
    for (int i = 0; i < n; i++)
        r->t.puts += r->st[i] == 0;
    kvf_batch get = {.n = (size_t)n,
                     .keys = r->keys,
                     .bufs = (void *const *)r->bufs,
                     .caps = r->caps,
                     .out_lens = r->out_lens,
                     .status = r->st};
    if (kvf_client_get(r->cl, &get) != 0) {
        r->t.errors++;
        return;
    }
    for (int i = 0; i < n; i++) {
        if (r->st[i] != 0)
            continue;
        if (r->out_lens[i] == r->lens[i] && !memcmp(r->bufs[i], r->objs[i], r->lens[i]))
            r->t.verified++;
        else
            r->t.mismatches++;
    }
    int ne = n / 2 + 1;
    if (kvf_client_evict(r->cl, (size_t)ne, r->keys, r->st, 0) == 0)
        for (int i = 0; i < ne; i++)
            r->t.evictions += r->st[i] == 0;
    else
        r->t.errors++;
}

static void *rival_main(void *p)
{
    soak_rival *r = p;
    while (!atomic_load(&r->stop))
        rival_round(r);
    return NULL;
}

static void rival_free(soak_rival *r)
{
    for (int i = 0; i < RIVAL_MAX; i++) {
        free(r->objs[i]);
        free(r->bufs[i]);
    }
    free(r->raw);
    kvf_client_close(&r->cl);
    free(r);
}

int soak_rival_start(soak_rival **out, const soak_rival_opts *o)
{
    *out = NULL;
    soak_rival *r = calloc(1, sizeof *r);
    if (!r)
        return -1;
    r->o = *o;
    r->o.batch = o->batch < 1 ? 1 : o->batch > RIVAL_MAX ? RIVAL_MAX : o->batch;
    r->seg = o->object_bytes / (uint64_t)o->layers;
    r->cap = kvf_obj_raw_size((uint32_t)o->layers, r->seg);
    r->rng = 0x2b7e151628aed2a6ull;
    r->raw = malloc(r->seg * (uint64_t)o->layers);
    int ok = r->raw != NULL && o->layers <= 16;
    for (int i = 0; i < r->o.batch && ok; i++) {
        r->objs[i] = malloc(r->cap);
        r->bufs[i] = malloc(r->cap);
        r->caps[i] = r->cap;
        ok = r->objs[i] && r->bufs[i];
    }
    const char *nodes[1] = {o->node};
    kvf_client_opts co = {.nodes = nodes,
                          .n_nodes = 1,
                          .ns = o->ns,
                          .conns_per_node = 1,
                          .deadline_ms = 30000,
                          .credential = o->credential};
    char err[300] = "out of memory";
    if (!ok || kvf_client_open(&r->cl, &co, err, sizeof err) != 0 ||
        pthread_create(&r->th, NULL, rival_main, r) != 0) {
        fprintf(stderr, "kvf-bench soak: rival tenant: %s\n", err);
        rival_free(r);
        return -1;
    }
    *out = r;
    return 0;
}

void soak_rival_stop(soak_rival **rp, soak_rival_totals *t)
{
    memset(t, 0, sizeof *t);
    if (!rp || !*rp)
        return;
    soak_rival *r = *rp;
    atomic_store(&r->stop, 1);
    pthread_join(r->th, NULL);
    *t = r->t;
    rival_free(r);
    *rp = NULL;
}
