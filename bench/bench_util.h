/*
 * Helpers shared by the kvf-bench subcommands: starting daemons on free loopback ports, timing,
 * percentiles, reading a process's RSS, and a JSON result that every figure goes into with its
 * label (real, simulated or backend_infeasible).
 */
#ifndef KVF_BENCH_UTIL_H
#define KVF_BENCH_UTIL_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

typedef struct bench_proc {
    pid_t pid;
    uint16_t port;
} bench_proc;

/* Starts kvf-store (found beside this binary, or --store-bin) on 127.0.0.1:0 and waits for its
 * ready line. Returns 0 or -1 with a message on stderr. */
int bench_start_store(bench_proc *p, const char *bin, const char *memory, const char *extra);
/* Starts redis-server with persistence off on a free loopback port and waits until it answers.
 * Returns 0, or -1 when redis-server is missing or does not start. */
int bench_start_redis(bench_proc *p);
/* SIGTERM, then SIGKILL after 5 s; reaps the process. */
void bench_stop(bench_proc *p);

double bench_now(void); /* seconds, monotonic */
/* The q-quantile (0..1) of n samples; sorts them. */
double bench_quantile(double *v, size_t n, double q);
/* Resident set size of pid in MiB, or -1. */
double bench_rss_mib(pid_t pid);

/* Progress on stderr: "[store] message". */
void bench_progress(const char *bench, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Draws a bar chart of n labelled values (GB/s) to a PNG with gnuplot. Returns 0, or -1 when
 * gnuplot is missing or fails (a message on stderr). */
int bench_plot_bars(const char *png, const char *title, const char *ylabel,
                    const char *const *labels, const double *values, const int *groups, size_t n);

/* Prints the human table rows collected and, with json, the object as one line. */
void bench_emit(json_t *result, int json);

#endif
