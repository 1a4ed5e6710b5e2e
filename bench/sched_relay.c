/*
 * kvf-bench sched --relay: how fast kvf-relay publishes an engine's single stream again by shard
 * (docs/scale.md, "A relay for engines that publish one stream"). Real, on this machine.
 *
 * An engine's publisher (kvf_events: one stream, block hashes of its own, a replay window that
 * keeps all of it) publishes 4,096 batches of 64 chained blocks of 16 tokens (256 sequences of
 * 1,024 blocks: 262,144 blocks), then kvf-relay starts, late-joins and relays the whole window.
 * relay_blocks_per_s: blocks relayed per second, from the first live batch (which makes the relay
 * ask the window) to the relay's counter holding them all: the replay over ZeroMQ, the decode,
 * the shard of each sequence and the re-encoding and sends, on the relay's one thread. The floor
 * in the same run: decode_blocks_per_s, the same batches decoded alone in this process
 * (kvf__kve_decode_batch), the least any relay must do per block; relay_vs_decode divides them.
 */
#include "bench.h"
#include "bench_util.h"

#include "kvf/events.h"
#include "kvf/kvf.h"
#include "http.h"
#include "kvevents.h"
#include "proc.h"

#include <inttypes.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define RL_SEQS      256
#define RL_PER_BATCH 64
#define RL_BATCHES   4096 /* RL_SEQS sequences of RL_BATCHES / RL_SEQS batches */
#define RL_BT        16
#define RL_ROUNDS    3

static uint32_t rl_tok(int seq, size_t pos)
{
    return (uint32_t)(((uint64_t)seq * 7919u + pos * 31u + 1u) % 50000u);
}

/* Batch b's blocks: sequence b % RL_SEQS, its (b / RL_SEQS)-th run of RL_PER_BATCH blocks, with
 * the engine's own hashes (not kvfabric's chain). */
static void rl_batch(int b, uint64_t *h, uint32_t *tok, int *has_parent, uint64_t *parent)
{
    int seq = b % RL_SEQS, run = b / RL_SEQS;
    for (int k = 0; k < RL_PER_BATCH; k++) {
        size_t blk = (size_t)run * RL_PER_BATCH + (size_t)k;
        h[k] = 0x9E3779B97F4A7C15ull * ((uint64_t)seq << 32 | (uint64_t)(blk + 1));
        for (int t = 0; t < RL_BT; t++)
            tok[k * RL_BT + t] = rl_tok(seq, blk * RL_BT + (size_t)t);
    }
    *has_parent = run > 0;
    *parent = run > 0
                  ? 0x9E3779B97F4A7C15ull * ((uint64_t)seq << 32 | (uint64_t)(run * RL_PER_BATCH))
                  : 0;
}

/* A counter of the relay's GET /v1/relay, or -1. */
static double relay_counter(uint16_t port, const char *key)
{
    char url[96], err[256];
    snprintf(url, sizeof url, "http://127.0.0.1:%u/v1/relay", port);
    long st = 0;
    json_t *o = NULL;
    double v = -1;
    if (kvf__http_call("GET", url, NULL, 2000, &st, &o, err, sizeof err) == 0 && st == 200 &&
        json_is_number(json_object_get(o, key)))
        v = json_number_value(json_object_get(o, key));
    json_decref(o);
    return v;
}

/* One round: the window published, the relay started and timed. Blocks per second, or -1. */
static double relay_round(uint32_t shards, uint64_t *malformed)
{
    char err[300];
    kvf_events *ev = NULL;
    kvf_events_opts o = {.listen = "127.0.0.1:0",
                         .replay = "127.0.0.1:0",
                         .replay_batches = RL_BATCHES + 16,
                         .replay_bytes = (size_t)256 << 20};
    if (kvf_events_open(&ev, &o, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-bench sched --relay: %s\n", err);
        return -1;
    }
    uint64_t h[RL_PER_BATCH], parent;
    uint32_t tok[RL_PER_BATCH * RL_BT];
    int has_parent;
    for (int b = 0; b < RL_BATCHES; b++) {
        rl_batch(b, h, tok, &has_parent, &parent);
        kvf_events_publish(ev, NULL, 0, h, RL_PER_BATCH, has_parent, parent, tok, RL_BT, "GPU");
    }
    char sh[16], win[32];
    snprintf(sh, sizeof sh, "%u", shards);
    snprintf(win, sizeof win, "%d", 2 * RL_BATCHES);
    char *argv[] = {(char *)kvf__proc_find_bin("kvf-relay"),
                    (char *)"--from",
                    (char *)kvf_events_endpoint(ev),
                    (char *)"--from-replay",
                    (char *)kvf_events_replay_endpoint(ev),
                    (char *)"--shards",
                    sh,
                    (char *)"--replay-batches",
                    win,
                    (char *)"--listen",
                    (char *)"127.0.0.1:0",
                    (char *)"--log-level",
                    (char *)"error",
                    NULL};
    uint16_t port = 0;
    pid_t pid = kvf__proc_start_daemon(argv, 20000, &port, err, sizeof err);
    if (pid < 0) {
        fprintf(stderr, "kvf-bench sched --relay: %s\n", err);
        kvf_events_close(&ev);
        return -1;
    }
    /* live batches until the relay has seen one (the first it sees makes it ask for the rest),
     * then until it holds all (bounded: 60 s) */
    double t0 = bench_now(), rate = -1, got = 0;
    int live = RL_BATCHES;
    while (bench_now() - t0 < 60 && (got = relay_counter(port, "batches")) < RL_BATCHES + 1) {
        if (got <= 0) {
            rl_batch(live++ % RL_BATCHES, h, tok, &has_parent, &parent);
            kvf_events_publish(ev, NULL, 0, h, RL_PER_BATCH, has_parent, parent, tok, RL_BT, "GPU");
            t0 = bench_now();
        }
        usleep(1000);
    }
    double t = bench_now() - t0;
    if (got >= RL_BATCHES + 1 && t > 0)
        rate = (double)RL_BATCHES * RL_PER_BATCH / t;
    double bad = relay_counter(port, "malformed");
    *malformed += bad > 0 ? (uint64_t)bad : 0;
    kill(pid, SIGTERM);
    waitpid(pid, NULL, 0);
    kvf_events_close(&ev);
    return rate;
}

/* The same batches decoded alone: blocks per second, or -1. */
static double decode_rate(void)
{
    void **pay = calloc(RL_BATCHES, sizeof *pay);
    size_t *len = calloc(RL_BATCHES, sizeof *len);
    kvf__kve_decoder *dec = NULL;
    double rate = -1;
    if (!pay || !len || kvf__kve_decoder_new(&dec) != 0)
        goto out;
    uint64_t h[RL_PER_BATCH], parent;
    uint32_t tok[RL_PER_BATCH * RL_BT];
    int has_parent;
    for (int b = 0; b < RL_BATCHES; b++) {
        kvf__kve_enc *e = NULL;
        const void *d;
        rl_batch(b, h, tok, &has_parent, &parent);
        if (kvf__kve_enc_begin(&e, 1) == 0) {
            kvf__kve_enc_block_stored(e, h, RL_PER_BATCH, has_parent, parent, tok, RL_BT, "GPU");
            if (kvf__kve_enc_end(e, &d, &len[b]) == 0 && (pay[b] = malloc(len[b])))
                memcpy(pay[b], d, len[b]);
        }
        kvf__kve_enc_free(&e);
        if (!pay[b])
            goto out;
    }
    double t0 = bench_now();
    uint64_t blocks = 0;
    for (int b = 0; b < RL_BATCHES; b++) {
        const kvf_kve *ev = NULL;
        size_t n = 0;
        uint64_t bad = 0;
        char err[128];
        if (kvf__kve_decode_batch(dec, pay[b], len[b], &ev, &n, &bad, err, sizeof err) == 0)
            for (size_t i = 0; i < n; i++)
                blocks += ev[i].n_hashes;
    }
    double t = bench_now() - t0;
    if (blocks == (uint64_t)RL_BATCHES * RL_PER_BATCH && t > 0)
        rate = (double)blocks / t;
out:
    for (int b = 0; pay && b < RL_BATCHES; b++)
        free(pay[b]);
    free(pay), free(len);
    kvf__kve_decoder_free(&dec);
    return rate;
}

int bench_sched_relay(json_t *res, int quick, int shards)
{
    uint32_t s = shards >= 2 ? (uint32_t)shards : 4;
    int rounds = quick ? 1 : RL_ROUNDS;
    double relay[RL_ROUNDS], dec[RL_ROUNDS], ratio[RL_ROUNDS];
    uint64_t malformed = 0;
    int n = 0;
    for (int r = 0; r < rounds; r++) {
        double a = relay_round(s, &malformed), b = decode_rate();
        if (a <= 0 || b <= 0)
            continue;
        relay[n] = a, dec[n] = b, ratio[n] = a / b;
        bench_progress("sched", "relay round %d: %.2f M blocks/s relayed, %.2f M/s decoded alone",
                       r + 1, a / 1e6, b / 1e6);
        n++;
    }
    if (!n) {
        fprintf(stderr, "kvf-bench sched --relay: no round completed\n");
        return -1;
    }
    json_object_set_new(res, "label", json_string("real"));
    json_object_set_new(res, "what",
                        json_string("kvf-relay relaying a window of an engine's single stream by "
                                    "shard, against decoding the same batches alone"));
    json_object_set_new(res, "shards", json_integer(s));
    json_object_set_new(res, "blocks", json_integer((json_int_t)RL_BATCHES * RL_PER_BATCH));
    bench_json_rounds(res, "relay_blocks_per_s", relay, (size_t)n);
    bench_json_rounds(res, "decode_blocks_per_s", dec, (size_t)n);
    bench_json_rounds(res, "relay_vs_decode", ratio, (size_t)n);
    json_object_set_new(res, "relay_malformed", json_integer((json_int_t)malformed));
    return malformed ? -1 : 0;
}
