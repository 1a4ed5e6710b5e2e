/*
 * The backend-feasibility classifier (include/kvf/feasibility.h, docs/feasibility.md).
 *
 * Each action runs an ordered rule chain; the first rule that fails names the missing capability
 * and the side that lacks it. Transfers also intersect both sides' transports and memory kinds:
 * an action that moves KV is real only when one transport works on both sides and each side's
 * transfer path can reach the memory its KV lives in.
 */
#include "kvf/feasibility.h"

#include "kvf/error.h"

#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const action_names[] = {
#define XX(e, name) name,
    KVF_ACTION_MAP(XX)
#undef XX
};

static const char *const reason_names[] = {
#define XX(e, name) name,
    KVF_FEAS_REASON_MAP(XX)
#undef XX
};

const char *kvf_action_name(kvf_action_id a)
{
    return (unsigned)a < KVF_ACTION_COUNT_ ? action_names[a] : "?";
}

int kvf_action_parse(const char *name, kvf_action_id *out)
{
    for (int i = 0; i < KVF_ACTION_COUNT_; i++) {
        if (!strcmp(name, action_names[i])) {
            *out = (kvf_action_id)i;
            return 0;
        }
    }
    return KVF_EINVAL;
}

const char *kvf_feas_label_name(kvf_feas_label l)
{
    return l == KVF_FEAS_REAL        ? "real"
           : l == KVF_FEAS_SIMULATED ? "simulated"
                                     : "backend_infeasible";
}

const char *kvf_feas_reason_name(kvf_feas_reason r)
{
    return (unsigned)r < sizeof reason_names / sizeof reason_names[0] ? reason_names[r] : "?";
}

/* ------------------------------------------------------------------------------------------ */
/* Rules */

static int deny(kvf_verdict *v, kvf_feas_reason r, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int deny(kvf_verdict *v, kvf_feas_reason r, const char *fmt, ...)
{
    v->label = KVF_FEAS_BACKEND_INFEASIBLE;
    v->reason = r;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(v->why, sizeof v->why, fmt, ap);
    va_end(ap);
    return 1;
}

static const char *name_of(const kvf_caps *c)
{
    return c->name[0] ? c->name : c->engine[0] ? c->engine : "this backend";
}

static const char *memk_name(uint32_t k)
{
    return (k & KVF_MEMK_CUDA) ? "CUDA device" : (k & KVF_MEMK_UNIFIED) ? "unified" : "host";
}

/* KV can move between the two sides: a common transport, and memory each side can reach. */
static int rule_transfer(const kvf_caps *l, const kvf_caps *r, kvf_verdict *v)
{
    if (!(l->transports & r->transports))
        return deny(v, KVF_FEAS_NO_COMMON_TRANSPORT, "%s and %s share no transport", name_of(l),
                    name_of(r));
    uint32_t miss = l->mem_kinds & ~l->xfer_mem_kinds;
    if (miss)
        return deny(v, KVF_FEAS_MEMORY_KIND,
                    "%s keeps KV in %s memory, which its transfer path cannot reach", name_of(l),
                    memk_name(miss));
    miss = r->mem_kinds & ~r->xfer_mem_kinds;
    if (miss)
        return deny(v, KVF_FEAS_MEMORY_KIND,
                    "%s keeps KV in %s memory, which its transfer path cannot reach", name_of(r),
                    memk_name(miss));
    return 0;
}

static int rule_rdma(const kvf_caps *l, const kvf_caps *r, kvf_verdict *v)
{
    const kvf_caps *side[2] = {l, r};
    for (int i = 0; i < 2; i++)
        if (side[i]->rdma_devices <= 0 || !(side[i]->transports & KVF_TRANSPORT_RDMA))
            return deny(v, KVF_FEAS_NO_RDMA_DEVICE, "%s has no RDMA device", name_of(side[i]));
    for (int i = 0; i < 2; i++)
        if (!side[i]->rdma_one_sided)
            return deny(v, KVF_FEAS_NO_ONE_SIDED, "%s cannot do one-sided RDMA READ/WRITE",
                        name_of(side[i]));
    return rule_transfer(l, r, v);
}

static int rule_store(const kvf_caps *r, kvf_verdict *v)
{
    if (!r->store_tiers)
        return deny(v, KVF_FEAS_NO_STORE, "%s is not a KV store", name_of(r));
    return 0;
}

int kvf_classify(kvf_action_id a, const kvf_caps *l, const kvf_caps *r, int allow_simulated,
                 kvf_verdict *v)
{
    if (!l || !r || !v || (unsigned)a >= KVF_ACTION_COUNT_)
        return KVF_EINVAL;
    memset(v, 0, sizeof *v);
    v->label = KVF_FEAS_REAL;
    v->reason = KVF_FEAS_NONE;
    int denied = 0;
    switch (a) {
    case KVF_ACTION_STORE:
    case KVF_ACTION_RETRIEVE:
    case KVF_ACTION_MOVE:
        denied = rule_store(r, v) || rule_transfer(l, r, v);
        break;
    case KVF_ACTION_PREFETCH:
        denied = rule_store(r, v) || rule_transfer(l, r, v) ||
                 (!l->async_load &&
                  deny(v, KVF_FEAS_NO_ASYNC_LOAD,
                       "%s cannot load KV while it computes (no asynchronous load)", name_of(l)));
        break;
    case KVF_ACTION_LOOKUP:
    case KVF_ACTION_EVICT:
    case KVF_ACTION_PIN:
    case KVF_ACTION_UNPIN:
    case KVF_ACTION_CLEAR:
        denied = rule_store(r, v) || (!(l->transports & r->transports) &&
                                      deny(v, KVF_FEAS_NO_COMMON_TRANSPORT,
                                           "%s and %s share no transport", name_of(l), name_of(r)));
        break;
    case KVF_ACTION_COMPRESS:
    case KVF_ACTION_DECOMPRESS:
        denied = rule_store(r, v) ||
                 (!r->codecs && deny(v, KVF_FEAS_NO_CODEC, "%s has no codec", name_of(r)));
        break;
    case KVF_ACTION_RDMA_READ:
    case KVF_ACTION_RDMA_WRITE:
        denied = rule_rdma(l, r, v);
        break;
    case KVF_ACTION_LAYERWISE_LOAD:
        denied = (!l->paged &&
                  deny(v, KVF_FEAS_NO_PAGED_LAYOUT, "%s has no paged KV layout", name_of(l))) ||
                 (!l->layerwise_hooks &&
                  deny(v, KVF_FEAS_NO_LAYERWISE_HOOK,
                       "%s has no per-layer hook in its forward pass", name_of(l))) ||
                 rule_store(r, v) || rule_transfer(l, r, v);
        break;
    case KVF_ACTION_PD_HANDOFF_DIRECT:
        /* Engine to engine, straight into the decode side's KV memory: one-sided RDMA into a
         * connector on both ends. */
        denied = (!l->external_connector && deny(v, KVF_FEAS_NO_EXTERNAL_CONNECTOR,
                                                 "%s has no external KV connector", name_of(l))) ||
                 (!r->external_connector && deny(v, KVF_FEAS_NO_EXTERNAL_CONNECTOR,
                                                 "%s has no external KV connector", name_of(r))) ||
                 rule_rdma(l, r, v);
        break;
    case KVF_ACTION_PD_HANDOFF_STORE:
        /* The prefill side saves, the decode side loads, through a store both reach. */
        denied = rule_transfer(l, r, v);
        break;
    case KVF_ACTION_KV_QUANTIZATION:
        denied = !l->quant_bits &&
                 deny(v, KVF_FEAS_NO_QUANTIZATION, "%s cannot quantize its KV cache", name_of(l));
        break;
    case KVF_ACTION_TRIM:
        denied = !l->trim && deny(v, KVF_FEAS_NO_TRIM,
                                  "%s cannot drop a suffix of a sequence's KV cache", name_of(l));
        if (!denied && l->trim_can_fail)
            snprintf(v->why, sizeof v->why,
                     "%s can trim, but a partial removal may be refused "
                     "and must be checked",
                     name_of(l));
        break;
    default:
        return KVF_EINVAL;
    }
    if (denied && allow_simulated)
        v->label = KVF_FEAS_SIMULATED; /* evaluated by the cost model only; the reason stays */
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Built-in records. Sources are cited field by field in docs/feasibility.md. */

#define BITS(...) bits_of((const int[]){__VA_ARGS__, -1})

static uint32_t bits_of(const int *v)
{
    uint32_t m = 0;
    for (; *v >= 0; v++)
        m |= 1u << *v;
    return m;
}

static const char *const builtin_names[] = {"mlx-lm", "vllm", "llama.cpp", "reference",
                                            "kvf-store"};

const char *kvf_caps_builtin_name(size_t i)
{
    return i < sizeof builtin_names / sizeof builtin_names[0] ? builtin_names[i] : NULL;
}

int kvf_caps_builtin(const char *name, kvf_caps *c)
{
    memset(c, 0, sizeof *c);
    snprintf(c->name, sizeof c->name, "%s", name);
    c->transports = KVF_TRANSPORT_TCP;
    c->xfer_mem_kinds = KVF_MEMK_HOST | KVF_MEMK_UNIFIED; /* this build's transfer path */
    if (!strcmp(name, "mlx-lm")) {
        snprintf(c->platform, sizeof c->platform, "macos");
        c->apple_silicon = 1;
        c->mem_kinds = KVF_MEMK_UNIFIED;
        snprintf(c->engine, sizeof c->engine, "mlx-lm");
        c->quant_bits = BITS(2, 3, 4, 5, 6, 8);
        c->quant_groups = 1 | 2 | 4; /* 32, 64, 128 */
        c->trim = 1;
        c->rotating_cache = 1;
        c->rotating_with_quant = 0;
    } else if (!strcmp(name, "vllm")) {
        snprintf(c->platform, sizeof c->platform, "linux");
        c->transports = KVF_TRANSPORT_TCP | KVF_TRANSPORT_RDMA;
        c->rdma_devices = 1;
        c->rdma_one_sided = 1;
        c->mem_kinds = KVF_MEMK_CUDA;
        snprintf(c->engine, sizeof c->engine, "vllm");
        c->paged = c->layerwise_hooks = c->async_load = c->external_connector = 1;
        c->quant_bits = BITS(8); /* fp8 KV cache */
        c->partial_evict = 1;
        c->rotating_cache = 1; /* sliding-window attention */
    } else if (!strcmp(name, "llama.cpp")) {
        snprintf(c->platform, sizeof c->platform, "linux");
        c->mem_kinds = KVF_MEMK_HOST;
        snprintf(c->engine, sizeof c->engine, "llama.cpp");
        c->quant_bits = BITS(4, 5, 8); /* q4_0, q5_0, q8_0 cache types */
        c->trim = 1;
        c->partial_evict = 1;
        c->trim_can_fail = 1;
        c->rotating_cache = 1;
        c->rotating_with_quant = 1;
    } else if (!strcmp(name, "reference")) {
        snprintf(c->platform, sizeof c->platform, "linux");
        c->mem_kinds = KVF_MEMK_HOST;
        snprintf(c->engine, sizeof c->engine, "reference");
        c->paged = c->layerwise_hooks = c->async_load = c->external_connector = 1;
    } else if (!strcmp(name, "kvf-store")) {
        snprintf(c->platform, sizeof c->platform, "linux");
        c->mem_kinds = KVF_MEMK_HOST;
        snprintf(c->engine, sizeof c->engine, "store");
        c->store_tiers = 1;
        c->codecs = 1 | 2;
    } else {
        return KVF_ENOENT;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* JSON */

static const struct field {
    const char *name;
    size_t off;
    char kind; /* i: int, u: uint32 bit set, s: string */
    size_t len;
} fields[] = {
    {"name", offsetof(kvf_caps, name), 's', sizeof(((kvf_caps *)0)->name)},
    {"platform", offsetof(kvf_caps, platform), 's', sizeof(((kvf_caps *)0)->platform)},
    {"apple_silicon", offsetof(kvf_caps, apple_silicon), 'i', 0},
    {"transports", offsetof(kvf_caps, transports), 'u', 0},
    {"rdma_devices", offsetof(kvf_caps, rdma_devices), 'i', 0},
    {"rdma_one_sided", offsetof(kvf_caps, rdma_one_sided), 'i', 0},
    {"mem_kinds", offsetof(kvf_caps, mem_kinds), 'u', 0},
    {"xfer_mem_kinds", offsetof(kvf_caps, xfer_mem_kinds), 'u', 0},
    {"engine", offsetof(kvf_caps, engine), 's', sizeof(((kvf_caps *)0)->engine)},
    {"engine_version", offsetof(kvf_caps, engine_version), 's',
     sizeof(((kvf_caps *)0)->engine_version)},
    {"paged", offsetof(kvf_caps, paged), 'i', 0},
    {"layerwise_hooks", offsetof(kvf_caps, layerwise_hooks), 'i', 0},
    {"async_load", offsetof(kvf_caps, async_load), 'i', 0},
    {"external_connector", offsetof(kvf_caps, external_connector), 'i', 0},
    {"quant_bits", offsetof(kvf_caps, quant_bits), 'u', 0},
    {"quant_groups", offsetof(kvf_caps, quant_groups), 'u', 0},
    {"trim", offsetof(kvf_caps, trim), 'i', 0},
    {"partial_evict", offsetof(kvf_caps, partial_evict), 'i', 0},
    {"trim_can_fail", offsetof(kvf_caps, trim_can_fail), 'i', 0},
    {"rotating_cache", offsetof(kvf_caps, rotating_cache), 'i', 0},
    {"rotating_with_quant", offsetof(kvf_caps, rotating_with_quant), 'i', 0},
    {"store_tiers", offsetof(kvf_caps, store_tiers), 'i', 0},
    {"codecs", offsetof(kvf_caps, codecs), 'i', 0},
};

#define N_FIELDS (sizeof fields / sizeof fields[0])

int kvf_caps_from_json(const char *text, size_t len, kvf_caps *out, char *err, size_t errlen)
{
    json_error_t je;
    json_t *o = json_loadb(text, len, JSON_REJECT_DUPLICATES, &je);
    if (!o || !json_is_object(o)) {
        snprintf(err, errlen, "capability record: %s", o ? "expected a JSON object" : je.text);
        json_decref(o);
        return KVF_EINVAL;
    }
    kvf_caps c;
    memset(&c, 0, sizeof c);
    int rc = 0;
    json_t *base = json_object_get(o, "base");
    if (base && (!json_is_string(base) || kvf_caps_builtin(json_string_value(base), &c) != 0)) {
        snprintf(err, errlen, "base: unknown built-in record");
        rc = KVF_EINVAL;
        goto out;
    }
    const char *k;
    json_t *v;
    json_object_foreach(o, k, v)
    {
        if (!strcmp(k, "base"))
            continue;
        size_t i;
        for (i = 0; i < N_FIELDS; i++)
            if (!strcmp(k, fields[i].name))
                break;
        if (i == N_FIELDS) {
            snprintf(err, errlen, "unknown field \"%s\"", k);
            rc = KVF_EINVAL;
            goto out;
        }
        char *dst = (char *)&c + fields[i].off;
        if (fields[i].kind == 's') {
            if (!json_is_string(v) || json_string_length(v) >= fields[i].len) {
                snprintf(err, errlen, "%s: expected a string under %zu bytes", k, fields[i].len);
                rc = KVF_EINVAL;
                goto out;
            }
            snprintf(dst, fields[i].len, "%s", json_string_value(v));
        } else {
            if (!json_is_integer(v) && !json_is_boolean(v)) {
                snprintf(err, errlen, "%s: expected an integer", k);
                rc = KVF_EINVAL;
                goto out;
            }
            json_int_t x = json_is_boolean(v) ? json_is_true(v) : json_integer_value(v);
            if (x < 0 || x > (json_int_t)UINT32_MAX) {
                snprintf(err, errlen, "%s: out of range", k);
                rc = KVF_EINVAL;
                goto out;
            }
            if (fields[i].kind == 'u')
                *(uint32_t *)dst = (uint32_t)x;
            else
                *(int *)dst = (int)x;
        }
    }
    *out = c;
out:
    json_decref(o);
    return rc;
}

int kvf_caps_load(const char *path, kvf_caps *out, char *err, size_t errlen)
{
    if (kvf_caps_builtin(path, out) == 0)
        return 0;
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen,
                 "%s: not a built-in record (mlx-lm, vllm, llama.cpp, reference, "
                 "kvf-store) nor a readable file",
                 path);
        return KVF_ENOENT;
    }
    char buf[65536];
    size_t n = fread(buf, 1, sizeof buf, f);
    fclose(f);
    char inner[200];
    int rc = kvf_caps_from_json(buf, n, out, inner, sizeof inner);
    if (rc)
        snprintf(err, errlen, "%s: %s", path, inner);
    return rc;
}

char *kvf_caps_to_json(const kvf_caps *c)
{
    json_t *o = json_object();
    for (size_t i = 0; i < N_FIELDS; i++) {
        const char *src = (const char *)c + fields[i].off;
        if (fields[i].kind == 's')
            json_object_set_new(o, fields[i].name, json_string(src));
        else if (fields[i].kind == 'u')
            json_object_set_new(o, fields[i].name, json_integer(*(const uint32_t *)src));
        else
            json_object_set_new(o, fields[i].name, json_integer(*(const int *)src));
    }
    char *t = json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(o);
    return t;
}

/* ------------------------------------------------------------------------------------------ */
/* Scores and the gap */

void kvf_gap_state_defaults(kvf_gap_state *s)
{
    s->prompt_tokens = 8192;
    s->cached_tokens = 7168;
    s->kv_bytes_per_token = 131072; /* llama-3.1-8b, bf16 */
    s->prefill_tokens_per_s = 10000;
    s->tcp_bytes_per_s = 3e9;   /* one loopback / 25 GbE stream */
    s->rdma_bytes_per_s = 25e9; /* 200 Gb/s RDMA */
    s->memory_pressure = 0.1;
}

double kvf_action_score(kvf_action_id a, const kvf_gap_state *s)
{
    double c = s->cached_tokens, n = s->prompt_tokens, B = s->kv_bytes_per_token;
    double compute_saved = c / s->prefill_tokens_per_s;
    double rest = (n - c) / s->prefill_tokens_per_s;
    double tcp = c * B / s->tcp_bytes_per_s, rdma = c * B / s->rdma_bytes_per_s;
    double pressure = s->memory_pressure * c * B / 1e10; /* holding KV costs memory */
    switch (a) {
    case KVF_ACTION_RETRIEVE:
        return compute_saved - tcp;
    case KVF_ACTION_LAYERWISE_LOAD: /* the load overlaps the compute of the rest */
        return compute_saved - (tcp > rest ? tcp - rest : 0);
    case KVF_ACTION_RDMA_READ:
        return compute_saved - rdma;
    case KVF_ACTION_PREFETCH: /* moved before the request arrives, held meanwhile */
        return compute_saved - pressure;
    case KVF_ACTION_PD_HANDOFF_DIRECT:
        return -n * B / s->rdma_bytes_per_s;
    case KVF_ACTION_PD_HANDOFF_STORE:
        return -2 * n * B / s->tcp_bytes_per_s;
    case KVF_ACTION_KV_QUANTIZATION: /* half the bytes to move (8-bit from 16) */
        return tcp / 2;
    case KVF_ACTION_STORE:
    case KVF_ACTION_RDMA_WRITE:
    case KVF_ACTION_MOVE:
        return -pressure;
    default:
        return 0;
    }
}

int kvf_optimality_gap(const kvf_caps *l, const kvf_caps *r, const kvf_gap_state *s, kvf_gap *g)
{
    if (!l || !r || !s || !g)
        return KVF_EINVAL;
    memset(g, 0, sizeof *g);
    double best_all = -1e300, best_f = -1e300;
    for (int a = 0; a < KVF_ACTION_COUNT_; a++) {
        double sc = kvf_action_score((kvf_action_id)a, s);
        kvf_verdict v;
        kvf_classify((kvf_action_id)a, l, r, 0, &v);
        if (sc > best_all) {
            best_all = sc;
            g->best_all = (kvf_action_id)a;
        }
        if (v.label == KVF_FEAS_REAL && sc > best_f) {
            best_f = sc;
            g->best_feasible = (kvf_action_id)a;
            g->have_feasible = 1;
        }
    }
    g->score_all = best_all;
    g->score_feasible = g->have_feasible ? best_f : 0;
    g->gap = g->have_feasible ? best_all - best_f : best_all;
    return 0;
}
