/*
 * The cost model (docs/scheduler.md, "Placement"): its constants (defaults for llama-3.1-8b on
 * one H200-class GPU, or a calibration file) and the estimates placement ranks instances by.
 */
#include "sched_int.h"

#include "kvf/error.h"

#include <jansson.h>
#include <stdio.h>
#include <string.h>

void kvf_sched_cost_defaults(kvf_sched_cost *c)
{
    /* llama-3.1-8b, bf16, on one H200-class GPU: about 10k prefill tokens/s at short contexts,
     * attention growing with the square of the context; 128 KiB of KV per token; a 100 Gb/s
     * store link (12.5 GB/s); 12 ms per output token plus 0.1 ms per other active sequence. */
    c->prefill_tokens_per_s = 10000.0;
    c->prefill_attn_s_per_tok2 = 2.0e-10;
    c->load_bytes_per_s = 12.5e9;
    c->disk_load_bytes_per_s = 3e9; /* an NVMe SSD's reads */
    c->kv_bytes_per_token = 131072.0;
    c->tpot_base_s = 0.012;
    c->tpot_per_seq_s = 0.0001;
    c->disagg_threshold_tokens = 512;
    c->handoff_bytes_per_s = 25e9;
    c->reject_factor = 0;
    c->klpm_k = 128;
    c->queue_by_work = 1;
    c->decode_overflow = 1;
    c->load_deadline_base_s = 0.2;
    c->load_deadline_s_per_ktok = 0;
}

double kvf__sched_load_deadline_s(const kvf_sched_cost *c, double tokens)
{
    double per_ktok = c->load_deadline_s_per_ktok > 0
                          ? c->load_deadline_s_per_ktok
                          : 2.0 * 1000.0 * c->kv_bytes_per_token / c->load_bytes_per_s;
    return c->load_deadline_base_s + per_ktok * tokens / 1000.0;
}

int kvf_sched_cost_load(const char *path, kvf_sched_cost *c, char *err, size_t errlen)
{
    json_error_t je;
    json_t *o = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
    if (!o) {
        snprintf(err, errlen, "%s: line %d: %s", path, je.line, je.text);
        return KVF_EINVAL;
    }
    if (!json_is_object(o)) {
        snprintf(err, errlen, "%s: expected a JSON object", path);
        json_decref(o);
        return KVF_EINVAL;
    }
    static const struct {
        const char *name;
        size_t off;
    } f[] = {
        {"prefill_tokens_per_s", offsetof(kvf_sched_cost, prefill_tokens_per_s)},
        {"prefill_attn_s_per_tok2", offsetof(kvf_sched_cost, prefill_attn_s_per_tok2)},
        {"load_bytes_per_s", offsetof(kvf_sched_cost, load_bytes_per_s)},
        {"disk_load_bytes_per_s", offsetof(kvf_sched_cost, disk_load_bytes_per_s)},
        {"kv_bytes_per_token", offsetof(kvf_sched_cost, kv_bytes_per_token)},
        {"tpot_base_s", offsetof(kvf_sched_cost, tpot_base_s)},
        {"tpot_per_seq_s", offsetof(kvf_sched_cost, tpot_per_seq_s)},
        {"disagg_threshold_tokens", offsetof(kvf_sched_cost, disagg_threshold_tokens)},
        {"handoff_bytes_per_s", offsetof(kvf_sched_cost, handoff_bytes_per_s)},
        {"reject_factor", offsetof(kvf_sched_cost, reject_factor)},
        {"load_deadline_base_s", offsetof(kvf_sched_cost, load_deadline_base_s)},
        {"load_deadline_s_per_ktok", offsetof(kvf_sched_cost, load_deadline_s_per_ktok)},
        {"remote_load_bytes_per_s", offsetof(kvf_sched_cost, remote_load_bytes_per_s)},
    };
    const char *k;
    json_t *v;
    int rc = 0;
    json_object_foreach(o, k, v)
    {
        if (strcmp(k, "klpm_k") == 0 && json_is_integer(v) && json_integer_value(v) >= 0) {
            c->klpm_k = (uint32_t)json_integer_value(v);
            continue;
        }
        uint32_t *flag = !strcmp(k, "queue_by_work")     ? &c->queue_by_work
                         : !strcmp(k, "decode_overflow") ? &c->decode_overflow
                                                         : NULL;
        if (flag && json_is_integer(v) &&
            (json_integer_value(v) == 0 || json_integer_value(v) == 1)) {
            *flag = (uint32_t)json_integer_value(v);
            continue;
        }
        size_t i;
        for (i = 0; i < sizeof f / sizeof f[0]; i++)
            if (strcmp(k, f[i].name) == 0)
                break;
        if (i == sizeof f / sizeof f[0] || !json_is_number(v) || json_number_value(v) < 0) {
            snprintf(err, errlen, "%s: %s: unknown key or not a non-negative number", path, k);
            rc = KVF_EINVAL;
            break;
        }
        *(double *)((char *)c + f[i].off) = json_number_value(v);
    }
    json_decref(o);
    return rc;
}

double kvf__sched_prefill_s(const kvf_sched_cost *c, double n, double cached)
{
    if (cached > n)
        cached = n;
    return (n - cached) / c->prefill_tokens_per_s +
           c->prefill_attn_s_per_tok2 * (n * n - cached * cached) / 2.0;
}

double kvf__sched_queue_s(const kvf_sched_cost *c, const kvf_instance_load *load)
{
    /* The reporter's seconds where it gives them (they price each request's attention, which
     * grows with its length); the queued tokens at the linear rate otherwise, a floor that
     * takes no account of attention. */
    double linear = load->queued_prefill_tokens / c->prefill_tokens_per_s;
    return load->queued_prefill_s > linear ? load->queued_prefill_s : linear;
}

double kvf__sched_load_s(const kvf_sched_cost *c, double tokens)
{
    return tokens * c->kv_bytes_per_token / c->load_bytes_per_s;
}

double kvf__sched_handoff_s(const kvf_sched_cost *c, double tokens)
{
    return tokens * c->kv_bytes_per_token / c->handoff_bytes_per_s;
}

void kvf__sched_estimate(const kvf_sched_cost *c, const kvf_instance_load *load, double n,
                         double device, double store, double disk, double disk_bps, double remote,
                         kvf__sched_est *e)
{
    e->device = device;
    e->cached = device > store ? device : store;
    double loaded = device >= e->cached ? 0 : e->cached - device;
    e->disk = disk < loaded ? disk : loaded;
    /* remote tokens among those not on a disk tier only (which are priced at the disk's rate) */
    e->remote = remote < loaded - e->disk ? remote : loaded - e->disk;
    if (e->remote < 0)
        e->remote = 0;
    double rate = disk_bps > 0 && disk_bps < c->load_bytes_per_s ? disk_bps : c->load_bytes_per_s;
    double rrate =
        c->remote_load_bytes_per_s > 0 && c->remote_load_bytes_per_s < c->load_bytes_per_s
            ? c->remote_load_bytes_per_s
            : c->load_bytes_per_s;
    e->load_s = kvf__sched_load_s(c, loaded - e->disk - e->remote) +
                e->disk * c->kv_bytes_per_token / rate + e->remote * c->kv_bytes_per_token / rrate;
    e->ttft_s = kvf__sched_queue_s(c, load) + e->load_s + kvf__sched_prefill_s(c, n, e->cached);
}
