/*
 * Metrics in Prometheus's text format (metrics.h).
 */
#include "metrics.h"

#include "kvf/kvf.h"

#include <dirent.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#define MAX_LABELS  8
#define MAX_BOUNDS  32
#define MAX_COLLECT 8

const double kvf__metrics_latency_buckets[] = {50e-6,  100e-6, 250e-6, 500e-6, 1e-3,   2.5e-3,
                                               5e-3,   10e-3,  25e-3,  50e-3,  100e-3, 250e-3,
                                               500e-3, 1.0,    2.5,    5.0,    10.0};
const size_t kvf__metrics_latency_nbuckets =
    sizeof kvf__metrics_latency_buckets / sizeof kvf__metrics_latency_buckets[0];

struct kvf__series {
    struct kvf__series *next;
    const struct kvf__metric *fam;
    char *values[MAX_LABELS];
    _Atomic uint64_t bits;                    /* counter or gauge: the double's bits */
    _Atomic uint64_t buckets[MAX_BOUNDS + 1]; /* histogram: per bucket, not cumulative */
    _Atomic uint64_t sum_bits, count;
};

struct kvf__metric {
    kvf__metrics *m;
    char *name, *help;
    kvf__metric_type type;
    char *labels[MAX_LABELS];
    size_t n_labels;
    double bounds[MAX_BOUNDS];
    size_t n_bounds;
    kvf__series *series; /* newest first; guarded by m->mu */
};

struct kvf__metrics {
    pthread_mutex_t mu;
    char *prefix;
    kvf__metric **fam;
    size_t n_fam, cap_fam;
    void (*collect[MAX_COLLECT])(void *, kvf__metrics *);
    void *collect_ud[MAX_COLLECT];
    size_t n_collect;
};

static double from_bits(uint64_t b)
{
    double v;
    memcpy(&v, &b, sizeof v);
    return v;
}

static uint64_t to_bits(double v)
{
    uint64_t b;
    memcpy(&b, &v, sizeof b);
    return b;
}

static void atomic_add_double(_Atomic uint64_t *a, double v)
{
    uint64_t old = atomic_load_explicit(a, memory_order_relaxed);
    while (!atomic_compare_exchange_weak_explicit(a, &old, to_bits(from_bits(old) + v),
                                                  memory_order_relaxed, memory_order_relaxed))
        ;
}

kvf__metrics *kvf__metrics_new(const char *prefix)
{
    kvf__metrics *m = calloc(1, sizeof *m);
    if (!m)
        return NULL;
    m->prefix = strdup(prefix ? prefix : "kvf");
    if (!m->prefix || pthread_mutex_init(&m->mu, NULL) != 0) {
        free(m->prefix);
        free(m);
        return NULL;
    }
    return m;
}

static void series_free(kvf__series *s)
{
    while (s) {
        kvf__series *n = s->next;
        for (size_t i = 0; i < MAX_LABELS; i++)
            free(s->values[i]);
        free(s);
        s = n;
    }
}

void kvf__metrics_free(kvf__metrics **pm)
{
    kvf__metrics *m = pm ? *pm : NULL;
    if (!m)
        return;
    for (size_t i = 0; i < m->n_fam; i++) {
        kvf__metric *f = m->fam[i];
        series_free(f->series);
        for (size_t k = 0; k < f->n_labels; k++)
            free(f->labels[k]);
        free(f->name);
        free(f->help);
        free(f);
    }
    free(m->fam);
    free(m->prefix);
    pthread_mutex_destroy(&m->mu);
    free(m);
    *pm = NULL;
}

static int name_ok(const char *s, int colon)
{
    if (!s || !*s || (*s >= '0' && *s <= '9'))
        return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              *s == '_' || (colon && *s == ':')))
            return 0;
    return 1;
}

/* Splits "a,b" into names[]; returns the count, or -1 for a bad or reserved name. */
static int split_labels(const char *labels, char names[MAX_LABELS][64])
{
    int n = 0;
    if (!labels || !*labels)
        return 0;
    const char *p = labels;
    while (*p) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (n == MAX_LABELS || len == 0 || len >= 64)
            return -1;
        memcpy(names[n], p, len);
        names[n][len] = 0;
        if (!name_ok(names[n], 0) || !strncmp(names[n], "__", 2) || !strcmp(names[n], "le"))
            return -1;
        n++;
        p = e ? e + 1 : p + len;
    }
    return n;
}

static kvf__metric *family(kvf__metrics *m, const char *name, const char *help,
                           kvf__metric_type type, const char *labels, const double *bounds,
                           size_t n_bounds)
{
    char full[256], names[MAX_LABELS][64];
    if (!m || !name || !help)
        return NULL;
    int nl = split_labels(labels, names);
    if (snprintf(full, sizeof full, "%s_%s", m->prefix, name) >= (int)sizeof full ||
        !name_ok(full, 1) || nl < 0 || n_bounds > MAX_BOUNDS)
        return NULL;
    for (size_t i = 1; i < n_bounds; i++)
        if (!(bounds[i] > bounds[i - 1]))
            return NULL;
    pthread_mutex_lock(&m->mu);
    kvf__metric *f = NULL;
    for (size_t i = 0; i < m->n_fam; i++) {
        if (strcmp(m->fam[i]->name, full))
            continue;
        f = m->fam[i];
        int same = f->type == type && f->n_labels == (size_t)nl;
        for (int k = 0; same && k < nl; k++)
            same = !strcmp(f->labels[k], names[k]);
        pthread_mutex_unlock(&m->mu);
        return same ? f : NULL;
    }
    if (m->n_fam == m->cap_fam) {
        size_t cap = m->cap_fam ? 2 * m->cap_fam : 32;
        kvf__metric **nf = realloc(m->fam, cap * sizeof *nf);
        if (!nf)
            goto out;
        m->fam = nf;
        m->cap_fam = cap;
    }
    f = calloc(1, sizeof *f);
    if (!f)
        goto out;
    f->m = m;
    f->type = type;
    f->name = strdup(full);
    f->help = strdup(help);
    for (int k = 0; k < nl; k++)
        f->labels[k] = strdup(names[k]);
    f->n_labels = (size_t)nl;
    int ok = f->name && f->help;
    for (int k = 0; k < nl; k++)
        ok = ok && f->labels[k];
    if (!ok) {
        for (int k = 0; k < nl; k++)
            free(f->labels[k]);
        free(f->name);
        free(f->help);
        free(f);
        f = NULL;
        goto out;
    }
    if (n_bounds)
        memcpy(f->bounds, bounds, n_bounds * sizeof *bounds);
    f->n_bounds = n_bounds;
    m->fam[m->n_fam++] = f;
out:
    pthread_mutex_unlock(&m->mu);
    return f;
}

kvf__metric *kvf__metric_counter(kvf__metrics *m, const char *name, const char *help,
                                 const char *labels)
{
    return family(m, name, help, KVF_METRIC_COUNTER, labels, NULL, 0);
}

kvf__metric *kvf__metric_gauge(kvf__metrics *m, const char *name, const char *help,
                               const char *labels)
{
    return family(m, name, help, KVF_METRIC_GAUGE, labels, NULL, 0);
}

kvf__metric *kvf__metric_histogram(kvf__metrics *m, const char *name, const char *help,
                                   const char *labels, const double *bounds, size_t n_bounds)
{
    if (!bounds || !n_bounds)
        return NULL;
    return family(m, name, help, KVF_METRIC_HISTOGRAM, labels, bounds, n_bounds);
}

kvf__series *kvf__metric_series(kvf__metric *f, const char *const *values)
{
    if (!f)
        return NULL;
    pthread_mutex_lock(&f->m->mu);
    kvf__series *s = f->series;
    for (; s; s = s->next) {
        size_t k = 0;
        while (k < f->n_labels && !strcmp(s->values[k], values[k] ? values[k] : ""))
            k++;
        if (k == f->n_labels)
            break;
    }
    if (!s && (s = calloc(1, sizeof *s)) != NULL) {
        int ok = 1;
        for (size_t k = 0; k < f->n_labels && ok; k++)
            ok = (s->values[k] = strdup(values && values[k] ? values[k] : "")) != NULL;
        if (ok) {
            s->fam = f;
            s->next = f->series;
            f->series = s;
        } else {
            series_free(s);
            s = NULL;
        }
    }
    pthread_mutex_unlock(&f->m->mu);
    return s;
}

void kvf__series_add(kvf__series *s, double v)
{
    if (s)
        atomic_add_double(&s->bits, v);
}

void kvf__series_set(kvf__series *s, double v)
{
    if (s)
        atomic_store_explicit(&s->bits, to_bits(v), memory_order_relaxed);
}

double kvf__series_value(const kvf__series *s)
{
    return s ? from_bits(atomic_load_explicit(&((kvf__series *)s)->bits, memory_order_relaxed))
             : 0.0;
}

void kvf__series_observe(kvf__series *s, double v)
{
    if (!s || s->fam->type != KVF_METRIC_HISTOGRAM || isnan(v))
        return;
    size_t b = 0;
    while (b < s->fam->n_bounds && v > s->fam->bounds[b])
        b++;
    atomic_fetch_add_explicit(&s->buckets[b], 1, memory_order_relaxed);
    atomic_add_double(&s->sum_bits, v);
    atomic_fetch_add_explicit(&s->count, 1, memory_order_relaxed);
}

void kvf__metrics_set_all(kvf__metrics *m, const kvf__metric_value *v, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        kvf__metric *f = v[i].counter ? kvf__metric_counter(m, v[i].name, v[i].help, NULL)
                                      : kvf__metric_gauge(m, v[i].name, v[i].help, NULL);
        kvf__series_set(kvf__metric_series(f, NULL), v[i].v);
    }
}

void kvf__metrics_on_collect(kvf__metrics *m, void (*fn)(void *ud, kvf__metrics *m), void *ud)
{
    if (!m || !fn)
        return;
    pthread_mutex_lock(&m->mu);
    if (m->n_collect < MAX_COLLECT) {
        m->collect[m->n_collect] = fn;
        m->collect_ud[m->n_collect++] = ud;
    }
    pthread_mutex_unlock(&m->mu);
}

/* ------------------------------------------------------------------------------------------ */
/* Exposition */

static void put_value(FILE *f, double v)
{
    if (isinf(v))
        fputs(v > 0 ? "+Inf" : "-Inf", f);
    else if (isnan(v))
        fputs("NaN", f);
    else if (v == floor(v) && fabs(v) < 9007199254740992.0)
        fprintf(f, "%.0f", v);
    else {
        char b[40];
        snprintf(b, sizeof b, "%.15g", v); /* the shortest that reads back the same */
        if (strtod(b, NULL) != v)
            snprintf(b, sizeof b, "%.17g", v);
        fputs(b, f);
    }
}

static void put_escaped(FILE *f, const char *s, int quote)
{
    for (; *s; s++) {
        if (*s == '\\')
            fputs("\\\\", f);
        else if (*s == '\n')
            fputs("\\n", f);
        else if (quote && *s == '"')
            fputs("\\\"", f);
        else
            fputc(*s, f);
    }
}

/* {a="x",b="y"} with, where extra is set, one more label (le) last; nothing for no labels. */
static void put_labels(FILE *f, const kvf__metric *fam, const kvf__series *s, const char *extra,
                       double extra_v)
{
    if (!fam->n_labels && !extra)
        return;
    fputc('{', f);
    for (size_t k = 0; k < fam->n_labels; k++) {
        fprintf(f, "%s%s=\"", k ? "," : "", fam->labels[k]);
        put_escaped(f, s->values[k], 1);
        fputc('"', f);
    }
    if (extra) {
        fprintf(f, "%s%s=\"", fam->n_labels ? "," : "", extra);
        put_value(f, extra_v);
        fputc('"', f);
    }
    fputc('}', f);
}

static const char *type_name(kvf__metric_type t)
{
    return t == KVF_METRIC_COUNTER ? "counter" : t == KVF_METRIC_GAUGE ? "gauge" : "histogram";
}

static void put_family(FILE *f, const kvf__metric *fam)
{
    fprintf(f, "# HELP %s ", fam->name);
    put_escaped(f, fam->help, 0);
    fprintf(f, "\n# TYPE %s %s\n", fam->name, type_name(fam->type));
    for (const kvf__series *s = fam->series; s; s = s->next) {
        if (fam->type != KVF_METRIC_HISTOGRAM) {
            fputs(fam->name, f);
            put_labels(f, fam, s, NULL, 0);
            fputc(' ', f);
            put_value(f, from_bits(atomic_load_explicit(&((kvf__series *)s)->bits,
                                                        memory_order_relaxed)));
            fputc('\n', f);
            continue;
        }
        /* Buckets are cumulative; the count is their total, read once so the two agree. */
        uint64_t cum = 0;
        for (size_t b = 0; b <= fam->n_bounds; b++) {
            cum += atomic_load_explicit(&((kvf__series *)s)->buckets[b], memory_order_relaxed);
            fprintf(f, "%s_bucket", fam->name);
            put_labels(f, fam, s, "le", b < fam->n_bounds ? fam->bounds[b] : INFINITY);
            fprintf(f, " %llu\n", (unsigned long long)cum);
        }
        fprintf(f, "%s_sum", fam->name);
        put_labels(f, fam, s, NULL, 0);
        fputc(' ', f);
        put_value(f, from_bits(atomic_load_explicit(&((kvf__series *)s)->sum_bits,
                                                    memory_order_relaxed)));
        fprintf(f, "\n%s_count", fam->name);
        put_labels(f, fam, s, NULL, 0);
        fprintf(f, " %llu\n", (unsigned long long)cum);
    }
}

/* The process collector's usual series, from /proc (Linux; elsewhere only the fd limit). */
static void put_process(FILE *f)
{
    long tick = sysconf(_SC_CLK_TCK), page = sysconf(_SC_PAGESIZE);
    unsigned long long ut = 0, st = 0, start = 0, vsize = 0, rss = 0, btime = 0;
    FILE *p = fopen("/proc/self/stat", "r");
    int have_stat = 0;
    if (p) {
        char buf[1024];
        size_t n = fread(buf, 1, sizeof buf - 1, p);
        buf[n] = 0;
        fclose(p);
        char *q = strrchr(buf, ')'); /* the command name may hold spaces */
        /* after ")": state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime
         * stime cutime cstime priority nice threads itrealvalue starttime vsize rss */
        have_stat = q && sscanf(q + 2,
                                "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu %*d %*d "
                                "%*d %*d %*d %*d %llu %llu %llu",
                                &ut, &st, &start, &vsize, &rss) == 5;
    }
    p = fopen("/proc/stat", "r");
    if (p) {
        char line[256];
        while (fgets(line, sizeof line, p))
            if (sscanf(line, "btime %llu", &btime) == 1)
                break;
        fclose(p);
    }
    if (have_stat && tick > 0) {
        fputs("# HELP process_cpu_seconds_total Total user and system CPU time spent in "
              "seconds.\n# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total ",
              f);
        put_value(f, (double)(ut + st) / (double)tick);
        fputs("\n# HELP process_resident_memory_bytes Resident memory size in bytes.\n"
              "# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes ",
              f);
        put_value(f, (double)rss * (double)page);
        fputs("\n# HELP process_virtual_memory_bytes Virtual memory size in bytes.\n"
              "# TYPE process_virtual_memory_bytes gauge\nprocess_virtual_memory_bytes ",
              f);
        put_value(f, (double)vsize);
        fputc('\n', f);
        if (btime) {
            fputs("# HELP process_start_time_seconds Start time of the process since unix epoch "
                  "in seconds.\n# TYPE process_start_time_seconds gauge\n"
                  "process_start_time_seconds ",
                  f);
            put_value(f, (double)btime + (double)start / (double)tick);
            fputc('\n', f);
        }
    }
    DIR *d = opendir("/proc/self/fd");
    if (d) {
        long n = 0;
        for (struct dirent *e; (e = readdir(d)) != NULL;)
            n += e->d_name[0] != '.';
        closedir(d);
        fprintf(f,
                "# HELP process_open_fds Number of open file descriptors.\n"
                "# TYPE process_open_fds gauge\nprocess_open_fds %ld\n",
                n - 1); /* the directory's own */
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY)
        fprintf(f,
                "# HELP process_max_fds Maximum number of open file descriptors.\n"
                "# TYPE process_max_fds gauge\nprocess_max_fds %llu\n",
                (unsigned long long)rl.rlim_cur);
}

int kvf__metrics_expose(kvf__metrics *m, char **text, size_t *len)
{
    if (!m || !text || !len)
        return -1;
    void (*fn[MAX_COLLECT])(void *, kvf__metrics *);
    void *ud[MAX_COLLECT];
    pthread_mutex_lock(&m->mu);
    size_t nc = m->n_collect;
    memcpy(fn, m->collect, nc * sizeof fn[0]);
    memcpy(ud, m->collect_ud, nc * sizeof ud[0]);
    pthread_mutex_unlock(&m->mu);
    for (size_t i = 0; i < nc; i++)
        fn[i](ud[i], m);
    *text = NULL;
    *len = 0;
    FILE *f = open_memstream(text, len);
    if (!f)
        return -1;
    fprintf(f,
            "# HELP kvf_build_info kvfabric's version, as a series of value 1.\n"
            "# TYPE kvf_build_info gauge\n"
            "kvf_build_info{component=\"%s\",version=\"%s\"} 1\n",
            m->prefix, KVF_VERSION_STRING);
    pthread_mutex_lock(&m->mu);
    for (size_t i = 0; i < m->n_fam; i++)
        put_family(f, m->fam[i]);
    pthread_mutex_unlock(&m->mu);
    put_process(f);
    if (fclose(f) != 0) {
        free(*text);
        *text = NULL;
        return -1;
    }
    return 0;
}
