/*
 * Metrics in Prometheus's text format: one registry per daemon, typed families (counter, gauge,
 * histogram) with fixed label names, series made on first use and updated lock-free, and the
 * exposition written by one function, so no daemon prints metric text by hand.
 *
 *   kvf__metrics *m = kvf__metrics_new("kvf_store");        // names are prefixed "kvf_store_"
 *   kvf__metric *req = kvf__metric_counter(m, "requests_total", "Requests served.", "op,result");
 *   kvf__series_add(kvf__metric_series(req, (const char *[]){"get", "ok"}), 1);
 *   char *text; size_t len; kvf__metrics_expose(m, &text, &len);   // free(text)
 *
 * Every registry carries kvf_build_info{component,version} and the process collector's series
 * (process_cpu_seconds_total, process_resident_memory_bytes, process_virtual_memory_bytes,
 * process_open_fds, process_max_fds, process_start_time_seconds), read from /proc at exposition.
 */
#ifndef KVF_CORE_METRICS_H
#define KVF_CORE_METRICS_H

#include <stddef.h>

typedef struct kvf__metrics kvf__metrics;
typedef struct kvf__metric kvf__metric;
typedef struct kvf__series kvf__series;

typedef enum kvf__metric_type {
    KVF_METRIC_COUNTER,
    KVF_METRIC_GAUGE,
    KVF_METRIC_HISTOGRAM,
} kvf__metric_type;

/* A registry whose family names get prefix + "_" (prefix: the component, e.g. "kvf_store"; it is
 * also build_info's component label). NULL when out of memory. */
kvf__metrics *kvf__metrics_new(const char *prefix);
void kvf__metrics_free(kvf__metrics **m);

/* Families. name: [a-z_:][a-z0-9_:]* after the prefix (counters end in _total, sizes in _bytes,
 * times in _seconds: the conventions of Prometheus's naming guide); help: one line; labels: a
 * comma-separated list of label names, or NULL. A name registered again returns the first family
 * when its type and labels agree, NULL otherwise (and for a bad name or out of memory). */
kvf__metric *kvf__metric_counter(kvf__metrics *m, const char *name, const char *help,
                                 const char *labels);
kvf__metric *kvf__metric_gauge(kvf__metrics *m, const char *name, const char *help,
                               const char *labels);
/* bounds: the buckets' upper bounds, strictly increasing (+Inf is added). At most 32. */
kvf__metric *kvf__metric_histogram(kvf__metrics *m, const char *name, const char *help,
                                   const char *labels, const double *bounds, size_t n_bounds);

/* The series of a family with these label values (as many as the family has label names; NULL
 * for none), made on first use. NULL only when out of memory, or for a NULL family. Series live
 * as long as the registry: a pointer may be kept and updated from any thread. */
kvf__series *kvf__metric_series(kvf__metric *f, const char *const *values);

/* Updates (a NULL series is ignored, so a failed lookup never crashes a daemon). */
void kvf__series_add(kvf__series *s, double v);     /* counter (v >= 0) or gauge */
void kvf__series_set(kvf__series *s, double v);     /* gauge; or a counter mirrored at collect
                                                     * time from a monotonic count of its own */
void kvf__series_observe(kvf__series *s, double v); /* histogram */
double kvf__series_value(const kvf__series *s);     /* counter or gauge; for tests */

/* A value a daemon mirrors into its registry at collect time, and its family's description. */
typedef struct kvf__metric_value {
    const char *name, *help;
    int counter; /* 1: a counter (the value a monotonic count), 0: a gauge */
    double v;
} kvf__metric_value;
/* Sets the unlabelled series of each of n values (families made on first use). */
void kvf__metrics_set_all(kvf__metrics *m, const kvf__metric_value *v, size_t n);

/* Called at the start of every exposition, to set series from the daemon's own state. */
void kvf__metrics_on_collect(kvf__metrics *m, void (*fn)(void *ud, kvf__metrics *m), void *ud);

/* The registry in Prometheus's text exposition format (version 0.0.4) into a malloc'd *text of
 * *len bytes. Returns 0 or -1 (out of memory). */
int kvf__metrics_expose(kvf__metrics *m, char **text, size_t *len);

/* The content type of the exposition, for an HTTP reply. */
#define KVF_METRICS_CONTENT_TYPE "text/plain; version=0.0.4; charset=utf-8"

/* Buckets for latencies in seconds, 50 us to 10 s. */
/* The registry underneath a public kvf_metrics (kvf/metrics.h), for libkvf's own modules; and a
 * public handle on a daemon's own registry (borrowed: kvf_metrics_free frees the handle only). */
struct kvf_metrics;
kvf__metrics *kvf__metrics_registry(struct kvf_metrics *m);
struct kvf_metrics *kvf__metrics_wrap(kvf__metrics *r);

extern const double kvf__metrics_latency_buckets[];
extern const size_t kvf__metrics_latency_nbuckets;

#endif
