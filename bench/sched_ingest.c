/*
 * kvf-bench sched --ingest: how fast kvf-sched's index takes KV events, and how fast place()
 * stays while it does (docs/scheduler.md, "Event ingest"). Real, on this machine.
 *
 * 256 instances each publish one sequence of 4,096 blocks of 16 tokens, in batches of 64 blocks
 * (vLLM's BlockStored events, msgpack, each batch chained to the previous one of its instance):
 * 1,048,576 blocks in all, encoded before the clock starts. ingest_events_per_s: blocks indexed
 * per second by kvf_sched_ingest() on one thread, decoding included, into an empty index (the
 * median of three rounds). place_p99_us_under_ingest: with those 1M blocks indexed, place() of
 * 8,192-token requests (each an instance's prefix) on the main thread while another thread
 * ingests at 1M events per second (removing a batch's blocks and storing them again), each batch
 * decoded outside the lock and applied under it, as kvf-sched's events thread does; its p99 next
 * to place()'s p99 without ingest, in the same run.
 */
#include "bench.h"
#include "bench_util.h"

#include "kvf/events.h"
#include "kvf/kvf.h"
#include "ingest.h"
#include "kvevents.h"
#include "scheduler.h"

#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define IG_INSTANCES 256
#define IG_BT        16
#define IG_PER_BATCH 64
#define IG_SEQ       4096 /* blocks per instance */
#define IG_BATCHES   (IG_INSTANCES * IG_SEQ / IG_PER_BATCH)

typedef struct batch {
    void *stored, *removed; /* encoded payloads */
    size_t stored_len, removed_len;
    int inst;
} batch;

static uint32_t tok(int inst, size_t pos)
{
    return (uint32_t)(((uint64_t)inst * 7919u + pos * 31u) % 50000u);
}

static void *dup_payload(kvf__kve_enc *e, size_t *len)
{
    const void *d;
    if (kvf__kve_enc_end(e, &d, len) != 0)
        return NULL;
    void *p = malloc(*len);
    if (p)
        memcpy(p, d, *len);
    return p;
}

/* Every instance's sequence as batches, instance-interleaved (batch k is instance k % 256's
 * (k / 256)-th). Returns NULL out of memory. */
static batch *encode_all(void)
{
    batch *b = calloc(IG_BATCHES, sizeof *b);
    uint64_t h[IG_PER_BATCH];
    uint32_t t[IG_PER_BATCH * IG_BT];
    for (size_t k = 0; b && k < IG_BATCHES; k++) {
        int inst = (int)(k % IG_INSTANCES);
        size_t first = k / IG_INSTANCES * IG_PER_BATCH; /* block index in its sequence */
        for (int i = 0; i < IG_PER_BATCH; i++)
            h[i] = ((uint64_t)(inst + 1) << 32) | (first + (size_t)i + 1);
        for (int i = 0; i < IG_PER_BATCH * IG_BT; i++)
            t[i] = tok(inst, first * IG_BT + (size_t)i);
        kvf__kve_enc *e = NULL;
        if (kvf__kve_enc_begin(&e, 1) != 0)
            goto fail;
        kvf__kve_enc_block_stored(e, h, IG_PER_BATCH, first > 0,
                                  first ? (((uint64_t)(inst + 1) << 32) | first) : 0, t, IG_BT,
                                  "GPU");
        b[k].stored = dup_payload(e, &b[k].stored_len);
        kvf__kve_enc_free(&e);
        if (kvf__kve_enc_begin(&e, 1) != 0)
            goto fail;
        kvf__kve_enc_block_removed(e, h, IG_PER_BATCH, "GPU");
        b[k].removed = dup_payload(e, &b[k].removed_len);
        kvf__kve_enc_free(&e);
        b[k].inst = inst;
        if (!b[k].stored || !b[k].removed)
            goto fail;
    }
    return b;
fail:
    for (size_t k = 0; k < IG_BATCHES; k++)
        free(b[k].stored), free(b[k].removed);
    free(b);
    return NULL;
}

kvf_sched *bench_sched_uniform(int n, uint32_t block_tokens, uint64_t capacity_blocks)
{
    kvf_sched_opts so = {.policy = KVF_POLICY_KVF_COST, .expected_blocks = 1u << 21};
    kvf_sched_cost_defaults(&so.cost);
    kvf_sched *s = NULL;
    if (kvf_sched_new(&s, &so) != 0)
        return NULL;
    for (int i = 0; i < n; i++) {
        kvf_instance_info info;
        memset(&info, 0, sizeof info);
        snprintf(info.id, sizeof info.id, "inst-%d", i);
        info.role = KVF_ROLE_BOTH;
        info.block_tokens = block_tokens;
        info.capacity_blocks = capacity_blocks;
        kvf_sched_instance_add(s, &info, NULL);
    }
    return s;
}

/* Decodes one payload with d and applies it to s, taking mu (may be NULL: applied whole) for the
 * apply only, a slice of KVF_SCHED_APPLY_SLICE blocks at a time, as kvf-sched's events thread
 * does. 0 or an error. */
static int ingest_one(kvf_sched *s, kvf__kve_decoder *d, pthread_mutex_t *mu, int inst,
                      const void *payload, size_t len, kvf_ingest_stats *st)
{
    char err[256];
    const kvf_kve *ev;
    size_t n;
    uint64_t malformed = 0;
    int rc = kvf__kve_decode_batch(d, payload, len, &ev, &n, &malformed, err, sizeof err);
    if (rc)
        return rc;
    kvf_event_source src = {.instance = inst, .store = -1};
    if (!mu)
        return kvf_sched_apply(s, &src, ev, n, malformed, st, err, sizeof err);
    /* slice by slice, the lock released between them, as kvf-sched's events thread applies */
    kvf_apply_cursor cur = {0, 0};
    do {
        pthread_mutex_lock(mu);
        rc = kvf_sched_apply_some(s, &src, ev, n, malformed, &cur, KVF_SCHED_APPLY_SLICE, st, err,
                                  sizeof err);
        pthread_mutex_unlock(mu);
    } while (!rc && cur.event < n);
    return rc;
}

typedef int (*decode_fn)(kvf__kve_decoder *, const void *, size_t, const kvf_kve **, size_t *,
                         uint64_t *, char *, size_t);

/* Decodes batches [0, n) of b with fn and applies none: the decoding's share of ingest(). Returns
 * the seconds it took, or -1 on an error. */
static double decode_only(decode_fn fn, kvf__kve_decoder *d, const batch *b, size_t n)
{
    char err[256];
    const kvf_kve *ev;
    size_t ne;
    double t0 = bench_now();
    for (size_t k = 0; k < n; k++)
        if (fn(d, b[k].stored, b[k].stored_len, &ev, &ne, NULL, err, sizeof err) != 0)
            return -1;
    return bench_now() - t0;
}

/* Ingests batches [0, n) of b into s. Returns the seconds it took, or -1 on an error. */
static double ingest(kvf_sched *s, kvf__kve_decoder *d, const batch *b, size_t n,
                     kvf_ingest_stats *st)
{
    double t0 = bench_now();
    for (size_t k = 0; k < n; k++)
        if (ingest_one(s, d, NULL, b[k].inst, b[k].stored, b[k].stored_len, st) != 0)
            return -1;
    return bench_now() - t0;
}

typedef struct churn {
    kvf_sched *s;
    kvf__kve_decoder *d;
    const batch *b;
    pthread_mutex_t *mu;
    atomic_int stop;
    double rate; /* blocks per second to aim for */
    uint64_t events;
} churn;

/* Removes a batch's blocks and stores them again, batch after batch, paced to c->rate blocks
 * (events) per second, each batch decoded without the lock and applied under it. */
static void *churn_main(void *arg)
{
    churn *c = arg;
    kvf_ingest_stats st = {0};
    double t0 = bench_now();
    for (size_t k = 0; !atomic_load(&c->stop); k = (k + 1) % IG_BATCHES) {
        ingest_one(c->s, c->d, c->mu, c->b[k].inst, c->b[k].removed, c->b[k].removed_len, &st);
        ingest_one(c->s, c->d, c->mu, c->b[k].inst, c->b[k].stored, c->b[k].stored_len, &st);
        c->events += 2 * IG_PER_BATCH;
        double ahead = (double)c->events / c->rate - (bench_now() - t0);
        if (ahead > 0) {
            struct timespec ts = {0, (long)(ahead * 1e9)};
            nanosleep(&ts, NULL);
        }
    }
    c->rate = (double)c->events / (bench_now() - t0); /* what it achieved */
    return NULL;
}

/* place() latencies (us, lock wait included) of `calls` 8,192-token requests into lat. */
static void time_places(kvf_sched *s, pthread_mutex_t *mu, int calls, double *lat)
{
    static uint32_t t[512 * IG_BT];
    for (int c = 0; c < calls; c++) {
        int inst = (int)((uint64_t)c * 2654435761u % IG_INSTANCES);
        for (size_t i = 0; i < 512 * IG_BT; i++)
            t[i] = tok(inst, i);
        kvf_place_req rq = {.tokens = t, .n_tokens = 512 * IG_BT, .output_tokens = 256};
        kvf_place_res rs;
        double t0 = bench_now();
        pthread_mutex_lock(mu);
        kvf_sched_place(s, &rq, &rs);
        pthread_mutex_unlock(mu);
        lat[c] = (bench_now() - t0) * 1e6;
    }
}

/* The machine's own noise: a loop of arithmetic that touches no memory and takes no lock,
 * sized to last as long as a median place(), timed as place() is. Its p99 is what this machine
 * (timer ticks, a hypervisor's exits, the other thread sharing the cores) adds to any work that
 * long: the floor under place()'s p99, measured in the same run. */
static volatile uint64_t spin_sink;

static void spin(uint64_t iters)
{
    uint64_t x = spin_sink;
    for (uint64_t k = 0; k < iters; k++)
        x = x * 6364136223846793005ull + 1442695040888963407ull;
    spin_sink = x;
}

/* Iterations of spin() that last about `us` microseconds (the median of 51 timings). */
static uint64_t spin_iters_for(double us)
{
    const uint64_t probe = 100000;
    double t[51];
    for (int i = 0; i < 51; i++) {
        double t0 = bench_now();
        spin(probe);
        t[i] = (bench_now() - t0) * 1e6;
    }
    double per = bench_quantile(t, 51, 0.5) / (double)probe;
    return per > 0 ? (uint64_t)(us / per) + 1 : 1;
}

static void time_spins(uint64_t iters, int calls, double *lat)
{
    for (int c = 0; c < calls; c++) {
        double t0 = bench_now();
        spin(iters);
        lat[c] = (bench_now() - t0) * 1e6;
    }
}

/* One shard's ingest thread: its own index and decoder, the batches of the sequences whose first
 * block is in its shard (those a replica subscribed to its shard's topic receives), in order. */
typedef struct shard_job {
    const batch *b;
    const size_t *mine; /* indices into b */
    size_t n;
    pthread_barrier_t *go;
    double secs;           /* from the barrier to its last batch applied; -1 on an error */
    uint64_t blocks, held; /* blocks ingested, and those its index holds at the end */
} shard_job;

static void *shard_main(void *arg)
{
    shard_job *j = arg;
    kvf_sched *s = bench_sched_uniform(IG_INSTANCES, IG_BT, 1u << 20);
    kvf__kve_decoder *d = NULL;
    int ok = s && kvf__kve_decoder_new(&d) == 0;
    kvf_ingest_stats st = {0};
    pthread_barrier_wait(j->go);
    double t0 = bench_now();
    for (size_t k = 0; ok && k < j->n; k++) {
        const batch *x = &j->b[j->mine[k]];
        ok = ingest_one(s, d, NULL, x->inst, x->stored, x->stored_len, &st) == 0;
    }
    j->secs = ok ? bench_now() - t0 : -1;
    j->blocks = st.stored;
    kvf_index_stats ix = {0};
    if (s)
        kvf_sched_index_stats(s, &ix);
    j->held = ix.blocks;
    kvf__kve_decoder_free(&d);
    kvf_sched_destroy(&s);
    return NULL;
}

/* The batches ingested by `shards` threads, each shard's index its own (the events of an engine
 * publishing with kvf_events_opts.shards, each shard a kvf-sched replica): the aggregate rate is
 * every block over the slowest shard's time. Returns it, or -1; *max_over_mean the largest shard's
 * blocks over the mean, *held the blocks the largest shard's index holds. */
static double ingest_sharded(const batch *b, int shards, double *max_over_mean, uint64_t *held)
{
    size_t *idx = malloc(IG_BATCHES * sizeof *idx), at = 0;
    shard_job *jobs = calloc((size_t)shards, sizeof *jobs);
    pthread_t *th = calloc((size_t)shards, sizeof *th);
    double rate = -1;
    if (!idx || !jobs || !th)
        goto out;
    for (int k = 0; k < shards; k++) {
        jobs[k].mine = idx + at;
        for (size_t x = 0; x < IG_BATCHES; x++) {
            /* the shard of the instance's one sequence: that of its first block */
            uint64_t root = ((uint64_t)(b[x].inst + 1) << 32) | 1u;
            if ((int)kvf_events_shard_of(root, (uint32_t)shards) == k)
                idx[at++] = x;
        }
        jobs[k].n = (size_t)(idx + at - jobs[k].mine);
    }
    pthread_barrier_t go;
    pthread_barrier_init(&go, NULL, (unsigned)shards);
    int started = 0;
    for (int k = 0; k < shards; k++) {
        jobs[k].b = b;
        jobs[k].go = &go;
        if (pthread_create(&th[k], NULL, shard_main, &jobs[k]) != 0)
            break;
        started++;
    }
    if (started < shards) { /* the barrier would never open: nothing measured */
        fprintf(stderr, "kvf-bench sched --ingest: cannot start %d threads\n", shards);
        exit(1);
    }
    double slowest = 0;
    uint64_t blocks = 0, most = 0;
    int ok = 1;
    for (int k = 0; k < shards; k++) {
        pthread_join(th[k], NULL);
        ok = ok && jobs[k].secs > 0;
        slowest = jobs[k].secs > slowest ? jobs[k].secs : slowest;
        blocks += jobs[k].blocks;
        most = jobs[k].blocks > most ? jobs[k].blocks : most;
        *held = jobs[k].held > *held ? jobs[k].held : *held;
    }
    pthread_barrier_destroy(&go);
    *max_over_mean = blocks ? (double)most * shards / (double)blocks : 0;
    rate = ok && slowest > 0 ? (double)blocks / slowest : -1;
out:
    free(idx), free(jobs), free(th);
    return rate;
}

/* --shards: the index split `shards` ways against one shard, the same batches, round by round
 * in the same run. */
static int sharded_figures(json_t *res, const batch *b, int shards)
{
    const int rounds = 3;
    double one[3], many[3], balance = 0;
    uint64_t held1 = 0, heldn = 0;
    for (int r = 0; r < rounds; r++) {
        double bal;
        one[r] = ingest_sharded(b, 1, &bal, &held1);
        many[r] = ingest_sharded(b, shards, &balance, &heldn);
        if (one[r] <= 0 || many[r] <= 0) {
            fprintf(stderr, "kvf-bench sched --ingest: the sharded index refused a batch\n");
            return -1;
        }
    }
    bench_spread s1 = bench_json_rounds(res, "sharded_one_events_per_s", one, (size_t)rounds);
    bench_spread sn = bench_json_rounds(res, "sharded_events_per_s", many, (size_t)rounds);
    double ratio[3];
    for (int r = 0; r < rounds; r++)
        ratio[r] = many[r] / one[r];
    bench_spread sr = bench_json_rounds(res, "sharded_vs_one", ratio, (size_t)rounds);
    json_object_set_new(res, "shards", json_integer(shards));
    json_object_set_new(res, "shard_blocks_max_over_mean", json_real(balance));
    json_object_set_new(res, "shard_index_blocks_max", json_integer((json_int_t)heldn));
    json_object_set_new(res, "unsharded_index_blocks", json_integer((json_int_t)held1));
    json_object_set_new(res, "sharded_label", json_string("real"));
    printf("  the index split %d ways by prefix, a thread per shard (each a kvf-sched replica's "
           "work): %.2f M events/s in all (rounds %.2f-%.2f), one shard %.2f M events/s in the "
           "same rounds: %.2fx (rounds %.2f-%.2f); the largest shard takes %.2fx the mean and "
           "indexes %" PRIu64 " of the %" PRIu64 " blocks; this machine has %ld cores\n",
           shards, sn.median / 1e6, sn.p10 / 1e6, sn.p90 / 1e6, s1.median / 1e6, sr.median, sr.p10,
           sr.p90, balance, heldn, held1, sysconf(_SC_NPROCESSORS_ONLN));
    return 0;
}

int bench_sched_ingest(json_t *res, int quick, int shards)
{
    const int rounds = 3, calls = quick ? 2000 : 10000;
    batch *b = encode_all();
    double *lat = malloc((size_t)calls * sizeof *lat), rate[3], drate[3], rrate[3];
    kvf__kve_decoder *d = NULL;
    kvf_sched *s = NULL;
    int rc = -1;
    if (!b || !lat || kvf__kve_decoder_new(&d) != 0) {
        fprintf(stderr, "kvf-bench sched --ingest: out of memory\n");
        goto out;
    }
    kvf_ingest_stats st = {0};
    for (int r = 0; r < rounds; r++) {
        kvf_sched_destroy(&s);
        s = bench_sched_uniform(IG_INSTANCES, IG_BT, 1u << 20);
        memset(&st, 0, sizeof st);
        double secs = s ? ingest(s, d, b, IG_BATCHES, &st) : -1;
        if (secs <= 0) {
            fprintf(stderr, "kvf-bench sched --ingest: the index refused a batch\n");
            goto out;
        }
        rate[r] = (double)st.stored / secs;
        double dsecs = decode_only(kvf__kve_decode_batch, d, b, IG_BATCHES);
        drate[r] = dsecs > 0 ? (double)st.stored / dsecs : 0;
        /* the peer: msgpack-c's object tree, which decoded the events before msgpuck */
        double rsecs = decode_only(kvf__kve_decode_batch_ref, d, b, IG_BATCHES);
        rrate[r] = rsecs > 0 ? (double)st.stored / rsecs : 0;
    }
    kvf_index_stats ix;
    kvf_sched_index_stats(s, &ix);
    printf("kvf-bench sched --ingest: real (this machine, one thread)\n");
    bench_spread ing = bench_json_rounds(res, "ingest_events_per_s", rate, (size_t)rounds);
    bench_spread dec = bench_json_rounds(res, "decode_events_per_s", drate, (size_t)rounds);
    bench_spread ref = bench_json_rounds(res, "decode_ref_events_per_s", rrate, (size_t)rounds);
    json_object_set_new(res, "decoder", json_string(kvf__kve_decoder_name()));
    json_object_set_new(res, "decode_vs_ref",
                        json_real(ref.median > 0 ? dec.median / ref.median : 0));
    printf("  ingest: %" PRIu64 " blocks (BlockStored, %d per batch, chained) into an empty index "
           "of %d instances: %.2f M events/s (rounds %.2f-%.2f); index %" PRIu64
           " blocks, %.0f MiB; target 5 M/s\n",
           st.stored, IG_PER_BATCH, IG_INSTANCES, ing.median / 1e6, ing.p10 / 1e6, ing.p90 / 1e6,
           ix.blocks, (double)ix.bytes / 1048576.0);
    printf("  of which decoding alone (%s, no index): %.2f M events/s, %.0f ns of the %.0f ns a "
           "block takes; msgpack-c's object tree (the peer): %.2f M events/s, %.0f ns (%.2fx)\n",
           kvf__kve_decoder_name(), dec.median / 1e6, 1e9 / dec.median, 1e9 / ing.median,
           ref.median / 1e6, 1e9 / ref.median, ref.median > 0 ? dec.median / ref.median : 0);
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    time_places(s, &mu, calls, lat);
    double idle99 = bench_quantile(lat, (size_t)calls, 0.99),
           idle50 = bench_quantile(lat, (size_t)calls, 0.5);
    uint64_t iters = spin_iters_for(idle50);
    time_spins(iters, calls, lat);
    double noise99 = bench_quantile(lat, (size_t)calls, 0.99),
           noise50 = bench_quantile(lat, (size_t)calls, 0.5);
    churn c = {.s = s, .d = d, .b = b, .mu = &mu, .rate = 1e6};
    pthread_t th;
    int started = pthread_create(&th, NULL, churn_main, &c) == 0;
    time_places(s, &mu, calls, lat);
    double busy99 = bench_quantile(lat, (size_t)calls, 0.99),
           busy50 = bench_quantile(lat, (size_t)calls, 0.5);
    time_spins(iters, calls, lat);
    atomic_store(&c.stop, 1);
    if (started)
        pthread_join(th, NULL);
    double bnoise99 = bench_quantile(lat, (size_t)calls, 0.99);
    printf("  place() of an 8192-token request, %d calls: alone p50 %.1f us p99 %.1f us; while "
           "ingesting %.2f M events/s: p50 %.1f us p99 %.1f us (%.2fx); target p99 <= 50 us\n",
           calls, idle50, idle99, c.rate / 1e6, busy50, busy99, idle99 > 0 ? busy99 / idle99 : 0);
    printf("  this machine's floor: a loop of arithmetic as long as a median place() (%.1f us), "
           "timed the same way: p99 %.1f us alone, %.1f us while ingesting; place() p99 / floor: "
           "%.2f alone, %.2f while ingesting\n",
           noise50, noise99, bnoise99, noise99 > 0 ? idle99 / noise99 : 0,
           bnoise99 > 0 ? busy99 / bnoise99 : 0);
    json_object_set_new(res, "noise_p50_us_alone", json_real(noise50));
    json_object_set_new(res, "noise_p99_us_alone", json_real(noise99));
    json_object_set_new(res, "noise_p99_us_under_ingest", json_real(bnoise99));
    json_object_set_new(res, "place_p99_alone_vs_noise",
                        json_real(noise99 > 0 ? idle99 / noise99 : 0));
    json_object_set_new(res, "place_p99_under_ingest_vs_noise",
                        json_real(bnoise99 > 0 ? busy99 / bnoise99 : 0));
    json_object_set_new(res, "ingest_label", json_string("real"));
    json_object_set_new(res, "ingest_blocks", json_integer((json_int_t)st.stored));
    json_object_set_new(res, "index_blocks", json_integer((json_int_t)ix.blocks));
    json_object_set_new(res, "index_bytes", json_integer((json_int_t)ix.bytes));
    json_object_set_new(res, "index_instances", json_integer(IG_INSTANCES));
    json_object_set_new(res, "place_p50_us_alone", json_real(idle50));
    json_object_set_new(res, "place_p99_us_alone", json_real(idle99));
    json_object_set_new(res, "place_p50_us_under_ingest", json_real(busy50));
    json_object_set_new(res, "place_p99_us_under_ingest", json_real(busy99));
    json_object_set_new(res, "ingest_events_per_s_during_place", json_real(c.rate));
    rc = shards > 1 ? sharded_figures(res, b, shards) : 0;
out:
    kvf_sched_destroy(&s);
    kvf__kve_decoder_free(&d);
    for (size_t k = 0; b && k < IG_BATCHES; k++)
        free(b[k].stored), free(b[k].removed);
    free(b);
    free(lat);
    return rc;
}
