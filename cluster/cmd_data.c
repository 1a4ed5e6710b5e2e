/*
 * kvf: the operator CLI.
 *
 *   kvf stats   --node HOST:PORT [--json]
 *   kvf put     --node HOST:PORT[,...] [chunks] [--codec none|lz4|shuffle-lz4]
 *   kvf get     --node ... [chunks]        fetch, verify checksums and synthetic content
 *   kvf lookup  --node ... [chunks]        leading cached prefix, one round trip per node
 *   kvf evict | pin [--lease-ms N] | unpin | compress --codec C   --node ... [chunks]
 *   kvf clear   --node ... [--model M] [--salt S]
 *   kvf keys    [chunks]                   print the chunk keys of a token sequence
 *   kvf estimate --model M --tokens N [--batch B] [--memory SIZE]   KV memory a workload needs
 *   kvf probe    [--engine NAME]           this host's capability record, by executing tiny actions
 *   kvf classify --local L --remote R [--state S.json]   every remote action's feasibility label,
 *                                      reason and score, and the optimality gap (L, R: a built-in
 *                                      record name or a capability record JSON file)
 *
 * [chunks] names a token sequence and its namespace: --model PRESET|layout.json (default
 * ref-tiny), --salt TENANT, and either --tokens-file F (whitespace- or comma-separated token ids)
 * or --synthetic N [--seed S] (N deterministic tokens). Synthetic chunks carry deterministic KV
 * bytes derived from their key, so `get` can check every byte it receives.
 * Output is readable by default; --json prints one JSON object.
 */
#include "kvf/kvf.h"

#include "cluster.h"
#include "bytes.h"
#include "probe.h"
#include "units.h"

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct args {
    const char *cmd;
    char *nodes[KVF_CLIENT_MAX_NODES];
    size_t n_nodes;
    const char *model;
    const char *salt;
    const char *tokens_file;
    long synthetic;
    uint64_t seed;
    const char *codec;
    const char *local, *remote, *state, *engine;
    const char *calib[4];
    int n_calib;
    int live_pressure;
    uint64_t tokens, batch, memory;
    uint32_t lease_ms;
    int json;
    int deadline_ms;
    int conns;
} args;

static void usage(FILE *f)
{
    fprintf(
        f,
        "usage: kvf COMMAND [options]\n"
        "commands: stats put get lookup evict pin unpin compress clear keys estimate classify "
        "probe\n"
        "          cluster up|down|status --config FILE [--netns] [--json]\n"
        "  --node HOST:PORT[,HOST:PORT...]  storage nodes (repeatable)\n"
        "  --model PRESET|FILE.json         layout (default ref-tiny)\n"
        "  --salt TENANT                    tenant salt of the key namespace\n"
        "  --synthetic N [--seed S]         N deterministic tokens with synthetic KV\n"
        "  --tokens-file FILE               token ids, separated by spaces or commas\n"
        "  --codec none|lz4|shuffle-lz4     put/compress codec (default none)\n"
        "  --lease-ms N                     pin lease (default 30000)\n"
        "  --deadline-ms N                  per-operation deadline (default 5000)\n"
        "  --tokens N [--batch B] [--memory SIZE]   estimate: workload and budget\n"
        "  --local L --remote R [--state S.json]   classify: capability records\n"
        "  --calibration BENCH.json         classify: constants from a kvf-bench store or\n"
        "                                   connector --json result (repeatable)\n"
        "  --live-pressure                  classify: memory pressure from this host's telemetry\n"
        "  --json                           one JSON object on stdout\n");
}

/* Token i of a synthetic sequence depends only on (seed, i), so sequences of different lengths
 * with one seed share their prefix. */
static uint32_t synthetic_token(uint64_t seed, size_t i)
{
    uint64_t s = seed * 0x100000001b3ull + i;
    return (uint32_t)(kvf__splitmix64(&s) % 32000u);
}

/* Deterministic KV bytes for layer l of the chunk with key k: smooth values, as real KV tensors
 * are, so codecs have something to find. */
static void synthetic_segment(const kvf_key *k, uint32_t l, kvf_dtype dt, uint8_t *out,
                              size_t bytes)
{
    uint64_t s = k->lo ^ (k->hi * 31) ^ ((uint64_t)l << 48);
    size_t esz = kvf_layout_dtype_size(dt);
    for (size_t i = 0; i + esz <= bytes; i += esz) {
        uint64_t r = kvf__splitmix64(&s);
        float v = ((float)(r & 0xffff) - 32768.0f) / 16384.0f * 0.5f;
        uint32_t bits;
        memcpy(&bits, &v, 4);
        if (esz == 4)
            memcpy(out + i, &bits, 4);
        else if (esz == 2) {
            uint16_t h = (uint16_t)(bits >> 16);
            memcpy(out + i, &h, 2);
        } else
            out[i] = (uint8_t)(bits >> 24);
    }
}

static int read_tokens(const char *path, uint32_t **out, size_t *n)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "kvf: %s: %s\n", path, strerror(errno));
        return -1;
    }
    size_t cap = 1024, k = 0;
    uint32_t *t = malloc(cap * sizeof *t);
    int c;
    unsigned long long v = 0;
    int in_num = 0;
    long line = 1;
    while (t) {
        c = fgetc(f);
        if (c >= '0' && c <= '9') {
            v = v * 10 + (unsigned)(c - '0');
            if (v > UINT32_MAX) {
                fprintf(stderr, "kvf: %s:%ld: token id out of range\n", path, line);
                free(t);
                fclose(f);
                return -1;
            }
            in_num = 1;
            continue;
        }
        if (in_num) {
            if (k == cap) {
                cap *= 2;
                uint32_t *nt = realloc(t, cap * sizeof *t);
                if (!nt)
                    break;
                t = nt;
            }
            t[k++] = (uint32_t)v;
            v = 0;
            in_num = 0;
        }
        if (c == EOF)
            break;
        if (c == '\n')
            line++;
        if (c != ' ' && c != ',' && c != '\n' && c != '\t' && c != '\r') {
            fprintf(stderr, "kvf: %s:%ld: unexpected character '%c'\n", path, line, c);
            free(t);
            fclose(f);
            return -1;
        }
    }
    fclose(f);
    if (!t) {
        fprintf(stderr, "kvf: out of memory\n");
        return -1;
    }
    *out = t;
    *n = k;
    return 0;
}

typedef struct chunks {
    kvf_layout layout;
    kvf_keyspace ks;
    uint32_t *tokens;
    size_t n_tokens;
    kvf_key *keys;
    size_t n;
    size_t leftover;
} chunks;

static int load_chunks(const args *a, chunks *ch, int need_tokens)
{
    char err[256];
    memset(ch, 0, sizeof *ch);
    if (kvf_layout_resolve(a->model, &ch->layout, err, sizeof err) != 0) {
        fprintf(stderr, "kvf: --model: %s\n", err);
        return -1;
    }
    size_t salt_len = a->salt ? strlen(a->salt) : 0;
    if (kvf_keyspace_init(&ch->ks, &ch->layout, a->salt, salt_len) != 0) {
        fprintf(stderr, "kvf: --salt: longer than %u bytes\n", KVF_SALT_MAX);
        return -1;
    }
    if (!need_tokens)
        return 0;
    if (a->tokens_file) {
        if (read_tokens(a->tokens_file, &ch->tokens, &ch->n_tokens) != 0)
            return -1;
    } else if (a->synthetic > 0) {
        ch->n_tokens = (size_t)a->synthetic;
        ch->tokens = malloc(ch->n_tokens * sizeof *ch->tokens);
        if (!ch->tokens)
            return -1;
        for (size_t i = 0; i < ch->n_tokens; i++)
            ch->tokens[i] = synthetic_token(a->seed, i);
    } else {
        fprintf(stderr, "kvf: %s needs --synthetic N or --tokens-file FILE\n", a->cmd);
        return -1;
    }
    size_t maxk = ch->n_tokens / ch->layout.chunk_tokens;
    ch->keys = calloc(maxk ? maxk : 1, sizeof *ch->keys);
    if (!ch->keys)
        return -1;
    kvf_keys_compute(&ch->ks, ch->tokens, ch->n_tokens, ch->keys, maxk, &ch->n, &ch->leftover);
    if (ch->n == 0) {
        fprintf(stderr, "kvf: %zu tokens make no full chunk of %u tokens\n", ch->n_tokens,
                ch->layout.chunk_tokens);
        return -1;
    }
    return 0;
}

static void free_chunks(chunks *ch)
{
    free(ch->tokens);
    free(ch->keys);
}

static int open_client(const args *a, const chunks *ch, kvf_client **cl)
{
    if (a->n_nodes == 0) {
        fprintf(stderr, "kvf: %s needs --node HOST:PORT\n", a->cmd);
        return -1;
    }
    kvf_client_opts o = {
        .nodes = (const char *const *)a->nodes,
        .n_nodes = a->n_nodes,
        .ns = ch->ks.seed,
        .conns_per_node = a->conns,
        .deadline_ms = a->deadline_ms,
    };
    char err[256];
    int rc = kvf_client_open(cl, &o, err, sizeof err);
    if (rc) {
        fprintf(stderr, "kvf: %s\n", err);
        return -1;
    }
    return 0;
}

/* Builds the synthetic object of chunk i. Caller frees *obj. */
static int build_object(const chunks *ch, size_t i, kvf_codec codec, uint8_t **obj, uint64_t *len)
{
    const kvf_layout *l = &ch->layout;
    uint64_t seg = kvf_layout_segment_bytes(l);
    size_t cap = kvf_obj_raw_size(l->layers, seg);
    uint8_t *raw = malloc((size_t)seg * l->layers);
    uint8_t *scratch = malloc(seg);
    const void **segs = malloc(l->layers * sizeof *segs);
    *obj = malloc(cap);
    int rc = -1;
    if (raw && scratch && segs && *obj) {
        for (uint32_t k = 0; k < l->layers; k++) {
            synthetic_segment(&ch->keys[i], k, l->dtype, raw + (size_t)k * seg, seg);
            segs[k] = raw + (size_t)k * seg;
        }
        size_t out;
        rc = kvf_obj_encode(&ch->keys[i], ch->ks.layout_fp, l->chunk_tokens, l->layers, segs, seg,
                            codec, *obj, cap, &out, scratch);
        *len = out;
    }
    free(raw);
    free(scratch);
    free(segs);
    if (rc) {
        free(*obj);
        *obj = NULL;
    }
    return rc;
}

/* Decodes a fetched object and compares it with the synthetic content of chunk i. */
static int check_object(const chunks *ch, size_t i, const uint8_t *obj, uint64_t len)
{
    kvf_obj_info info;
    int rc = kvf_obj_verify(obj, len, &info);
    if (rc)
        return rc;
    const kvf_layout *l = &ch->layout;
    uint64_t seg = kvf_layout_segment_bytes(l);
    if (info.layers != l->layers || info.layout_fp != ch->ks.layout_fp)
        return KVF_ELAYOUT;
    uint8_t *want = malloc(seg), *got = malloc(seg), *scratch = malloc(seg);
    rc = (want && got && scratch) ? 0 : KVF_ENOMEM;
    const uint8_t *p = obj + info.header_len;
    for (uint32_t k = 0; k < l->layers && !rc; k++) {
        kvf_obj_seg s = kvf_obj_seg_at(&info, k);
        if (s.raw_len != seg) {
            rc = KVF_ELAYOUT;
            break;
        }
        rc = kvf_obj_decode_seg(info.codec, &s, p, got, scratch);
        synthetic_segment(&ch->keys[i], k, l->dtype, want, seg);
        if (!rc && memcmp(want, got, seg) != 0)
            rc = KVF_ECHECKSUM;
        p += s.stored_len;
    }
    free(want);
    free(got);
    free(scratch);
    return rc;
}

static void print_statuses(const args *a, const chunks *ch, const int *st, const char *what)
{
    size_t ok = 0, other = 0;
    json_t *counts = json_object();
    for (size_t i = 0; i < ch->n; i++) {
        const char *name = st[i] == 0 ? "ok" : kvf_err_name(st[i]);
        json_t *v = json_object_get(counts, name);
        json_object_set_new(counts, name, json_integer(v ? json_integer_value(v) + 1 : 1));
        if (st[i] == 0)
            ok++;
        else
            other++;
    }
    if (a->json) {
        json_t *o = json_pack("{s:s,s:I,s:I,s:O}", "command", a->cmd, "chunks", (json_int_t)ch->n,
                              "ok", (json_int_t)ok, "statuses", counts);
        char *t = json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS);
        printf("%s\n", t);
        free(t);
        json_decref(o);
    } else {
        printf("%s: %zu chunk(s) of %u tokens, %zu %s", a->cmd, ch->n, ch->layout.chunk_tokens, ok,
               what);
        const char *k;
        json_t *v;
        json_object_foreach(counts, k, v)
        {
            if (strcmp(k, "ok") != 0)
                printf(", %" JSON_INTEGER_FORMAT " %s", json_integer_value(v), k);
        }
        printf("\n");
    }
    json_decref(counts);
    (void)other;
}

static int cmd_put(const args *a, kvf_client *cl, const chunks *ch)
{
    kvf_codec codec = KVF_CODEC_NONE;
    if (a->codec && kvf_codec_parse(a->codec, &codec) != 0) {
        fprintf(stderr, "kvf: --codec: expected none, lz4 or shuffle-lz4\n");
        return 2;
    }
    uint8_t **objs = calloc(ch->n, sizeof *objs);
    uint64_t *lens = calloc(ch->n, sizeof *lens);
    int *st = calloc(ch->n, sizeof *st);
    int rc = (objs && lens && st) ? 0 : KVF_ENOMEM;
    uint64_t raw = 0, stored = 0;
    for (size_t i = 0; i < ch->n && !rc; i++) {
        rc = build_object(ch, i, codec, &objs[i], &lens[i]);
        raw += kvf_layout_chunk_bytes(&ch->layout);
        stored += lens[i];
    }
    if (!rc) {
        kvf_batch b = {.n = ch->n,
                       .keys = ch->keys,
                       .objs = (const void *const *)objs,
                       .lens = lens,
                       .status = st};
        rc = kvf_client_put(cl, &b);
    }
    if (!rc) {
        print_statuses(a, ch, st, "stored");
        if (!a->json)
            printf("put: %" PRIu64 " KV bytes as %" PRIu64 " object bytes (%s)\n", raw, stored,
                   kvf_codec_name(codec));
    } else {
        fprintf(stderr, "kvf: put: %s\n", kvf_strerror(rc));
    }
    for (size_t i = 0; objs && i < ch->n; i++)
        free(objs[i]);
    free(objs);
    free(lens);
    int failed = 0;
    for (size_t i = 0; st && i < ch->n; i++)
        failed += st[i] != 0 && st[i] != KVF_EEXIST;
    free(st);
    return rc ? 1 : failed ? 3 : 0;
}

static int cmd_get(const args *a, kvf_client *cl, const chunks *ch)
{
    uint64_t cap = kvf_obj_raw_size(ch->layout.layers, kvf_layout_segment_bytes(&ch->layout));
    uint8_t *mem = malloc(cap * ch->n);
    void **bufs = calloc(ch->n, sizeof *bufs);
    uint64_t *caps = calloc(ch->n, sizeof *caps), *lens = calloc(ch->n, sizeof *lens);
    int *st = calloc(ch->n, sizeof *st);
    if (!mem || !bufs || !caps || !lens || !st) {
        fprintf(stderr, "kvf: out of memory\n");
        return 1;
    }
    for (size_t i = 0; i < ch->n; i++) {
        bufs[i] = mem + i * cap;
        caps[i] = cap;
    }
    kvf_batch b = {.n = ch->n,
                   .keys = ch->keys,
                   .bufs = (void *const *)bufs,
                   .caps = caps,
                   .out_lens = lens,
                   .status = st};
    int rc = kvf_client_get(cl, &b);
    size_t bad = 0;
    if (!rc) {
        /* The client verified checksums; synthetic chunks are also compared byte for byte. */
        for (size_t i = 0; i < ch->n; i++) {
            if (st[i] == 0 && a->synthetic > 0) {
                st[i] = check_object(ch, i, bufs[i], lens[i]);
                bad += st[i] != 0;
            }
        }
        print_statuses(a, ch, st, "verified");
    } else {
        fprintf(stderr, "kvf: get: %s\n", kvf_strerror(rc));
    }
    free(mem);
    free(bufs);
    free(caps);
    free(lens);
    free(st);
    return rc ? 1 : bad ? 4 : 0;
}

static int cmd_lookup(const args *a, kvf_client *cl, const chunks *ch)
{
    size_t hits = 0;
    int rc = kvf_client_lookup_prefix(cl, ch->n, ch->keys, &hits, a->deadline_ms);
    if (rc) {
        fprintf(stderr, "kvf: lookup: %s\n", kvf_strerror(rc));
        return 1;
    }
    size_t cached = hits * ch->layout.chunk_tokens;
    if (a->json)
        printf("{\"command\":\"lookup\",\"chunks\":%zu,\"hit_chunks\":%zu,\"tokens\":%zu,"
               "\"cached_tokens\":%zu}\n",
               ch->n, hits, ch->n_tokens, cached);
    else
        printf("lookup: %zu of %zu chunk(s) cached: the first %zu of %zu tokens\n", hits, ch->n,
               cached, ch->n_tokens);
    return 0;
}

static int cmd_keyop(const args *a, kvf_client *cl, const chunks *ch)
{
    int *st = calloc(ch->n, sizeof *st);
    if (!st)
        return 1;
    int rc;
    const char *what = "done";
    if (!strcmp(a->cmd, "evict")) {
        rc = kvf_client_evict(cl, ch->n, ch->keys, st, a->deadline_ms);
        what = "evicted";
    } else if (!strcmp(a->cmd, "pin")) {
        rc = kvf_client_pin(cl, ch->n, ch->keys, a->lease_ms, st, a->deadline_ms);
        what = "pinned";
    } else if (!strcmp(a->cmd, "unpin")) {
        rc = kvf_client_unpin(cl, ch->n, ch->keys, st, a->deadline_ms);
        what = "unpinned";
    } else {
        rc = kvf_client_compress(cl, ch->n, ch->keys, a->codec ? a->codec : "shuffle-lz4", st,
                                 a->deadline_ms);
        what = "recoded";
    }
    if (rc)
        fprintf(stderr, "kvf: %s: %s\n", a->cmd, kvf_strerror(rc));
    else
        print_statuses(a, ch, st, what);
    free(st);
    return rc ? 1 : 0;
}

static int cmd_stats(const args *a, kvf_client *cl)
{
    int ret = 0;
    for (size_t i = 0; i < a->n_nodes; i++) {
        char *j = NULL;
        int rc = kvf_client_stats(cl, i, &j, a->deadline_ms);
        if (rc) {
            fprintf(stderr, "kvf: stats %s: %s\n", a->nodes[i], kvf_strerror(rc));
            ret = 1;
            continue;
        }
        if (a->json) {
            printf("%s\n", j);
        } else {
            json_t *o = json_loads(j, 0, NULL);
            printf("node %s\n", a->nodes[i]);
            const char *k;
            json_t *v;
            json_object_foreach(o, k, v)
            {
                if (json_is_integer(v))
                    printf("  %-22s %" JSON_INTEGER_FORMAT "\n", k, json_integer_value(v));
                else if (json_is_string(v))
                    printf("  %-22s %s\n", k, json_string_value(v));
            }
            json_decref(o);
        }
        free(j);
    }
    return ret;
}

static int cmd_keys(const args *a, const chunks *ch)
{
    char hex[33];
    if (a->json) {
        printf("{\"seed\":\"%016" PRIx64 "\",\"layout_fingerprint\":\"%016" PRIx64 "\",\"keys\":[",
               ch->ks.seed, ch->ks.layout_fp);
        for (size_t i = 0; i < ch->n; i++)
            printf("%s\"%s\"", i ? "," : "", kvf_key_to_hex(&ch->keys[i], hex));
        printf("],\"leftover_tokens\":%zu}\n", ch->leftover);
        return 0;
    }
    printf("namespace %016" PRIx64 " (layout %016" PRIx64 ")\n", ch->ks.seed, ch->ks.layout_fp);
    for (size_t i = 0; i < ch->n; i++)
        printf("chunk %4zu  tokens %6zu..%-6zu  %s\n", i, i * ch->layout.chunk_tokens,
               (i + 1) * ch->layout.chunk_tokens - 1, kvf_key_to_hex(&ch->keys[i], hex));
    printf("%zu leftover token(s) in no full chunk\n", ch->leftover);
    return 0;
}

static int cmd_estimate(const args *a)
{
    kvf_layout l;
    char err[256];
    if (kvf_layout_resolve(a->model, &l, err, sizeof err) != 0) {
        fprintf(stderr, "kvf: --model: %s\n", err);
        return 2;
    }
    if (a->tokens == 0) {
        fprintf(stderr, "kvf: estimate needs --tokens N\n");
        return 2;
    }
    uint64_t batch = a->batch ? a->batch : 1;
    kvf_estimate e;
    if (kvf_layout_estimate(&l, a->tokens, batch, a->memory, &e) != 0) {
        fprintf(stderr, "kvf: estimate: the numbers overflow 64 bits\n");
        return 2;
    }
    if (a->json) {
        printf("{\"model\":\"%s\",\"tokens\":%" PRIu64 ",\"batch\":%" PRIu64
               ",\"bytes_per_token\":%" PRIu64 ",\"bytes_per_chunk\":%" PRIu64
               ",\"chunk_tokens\":%u,\"bytes_per_sequence\":%" PRIu64 ",\"bytes_total\":%" PRIu64
               ",\"memory\":%" PRIu64 ",\"tokens_fit\":%" PRIu64 ",\"sequences_fit\":%" PRIu64
               ",\"label\":\"real\"}\n",
               l.model_id, a->tokens, batch, e.bytes_per_token, e.bytes_per_chunk, l.chunk_tokens,
               e.bytes_per_sequence, e.bytes_total, a->memory, e.tokens_fit, e.sequences_fit);
        return 0;
    }
    printf("%s (%u layers, %u KV heads x %u, %s, %s, TP %u of %u)\n", l.model_id, l.layers,
           l.kv_heads, l.head_dim, kvf_dtype_name(l.dtype),
           l.kind == KVF_KV_LATENT ? "latent" : "K+V", l.tp_rank, l.tp_size);
    printf("  KV per token     %" PRIu64 " bytes (%.1f KiB)\n", e.bytes_per_token,
           (double)e.bytes_per_token / 1024);
    printf("  KV per chunk     %" PRIu64 " bytes (%u tokens, %.1f MiB)\n", e.bytes_per_chunk,
           l.chunk_tokens, (double)e.bytes_per_chunk / 1048576);
    printf("  one sequence     %" PRIu64 " tokens: %.2f GiB, %" PRIu64 " full chunks\n", a->tokens,
           (double)e.bytes_per_sequence / 1073741824.0, e.chunks_per_sequence);
    printf("  batch of %-7" PRIu64 " %.2f GiB\n", batch, (double)e.bytes_total / 1073741824.0);
    if (a->memory)
        printf("  in %.1f GiB      %" PRIu64 " tokens, %" PRIu64 " sequences of %" PRIu64
               " tokens\n",
               (double)a->memory / 1073741824.0, e.tokens_fit, e.sequences_fit, a->tokens);
    return 0;
}

/* Applies a kvf-bench --json result to the gap's constants: a store run gives the TCP bandwidth
 * (kvf_get_gbps, what an engine's load gets), a connector run the model's KV bytes per token and
 * its effective prefill rate (8192 tokens over ttft_full_ms_8k, attention included). Returns 0, or
 * -1 with a message in err. */
static int apply_calibration(const char *path, kvf_gap_state *st, char *err, size_t errlen)
{
    json_error_t je;
    json_t *o = json_load_file(path, 0, &je);
    if (!o || !json_is_object(o)) {
        snprintf(err, errlen, "%s: %s", path, o ? "expected a JSON object" : je.text);
        json_decref(o);
        return -1;
    }
    const char *bench = json_string_value(json_object_get(o, "bench"));
    const char *label = json_string_value(json_object_get(o, "label"));
    int rc = -1;
    if (!bench || !label || strcmp(label, "real") != 0) {
        snprintf(err, errlen, "%s: not a kvf-bench result labelled real", path);
    } else if (!strcmp(bench, "store")) {
        double g = json_number_value(json_object_get(o, "kvf_get_gbps"));
        if (!(g > 0))
            snprintf(err, errlen, "%s: no positive kvf_get_gbps", path);
        else {
            st->tcp_bytes_per_s = g * 1e9;
            rc = 0;
        }
    } else if (!strcmp(bench, "connector")) {
        double ms = json_number_value(json_object_get(o, "ttft_full_ms_8k"));
        const char *model = json_string_value(json_object_get(o, "ttft_model"));
        kvf_layout l;
        char inner[200];
        if (!(ms > 0) || !model)
            snprintf(err, errlen, "%s: needs ttft_full_ms_8k and ttft_model", path);
        else if (kvf_layout_resolve(model, &l, inner, sizeof inner) != 0)
            snprintf(err, errlen, "%s: ttft_model: %s", path, inner);
        else {
            st->prefill_tokens_per_s = 8192.0 / (ms / 1e3);
            st->kv_bytes_per_token = (double)kvf_layout_bytes_per_token(&l);
            rc = 0;
        }
    } else {
        snprintf(err, errlen,
                 "%s: a kvf-bench %s result has no constants for the gap (store or "
                 "connector)",
                 path, bench);
    }
    json_decref(o);
    return rc;
}

static int cmd_classify(const args *a)
{
    kvf_caps l, r;
    char err[256];
    if (!a->local || !a->remote) {
        fprintf(stderr, "kvf: classify needs --local and --remote (built-in: mlx-lm vllm "
                        "llama.cpp reference kvf-store, or a JSON file)\n");
        return 2;
    }
    if (kvf_caps_load(a->local, &l, err, sizeof err) != 0 ||
        kvf_caps_load(a->remote, &r, err, sizeof err) != 0) {
        fprintf(stderr, "kvf: %s\n", err);
        return 2;
    }
    kvf_gap_state st;
    kvf_gap_state_defaults(&st);
    for (int i = 0; i < a->n_calib; i++)
        if (apply_calibration(a->calib[i], &st, err, sizeof err) != 0) {
            fprintf(stderr, "kvf: --calibration: %s\n", err);
            return 2;
        }
    if (a->state) {
        json_error_t je;
        json_t *o = json_load_file(a->state, 0, &je);
        if (!o || !json_is_object(o)) {
            fprintf(stderr, "kvf: --state: %s: %s\n", a->state, o ? "expected an object" : je.text);
            json_decref(o);
            return 2;
        }
        static const struct {
            const char *k;
            size_t off;
        } f[] = {{"prompt_tokens", offsetof(kvf_gap_state, prompt_tokens)},
                 {"cached_tokens", offsetof(kvf_gap_state, cached_tokens)},
                 {"kv_bytes_per_token", offsetof(kvf_gap_state, kv_bytes_per_token)},
                 {"prefill_tokens_per_s", offsetof(kvf_gap_state, prefill_tokens_per_s)},
                 {"tcp_bytes_per_s", offsetof(kvf_gap_state, tcp_bytes_per_s)},
                 {"rdma_bytes_per_s", offsetof(kvf_gap_state, rdma_bytes_per_s)},
                 {"memory_pressure", offsetof(kvf_gap_state, memory_pressure)}};
        const char *k;
        json_t *v;
        json_object_foreach(o, k, v)
        {
            size_t i;
            for (i = 0; i < sizeof f / sizeof f[0]; i++)
                if (!strcmp(k, f[i].k))
                    break;
            if (i == sizeof f / sizeof f[0] || !json_is_number(v)) {
                fprintf(stderr, "kvf: --state: %s: unknown key or not a number\n", k);
                json_decref(o);
                return 2;
            }
            *(double *)((char *)&st + f[i].off) = json_number_value(v);
        }
        json_decref(o);
    }
    if (a->live_pressure) {
        kvf_telemetry t;
        if (kvf_telemetry_read(&t) != 0) {
            fprintf(stderr, "kvf: --live-pressure: cannot read this host's telemetry\n");
            return 2;
        }
        st.memory_pressure = kvf_telemetry_pressure(&t);
    }
    kvf_gap g;
    kvf_optimality_gap(&l, &r, &st, &g);
    json_t *arr = json_array();
    if (!a->json)
        printf("%-20s %-19s %-26s %9s  %s\n", "action", "label", "reason", "score s", "why");
    for (int i = 0; i < KVF_ACTION_COUNT_; i++) {
        kvf_verdict v;
        kvf_classify((kvf_action_id)i, &l, &r, 0, &v);
        double sc = kvf_action_score((kvf_action_id)i, &st);
        if (a->json)
            json_array_append_new(
                arr, json_pack("{s:s,s:s,s:s,s:f,s:s}", "action", kvf_action_name((kvf_action_id)i),
                               "label", kvf_feas_label_name(v.label), "reason",
                               kvf_feas_reason_name(v.reason), "score_s", sc, "why", v.why));
        else
            printf("%-20s %-19s %-26s %9.3f  %s\n", kvf_action_name((kvf_action_id)i),
                   kvf_feas_label_name(v.label), kvf_feas_reason_name(v.reason), sc, v.why);
    }
    if (a->json) {
        json_t *o = json_pack("{s:s,s:s,s:o,s:s,s:s,s:f,s:f,s:f,s:s}", "local", l.name, "remote",
                              r.name, "actions", arr, "best_action", kvf_action_name(g.best_all),
                              "best_feasible_action",
                              g.have_feasible ? kvf_action_name(g.best_feasible) : "none",
                              "score_best_s", g.score_all, "score_best_feasible_s",
                              g.score_feasible, "gap_s", g.gap, "score_label", "simulated");
        json_object_set_new(o, "state",
                            json_pack("{s:f,s:f,s:f,s:f,s:f,s:f,s:f}", "prompt_tokens",
                                      st.prompt_tokens, "cached_tokens", st.cached_tokens,
                                      "kv_bytes_per_token", st.kv_bytes_per_token,
                                      "prefill_tokens_per_s", st.prefill_tokens_per_s,
                                      "tcp_bytes_per_s", st.tcp_bytes_per_s, "rdma_bytes_per_s",
                                      st.rdma_bytes_per_s, "memory_pressure", st.memory_pressure));
        char *t = json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS);
        printf("%s\n", t);
        free(t);
        json_decref(o);
    } else {
        json_decref(arr);
        printf("state: %.0f-token prompt, %.0f cached, %.0f B/token, prefill %.0f tok/s, TCP %.2f "
               "GB/s, RDMA %.1f GB/s, pressure %.2f\n",
               st.prompt_tokens, st.cached_tokens, st.kv_bytes_per_token, st.prefill_tokens_per_s,
               st.tcp_bytes_per_s / 1e9, st.rdma_bytes_per_s / 1e9, st.memory_pressure);
        printf("best action %s (%.3f s saved); best real action %s (%.3f s); gap %.3f s "
               "(scores simulated by the cost model)\n",
               kvf_action_name(g.best_all), g.score_all,
               g.have_feasible ? kvf_action_name(g.best_feasible) : "none", g.score_feasible,
               g.gap);
    }
    return 0;
}

static int cmd_probe(const args *a)
{
    kvf_probe_report r;
    kvf__probe_host(&r, a->engine);
    char *rec = kvf_caps_to_json(&r.caps);
    if (!rec)
        return 1;
    if (a->json) {
        json_t *steps = json_array();
        for (int i = 0; i < r.n_steps; i++)
            json_array_append_new(steps, json_pack("{s:s,s:b,s:s}", "probe", r.steps[i].name, "ok",
                                                   r.steps[i].ok, "detail", r.steps[i].detail));
        json_t *rj = json_loads(rec, 0, NULL);
        const kvf_telemetry *t = &r.telemetry;
        json_t *o = json_pack(
            "{s:o,s:o,s:{s:I,s:I,s:b,s:f,s:f,s:b,s:I,s:I,s:f},s:s}", "record", rj, "probes", steps,
            "telemetry", "mem_total", (json_int_t)t->mem_total, "mem_available",
            (json_int_t)t->mem_available, "have_psi", t->have_psi, "psi_some_avg10",
            t->psi_some_avg10, "psi_full_avg10", t->psi_full_avg10, "have_cgroup", t->have_cgroup,
            "cgroup_limit",
            (json_int_t)(t->cgroup_limit == UINT64_MAX ? -1 : (json_int_t)t->cgroup_limit),
            "cgroup_usage", (json_int_t)t->cgroup_usage, "pressure", kvf_telemetry_pressure(t),
            "label", "real");
        char *txt = json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS);
        printf("%s\n", txt);
        free(txt);
        json_decref(o);
    } else {
        for (int i = 0; i < r.n_steps; i++)
            printf("%-10s %-4s %s\n", r.steps[i].name, r.steps[i].ok ? "ok" : "no",
                   r.steps[i].detail);
        printf("pressure   %.2f (0 idle .. 1 exhausted)\nrecord     %s\n",
               kvf_telemetry_pressure(&r.telemetry), rec);
    }
    free(rec);
    return 0;
}

static int add_nodes(args *a, const char *list)
{
    char *dup = strdup(list), *save = NULL;
    if (!dup)
        return -1;
    for (char *t = strtok_r(dup, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        if (a->n_nodes == KVF_CLIENT_MAX_NODES) {
            free(dup);
            return -1;
        }
        a->nodes[a->n_nodes++] = strdup(t);
    }
    free(dup);
    return 0;
}

int main(int argc, char **argv)
{
    args a = {.model = "ref-tiny", .lease_ms = 30000, .deadline_ms = 5000, .conns = 2};
    if (argc >= 2 && !strcmp(argv[1], "cluster"))
        return kvf_cluster_main(argc - 1, argv + 1);
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    a.cmd = argv[1];
    static const char *const cmds[] = {"stats",    "put",      "get",      "lookup", "evict",
                                       "pin",      "unpin",    "compress", "clear",  "keys",
                                       "estimate", "classify", "probe"};
    int known = 0;
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++)
        known |= !strcmp(a.cmd, cmds[i]);
    if (!known) {
        fprintf(stderr, "kvf: unknown command \"%s\"\n", a.cmd);
        usage(stderr);
        return 2;
    }
    for (int i = 2; i < argc; i++) {
        const char *o = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(o, "--json")) {
            a.json = 1;
            continue;
        }
        if (!strcmp(o, "--live-pressure")) {
            a.live_pressure = 1;
            continue;
        }
        if (!v) {
            fprintf(stderr, "kvf: %s needs a value\n", o);
            return 2;
        }
        i++;
        char *end = NULL;
        if (!strcmp(o, "--node")) {
            if (add_nodes(&a, v) != 0) {
                fprintf(stderr, "kvf: too many nodes\n");
                return 2;
            }
        } else if (!strcmp(o, "--model")) {
            a.model = v;
        } else if (!strcmp(o, "--salt")) {
            a.salt = v;
        } else if (!strcmp(o, "--tokens-file")) {
            a.tokens_file = v;
        } else if (!strcmp(o, "--synthetic")) {
            a.synthetic = strtol(v, &end, 10);
        } else if (!strcmp(o, "--seed")) {
            a.seed = strtoull(v, &end, 10);
        } else if (!strcmp(o, "--codec")) {
            a.codec = v;
        } else if (!strcmp(o, "--lease-ms")) {
            a.lease_ms = (uint32_t)strtoul(v, &end, 10);
        } else if (!strcmp(o, "--deadline-ms")) {
            a.deadline_ms = (int)strtol(v, &end, 10);
        } else if (!strcmp(o, "--engine")) {
            a.engine = v;
        } else if (!strcmp(o, "--local")) {
            a.local = v;
        } else if (!strcmp(o, "--remote")) {
            a.remote = v;
        } else if (!strcmp(o, "--state")) {
            a.state = v;
        } else if (!strcmp(o, "--calibration")) {
            if (a.n_calib == (int)(sizeof a.calib / sizeof a.calib[0])) {
                fprintf(stderr, "kvf: at most 4 --calibration files\n");
                return 2;
            }
            a.calib[a.n_calib++] = v;
        } else if (!strcmp(o, "--tokens")) {
            a.tokens = strtoull(v, &end, 10);
        } else if (!strcmp(o, "--batch")) {
            a.batch = strtoull(v, &end, 10);
        } else if (!strcmp(o, "--memory")) {
            if (kvf__parse_size(v, &a.memory) != 0) {
                fprintf(stderr, "kvf: --memory: cannot parse size \"%s\"\n", v);
                return 2;
            }
        } else if (!strcmp(o, "--conns")) {
            a.conns = (int)strtol(v, &end, 10);
        } else {
            fprintf(stderr, "kvf: unknown option %s\n", o);
            return 2;
        }
        if (end && *end) {
            fprintf(stderr, "kvf: %s: \"%s\" is not a number\n", o, v);
            return 2;
        }
    }
    if (!strcmp(a.cmd, "classify"))
        return cmd_classify(&a);
    if (!strcmp(a.cmd, "probe"))
        return cmd_probe(&a);
    if (!strcmp(a.cmd, "estimate"))
        return cmd_estimate(&a);
    int need_tokens = strcmp(a.cmd, "stats") && strcmp(a.cmd, "clear");
    chunks ch;
    if (load_chunks(&a, &ch, need_tokens) != 0)
        return 2;
    int ret;
    if (!strcmp(a.cmd, "keys")) {
        ret = cmd_keys(&a, &ch);
        free_chunks(&ch);
        return ret;
    }
    kvf_client *cl = NULL;
    if (open_client(&a, &ch, &cl) != 0) {
        free_chunks(&ch);
        return 1;
    }
    if (!strcmp(a.cmd, "stats")) {
        ret = cmd_stats(&a, cl);
    } else if (!strcmp(a.cmd, "clear")) {
        uint64_t removed = 0;
        int rc = kvf_client_clear(cl, &removed, a.deadline_ms);
        if (rc)
            fprintf(stderr, "kvf: clear: %s\n", kvf_strerror(rc));
        else if (a.json)
            printf("{\"command\":\"clear\",\"removed\":%" PRIu64 "}\n", removed);
        else
            printf("clear: removed %" PRIu64 " entries of namespace %016" PRIx64 "\n", removed,
                   ch.ks.seed);
        ret = rc ? 1 : 0;
    } else if (!strcmp(a.cmd, "put")) {
        ret = cmd_put(&a, cl, &ch);
    } else if (!strcmp(a.cmd, "get")) {
        ret = cmd_get(&a, cl, &ch);
    } else if (!strcmp(a.cmd, "lookup")) {
        ret = cmd_lookup(&a, cl, &ch);
    } else {
        ret = cmd_keyop(&a, cl, &ch);
    }
    kvf_client_close(&cl);
    free_chunks(&ch);
    for (size_t i = 0; i < a.n_nodes; i++)
        free(a.nodes[i]);
    return ret;
}
