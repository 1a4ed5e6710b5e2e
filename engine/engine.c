/*
 * The reference engine's forward pass (engine/include/engine.h). A Llama-style decoder: pre-norm
 * RMSNorm ("Root Mean Square Layer Normalization", Zhang and Sennrich, 2019), rotary embeddings
 * ("RoFormer", Su et al., 2021) on Q and K, grouped-query attention ("GQA", Ainslie et al., 2023)
 * and a SwiGLU MLP ("GLU Variants Improve Transformer", Shazeer, 2020). All math is f32.
 *
 * Attention for a block of queries multiplies them against every key up to the block's end at
 * once (a GEMM per KV head), masks the future, and softmaxes row by row. The keys and values of a
 * layer are kept contiguous per KV head in scratch while the layer runs, filled from the paged
 * cache for the prefix and appended block by block; the paged cache is the copy that persists and
 * the one the connector moves.
 */
#include "engine.h"

#include "kvf/error.h"

#include "bytes.h"

#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct layer_w {
    float *wq, *wk, *wv, *wo, *wg, *wu, *wd, *n1, *n2;
} layer_w;

struct kvfe_engine {
    kvfe_model m;
    kvfe_opts o;
    uint32_t B; /* block rows: divides chunk_tokens, aligned to absolute positions */
    uint32_t hd, kvh, nh, group;
    float *embed, *norm_f;
    layer_w *lw;
    /* paged KV cache: per layer K and V planes */
    uint8_t **kplane, **vplane;
    size_t page_bytes, page_stride;
    uint32_t num_pages;
    uint32_t *page_of; /* page id of each page index of the sequence */
    /* sequence */
    uint32_t *tokens;
    size_t len;
    /* scratch */
    float *x, *h, *q, *k, *v, *att, *o_, *g, *u, *scores, *kc, *vc, *logits;
    float *rope_cos, *rope_sin;
    /* Saves in flight (docs/connector.md, "The reference engine"): the last prefill's, which may
     * still be reading its pages, and the one before it, whose pages are read and whose chunks
     * may still be on their way to the stores. */
    kvf_xfer *pending_save, *older_save;
    int device_off, reuse_off, save_off; /* per request (kvfe_set_tiers) */
    size_t device_max; /* most tokens reused from the pages (kvfe_set_device_reuse) */
    kvfe_rates rates;  /* opts.decide's measurements */
    kvfe_fit fit;      /* the passes its prefill terms are fitted to */
};

#define RATE_ALPHA 0.3

static double ewma(double old, double now_)
{
    return old > 0 ? (1 - RATE_ALPHA) * old + RATE_ALPHA * now_ : now_;
}

size_t kvfe_decide(const kvfe_rates *r, uint64_t bytes_per_token, uint32_t chunk_tokens, size_t dev,
                   size_t cached, size_t n, size_t load_from, kvfe_choice *choice,
                   double *predicted, double *recompute)
{
    *predicted = *recompute = 0;
    *choice = KVFE_NO_DECISION;
    if (cached <= dev || chunk_tokens == 0)
        return dev;
    if (r->load_bps <= 0 || (r->s_per_token <= 0 && r->base_s <= 0)) {
        *choice = KVFE_LOAD; /* nothing measured yet: load, and measure */
        return cached;
    }
    double all = kvfe_rates_compute_s(r, dev, n), best_s = all;
    size_t best = dev;
    for (size_t p = (dev / chunk_tokens + 1) * chunk_tokens; p <= cached; p += chunk_tokens) {
        double load = (double)(p - load_from) * (double)bytes_per_token / r->load_bps;
        double rest = kvfe_rates_compute_s(r, p, n), t = load > rest ? load : rest;
        if (t < best_s * 0.95 && t < all * 0.95)
            best = p, best_s = t;
    }
    *recompute = all;
    *predicted = best_s;
    *choice = best == dev ? KVFE_RECOMPUTE : best == cached ? KVFE_LOAD : KVFE_PARTIAL;
    return best;
}

void kvfe_rates_get(const kvfe_engine *e, kvfe_rates *r)
{
    *r = e->rates;
}

void kvfe_rates_set(kvfe_engine *e, const kvfe_rates *r)
{
    e->rates = *r;
    kvfe_fit_clear(&e->fit); /* the model set is the model: what was measured is forgotten */
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The models: their layouts are the layout presets of the same names (core/layout.c). */
static const struct model_shape {
    const char *name;
    uint32_t vocab, n_heads, ffn;
} shapes[] = {
    {"ref-tiny", 512, 4, 256},
    {"ref-tiny-32l", 512, 4, 256},
    {"ref-100m", 32000, 12, 2048},
};

int kvfe_model_preset(const char *name, kvfe_model *m)
{
    memset(m, 0, sizeof *m);
    const struct model_shape *sh = NULL;
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0] && !sh; i++)
        if (strcmp(name, shapes[i].name) == 0)
            sh = &shapes[i];
    if (!sh || kvf_layout_preset(name, &m->layout) != 0)
        return KVF_ENOENT;
    m->vocab = sh->vocab;
    m->n_heads = sh->n_heads;
    m->ffn = sh->ffn;
    m->hidden = m->n_heads * m->layout.head_dim;
    m->rope_theta = 10000.0f;
    m->norm_eps = 1e-5f;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Weights from a seed */

static float *rand_tensor(size_t n, float scale, uint64_t *seed)
{
    float *p = malloc(n * sizeof *p);
    if (!p)
        return NULL;
    for (size_t i = 0; i < n; i++)
        p[i] = ((float)(kvf__splitmix64(seed) >> 40) / (float)(1u << 24) * 2.0f - 1.0f) * scale;
    return p;
}

static float *ones(size_t n)
{
    float *p = malloc(n * sizeof *p);
    if (p)
        for (size_t i = 0; i < n; i++)
            p[i] = 1.0f;
    return p;
}

/* ------------------------------------------------------------------------------------------ */
/* Kernels */

static void rmsnorm(float *out, const float *x, const float *w, size_t rows, size_t dim, float eps)
{
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float ss = 0.0f;
        for (size_t i = 0; i < dim; i++)
            ss += xr[i] * xr[i];
        float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        for (size_t i = 0; i < dim; i++)
            out[r * dim + i] = xr[i] * inv * w[i];
    }
}

/* out[rows][n] = in[rows][k] * w[k][n] */
static void matmul(float *out, const float *in, const float *w, size_t rows, size_t k, size_t n)
{
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)rows, (int)n, (int)k, 1.0f, in,
                (int)k, w, (int)n, 0.0f, out, (int)n);
}

/* Rotates pairs (2i, 2i+1) of every head of rows at positions pos0.. */
static void rope(const kvfe_engine *e, float *x, size_t rows, size_t heads, size_t pos0)
{
    uint32_t hd = e->hd;
    for (size_t r = 0; r < rows; r++) {
        const float *cs = e->rope_cos + (pos0 + r) * (hd / 2);
        const float *sn = e->rope_sin + (pos0 + r) * (hd / 2);
        for (size_t h = 0; h < heads; h++) {
            float *v = x + (r * heads + h) * hd;
            for (uint32_t i = 0; i < hd / 2; i++) {
                float a = v[2 * i], b = v[2 * i + 1];
                v[2 * i] = a * cs[i] - b * sn[i];
                v[2 * i + 1] = a * sn[i] + b * cs[i];
            }
        }
    }
}

static float *kv_row(kvfe_engine *e, uint8_t **planes, uint32_t layer, size_t pos)
{
    uint32_t pt = e->m.layout.page_tokens;
    uint32_t page = e->page_of[pos / pt];
    return (float *)(planes[layer] + (size_t)page * e->page_stride) + (pos % pt) * e->kvh * e->hd;
}

/* ------------------------------------------------------------------------------------------ */
/* One layer over rows [start, n) */

/* The prefix's keys and values of layer l, from the paged cache into contiguous scratch. */
static void gather_prefix(kvfe_engine *e, uint32_t l, size_t start)
{
    uint32_t hd = e->hd;
    for (size_t p = 0; p < start; p++) {
        const float *kr = kv_row(e, e->kplane, l, p), *vr = kv_row(e, e->vplane, l, p);
        for (uint32_t g = 0; g < e->kvh; g++) {
            memcpy(e->kc + ((size_t)g * e->o.max_tokens + p) * hd, kr + g * hd, hd * sizeof(float));
            memcpy(e->vc + ((size_t)g * e->o.max_tokens + p) * hd, vr + g * hd, hd * sizeof(float));
        }
    }
}

/* Writes the block's new keys and values (rows b0 .. b0 + T) to the paged cache of layer l and to
 * the contiguous scratch. */
static void append_kv(kvfe_engine *e, uint32_t l, size_t b0, size_t T)
{
    uint32_t hd = e->hd;
    size_t kvdim = (size_t)e->kvh * hd;
    for (size_t t = 0; t < T; t++) {
        size_t pos = b0 + t;
        memcpy(kv_row(e, e->kplane, l, pos), e->k + t * kvdim, kvdim * sizeof(float));
        memcpy(kv_row(e, e->vplane, l, pos), e->v + t * kvdim, kvdim * sizeof(float));
        for (uint32_t g = 0; g < e->kvh; g++) {
            memcpy(e->kc + ((size_t)g * e->o.max_tokens + pos) * hd, e->k + t * kvdim + g * hd,
                   hd * sizeof(float));
            memcpy(e->vc + ((size_t)g * e->o.max_tokens + pos) * hd, e->v + t * kvdim + g * hd,
                   hd * sizeof(float));
        }
    }
}

/* Attention of the block's queries (rows b0 .. b1): per query head, scores against keys [0, b1),
 * causal mask, softmax, values; into e->att. */
static void attention(kvfe_engine *e, size_t b0, size_t b1)
{
    uint32_t hd = e->hd;
    size_t T = b1 - b0, qdim = (size_t)e->nh * hd;
    float scale = 1.0f / sqrtf((float)hd);
    for (uint32_t h = 0; h < e->nh; h++) {
        uint32_t g = h / e->group;
        const float *K = e->kc + (size_t)g * e->o.max_tokens * hd;
        const float *V = e->vc + (size_t)g * e->o.max_tokens * hd;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)T, (int)b1, (int)hd, scale,
                    e->q + h * hd, (int)qdim, K, (int)hd, 0.0f, e->scores, (int)b1);
        for (size_t t = 0; t < T; t++) {
            float *s = e->scores + t * b1;
            size_t last = b0 + t;
            float mx = s[0];
            for (size_t j = 1; j <= last; j++)
                if (s[j] > mx)
                    mx = s[j];
            float sum = 0.0f;
            for (size_t j = 0; j <= last; j++) {
                s[j] = expf(s[j] - mx);
                sum += s[j];
            }
            float inv = 1.0f / sum;
            for (size_t j = 0; j <= last; j++)
                s[j] *= inv;
            for (size_t j = last + 1; j < b1; j++)
                s[j] = 0.0f;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)T, (int)hd, (int)b1, 1.0f,
                    e->scores, (int)b1, V, (int)hd, 0.0f, e->att + h * hd, (int)qdim);
    }
}

/* The SwiGLU MLP of T rows x, added to them. */
static void mlp(kvfe_engine *e, const layer_w *w, float *x, size_t T)
{
    const kvfe_model *m = &e->m;
    uint32_t H = m->hidden;
    rmsnorm(e->h, x, w->n2, T, H, m->norm_eps);
    matmul(e->g, e->h, w->wg, T, H, m->ffn);
    matmul(e->u, e->h, w->wu, T, H, m->ffn);
    for (size_t i = 0; i < T * m->ffn; i++) {
        float a = e->g[i];
        e->g[i] = a / (1.0f + expf(-a)) * e->u[i];
    }
    matmul(e->o_, e->g, w->wd, T, m->ffn, H);
    for (size_t i = 0; i < T * H; i++)
        x[i] += e->o_[i];
}

static void layer_forward(kvfe_engine *e, uint32_t l, size_t start, size_t n)
{
    const kvfe_model *m = &e->m;
    const layer_w *w = &e->lw[l];
    uint32_t hd = e->hd, kvh = e->kvh, nh = e->nh, H = m->hidden;
    size_t kvdim = (size_t)kvh * hd, qdim = (size_t)nh * hd;

    gather_prefix(e, l, start);
    size_t b0 = start;
    while (b0 < n) {
        size_t b1 = (b0 / e->B + 1) * e->B;
        if (b1 > n)
            b1 = n;
        size_t T = b1 - b0;
        float *x = e->x + (b0 - start) * H;
        rmsnorm(e->h, x, w->n1, T, H, m->norm_eps);
        matmul(e->q, e->h, w->wq, T, H, qdim);
        matmul(e->k, e->h, w->wk, T, H, kvdim);
        matmul(e->v, e->h, w->wv, T, H, kvdim);
        rope(e, e->q, T, nh, b0);
        rope(e, e->k, T, kvh, b0);
        append_kv(e, l, b0, T);
        attention(e, b0, b1);
        matmul(e->o_, e->att, w->wo, T, qdim, H);
        for (size_t i = 0; i < T * H; i++)
            x[i] += e->o_[i];
        mlp(e, w, x, T);
        b0 = b1;
    }
}

static void finish(kvfe_engine *e, size_t last_row, kvfe_result *r)
{
    uint32_t H = e->m.hidden;
    rmsnorm(e->h, e->x + last_row * H, e->norm_f, 1, H, e->m.norm_eps);
    /* Tied embeddings: logits = h . E^T. */
    cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)e->m.vocab, (int)H, 1.0f, e->embed, (int)H, e->h,
                1, 0.0f, e->logits, 1);
    uint32_t best = 0;
    for (uint32_t i = 1; i < e->m.vocab; i++)
        if (e->logits[i] > e->logits[best])
            best = i;
    r->next_token = best;
    r->logits = e->logits;
}

static void embed_rows(kvfe_engine *e, size_t start, size_t n)
{
    uint32_t H = e->m.hidden;
    for (size_t p = start; p < n; p++)
        memcpy(e->x + (p - start) * H, e->embed + (size_t)(e->tokens[p] % e->m.vocab) * H,
               H * sizeof(float));
}

/* ------------------------------------------------------------------------------------------ */

/* Waits for a save and frees it; returns its status (0 for none). */
static int reap_save(kvf_xfer **x)
{
    if (!*x)
        return 0;
    int rc = kvf_xfer_wait(*x);
    kvf_xfer_free(x);
    return rc;
}

int kvfe_flush(kvfe_engine *e)
{
    int rc = reap_save(&e->older_save);
    int last = reap_save(&e->pending_save);
    return rc ? rc : last;
}

/* Before a prefill writes any page: the last prefill's save must have read its pages (it is left
 * to finish storing them), and the one before it, which had a whole prefill's time to be stored,
 * is waited for, so that at most two are ever in flight. */
static void settle_saves(kvfe_engine *e)
{
    if (!e->pending_save)
        return;
    kvf_xfer_wait_pages(e->pending_save);
    reap_save(&e->older_save);
    e->older_save = e->pending_save;
    e->pending_save = NULL;
}

/* Whole chunks of the previous sequence's KV that a prompt of n tokens starts with, at most
 * max_hit tokens: the device tier, kept in the pages (rows are aligned to absolute positions, so
 * they are the bytes a recompute would write). */
static size_t device_prefix(const kvfe_engine *e, const uint32_t *tokens, size_t n, size_t max_hit)
{
    size_t dev = 0;
    if (!e->device_max || e->device_off)
        return 0;
    if (max_hit > e->device_max)
        max_hit = e->device_max;
    while (dev < e->len && dev < n && e->tokens[dev] == tokens[dev])
        dev++;
    dev = dev / e->m.layout.chunk_tokens * e->m.layout.chunk_tokens;
    return dev < max_hit ? dev : max_hit;
}

/* Saves the chunks of tokens[from, full) through cn when this prefill saves. Called once the
 * first token is computed: every layer is reported done at once, so that the workers gather the
 * pages while the engine goes on (on a CPU engine, gathering during the forward pass would take
 * cores from it). Returns the transfer, or NULL when nothing is saved. */
static kvf_xfer *start_save(kvfe_engine *e, kvf_connector *cn, const uint32_t *tokens, size_t full,
                            size_t from)
{
    const kvf_layout *L = &e->m.layout;
    kvf_xfer *save = NULL;
    if (!cn || !e->o.save || e->save_off || full <= from ||
        kvf_connector_save(cn, tokens, full, from / L->chunk_tokens, e->page_of,
                           full / L->page_tokens, &save) != 0)
        return NULL;
    for (uint32_t l = 0; l < L->layers; l++) {
        if (kvf_xfer_layer_done(save, l) != 0) {
            /* A layer the connector could not take: this save cannot complete. */
            kvf_xfer_cancel(save);
            kvf_xfer_free(&save);
            break;
        }
    }
    return save;
}

/* Runs every layer over rows [start, n), each once its layer of load (may be NULL) has arrived.
 * Returns 0, or the load's failure, also put in r->load_error, when a layer of it did not
 * arrive. */
static int run_layers(kvfe_engine *e, size_t start, size_t n, kvf_xfer *load, kvf_xfer *more,
                      kvfe_result *r, double *load_done)
{
    embed_rows(e, start, n);
    int rc = 0;
    double t_load = now_s();
    if (load && e->o.no_overlap) {
        double w0 = now_s();
        rc = kvf_xfer_wait(load);
        r->wait_seconds += now_s() - w0;
    }
    for (uint32_t l = 0; !rc && l < e->m.layout.layers; l++) {
        if (more) { /* the stores' chunks beyond a prefetch's, loaded beside it */
            double w0 = now_s();
            rc = kvf_xfer_wait_layer(more, l);
            r->wait_seconds += now_s() - w0;
            if (rc)
                break;
        }
        if (load) {
            double w0 = now_s();
            rc = kvf_xfer_wait_layer(load, l);
            double t = now_s();
            r->wait_seconds += t - w0;
            if (rc)
                break;
            *load_done = t;
            /* Behind its pace: where the rest of the load would take longer than computing the
             * prompt, it is cut at this layer boundary and the prompt computed. */
            double rest = (t - t_load) * (double)(e->m.layout.layers - l - 1) / (double)(l + 1);
            if (e->o.decide && r->predicted_recompute_s > 0 && l + 1 < e->m.layout.layers &&
                rest > r->predicted_recompute_s * 1.2 + 0.002) {
                r->cut_at_layer = (int)l;
                e->rates.load_bps =
                    ewma(e->rates.load_bps,
                         (double)start * (double)kvf_layout_bytes_per_token(&e->m.layout) *
                             (double)(l + 1) / (double)e->m.layout.layers / (t - t_load));
                rc = KVF_ETIMEDOUT;
                break;
            }
        }
        double c0 = now_s();
        layer_forward(e, l, start, n);
        r->compute_seconds += now_s() - c0;
    }
    if (rc)
        r->load_error = rc;
    return rc;
}

/* The prefetch's share of a prefill: waits for pf until the deadline and loads from its memory
 * the leading chunks that arrived, at most max_hit tokens, where they are more than the pages'
 * dev. Returns the tokens being loaded (0: none) and *load. */
static size_t from_prefetch(kvfe_engine *e, kvf_connector *cn, kvf_prefetch *pf,
                            uint64_t deadline_ns, size_t dev, size_t max_hit, kvfe_result *r,
                            kvf_xfer **load)
{
    uint32_t P = e->m.layout.page_tokens;
    double w0 = now_s();
    r->prefetch_tokens = kvf_prefetch_tokens(pf);
    size_t ready = kvf_prefetch_wait(pf, deadline_ns);
    r->prefetch_wait_seconds = now_s() - w0;
    r->prefetch_ready_tokens = ready;
    r->cached_tokens = ready;
    size_t hit = ready < max_hit ? ready : max_hit;
    if (hit <= dev ||
        kvf_connector_load_prefetched(cn, pf, e->tokens, hit, e->page_of, hit / P, load) != 0)
        return 0;
    return hit;
}

static int prefill(kvfe_engine *e, const uint32_t *tokens, size_t n, kvf_prefetch *pf,
                   uint64_t deadline_ns, const kvf_source *src, size_t n_src, kvfe_result *r)
{
    memset(r, 0, sizeof *r);
    if (n == 0 || n >= e->o.max_tokens || (n_src && !src))
        return KVF_EINVAL;
    double t0 = now_s();
    settle_saves(e);
    const kvf_layout *L = &e->m.layout;
    uint32_t C = L->chunk_tokens, P = L->page_tokens;
    kvf_connector *cn = e->reuse_off ? NULL : e->o.cn;
    size_t max_hit = (n - 1) / C * C; /* at least one token is computed, for the logits */
    size_t dev = device_prefix(e, tokens, n, max_hit);
    memcpy(e->tokens, tokens, n * sizeof *tokens);
    e->len = n;

    size_t hit = 0;
    kvf_xfer *load = NULL, *more = NULL;
    r->cut_at_layer = -1;
    if (cn && pf) {
        hit = from_prefetch(e, cn, pf, deadline_ns, dev, max_hit, r, &load);
        /* Asked for more than arrived by the deadline: the rest is computed. */
        r->prefetch_deadline_missed = r->prefetch_ready_tokens < kvf_prefetch_tokens(pf);
        /* What the stores hold now beyond what the prefetch was asked for (another request
         * saved more of this prompt while this one waited) is loaded from them layer by layer,
         * beside the prefetch's scatter: the two write different pages. Not after a deadline
         * cut the prefetch short (what it did not bring in time is computed), and not asked
         * when the prefetch covers all that could be loaded (a round trip saved). */
        size_t base = hit > dev ? hit : dev, now_cached = 0;
        if (!r->prefetch_deadline_missed && kvf_prefetch_tokens(pf) < max_hit &&
            kvf_connector_lookup(cn, tokens, n, &now_cached) == 0) {
            now_cached = now_cached < max_hit ? now_cached / C * C : max_hit;
            r->cached_tokens = now_cached > r->cached_tokens ? now_cached : r->cached_tokens;
            if (now_cached > base &&
                kvf_connector_load_planned(cn, tokens, now_cached, base / C, src, n_src, e->page_of,
                                           now_cached / P, &more) == 0) {
                if (!hit && dev)
                    r->device_tokens = dev; /* the pages' part stays, the rest is loaded */
                hit = now_cached;
            }
        }
    } else {
        /* With a plan, what its named holders have counts too: the load asks them first. */
        if (cn && kvf_connector_lookup_planned(cn, tokens, n, src, n_src, &r->cached_tokens) == 0)
            hit = r->cached_tokens < max_hit ? r->cached_tokens : max_hit;
        if (e->o.decide && hit > dev) { /* load or recompute, from what was measured */
            size_t p = kvfe_decide(&e->rates, kvf_layout_bytes_per_token(L), C, dev, hit, n, 0,
                                   &r->choice, &r->predicted_s, &r->predicted_recompute_s);
            hit = p > dev ? p : 0;
        }
        if (hit <= dev) /* the pages already hold at least as much */
            hit = 0;
        else if (kvf_connector_load_planned(cn, tokens, hit, 0, src, n_src, e->page_of, hit / P,
                                            &load) != 0)
            hit = 0;
    }
    if (!hit && dev) {
        hit = dev;
        r->device_tokens = dev;
    }
    double load_done = 0, c_before = 0;
    while (run_layers(e, hit, n, load, more, r, &load_done) != 0) {
        /* The store could not deliver every layer: recompute everything from the start. Once
         * cancel returns no worker writes these pages any more. */
        kvf_xfer_cancel(load);
        kvf_xfer_free(&load);
        kvf_xfer_cancel(more);
        kvf_xfer_free(&more);
        hit = 0;
        r->device_tokens = 0;
        c_before = r->compute_seconds; /* the recompute's own time is measured below */
    }
    r->loaded_tokens = load || more ? hit - r->device_tokens : 0;
    if (e->o.decide && load && !pf && load_done > t0) /* a prefetch's scatter is no link's rate */
        e->rates.load_bps =
            ewma(e->rates.load_bps,
                 (double)hit * (double)kvf_layout_bytes_per_token(L) / (load_done - t0));
    else if (e->o.decide && !load && n > hit && r->compute_seconds > c_before)
        kvfe_fit_note(&e->fit, &e->rates, n - hit, hit, r->compute_seconds - c_before, now_s());
    kvf_xfer_free(&load);
    kvf_xfer_free(&more);
    finish(e, n - 1 - hit, r);
    /* Chunks kept from the device tier may not be in the store (evicted, or computed with reuse
     * off): the save starts at chunk 0 then, and the store answers "exists" for those it has.
     * After a failed load it starts at chunk 0 too, so that a chunk that was bad in the store is
     * replaced. */
    size_t full = n / C * C;
    e->pending_save = start_save(e, cn, tokens, full, r->device_tokens ? 0 : hit);
    r->seconds = now_s() - t0;
    return 0;
}

int kvfe_prefill(kvfe_engine *e, const uint32_t *tokens, size_t n, kvfe_result *r)
{
    return prefill(e, tokens, n, NULL, 0, NULL, 0, r);
}

int kvfe_prefill_planned(kvfe_engine *e, const uint32_t *tokens, size_t n, const kvf_source *src,
                         size_t n_src, kvfe_result *r)
{
    return prefill(e, tokens, n, NULL, 0, src, n_src, r);
}

int kvfe_prefill_prefetched(kvfe_engine *e, const uint32_t *tokens, size_t n, kvf_prefetch *pf,
                            uint64_t deadline_ns, const kvf_source *src, size_t n_src,
                            kvfe_result *r)
{
    return prefill(e, tokens, n, pf, deadline_ns, src, n_src, r);
}

int kvfe_gemm_threads(void)
{
    return openblas_get_num_threads();
}

void kvfe_set_gemm_threads(int n)
{
    if (n > 0)
        openblas_set_num_threads(n);
}

void kvfe_set_tiers(kvfe_engine *e, int device, int load, int save)
{
    e->device_off = !device;
    e->reuse_off = !load;
    e->save_off = !save;
}

void kvfe_set_reuse(kvfe_engine *e, int load, int save)
{
    kvfe_set_tiers(e, load, load, save);
}

void kvfe_set_overlap(kvfe_engine *e, int layerwise)
{
    e->o.no_overlap = !layerwise;
}

void kvfe_set_device_reuse(kvfe_engine *e, size_t max_tokens)
{
    e->device_max = max_tokens;
}

int kvfe_decode(kvfe_engine *e, uint32_t token, kvfe_result *r)
{
    memset(r, 0, sizeof *r);
    if (e->len == 0 || e->len + 1 >= e->o.max_tokens)
        return KVF_EINVAL;
    double t0 = now_s();
    size_t pos = e->len;
    e->tokens[pos] = token;
    e->len++;
    embed_rows(e, pos, pos + 1);
    for (uint32_t l = 0; l < e->m.layout.layers; l++)
        layer_forward(e, l, pos, pos + 1);
    finish(e, 0, r);
    r->seconds = r->compute_seconds = now_s() - t0;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */

void kvfe_close(kvfe_engine **ep)
{
    if (!ep || !*ep)
        return;
    kvfe_engine *e = *ep;
    kvfe_flush(e);
    if (e->lw) {
        for (uint32_t l = 0; l < e->m.layout.layers; l++) {
            layer_w *w = &e->lw[l];
            free(w->wq), free(w->wk), free(w->wv), free(w->wo), free(w->wg), free(w->wu);
            free(w->wd), free(w->n1), free(w->n2);
            if (e->kplane)
                free(e->kplane[l]);
            if (e->vplane)
                free(e->vplane[l]);
        }
    }
    free(e->lw), free(e->kplane), free(e->vplane), free(e->embed), free(e->norm_f);
    free(e->page_of), free(e->tokens);
    free(e->x), free(e->h), free(e->q), free(e->k), free(e->v), free(e->att), free(e->o_);
    free(e->g), free(e->u), free(e->scores), free(e->kc), free(e->vc), free(e->logits);
    free(e->rope_cos), free(e->rope_sin);
    free(e);
    *ep = NULL;
}

/* The shapes of the model's tensors and of the row blocks (B divides chunk_tokens, at most 128). */
static void set_shapes(kvfe_engine *e)
{
    const kvf_layout *L = &e->m.layout;
    e->hd = L->head_dim;
    e->kvh = L->kv_heads;
    e->nh = e->m.n_heads;
    e->group = e->nh / e->kvh;
    uint32_t C = L->chunk_tokens;
    e->B = C <= 128 ? C : 128;
    while (C % e->B)
        e->B /= 2;
    if (!e->o.max_tokens)
        e->o.max_tokens = 4096;
}

/* The weights, drawn from the seed in a fixed order, and the paged KV planes of every layer.
 * Returns whether every allocation succeeded (kvfe_close() frees what did). */
static int alloc_weights(kvfe_engine *e)
{
    const kvfe_model *m = &e->m;
    const kvf_layout *L = &m->layout;
    uint32_t H = m->hidden, F = m->ffn;
    size_t qdim = (size_t)e->nh * e->hd, kvdim = (size_t)e->kvh * e->hd;
    uint64_t seed = e->o.seed ? e->o.seed : 1;
    float sh = 0.5f * sqrtf(3.0f / (float)H), sf = 0.5f * sqrtf(3.0f / (float)F);
    e->embed = rand_tensor((size_t)m->vocab * H, 0.5f, &seed);
    e->norm_f = ones(H);
    e->lw = calloc(L->layers, sizeof *e->lw);
    e->kplane = calloc(L->layers, sizeof *e->kplane);
    e->vplane = calloc(L->layers, sizeof *e->vplane);
    e->page_bytes = (size_t)L->page_tokens * kvdim * sizeof(float);
    e->page_stride = e->page_bytes + e->o.page_pad;
    e->num_pages = (e->o.max_tokens + L->page_tokens - 1) / L->page_tokens;
    int ok = e->embed && e->norm_f && e->lw && e->kplane && e->vplane;
    for (uint32_t l = 0; ok && l < L->layers; l++) {
        layer_w *w = &e->lw[l];
        w->wq = rand_tensor((size_t)H * qdim, sh, &seed);
        w->wk = rand_tensor((size_t)H * kvdim, sh, &seed);
        w->wv = rand_tensor((size_t)H * kvdim, sh, &seed);
        w->wo = rand_tensor(qdim * H, sh, &seed);
        w->wg = rand_tensor((size_t)H * F, sh, &seed);
        w->wu = rand_tensor((size_t)H * F, sh, &seed);
        w->wd = rand_tensor((size_t)F * H, sf, &seed);
        w->n1 = ones(H);
        w->n2 = ones(H);
        e->kplane[l] = calloc(e->num_pages, e->page_stride);
        e->vplane[l] = calloc(e->num_pages, e->page_stride);
        ok = w->wq && w->wk && w->wv && w->wo && w->wg && w->wu && w->wd && w->n1 && w->n2 &&
             e->kplane[l] && e->vplane[l];
    }
    return ok;
}

/* The sequence's page map and tokens and the scratch of one row block. Returns whether every
 * allocation succeeded (kvfe_close() frees what did). */
static int alloc_scratch(kvfe_engine *e)
{
    size_t maxT = e->o.max_tokens, B = e->B, hd = e->hd;
    size_t H = e->m.hidden, F = e->m.ffn;
    size_t qdim = (size_t)e->nh * hd, kvdim = (size_t)e->kvh * hd;
    e->page_of = malloc(e->num_pages * sizeof *e->page_of);
    e->tokens = malloc(maxT * sizeof *e->tokens);
    e->x = malloc(maxT * H * sizeof(float));
    e->h = malloc(B * (H > F ? H : F) * sizeof(float));
    e->q = malloc(B * qdim * sizeof(float));
    e->k = malloc(B * kvdim * sizeof(float));
    e->v = malloc(B * kvdim * sizeof(float));
    e->att = malloc(B * qdim * sizeof(float));
    e->o_ = malloc(B * H * sizeof(float));
    e->g = malloc(B * F * sizeof(float));
    e->u = malloc(B * F * sizeof(float));
    e->scores = malloc(B * maxT * sizeof(float));
    e->kc = malloc(e->kvh * maxT * hd * sizeof(float));
    e->vc = malloc(e->kvh * maxT * hd * sizeof(float));
    e->logits = malloc(e->m.vocab * sizeof(float));
    e->rope_cos = malloc(maxT * (hd / 2) * sizeof(float));
    e->rope_sin = malloc(maxT * (hd / 2) * sizeof(float));
    return e->page_of && e->tokens && e->x && e->h && e->q && e->k && e->v && e->att && e->o_ &&
           e->g && e->u && e->scores && e->kc && e->vc && e->logits && e->rope_cos && e->rope_sin;
}

/* The rotary tables, and the page of each page index: identity, or a seeded permutation so that
 * a sequence's pages are scattered over the cache as they are in a serving engine. */
static void fill_tables(kvfe_engine *e)
{
    uint32_t hd = e->hd;
    for (uint32_t p = 0; p < e->o.max_tokens; p++) {
        for (uint32_t i = 0; i < hd / 2; i++) {
            double f = pow((double)e->m.rope_theta, -2.0 * i / (double)hd);
            e->rope_cos[(size_t)p * (hd / 2) + i] = (float)cos(p * f);
            e->rope_sin[(size_t)p * (hd / 2) + i] = (float)sin(p * f);
        }
    }
    for (uint32_t i = 0; i < e->num_pages; i++)
        e->page_of[i] = i;
    if (e->o.page_shuffle) {
        uint64_t s = e->o.page_shuffle;
        for (uint32_t i = e->num_pages - 1; i > 0; i--) {
            uint32_t j = (uint32_t)(kvf__splitmix64(&s) % (i + 1));
            uint32_t t = e->page_of[i];
            e->page_of[i] = e->page_of[j];
            e->page_of[j] = t;
        }
    }
}

/* Registers the KV planes of every layer with the connector, which moves KV to and from them. */
static int register_pages(kvfe_engine *e, char *err, size_t errlen)
{
    const kvf_layout *L = &e->m.layout;
    kvf_kv_layer *reg = calloc(L->layers, sizeof *reg);
    if (!reg)
        return KVF_ENOMEM;
    for (uint32_t l = 0; l < L->layers; l++)
        reg[l] = (kvf_kv_layer){.k_base = e->kplane[l],
                                .v_base = e->vplane[l],
                                .page_stride = e->page_stride,
                                .num_pages = e->num_pages,
                                .kind = KVF_MEM_HOST};
    int rc = kvf_connector_register(e->o.cn, reg, L->layers, err, errlen);
    free(reg);
    return rc;
}

int kvfe_open(kvfe_engine **out, const kvfe_opts *o, char *err, size_t errlen)
{
    *out = NULL;
    int rc = 0;
    kvfe_engine *e = calloc(1, sizeof *e);
    if (!e) {
        snprintf(err, errlen, "out of memory");
        return KVF_ENOMEM;
    }
    e->o = *o;
    e->device_max = o->keep_prefix ? SIZE_MAX : 0;
    if (kvfe_model_preset(o->model, &e->m) != 0) {
        snprintf(err, errlen, "engine: unknown model \"%s\" (ref-tiny, ref-tiny-32l or ref-100m)",
                 o->model);
        rc = KVF_ENOENT;
        goto out_close;
    }
    set_shapes(e);
    int ok = alloc_weights(e);
    ok = ok && alloc_scratch(e);
    if (!ok) {
        snprintf(err, errlen, "engine: out of memory for model %s", o->model);
        rc = KVF_ENOMEM;
        goto out_close;
    }
    fill_tables(e);
    if (o->cn)
        rc = register_pages(e, err, errlen);
    if (rc)
        goto out_close;
    *out = e;
    return 0;
out_close:
    kvfe_close(&e);
    return rc;
}
