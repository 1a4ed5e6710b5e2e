/*
 * The data commands of kvf, against kvf-store nodes:
 *
 *   kvf stats   --node HOST:PORT [--json]
 *   kvf put     --node HOST:PORT[,...] CHUNKS [--codec none|lz4|shuffle-lz4]
 *   kvf get     --node ... CHUNKS          fetch, verify checksums and synthetic content
 *   kvf lookup  --node ... CHUNKS          leading cached prefix, one round trip per node
 *   kvf evict | pin [--lease-ms N] | unpin | compress [--codec C]   --node ... CHUNKS
 *   kvf clear   --node ... [--model M] [--salt S]
 *   kvf keys    CHUNKS                     print the chunk keys of a token sequence
 *
 * CHUNKS names a token sequence and its namespace: --model PRESET|layout.json (default
 * ref-tiny), --salt TENANT, and either --tokens-file F (whitespace- or comma-separated token ids)
 * or --synthetic N [--seed S] (N deterministic tokens). Synthetic chunks carry deterministic KV
 * bytes derived from their key, so `get` can check every byte it receives.
 * Output is readable by default; --json prints one JSON object.
 */
#include "cmd_data.h"

#include "cli_common.h"

#include <inttypes.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

enum {
    OPT_CODEC = KVF__CLI_OPT_OWN,
    OPT_LEASE_MS,
};

/* The options of one run of a data command. */
typedef struct data_args {
    const char *cmd;
    kvf__cli_target t;
    const char *codec; /* put, compress; NULL: the command's default */
    uint32_t lease_ms; /* pin */
    int json;
} data_args;

/* One data command: what it needs before it runs, what it does, its own option (if any) and the
 * parts of its usage. Its options are the namespace's, the stores' when needs_store, the token
 * sequence's when needs_tokens, own, --json and --help. run gets no client (NULL) unless
 * needs_store, and no chunks (n == 0) unless needs_tokens. */
typedef struct data_cmd {
    const char *name;
    int needs_tokens;
    int needs_store;
    int (*run)(const data_args *a, kvf_client *cl, const kvf__cli_chunks *ch);
    struct option own;     /* name NULL: none */
    const char *synopsis;  /* after "usage: kvf NAME " */
    const char *about;     /* what it does, whole lines */
    const char *own_help;  /* the own option's usage line */
    const char *exit_help; /* exit statuses beyond 0, 1 and 2 */
} data_cmd;

/* ------------------------------------------------------------------------------------------ */
/* Synthetic chunk objects */

/* Builds the synthetic object of chunk i. Caller frees *obj. */
static int build_object(const kvf__cli_chunks *ch, size_t i, kvf_codec codec, uint8_t **obj,
                        uint64_t *len)
{
    const kvf_layout *l = &ch->layout;
    uint64_t seg = kvf_layout_segment_bytes(l);
    size_t cap = kvf_obj_raw_size(l->layers, seg);
    uint8_t *raw = malloc((size_t)seg * l->layers);
    uint8_t *scratch = malloc(seg);
    const void **segs = malloc(l->layers * sizeof *segs);
    *obj = malloc(cap);
    int rc = KVF_ENOMEM;
    if (raw && scratch && segs && *obj) {
        for (uint32_t k = 0; k < l->layers; k++) {
            kvf__cli_synthetic_segment(&ch->keys[i], k, l->dtype, raw + (size_t)k * seg, seg);
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

/* Decodes a fetched object and compares it with the synthetic content of chunk i. Returns 0,
 * KVF_ELAYOUT when its shape is not the layout's, KVF_ECHECKSUM when a byte differs, or the
 * object's own error. */
static int check_object(const kvf__cli_chunks *ch, size_t i, const uint8_t *obj, uint64_t len)
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
        kvf__cli_synthetic_segment(&ch->keys[i], k, l->dtype, want, seg);
        if (!rc && memcmp(want, got, seg) != 0)
            rc = KVF_ECHECKSUM;
        p += s.stored_len;
    }
    free(want);
    free(got);
    free(scratch);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* The commands */

/* Prints how many chunks ended with each status: "CMD: N chunk(s) of T tokens, K WHAT, ..." or
 * one JSON object. */
static void print_statuses(const data_args *a, const kvf__cli_chunks *ch, const int *st,
                           const char *what)
{
    size_t ok = 0;
    json_t *counts = json_object();
    for (size_t i = 0; i < ch->n; i++) {
        const char *name = st[i] == 0 ? "ok" : kvf_err_name(st[i]);
        json_t *v = json_object_get(counts, name);
        json_object_set_new(counts, name, json_integer(v ? json_integer_value(v) + 1 : 1));
        ok += st[i] == 0;
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
}

/* The exit statuses of the commands that reach the stores (docs/operations.md, "Exit status"):
 * scripts can tell a store that did not answer from a chunk that was not there. */
enum {
    EXIT_FAILED = 1,      /* a request failed as a whole */
    EXIT_PARTIAL = 3,     /* some chunks (or nodes) were not done */
    EXIT_MISMATCH = 4,    /* get: a chunk's bytes differ from its synthetic content */
    EXIT_UNREACHABLE = 5, /* no storage node answered */
};

/* Whether a status says the node could not be reached (rather than answering no). */
static int unreachable(int e)
{
    return e == KVF_ECONNREFUSED || e == KVF_ETIMEDOUT || e == KVF_ECONNRESET ||
           e == KVF_ENOTCONN || e == KVF_EHOSTUNREACH || e == KVF_ENETUNREACH || e == KVF_EPIPE ||
           e == KVF_ECLOSED;
}

/* The exit status of per-chunk statuses: 0 when each is 0 (or also_ok), EXIT_UNREACHABLE when
 * every chunk's node was unreachable, EXIT_PARTIAL otherwise. */
static int exit_of(const int *st, size_t n, int also_ok)
{
    size_t bad = 0, gone = 0;
    for (size_t i = 0; st && i < n; i++) {
        if (st[i] == 0 || (also_ok && st[i] == also_ok))
            continue;
        bad++;
        gone += unreachable(st[i]);
    }
    return !bad ? 0 : gone == n ? EXIT_UNREACHABLE : EXIT_PARTIAL;
}

/* The exit status of a request that failed as a whole with rc. */
static int exit_of_rc(int rc)
{
    return unreachable(rc) ? EXIT_UNREACHABLE : EXIT_FAILED;
}

static int run_put(const data_args *a, kvf_client *cl, const kvf__cli_chunks *ch)
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
    int ex = rc ? exit_of_rc(rc) : exit_of(st, ch->n, KVF_EEXIST);
    free(st);
    return ex;
}

static int run_get(const data_args *a, kvf_client *cl, const kvf__cli_chunks *ch)
{
    uint64_t cap = kvf_obj_raw_size(ch->layout.layers, kvf_layout_segment_bytes(&ch->layout));
    uint8_t *mem = malloc(cap * ch->n);
    void **bufs = calloc(ch->n, sizeof *bufs);
    uint64_t *caps = calloc(ch->n, sizeof *caps), *lens = calloc(ch->n, sizeof *lens);
    int *st = calloc(ch->n, sizeof *st);
    int rc = (mem && bufs && caps && lens && st) ? 0 : KVF_ENOMEM;
    for (size_t i = 0; i < ch->n && !rc; i++) {
        bufs[i] = mem + i * cap;
        caps[i] = cap;
    }
    kvf_batch b = {.n = ch->n,
                   .keys = ch->keys,
                   .bufs = (void *const *)bufs,
                   .caps = caps,
                   .out_lens = lens,
                   .status = st};
    if (!rc)
        rc = kvf_client_get(cl, &b);
    size_t bad = 0;
    if (!rc) {
        /* The client verified checksums; synthetic chunks are also compared byte for byte. */
        for (size_t i = 0; i < ch->n; i++) {
            if (st[i] == 0 && a->t.synthetic > 0) {
                st[i] = check_object(ch, i, bufs[i], lens[i]);
                bad += st[i] != 0;
            }
        }
        print_statuses(a, ch, st, "verified");
    } else {
        fprintf(stderr, "kvf: get: %s\n", kvf_strerror(rc));
    }
    int ex = rc ? exit_of_rc(rc) : bad ? EXIT_MISMATCH : exit_of(st, ch->n, 0);
    free(mem);
    free(bufs);
    free(caps);
    free(lens);
    free(st);
    return ex;
}

static int run_lookup(const data_args *a, kvf_client *cl, const kvf__cli_chunks *ch)
{
    size_t hits = 0;
    /* A node that does not answer holds nothing as far as a lookup is concerned (an engine then
     * recomputes): ask each first, so that "0 cached" is never said for a store that is down. */
    size_t answered = 0;
    for (size_t i = 0; i < a->t.n_nodes; i++) {
        char *j = NULL;
        int e = kvf_client_stats(cl, i, &j, a->t.deadline_ms);
        free(j);
        if (e)
            fprintf(stderr, "kvf: lookup: %s: %s\n", a->t.nodes[i], kvf_strerror(e));
        else
            answered++;
    }
    if (!answered) {
        fprintf(stderr, "kvf: lookup: no storage node answered\n");
        return EXIT_UNREACHABLE;
    }
    int rc = kvf_client_lookup_prefix(cl, ch->n, ch->keys, &hits, a->t.deadline_ms);
    if (rc) {
        fprintf(stderr, "kvf: lookup: %s\n", kvf_strerror(rc));
        return exit_of_rc(rc);
    }
    size_t cached = hits * ch->layout.chunk_tokens;
    if (a->json)
        printf("{\"command\":\"lookup\",\"chunks\":%zu,\"hit_chunks\":%zu,\"tokens\":%zu,"
               "\"cached_tokens\":%zu}\n",
               ch->n, hits, ch->n_tokens, cached);
    else
        printf("lookup: %zu of %zu chunk(s) cached: the first %zu of %zu tokens%s\n", hits, ch->n,
               cached, ch->n_tokens,
               answered < a->t.n_nodes ? " (on the nodes that answered)" : "");
    return answered < a->t.n_nodes ? EXIT_PARTIAL : 0;
}

/* Reports a per-chunk operation that returned rc with the statuses st (NULL when they could not
 * be allocated), and frees st. Returns the exit status. */
static int finish_keyop(const data_args *a, const kvf__cli_chunks *ch, int rc, int *st,
                        const char *what, int also_ok)
{
    if (rc)
        fprintf(stderr, "kvf: %s: %s\n", a->cmd, kvf_strerror(rc));
    else
        print_statuses(a, ch, st, what);
    int ex = rc ? exit_of_rc(rc) : exit_of(st, ch->n, also_ok);
    free(st);
    return ex;
}

static int run_evict(const data_args *a, kvf_client *cl, const kvf__cli_chunks *ch)
{
    int *st = calloc(ch->n, sizeof *st);
    int rc = st ? kvf_client_evict(cl, ch->n, ch->keys, st, a->t.deadline_ms) : KVF_ENOMEM;
    return finish_keyop(a, ch, rc, st, "evicted", KVF_ENOENT); /* gone either way */
}

static int run_pin(const data_args *a, kvf_client *cl, const kvf__cli_chunks *ch)
{
    int *st = calloc(ch->n, sizeof *st);
    int rc =
        st ? kvf_client_pin(cl, ch->n, ch->keys, a->lease_ms, st, a->t.deadline_ms) : KVF_ENOMEM;
    return finish_keyop(a, ch, rc, st, "pinned", 0);
}

static int run_unpin(const data_args *a, kvf_client *cl, const kvf__cli_chunks *ch)
{
    int *st = calloc(ch->n, sizeof *st);
    int rc = st ? kvf_client_unpin(cl, ch->n, ch->keys, st, a->t.deadline_ms) : KVF_ENOMEM;
    return finish_keyop(a, ch, rc, st, "unpinned", 0);
}

static int run_compress(const data_args *a, kvf_client *cl, const kvf__cli_chunks *ch)
{
    const char *codec = a->codec ? a->codec : "shuffle-lz4";
    int *st = calloc(ch->n, sizeof *st);
    int rc =
        st ? kvf_client_compress(cl, ch->n, ch->keys, codec, st, a->t.deadline_ms) : KVF_ENOMEM;
    return finish_keyop(a, ch, rc, st, "recoded", 0);
}

/* Prints one node's statistics (a JSON object) as "key value" lines. */
static void print_node_stats(const char *node, const char *json)
{
    json_t *o = json_loads(json, 0, NULL);
    printf("node %s\n", node);
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

static int run_stats(const data_args *a, kvf_client *cl, const kvf__cli_chunks *ch)
{
    (void)ch;
    size_t failed = 0, gone = 0;
    for (size_t i = 0; i < a->t.n_nodes; i++) {
        char *j = NULL;
        int rc = kvf_client_stats(cl, i, &j, a->t.deadline_ms);
        if (rc) {
            fprintf(stderr, "kvf: stats %s: %s\n", a->t.nodes[i], kvf_strerror(rc));
            failed++;
            gone += unreachable(rc);
            continue;
        }
        if (a->json)
            printf("%s\n", j);
        else
            print_node_stats(a->t.nodes[i], j);
        free(j);
    }
    return !failed                  ? 0
           : gone == a->t.n_nodes   ? EXIT_UNREACHABLE
           : failed == a->t.n_nodes ? EXIT_FAILED
                                    : EXIT_PARTIAL;
}

static int run_clear(const data_args *a, kvf_client *cl, const kvf__cli_chunks *ch)
{
    uint64_t removed = 0;
    int rc = kvf_client_clear(cl, &removed, a->t.deadline_ms);
    if (rc)
        fprintf(stderr, "kvf: clear: %s\n", kvf_strerror(rc));
    else if (a->json)
        printf("{\"command\":\"clear\",\"removed\":%" PRIu64 "}\n", removed);
    else
        printf("clear: removed %" PRIu64 " entries of namespace %016" PRIx64 "\n", removed,
               ch->ks.seed);
    return rc ? exit_of_rc(rc) : 0;
}

static int run_keys(const data_args *a, kvf_client *cl, const kvf__cli_chunks *ch)
{
    (void)cl;
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

/* ------------------------------------------------------------------------------------------ */
/* The command table */

static const data_cmd stats_cmd = {
    .name = "stats",
    .needs_store = 1,
    .run = run_stats,
    .synopsis = "--node HOST:PORT[,...] [--json]",
    .about = "Prints each node's counters (--json: each node's JSON object, one a line).\n",
};
static const data_cmd put_cmd = {
    .name = "put",
    .needs_tokens = 1,
    .needs_store = 1,
    .run = run_put,
    .own = {"codec", required_argument, NULL, OPT_CODEC},
    .synopsis = "--node HOST:PORT[,...] CHUNKS [--codec C] [--json]",
    .about = "Stores every full chunk of CHUNKS with synthetic KV bytes derived from its key.\n",
    .own_help = "  --codec none|lz4|shuffle-lz4     how the objects are encoded (default none)\n",
    .exit_help = " (a chunk already there counts as stored)",
};
static const data_cmd get_cmd = {
    .name = "get",
    .needs_tokens = 1,
    .needs_store = 1,
    .run = run_get,
    .synopsis = "--node HOST:PORT[,...] CHUNKS [--json]",
    .about = "Fetches every full chunk of CHUNKS and verifies its checksums; with --synthetic,\n"
             "also every byte against the content put stored.\n",
    .exit_help = ",\n             4 a chunk's bytes differ from its synthetic content",
};
static const data_cmd lookup_cmd = {
    .name = "lookup",
    .needs_tokens = 1,
    .needs_store = 1,
    .run = run_lookup,
    .synopsis = "--node HOST:PORT[,...] CHUNKS [--json]",
    .about =
        "Prints how many leading chunks of CHUNKS the stores hold (one round trip per node).\n",
};
static const data_cmd evict_cmd = {
    .name = "evict",
    .needs_tokens = 1,
    .needs_store = 1,
    .run = run_evict,
    .synopsis = "--node HOST:PORT[,...] CHUNKS [--json]",
    .about = "Removes every full chunk of CHUNKS from the stores.\n",
};
static const data_cmd pin_cmd = {
    .name = "pin",
    .needs_tokens = 1,
    .needs_store = 1,
    .run = run_pin,
    .own = {"lease-ms", required_argument, NULL, OPT_LEASE_MS},
    .synopsis = "--node HOST:PORT[,...] CHUNKS [--lease-ms N] [--json]",
    .about = "Keeps every full chunk of CHUNKS from eviction until its lease ends or unpin.\n",
    .own_help = "  --lease-ms N                     the pin's lease (default 30000)\n",
};
static const data_cmd unpin_cmd = {
    .name = "unpin",
    .needs_tokens = 1,
    .needs_store = 1,
    .run = run_unpin,
    .synopsis = "--node HOST:PORT[,...] CHUNKS [--json]",
    .about = "Releases the pins of every full chunk of CHUNKS.\n",
};
static const data_cmd compress_cmd = {
    .name = "compress",
    .needs_tokens = 1,
    .needs_store = 1,
    .run = run_compress,
    .own = {"codec", required_argument, NULL, OPT_CODEC},
    .synopsis = "--node HOST:PORT[,...] CHUNKS [--codec C] [--json]",
    .about = "Has the stores re-encode every full chunk of CHUNKS.\n",
    .own_help = "  --codec none|lz4|shuffle-lz4     the new encoding (default shuffle-lz4)\n",
};
static const data_cmd clear_cmd = {
    .name = "clear",
    .needs_store = 1,
    .run = run_clear,
    .synopsis = "--node HOST:PORT[,...] [--model M] [--salt S] [--json]",
    .about = "Removes every chunk of the key namespace of --model and --salt from the stores.\n",
};
static const data_cmd keys_cmd = {
    .name = "keys",
    .needs_tokens = 1,
    .run = run_keys,
    .synopsis = "CHUNKS [--json]",
    .about = "Prints the key of every full chunk of CHUNKS and the tokens left over.\n",
};

/* ------------------------------------------------------------------------------------------ */
/* Running a command */

static void print_usage(const data_cmd *cmd)
{
    printf("usage: kvf %s %s\n%s%s", cmd->name, cmd->synopsis, cmd->about,
           cmd->own_help ? cmd->own_help : "");
    if (cmd->needs_store)
        fputs(KVF__CLI_HELP_STORE, stdout);
    fputs(KVF__CLI_HELP_JSON, stdout);
    if (cmd->needs_tokens)
        fputs("CHUNKS is a token sequence in a key namespace; each full chunk of it has a key:\n",
              stdout);
    fputs(KVF__CLI_HELP_NAMESPACE, stdout);
    if (cmd->needs_tokens)
        fputs(KVF__CLI_HELP_TOKENS, stdout);
    if (cmd->needs_store)
        printf("exit status: 0 done, 1 a request failed, 2 a usage error, 3 some %s not done,\n"
               "             5 no storage node answered%s\n",
               cmd->needs_tokens ? "chunks" : "nodes", cmd->exit_help ? cmd->exit_help : "");
    else
        printf("exit status: 0 done, 2 a usage error%s\n", cmd->exit_help ? cmd->exit_help : "");
}

#define N_OF(a)     (sizeof(a) / sizeof((a)[0]))
#define MAX_OPTIONS 16 /* a data command has at most 12, the terminating entry included */

static size_t add_options(struct option *opts, size_t n, const struct option *group, size_t k)
{
    memcpy(opts + n, group, k * sizeof *group);
    return n + k;
}

/* Fills opts (room for MAX_OPTIONS) with the command's options, as data_cmd says. */
static void make_options(const data_cmd *cmd, struct option *opts)
{
    static const struct option ns[] = {KVF__CLI_OPTS_NAMESPACE}, store[] = {KVF__CLI_OPTS_STORE},
                               tokens[] = {KVF__CLI_OPTS_TOKENS},
                               end[] = {KVF__CLI_OPTS_JSON, KVF__CLI_OPTS_HELP, KVF__CLI_OPTS_END};
    size_t n = add_options(opts, 0, ns, N_OF(ns));
    if (cmd->needs_store)
        n = add_options(opts, n, store, N_OF(store));
    if (cmd->needs_tokens)
        n = add_options(opts, n, tokens, N_OF(tokens));
    if (cmd->own.name)
        n = add_options(opts, n, &cmd->own, 1);
    add_options(opts, n, end, N_OF(end));
}

static int parse(const data_cmd *cmd, int argc, char **argv, data_args *a)
{
    struct option opts[MAX_OPTIONS];
    const char *v;
    uint64_t n;
    int c;
    make_options(cmd, opts);
    while ((c = kvf__cli_next_opt(argc, argv, opts, &v)) != 0) {
        int rc = 0;
        switch (c) {
        case 'h':
            print_usage(cmd);
            return 0;
        case KVF__CLI_OPT_UNKNOWN:
        case KVF__CLI_OPT_NOVALUE:
            return kvf__cli_opt_error(c, v);
        case KVF__CLI_OPT_JSON:
            a->json = 1;
            break;
        case OPT_CODEC:
            a->codec = v;
            break;
        case OPT_LEASE_MS:
            rc = kvf__cli_parse_u64("--lease-ms", v, &n);
            a->lease_ms = (uint32_t)n;
            break;
        default:
            rc = kvf__cli_target_set(&a->t, c, v);
            break;
        }
        if (rc)
            return rc;
    }
    return KVF__CLI_RUN;
}

/* Loads the chunks, opens the client, runs the command. Returns its exit status. */
static int run_parsed(const data_cmd *cmd, const data_args *a)
{
    kvf__cli_chunks ch;
    kvf_client *cl = NULL;
    int rc;
    if (kvf__cli_chunks_load(&a->t, a->cmd, cmd->needs_tokens, &ch) != 0)
        rc = 2;
    else if (cmd->needs_store && kvf__cli_client_open(&a->t, &ch, a->cmd, &cl) != 0)
        rc = 1;
    else
        rc = cmd->run(a, cl, &ch);
    kvf_client_close(&cl);
    kvf__cli_chunks_free(&ch);
    return rc;
}

static int run_data(const data_cmd *cmd, int argc, char **argv)
{
    data_args a = {.cmd = cmd->name, .lease_ms = 30000};
    kvf__cli_target_init(&a.t);
    int rc = parse(cmd, argc, argv, &a);
    if (rc == KVF__CLI_RUN)
        rc = run_parsed(cmd, &a);
    kvf__cli_target_free(&a.t);
    return rc;
}

int kvf__cli_stats(int argc, char **argv)
{
    return run_data(&stats_cmd, argc, argv);
}

int kvf__cli_put(int argc, char **argv)
{
    return run_data(&put_cmd, argc, argv);
}

int kvf__cli_get(int argc, char **argv)
{
    return run_data(&get_cmd, argc, argv);
}

int kvf__cli_lookup(int argc, char **argv)
{
    return run_data(&lookup_cmd, argc, argv);
}

int kvf__cli_evict(int argc, char **argv)
{
    return run_data(&evict_cmd, argc, argv);
}

int kvf__cli_pin(int argc, char **argv)
{
    return run_data(&pin_cmd, argc, argv);
}

int kvf__cli_unpin(int argc, char **argv)
{
    return run_data(&unpin_cmd, argc, argv);
}

int kvf__cli_compress(int argc, char **argv)
{
    return run_data(&compress_cmd, argc, argv);
}

int kvf__cli_clear(int argc, char **argv)
{
    return run_data(&clear_cmd, argc, argv);
}

int kvf__cli_keys(int argc, char **argv)
{
    return run_data(&keys_cmd, argc, argv);
}
