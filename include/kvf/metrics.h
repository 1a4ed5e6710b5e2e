/*
 * kvf/metrics.h - Prometheus metrics for engines that embed libkvf: the registry kvfabric's own
 * daemons use (typed families, label sets, kvf_build_info and the process collector, one
 * exposition writer), for a program that serves /metrics itself (kvfabric.serve does, through
 * the Python binding). docs/operations.md, "Metrics", lists what kvfabric's daemons expose.
 *
 * Families are made on first use, by name: the first call with a name fixes its type, help and
 * label names; a later call with another type or other label names fails (KVF_EINVAL) and changes
 * nothing. Thread-safe.
 */
#ifndef KVF_METRICS_H
#define KVF_METRICS_H

#include "kvf/export.h"

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvf_metrics kvf_metrics;

/* A registry whose family names get prefix + "_" (e.g. "kvf_pyengine"). NULL when out of memory
 * or for a prefix that is not a metric name. */
KVF_API kvf_metrics *kvf_metrics_new(const char *prefix);
KVF_API void kvf_metrics_free(kvf_metrics **m);

/* labels: comma-separated label names, or NULL; values: as many label values (NULL for none).
 * Return 0, or KVF_EINVAL (a bad name, another type or labels for that name), or KVF_ENOMEM. */
KVF_API int kvf_metrics_counter_add(kvf_metrics *m, const char *name, const char *help,
                                    const char *labels, const char *const *values, double v);
/* A counter mirrored from a monotonic count the caller keeps (its value replaced). */
KVF_API int kvf_metrics_counter_set(kvf_metrics *m, const char *name, const char *help,
                                    const char *labels, const char *const *values, double v);
KVF_API int kvf_metrics_gauge_set(kvf_metrics *m, const char *name, const char *help,
                                  const char *labels, const char *const *values, double v);
/* A histogram of seconds with kvfabric's latency buckets (50 us to 10 s). */
KVF_API int kvf_metrics_observe_seconds(kvf_metrics *m, const char *name, const char *help,
                                        const char *labels, const char *const *values, double v);

/* The registry in Prometheus's text format (0.0.4) into *text (free with kvf_metrics_text_free)
 * of *len bytes. Returns 0 or KVF_ENOMEM. */
KVF_API int kvf_metrics_expose(kvf_metrics *m, char **text, size_t *len);
KVF_API void kvf_metrics_text_free(char *text);

#ifdef __cplusplus
}
#endif

#endif
