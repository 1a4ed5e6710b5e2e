/*
 * What the kvf subcommands share (cli_common.c): reading options with getopt_long, decimal
 * numbers, and for the data commands the options that name stores, a key namespace and a token
 * sequence, the chunks those make, a client opened on them, and the synthetic tokens and KV bytes
 * that let `kvf get` check what `kvf put` stored.
 *
 * Every function here prints its own error to stderr, prefixed "kvf: ", so a subcommand only
 * chooses the exit status.
 */
#ifndef KVF_CLUSTER_CLI_COMMON_H
#define KVF_CLUSTER_CLI_COMMON_H

#include "kvf/kvf.h"

#include <getopt.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* A subcommand's option parser returns this when the command is to run; any other value is the
 * exit status (0 after --help, 2 after a usage error). */
#define KVF__CLI_RUN (-1)

/* kvf__cli_next_opt() returns these besides an option's val (and 0 at the end). */
#define KVF__CLI_OPT_UNKNOWN '?' /* an unknown option or a stray argument */
#define KVF__CLI_OPT_NOVALUE ':' /* an option given without its value */

/* The vals of the shared options; a subcommand's own options use vals from KVF__CLI_OPT_OWN. */
enum {
    KVF__CLI_OPT_NODE = 256,
    KVF__CLI_OPT_DEADLINE,
    KVF__CLI_OPT_CONNS,
    KVF__CLI_OPT_MODEL,
    KVF__CLI_OPT_SALT,
    KVF__CLI_OPT_TOKENS_FILE,
    KVF__CLI_OPT_SYNTHETIC,
    KVF__CLI_OPT_SEED,
    KVF__CLI_OPT_JSON,
    KVF__CLI_OPT_OWN = 512,
};

/* Entries of a struct option table: --help (-h is accepted without one), --json, the stores and
 * their client, the key namespace, and the token sequence. */
#define KVF__CLI_OPTS_HELP             \
    {                                  \
        "help", no_argument, NULL, 'h' \
    }
#define KVF__CLI_OPTS_JSON                           \
    {                                                \
        "json", no_argument, NULL, KVF__CLI_OPT_JSON \
    }
#define KVF__CLI_OPTS_STORE                                              \
    {"node", required_argument, NULL, KVF__CLI_OPT_NODE},                \
        {"deadline-ms", required_argument, NULL, KVF__CLI_OPT_DEADLINE}, \
    {                                                                    \
        "conns", required_argument, NULL, KVF__CLI_OPT_CONNS             \
    }
#define KVF__CLI_OPTS_NAMESPACE                             \
    {"model", required_argument, NULL, KVF__CLI_OPT_MODEL}, \
    {                                                       \
        "salt", required_argument, NULL, KVF__CLI_OPT_SALT  \
    }
#define KVF__CLI_OPTS_TOKENS                                            \
    {"tokens-file", required_argument, NULL, KVF__CLI_OPT_TOKENS_FILE}, \
        {"synthetic", required_argument, NULL, KVF__CLI_OPT_SYNTHETIC}, \
    {                                                                   \
        "seed", required_argument, NULL, KVF__CLI_OPT_SEED              \
    }
#define KVF__CLI_OPTS_END \
    {                     \
        NULL, 0, NULL, 0  \
    }

/* The usage lines of those groups, to be concatenated into a subcommand's usage text. */
#define KVF__CLI_HELP_STORE                                                      \
    "  --node HOST:PORT[,HOST:PORT...]  storage nodes (repeatable)\n"            \
    "  --deadline-ms N                  per-operation deadline (default 5000)\n" \
    "  --conns N                        connections per node (default 2)\n"
#define KVF__CLI_HELP_NAMESPACE                                      \
    "  --model PRESET|FILE.json         layout (default ref-tiny)\n" \
    "  --salt TENANT                    tenant salt of the key namespace\n"
#define KVF__CLI_HELP_TOKENS                                                        \
    "  --synthetic N [--seed S]         N deterministic tokens with synthetic KV\n" \
    "  --tokens-file FILE               token ids, separated by spaces or commas\n"
#define KVF__CLI_HELP_JSON "  --json                           one JSON object on stdout\n"

/* Returns the next option of argv (argv[0] is the subcommand) from opts: its val with its value
 * in *val (NULL for an option without one), 'h' for -h or --help, 0 when argv is done, or
 * KVF__CLI_OPT_UNKNOWN / KVF__CLI_OPT_NOVALUE with the offending argument in *val. Options are
 * read up to the first argument that is not one, which is reported as unknown; "--opt=value" and
 * "--opt value" both work. Prints nothing. */
int kvf__cli_next_opt(int argc, char **argv, const struct option *opts, const char **val);

/* Prints the error for a KVF__CLI_OPT_UNKNOWN or KVF__CLI_OPT_NOVALUE of kvf__cli_next_opt().
 * Returns 2, the exit status of a usage error. */
int kvf__cli_opt_error(int c, const char *arg);

/* Parse v, the value of option opt ("--tokens"), as a decimal number the way strtol() and
 * strtoull() read one. Return 0, or 2 after printing that v is not a number. */
int kvf__cli_parse_long(const char *opt, const char *v, long *out);
int kvf__cli_parse_u64(const char *opt, const char *v, uint64_t *out);

/* The values of the store, namespace and token options. */
typedef struct kvf__cli_target {
    char *nodes[KVF_CLIENT_MAX_NODES]; /* owned; freed by kvf__cli_target_free() */
    size_t n_nodes;
    int deadline_ms;
    int conns;
    const char *model; /* borrowed from argv, as the other strings */
    const char *salt;
    const char *tokens_file;
    long synthetic; /* > 0: that many synthetic tokens */
    uint64_t seed;
} kvf__cli_target;

/* The defaults: ref-tiny, a 5 s deadline, 2 connections per node. */
void kvf__cli_target_init(kvf__cli_target *t);

/* Takes option c (a val of KVF__CLI_OPTS_STORE, _NAMESPACE or _TOKENS) with value v. Returns 0,
 * or 2 after printing why v is refused. */
int kvf__cli_target_set(kvf__cli_target *t, int c, const char *v);

void kvf__cli_target_free(kvf__cli_target *t);

/* A token sequence cut into chunks, with the key of each full chunk. */
typedef struct kvf__cli_chunks {
    kvf_layout layout;
    kvf_keyspace ks;
    uint32_t *tokens;
    size_t n_tokens;
    kvf_key *keys;
    size_t n;        /* full chunks, each with its key */
    size_t leftover; /* tokens after the last full chunk */
} kvf__cli_chunks;

/* Resolves t's model and namespace and, when need_tokens, reads or makes its tokens and computes
 * the keys of their full chunks; cmd names the subcommand in the error that neither
 * --synthetic nor --tokens-file was given. Returns 0, or -1 after printing why. Free *ch with
 * kvf__cli_chunks_free() either way. */
int kvf__cli_chunks_load(const kvf__cli_target *t, const char *cmd, int need_tokens,
                         kvf__cli_chunks *ch);
void kvf__cli_chunks_free(kvf__cli_chunks *ch);

/* Opens a client on t's nodes in ch's namespace. Returns 0, or -1 after printing why (no --node
 * given, or the client's own message). Caller owns *cl; close with kvf_client_close(). */
int kvf__cli_client_open(const kvf__cli_target *t, const kvf__cli_chunks *ch, const char *cmd,
                         kvf_client **cl);

/* Fills out with the deterministic KV bytes of layer l of the chunk with key k: smooth values,
 * as real KV tensors are, so codecs have something to find. */
void kvf__cli_synthetic_segment(const kvf_key *k, uint32_t l, kvf_dtype dt, uint8_t *out,
                                size_t bytes);

#endif
