/*
 * What the kvf subcommands share: option reading, numbers, and the stores, namespace and tokens
 * of the data commands (cli_common.h).
 */
#include "cli_common.h"

#include "args.h"
#include "auth.h"
#include "bytes.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

int kvf__cli_next_opt(int argc, char **argv, const struct option *opts, const char **val)
{
    /* The parser every binary uses (args.h), one option at a time; a stray argument, where an
     * option was expected, is reported as unknown. */
    int c = kvf__args_next(argc, argv, "h", opts, val);
    if (c == 0 && *val) {
        optind = argc;
        return KVF__CLI_OPT_UNKNOWN;
    }
    if (c == KVF__ARGS_UNKNOWN)
        return KVF__CLI_OPT_UNKNOWN;
    if (c == KVF__ARGS_NOVALUE)
        return KVF__CLI_OPT_NOVALUE;
    return c;
}

int kvf__cli_opt_error(int c, const char *arg)
{
    if (c == KVF__CLI_OPT_NOVALUE)
        fprintf(stderr, "kvf: %s needs a value\n", arg);
    else
        fprintf(stderr, "kvf: unknown option %s\n", arg);
    return 2;
}

static int not_a_number(const char *opt, const char *v)
{
    fprintf(stderr, "kvf: %s: \"%s\" is not a number\n", opt, v);
    return 2;
}

int kvf__cli_parse_long(const char *opt, const char *v, long *out)
{
    char *end = NULL;
    *out = strtol(v, &end, 10);
    return *end ? not_a_number(opt, v) : 0;
}

int kvf__cli_parse_u64(const char *opt, const char *v, uint64_t *out)
{
    char *end = NULL;
    *out = strtoull(v, &end, 10);
    return *end ? not_a_number(opt, v) : 0;
}

void kvf__cli_target_init(kvf__cli_target *t)
{
    memset(t, 0, sizeof *t);
    t->model = "ref-tiny";
    t->deadline_ms = 5000;
    t->conns = 2;
}

/* Adds the nodes of a comma-separated list. */
static int add_nodes(kvf__cli_target *t, const char *list)
{
    char *dup = strdup(list), *save = NULL;
    int rc = dup ? 0 : -1;
    for (char *s = dup ? strtok_r(dup, ",", &save) : NULL; s && !rc;
         s = strtok_r(NULL, ",", &save)) {
        if (t->n_nodes == KVF_CLIENT_MAX_NODES || !(t->nodes[t->n_nodes] = strdup(s)))
            rc = -1;
        else
            t->n_nodes++;
    }
    free(dup);
    return rc;
}

int kvf__cli_target_set(kvf__cli_target *t, int c, const char *v)
{
    long n;
    switch (c) {
    case KVF__CLI_OPT_NODE:
        if (add_nodes(t, v) == 0)
            return 0;
        fprintf(stderr, "kvf: too many nodes\n");
        return 2;
    case KVF__CLI_OPT_DEADLINE:
        if (kvf__cli_parse_long("--deadline-ms", v, &n) != 0)
            return 2;
        t->deadline_ms = (int)n;
        return 0;
    case KVF__CLI_OPT_CONNS:
        if (kvf__cli_parse_long("--conns", v, &n) != 0)
            return 2;
        t->conns = (int)n;
        return 0;
    case KVF__CLI_OPT_MODEL:
        t->model = v;
        return 0;
    case KVF__CLI_OPT_SALT:
        t->salt = v;
        return 0;
    case KVF__CLI_OPT_TOKENS_FILE:
        t->tokens_file = v;
        return 0;
    case KVF__CLI_OPT_SYNTHETIC:
        return kvf__cli_parse_long("--synthetic", v, &t->synthetic);
    case KVF__CLI_OPT_SEED:
        return kvf__cli_parse_u64("--seed", v, &t->seed);
    default:
        fprintf(stderr, "kvf: option %d is not a store, namespace or token option\n", c);
        return 2;
    }
}

void kvf__cli_target_free(kvf__cli_target *t)
{
    for (size_t i = 0; i < t->n_nodes; i++)
        free(t->nodes[i]);
    t->n_nodes = 0;
}

/* Token i of a synthetic sequence depends only on (seed, i), so sequences of different lengths
 * with one seed share their prefix. */
static uint32_t synthetic_token(uint64_t seed, size_t i)
{
    uint64_t s = seed * 0x100000001b3ull + i;
    return (uint32_t)(kvf__splitmix64(&s) % 32000u);
}

void kvf__cli_synthetic_segment(const kvf_key *k, uint32_t l, kvf_dtype dt, uint8_t *out,
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

/* A growing array of token ids. */
typedef struct token_buf {
    uint32_t *t;
    size_t n, cap;
} token_buf;

static int token_push(token_buf *b, uint32_t v)
{
    if (b->n == b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 1024;
        uint32_t *t = realloc(b->t, cap * sizeof *t);
        if (!t)
            return -1;
        b->t = t;
        b->cap = cap;
    }
    b->t[b->n++] = v;
    return 0;
}

/* Reads decimal token ids separated by spaces, tabs, commas and line ends. Returns 0, or -1
 * after printing the file, line and reason. */
static int parse_tokens(FILE *f, const char *path, token_buf *b)
{
    unsigned long long v = 0;
    int in_num = 0;
    long line = 1;
    for (;;) {
        int c = fgetc(f);
        if (c >= '0' && c <= '9') {
            v = v * 10 + (unsigned)(c - '0');
            if (v > UINT32_MAX) {
                fprintf(stderr, "kvf: %s:%ld: token id out of range\n", path, line);
                return -1;
            }
            in_num = 1;
            continue;
        }
        if (in_num && token_push(b, (uint32_t)v) != 0) {
            fprintf(stderr, "kvf: out of memory\n");
            return -1;
        }
        v = 0;
        in_num = 0;
        if (c == EOF)
            return 0;
        if (c == '\n')
            line++;
        if (c != ' ' && c != ',' && c != '\n' && c != '\t' && c != '\r') {
            fprintf(stderr, "kvf: %s:%ld: unexpected character '%c'\n", path, line, c);
            return -1;
        }
    }
}

static int read_tokens(const char *path, uint32_t **out, size_t *n)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "kvf: %s: %s\n", path, strerror(errno));
        return -1;
    }
    token_buf b = {0};
    int rc = parse_tokens(f, path, &b);
    fclose(f);
    if (rc) {
        free(b.t);
        return -1;
    }
    *out = b.t;
    *n = b.n;
    return 0;
}

static int make_tokens(const kvf__cli_target *t, const char *cmd, kvf__cli_chunks *ch)
{
    if (t->tokens_file)
        return read_tokens(t->tokens_file, &ch->tokens, &ch->n_tokens);
    if (t->synthetic <= 0) {
        fprintf(stderr, "kvf: %s needs --synthetic N or --tokens-file FILE\n", cmd);
        return -1;
    }
    ch->n_tokens = (size_t)t->synthetic;
    ch->tokens = malloc(ch->n_tokens * sizeof *ch->tokens);
    if (!ch->tokens)
        return -1;
    for (size_t i = 0; i < ch->n_tokens; i++)
        ch->tokens[i] = synthetic_token(t->seed, i);
    return 0;
}

int kvf__cli_chunks_load(const kvf__cli_target *t, const char *cmd, int need_tokens,
                         kvf__cli_chunks *ch)
{
    char err[256];
    memset(ch, 0, sizeof *ch);
    if (kvf_layout_resolve(t->model, &ch->layout, err, sizeof err) != 0) {
        fprintf(stderr, "kvf: --model: %s\n", err);
        return -1;
    }
    /* With a credential ($KVF_CREDENTIAL), its salt comes first, as in the connector. */
    uint8_t salt[KVF_SALT_MAX];
    size_t salt_len = 0;
    if (kvf__auth_key_salt(NULL, t->salt, t->salt ? strlen(t->salt) : 0, salt, sizeof salt,
                           &salt_len, err, sizeof err) != 0 ||
        kvf_keyspace_init(&ch->ks, &ch->layout, (const char *)salt, salt_len) != 0) {
        fprintf(stderr, "kvf: key space: %s\n", err);
        return -1;
    }
    if (!need_tokens)
        return 0;
    if (make_tokens(t, cmd, ch) != 0)
        return -1;
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

void kvf__cli_chunks_free(kvf__cli_chunks *ch)
{
    free(ch->tokens);
    free(ch->keys);
    ch->tokens = NULL;
    ch->keys = NULL;
}

int kvf__cli_client_open(const kvf__cli_target *t, const kvf__cli_chunks *ch, const char *cmd,
                         kvf_client **cl)
{
    if (t->n_nodes == 0) {
        fprintf(stderr, "kvf: %s needs --node HOST:PORT\n", cmd);
        return -1;
    }
    kvf_client_opts o = {
        .nodes = (const char *const *)t->nodes,
        .n_nodes = t->n_nodes,
        .ns = ch->ks.seed,
        .conns_per_node = t->conns,
        .deadline_ms = t->deadline_ms,
    };
    char err[256];
    if (kvf_client_open(cl, &o, err, sizeof err) != 0) {
        fprintf(stderr, "kvf: %s\n", err);
        return -1;
    }
    return 0;
}
