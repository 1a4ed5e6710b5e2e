#include "pagemap.h"

#include "kvf/error.h"

#include "cu.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int kvf__pagemap_init(kvf__pagemap *pm, const kvf_layout *l, const kvf_kv_layer *layers,
                      uint32_t n_layers, char *err, size_t errlen)
{
    if (!layers || n_layers != l->layers) {
        snprintf(err, errlen, "register: %u layers given, the layout has %u", n_layers, l->layers);
        return KVF_EINVAL;
    }
    uint32_t planes = l->kind == KVF_KV_LATENT ? 1 : 2;
    size_t page_bytes = (size_t)kvf_layout_bytes_per_token_layer(l) / planes * l->page_tokens;
    uint32_t min_pages = UINT32_MAX;
    int cuda = layers[0].kind == KVF_MEM_CUDA, dev = -1;
    const kvf__cu *cu = NULL;
    if (cuda) {
        char why[300];
        cu = kvf__cuda(why, sizeof why);
        if (!cu) {
            snprintf(err, errlen, "register: CUDA device memory: %s", why);
            return KVF_ENOTSUP;
        }
    }
    for (uint32_t i = 0; i < n_layers; i++) {
        const kvf_kv_layer *r = &layers[i];
        if ((r->kind == KVF_MEM_CUDA) != cuda) {
            snprintf(err, errlen,
                     "register: layer %u: %s memory, layer 0 %s: every layer must be in CUDA "
                     "device memory or none",
                     i, r->kind == KVF_MEM_CUDA ? "CUDA device" : "host",
                     cuda ? "CUDA device memory" : "host memory");
            return KVF_EINVAL;
        }
        if (r->kind != KVF_MEM_HOST && r->kind != KVF_MEM_UNIFIED && r->kind != KVF_MEM_CUDA) {
            snprintf(err, errlen, "register: layer %u: unknown memory kind %d", i, (int)r->kind);
            return KVF_EINVAL;
        }
        if (!r->k_base || (planes == 2) != (r->v_base != NULL)) {
            snprintf(err, errlen, "register: layer %u: %s", i,
                     !r->k_base    ? "no K plane"
                     : planes == 2 ? "no V plane"
                                   : "a latent layout has no V plane");
            return KVF_EINVAL;
        }
        if (r->page_stride < page_bytes) {
            snprintf(err, errlen, "register: layer %u: page stride %zu is below the page size %zu",
                     i, r->page_stride, page_bytes);
            return KVF_EINVAL;
        }
        if (r->num_pages == 0) {
            snprintf(err, errlen, "register: layer %u: no pages", i);
            return KVF_EINVAL;
        }
        for (uint32_t pl = 0; cuda && pl < planes; pl++) {
            char why[200];
            int d;
            if (kvf__cu_device_of(cu, pl ? r->v_base : r->k_base, &d, why, sizeof why) != 0) {
                snprintf(err, errlen, "register: layer %u: %s plane: %s", i, pl ? "V" : "K", why);
                return KVF_EINVAL;
            }
            if (dev >= 0 && d != dev) {
                snprintf(err, errlen,
                         "register: layer %u: on CUDA device %d, layer 0 on device %d: one "
                         "device per connector",
                         i, d, dev);
                return KVF_EINVAL;
            }
            dev = d;
        }
        if (r->num_pages < min_pages)
            min_pages = r->num_pages;
    }
    kvf_kv_layer *copy = malloc((size_t)n_layers * sizeof *copy);
    if (!copy) {
        snprintf(err, errlen, "out of memory");
        return KVF_ENOMEM;
    }
    memcpy(copy, layers, (size_t)n_layers * sizeof *copy);
    free(pm->reg);
    pm->reg = copy;
    pm->layers = n_layers;
    pm->planes = planes;
    pm->pages_per_chunk = l->chunk_tokens / l->page_tokens;
    pm->num_pages = min_pages;
    pm->page_bytes = page_bytes;
    pm->plane_bytes = page_bytes * pm->pages_per_chunk;
    pm->seg_bytes = (uint64_t)pm->plane_bytes * planes;
    pm->cuda = cuda;
    pm->dev = cuda ? dev : -1;
    return 0;
}

void kvf__pagemap_free(kvf__pagemap *pm)
{
    free(pm->reg);
    pm->reg = NULL;
}

void kvf__pagemap_gather(const kvf__pagemap *pm, uint32_t layer, uint8_t *seg,
                         const uint32_t *page_ids)
{
    const kvf_kv_layer *r = &pm->reg[layer];
    for (uint32_t pl = 0; pl < pm->planes; pl++) {
        const uint8_t *base = pl == 0 ? r->k_base : r->v_base;
        uint8_t *dst = seg + (size_t)pl * pm->plane_bytes;
        for (uint32_t p = 0; p < pm->pages_per_chunk; p++)
            memcpy(dst + (size_t)p * pm->page_bytes, base + (size_t)page_ids[p] * r->page_stride,
                   pm->page_bytes);
    }
}

void kvf__pagemap_scatter(const kvf__pagemap *pm, uint32_t layer, const uint8_t *seg,
                          const uint32_t *page_ids)
{
    const kvf_kv_layer *r = &pm->reg[layer];
    for (uint32_t pl = 0; pl < pm->planes; pl++) {
        uint8_t *base = pl == 0 ? r->k_base : r->v_base;
        const uint8_t *src = seg + (size_t)pl * pm->plane_bytes;
        for (uint32_t p = 0; p < pm->pages_per_chunk; p++)
            memcpy(base + (size_t)page_ids[p] * r->page_stride, src + (size_t)p * pm->page_bytes,
                   pm->page_bytes);
    }
}

void kvf__pagemap_pages(const kvf__pagemap *pm, uint32_t layer, const uint32_t *page_ids,
                        void **out)
{
    const kvf_kv_layer *r = &pm->reg[layer];
    for (uint32_t pl = 0; pl < pm->planes; pl++) {
        uint8_t *base = pl == 0 ? r->k_base : r->v_base;
        for (uint32_t p = 0; p < pm->pages_per_chunk; p++)
            *out++ = base + (size_t)page_ids[p] * r->page_stride;
    }
}
