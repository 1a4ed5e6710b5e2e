/*
 * kvf: the operator CLI. `kvf COMMAND [options]` runs one subcommand of the table below; each
 * parses its own options and prints them with `kvf COMMAND --help`. The subcommands live one
 * concern to a file: cmd_data.c (the data commands against stores), cmd_feasibility.c
 * (estimate, classify), cmd_probe.c (probe), cmd_auth.c (auth), cmd_deploy.c (deploy) and
 * cluster.c (the local cluster launcher).
 */
#include "cluster.h"
#include "cmd_auth.h"
#include "cmd_data.h"
#include "cmd_deploy.h"
#include "cmd_feasibility.h"
#include "cmd_probe.h"

#include "kvf/kvf.h"

#include <stdio.h>
#include <string.h>

/* A subcommand: run gets argv from the subcommand's name on and returns the exit status. */
typedef struct subcommand {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *help; /* one line for `kvf --help` */
} subcommand;

static const subcommand subcommands[] = {
    {.name = "stats", .run = kvf__cli_stats, .help = "each storage node's counters"},
    {.name = "put", .run = kvf__cli_put, .help = "store the chunks of a token sequence"},
    {.name = "get",
     .run = kvf__cli_get,
     .help = "fetch chunks and verify their checksums and synthetic content"},
    {.name = "lookup",
     .run = kvf__cli_lookup,
     .help = "how many leading chunks of a token sequence are cached"},
    {.name = "evict", .run = kvf__cli_evict, .help = "remove chunks from the stores"},
    {.name = "pin", .run = kvf__cli_pin, .help = "keep chunks from eviction for a lease"},
    {.name = "unpin", .run = kvf__cli_unpin, .help = "release pinned chunks"},
    {.name = "compress", .run = kvf__cli_compress, .help = "have the stores re-encode chunks"},
    {.name = "clear", .run = kvf__cli_clear, .help = "remove every chunk of a key namespace"},
    {.name = "keys", .run = kvf__cli_keys, .help = "print the chunk keys of a token sequence"},
    {.name = "estimate", .run = kvf__cli_estimate, .help = "the KV memory a workload needs"},
    {.name = "classify",
     .run = kvf__cli_classify,
     .help = "which remote actions two hosts can carry out, and the optimality gap"},
    {.name = "probe",
     .run = kvf__cli_probe,
     .help = "this host's capability record, by executing tiny actions"},
    {.name = "auth",
     .run = kvf__cli_auth,
     .help = "tenants and credentials for storage nodes that authenticate"},
    {.name = "cluster",
     .run = kvf__cli_cluster,
     .help = "start, stop or inspect a kvfabric cluster on this machine"},
    {.name = "deploy",
     .run = kvf__cli_deploy,
     .help = "render the systemd units' files of a cluster on several hosts"},
};

#define N_SUBCOMMANDS (sizeof subcommands / sizeof subcommands[0])

static void usage(FILE *f)
{
    fprintf(f, "usage: kvf COMMAND [options]\n"
               "       kvf COMMAND --help       that command's options\n"
               "       kvf --version\n"
               "commands:\n");
    for (size_t i = 0; i < N_SUBCOMMANDS; i++)
        fprintf(f, "  %-10s %s\n", subcommands[i].name, subcommands[i].help);
}

static const subcommand *find(const char *name)
{
    for (size_t i = 0; i < N_SUBCOMMANDS; i++)
        if (!strcmp(subcommands[i].name, name))
            return &subcommands[i];
    return NULL;
}

/* kvf help [COMMAND]: the table, or that command's --help. */
static int help(int argc, char **argv)
{
    if (argc < 3) {
        usage(stdout);
        return 0;
    }
    const subcommand *s = find(argv[2]);
    if (!s) {
        fprintf(stderr, "kvf: unknown command \"%s\"\n", argv[2]);
        usage(stderr);
        return 2;
    }
    char *sub_argv[] = {argv[2], "--help", NULL};
    return s->run(2, sub_argv);
}

int main(int argc, char **argv)
{
    /* --version anywhere before "--", for kvf and every command */
    for (int i = 1; i < argc && strcmp(argv[i], "--"); i++)
        if (!strcmp(argv[i], "--version") || (i == 1 && !strcmp(argv[i], "version"))) {
            printf("kvf (kvfabric) %s\n", KVF_VERSION_STRING);
            return 0;
        }
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help"))
        return help(argc, argv);
    const subcommand *s = find(argv[1]);
    if (!s) {
        fprintf(stderr, "kvf: unknown command \"%s\"\n", argv[1]);
        usage(stderr);
        return 2;
    }
    return s->run(argc - 1, argv + 1);
}
