/*
 * kvf-bench: kvfabric's benchmarks. `kvf-bench SUBCOMMAND --help` for each.
 */
#include "bench.h"

#include "kvf/kvf.h"

#include <signal.h>
#include <stdio.h>
#include <string.h>

static const struct {
    const char *name;
    int (*main)(int argc, char **argv);
    const char *what;
} subs[] = {
    {"store", bench_store_main, "storage node vs the TCP ceiling and Redis"},
    {"connector", bench_connector_main,
     "page moves vs a one-thread ceiling; layerwise overlap; engine TTFT with and without"},
    {"sched", bench_sched_main, "trace replay through the scheduler (simulated); place() latency"},
    {"soak", bench_soak_main,
     "store under churn while the host is pushed to a memory-pressure target"},
    {"e2e", bench_e2e_main,
     "trace replay on a running cluster with and without kvfabric (real end to end)"},
    {"disk", bench_disk_main, "the disk tier's engine alone vs fio on the same file system"},
    {"save", bench_save_main,
     "a prefill's save beside its pass over TCP: put in parts vs put whole after it"},
    {"replicas", bench_replicas_main,
     "placement throughput of N kvf-sched replicas vs one, over HTTP (real)"},
};

static void usage(FILE *f)
{
    fprintf(f, "usage: kvf-bench SUBCOMMAND [options]\n"
               "       kvf-bench SUBCOMMAND --help    that subcommand's options\n"
               "       kvf-bench --version\n"
               "subcommands:\n");
    for (size_t i = 0; i < sizeof subs / sizeof subs[0]; i++)
        fprintf(f, "  %-10s %s\n", subs[i].name, subs[i].what);
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    if (argc >= 2 &&
        (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help"))) {
        usage(stdout);
        return 0;
    }
    /* --version anywhere before "--", as every kvfabric binary and subcommand answers it */
    for (int i = 1; i < argc && strcmp(argv[i], "--"); i++)
        if (!strcmp(argv[i], "--version")) {
            printf("kvf-bench (kvfabric) %s\n", KVF_VERSION_STRING);
            return 0;
        }
    if (argc >= 2) {
        for (size_t i = 0; i < sizeof subs / sizeof subs[0]; i++)
            if (!strcmp(argv[1], subs[i].name))
                return subs[i].main(argc - 2, argv + 2);
        fprintf(stderr, "kvf-bench: unknown subcommand \"%s\"\n", argv[1]);
    }
    usage(stderr);
    return 2;
}
