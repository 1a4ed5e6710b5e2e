/* Mooncake-format traces (trace.h). */
#include "trace.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

int bench_trace_load(const char *path, size_t skip, size_t max, bench_trace_rec **out, size_t *n,
                     char *err, size_t errlen)
{
    *out = NULL;
    *n = 0;
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "%s: cannot open", path);
        return -1;
    }
    size_t cap = 1024, k = 0, seen = 0;
    bench_trace_rec *r = malloc(cap * sizeof *r);
    char *line = NULL;
    size_t lcap = 0;
    ssize_t len;
    long lineno = 0;
    int rc = r ? 0 : -1;
    if (!r)
        snprintf(err, errlen, "out of memory");
    while (!rc && (len = getline(&line, &lcap, f)) > 0 && (!max || k < max)) {
        lineno++;
        if (len <= 1)
            continue;
        json_error_t je;
        json_t *o = json_loads(line, 0, &je);
        json_t *ts = o ? json_object_get(o, "timestamp") : NULL;
        json_t *il = o ? json_object_get(o, "input_length") : NULL;
        json_t *ol = o ? json_object_get(o, "output_length") : NULL;
        json_t *ids = o ? json_object_get(o, "hash_ids") : NULL;
        if (!o || !json_is_number(ts) || !json_is_integer(il) || !json_is_integer(ol) ||
            !json_is_array(ids) || json_integer_value(il) <= 0 || json_integer_value(ol) < 0 ||
            json_integer_value(il) > UINT32_MAX || json_integer_value(ol) > UINT32_MAX) {
            snprintf(err, errlen, "%s:%ld: not a trace record (%s)", path, lineno,
                     o ? "missing or mistyped field" : je.text);
            json_decref(o);
            rc = -1;
            break;
        }
        if (seen++ < skip) {
            json_decref(o);
            continue;
        }
        if (k == cap) {
            bench_trace_rec *nr = realloc(r, 2 * cap * sizeof *r);
            if (!nr) {
                json_decref(o);
                snprintf(err, errlen, "out of memory");
                rc = -1;
                break;
            }
            r = nr;
            cap *= 2;
        }
        bench_trace_rec *q = &r[k];
        q->arrival = json_number_value(ts) / 1000.0;
        q->in_len = (uint32_t)json_integer_value(il);
        q->out_len = (uint32_t)json_integer_value(ol);
        q->n_ids = (uint32_t)json_array_size(ids);
        q->ids = malloc((q->n_ids ? q->n_ids : 1) * sizeof *q->ids);
        if (!q->ids) {
            json_decref(o);
            snprintf(err, errlen, "out of memory");
            rc = -1;
            break;
        }
        k++;
        for (uint32_t i = 0; i < q->n_ids; i++)
            q->ids[i] = (uint64_t)json_integer_value(json_array_get(ids, i));
        json_decref(o);
    }
    free(line);
    fclose(f);
    if (rc) {
        bench_trace_free(r, k);
        return -1;
    }
    *out = r;
    *n = k;
    return 0;
}

void bench_trace_free(bench_trace_rec *r, size_t n)
{
    for (size_t i = 0; r && i < n; i++)
        free(r[i].ids);
    free(r);
}

uint32_t bench_trace_token(uint64_t id, size_t i, uint32_t vocab)
{
    uint64_t z = id * 0x9E3779B97F4A7C15ull + i + 1;
    z ^= z >> 29;
    z *= 0xbf58476d1ce4e5b9ull;
    return (uint32_t)((z ^ (z >> 32)) % vocab);
}
