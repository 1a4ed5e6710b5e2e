/*
 * The public face of the metrics registry (kvf/metrics.h) over core/metrics.h.
 */
#include "kvf/metrics.h"

#include "kvf/error.h"

#include "metrics.h"

#include <stdlib.h>

struct kvf_metrics {
    kvf__metrics *r;
    int borrowed; /* kvf__metrics_wrap: r is the caller's */
};

kvf_metrics *kvf_metrics_new(const char *prefix)
{
    if (!prefix || !*prefix)
        return NULL;
    for (const char *p = prefix; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || *p == '_' ||
              (p > prefix && *p >= '0' && *p <= '9')))
            return NULL;
    kvf_metrics *m = calloc(1, sizeof *m);
    if (m && !(m->r = kvf__metrics_new(prefix))) {
        free(m);
        m = NULL;
    }
    return m;
}

void kvf_metrics_free(kvf_metrics **pm)
{
    if (!pm || !*pm)
        return;
    if (!(*pm)->borrowed)
        kvf__metrics_free(&(*pm)->r);
    free(*pm);
    *pm = NULL;
}

enum { OP_ADD, OP_SET, OP_OBSERVE };

/* One update of the series values of family name (made on first use as type). */
static int update(kvf_metrics *m, kvf__metric_type type, int op, const char *name, const char *help,
                  const char *labels, const char *const *values, double v)
{
    if (!m || (type == KVF_METRIC_COUNTER && !(v >= 0)))
        return KVF_EINVAL;
    kvf__metric *f =
        type == KVF_METRIC_COUNTER ? kvf__metric_counter(m->r, name, help, labels)
        : type == KVF_METRIC_GAUGE
            ? kvf__metric_gauge(m->r, name, help, labels)
            : kvf__metric_histogram(m->r, name, help, labels, kvf__metrics_latency_buckets,
                                    kvf__metrics_latency_nbuckets);
    kvf__series *s = f ? kvf__metric_series(f, values) : NULL;
    if (!s)
        return f ? KVF_ENOMEM : KVF_EINVAL;
    if (op == OP_ADD)
        kvf__series_add(s, v);
    else if (op == OP_SET)
        kvf__series_set(s, v);
    else
        kvf__series_observe(s, v);
    return 0;
}

int kvf_metrics_counter_add(kvf_metrics *m, const char *name, const char *help, const char *labels,
                            const char *const *values, double v)
{
    return update(m, KVF_METRIC_COUNTER, OP_ADD, name, help, labels, values, v);
}

int kvf_metrics_counter_set(kvf_metrics *m, const char *name, const char *help, const char *labels,
                            const char *const *values, double v)
{
    return update(m, KVF_METRIC_COUNTER, OP_SET, name, help, labels, values, v);
}

int kvf_metrics_gauge_set(kvf_metrics *m, const char *name, const char *help, const char *labels,
                          const char *const *values, double v)
{
    return update(m, KVF_METRIC_GAUGE, OP_SET, name, help, labels, values, v);
}

int kvf_metrics_observe_seconds(kvf_metrics *m, const char *name, const char *help,
                                const char *labels, const char *const *values, double v)
{
    return update(m, KVF_METRIC_HISTOGRAM, OP_OBSERVE, name, help, labels, values, v);
}

int kvf_metrics_expose(kvf_metrics *m, char **text, size_t *len)
{
    if (!m || !text || !len)
        return KVF_EINVAL;
    return kvf__metrics_expose(m->r, text, len) == 0 ? 0 : KVF_ENOMEM;
}

void kvf_metrics_text_free(char *text)
{
    free(text);
}

kvf__metrics *kvf__metrics_registry(kvf_metrics *m)
{
    return m ? m->r : NULL;
}

kvf_metrics *kvf__metrics_wrap(kvf__metrics *r)
{
    kvf_metrics *m = r ? calloc(1, sizeof *m) : NULL;
    if (m) {
        m->r = r;
        m->borrowed = 1;
    }
    return m;
}
