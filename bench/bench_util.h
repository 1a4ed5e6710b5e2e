/*
 * Helpers shared by the kvf-bench subcommands: reading their options from a table, starting
 * daemons on free loopback ports, timing, percentiles, reading a process's RSS, and a JSON result
 * that every figure goes into with its label (real, simulated or backend_infeasible).
 */
#ifndef KVF_BENCH_UTIL_H
#define KVF_BENCH_UTIL_H

#include "kvf/client.h"
#include "kvf/layout.h"

#include "args.h"

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Reads a kvf-bench subcommand's options (argv: what follows the subcommand's name) with the
 * parser every kvfabric binary uses (args.h), as "kvf-bench BENCH": --help and --version, the
 * usage from the table (synopsis, summary, each option's description and default), errors that
 * name the option. epilog: after the options (NULL: the subcommands' usual exit statuses).
 * Returns 0 to go on, 1 after --help or --version (exit 0), -1 after a usage error (exit 2). */
int bench_args(const char *bench, const char *synopsis, const char *summary, const char *epilog,
               const kvf__arg *args, size_t n, int argc, char **argv);

typedef struct bench_proc {
    pid_t pid;
    uint16_t port;
} bench_proc;

/* Starts kvf-store (bin; NULL: the one beside this binary) on 127.0.0.1:0 and waits for its
 * ready line. Returns 0 or -1 with a message on stderr. */
int bench_start_store(bench_proc *p, const char *bin, const char *memory, const char *extra);
/* Starts kvf-store as bench_start_store() does and opens a client to it at host (an address of
 * the store's; the port is the one it listens on), with co's options but its node list, which
 * becomes that one store. Returns 0, or -1 with the reason on stderr ("kvf-bench BENCH: ..." where
 * the client fails) and no store left running. The caller owns both: kvf_client_close(), then
 * bench_stop(). */
int bench_store_client_open(const char *bench, bench_proc *store, const char *bin,
                            const char *memory, const char *extra, const char *host,
                            const kvf_client_opts *co, kvf_client **cl);
/* Starts redis-server with persistence off on a free loopback port and waits until it answers.
 * Returns 0, or -1 when redis-server is missing or does not start. */
int bench_start_redis(bench_proc *p);
/* SIGTERM, then SIGKILL after 5 s; reaps the process. */
void bench_stop(bench_proc *p);

double bench_now(void); /* seconds, monotonic */
/* The q-quantile (0..1) of n samples; sorts them. */
double bench_quantile(double *v, size_t n, double q);
/* Sorts v ascending (what bench_quantile does first). */
void bench_sort(double *v, size_t n);
/* bench_quantile's value of values already sorted (bench_sort): for many quantiles of one set. */
double bench_quantile_sorted(const double *v, size_t n, double q);
/* Resident set size of pid in MiB, or -1. */
double bench_rss_mib(pid_t pid);

/* Progress on stderr: "[store] message". */
void bench_progress(const char *bench, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* A bar chart: n labelled values, each bar's group (0 grey: a ceiling or a baseline, 1 blue:
 * kvfabric, 2 red: a peer), and where given each one's spread (lo, hi: the 10th and 90th
 * percentiles over the rounds, drawn as whiskers); logy: a log axis (values spanning decades);
 * note: a line under the plot (NULL: none). */
typedef struct bench_bars {
    const char *title, *ylabel, *note;
    const char *const *labels;
    const double *values, *lo, *hi;
    const int *groups;
    size_t n;
    int logy;
} bench_bars;
/* Draws b to a PNG with gnuplot. Returns 0, or -1 when gnuplot is missing or fails (a message on
 * stderr). */
int bench_plot_bars(const char *png, const bench_bars *b);

/* fio writing (rw "write") or reading ("read": in order; "randread": every block once, in a
 * random order) a file of total bytes in dir with block size bs, io_uring, O_DIRECT, queue depth
 * 1: the disk benchmarks' peer. GB/s, or -1 when fio is missing or fails. A read follows a write
 * of the same file; "read" then removes it (so a "randread" comes before the "read"). */
double bench_fio_rate(const char *dir, const char *rw, uint64_t bs, uint64_t total);
/* The same fio job on a given file (its first total bytes, kept after) with depth requests in
 * flight per job and jobs jobs, each its own consecutive 1/jobs of the total, their bytes summed.
 * With readonly, fio is told so (--readonly: it refuses to write), for reading a file another
 * program owns, such as the disk tier's own. */
double bench_fio_rate_jobs(const char *file, const char *rw, uint64_t bs, uint64_t total, int depth,
                           int jobs, int readonly);
/* Whether fio runs here. */
int bench_fio_present(void);
/* The same job as bench_fio_rate (a file of total bytes in dir, block size bs, O_DIRECT, one
 * request in flight; "write", "read" or "randread") through io_uring from one aligned buffer, by
 * kvf-bench itself: the ceiling where fio is missing, and beside it where not. GB/s, or -1 (said
 * on stderr). A read follows a write of the same file; "read" then removes it. Built with
 * liburing only (KVF_HAVE_URING). */
double bench_uring_rate(const char *dir, const char *rw, uint64_t bs, uint64_t total);
/* The same job on a given file (its first total bytes), kept after; a read opens it read-only
 * and never writes it (the disk tier's own file, say). */
double bench_uring_rate_file(const char *file, const char *rw, uint64_t bs, uint64_t total);

/* A result object opening with "bench": bench, as every subcommand's does. Caller owns the
 * result; free with json_decref(). */
json_t *bench_result_new(const char *bench);
/* Sets key of result to the number v. */
void bench_json_real(json_t *result, const char *key, double v);
/* A figure measured over rounds or repetitions: the median and the spread (10th to 90th
 * percentile) across them. Benchmarks report the spread next to the median, because one round on a
 * shared machine can land far from the others. */
typedef struct bench_spread {
    double median, p10, p90;
} bench_spread;

/* The spread of n values (all zero when n is 0). v is not changed. */
bench_spread bench_spread_of(const double *v, size_t n);
/* Sets key of result to the median of the n values, KEY_rounds to the values in order, KEY_p10
 * and KEY_p90 to the spread; returns the spread. v is not changed. */
bench_spread bench_json_rounds(json_t *result, const char *key, const double *v, size_t n);

/* Prints the object as one line, with json; nothing without. */
void bench_emit(json_t *result, int json);

/* Tenants for a store's --auth, made for a run in dir (an empty folder): dir/tenants holds one
 * key per name (role tenant), dir/NAME.cred each one's credential. 0, or -1 after saying why.
 * bench_auth_remove() removes them and dir. */
int bench_auth_make(const char *dir, const char *const *names, size_t n, char *tenants,
                    size_t tlen);
void bench_auth_remove(const char *dir, const char *const *names, size_t n);

/* The key space of layout as a cluster's engines have it: the tenant salt of $KVF_CREDENTIAL,
 * where set (docs/keys.md). 0, or -1 with one line in err. */
int bench_keyspace(kvf_keyspace *ks, const kvf_layout *layout, char *err, size_t errlen);

#endif
