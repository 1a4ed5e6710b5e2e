/*
 * The page map: between an engine's paged KV planes and chunk segments. A segment is one layer of
 * one chunk, K rows of all its tokens then V rows ([tokens][heads][head_dim] each), so a page of
 * page_tokens tokens is one contiguous run in the engine and one contiguous run in the segment:
 * gather and scatter copy whole pages, never single rows.
 */
#ifndef KVF_CONNECTOR_PAGEMAP_H
#define KVF_CONNECTOR_PAGEMAP_H

#include <stddef.h>
#include <stdint.h>

#include "kvf/connector.h"

#define KVF_PAGEMAP_MAX_LAYERS 4096u

typedef struct kvf__pagemap {
    uint32_t layers;
    uint32_t planes; /* 2 (K and V) or 1 (latent) */
    uint32_t pages_per_chunk;
    uint32_t num_pages; /* the smallest num_pages over the layers */
    size_t page_bytes;  /* one page of one plane */
    size_t plane_bytes; /* one chunk of one plane: pages_per_chunk * page_bytes */
    uint64_t seg_bytes; /* planes * plane_bytes */
    kvf_kv_layer *reg;  /* copy of the registration; owned */
    int cuda;           /* the pages are CUDA device memory (every layer's), on device dev */
    int dev;
} kvf__pagemap;

/* Validates a registration against a layout and fills pm (pm->reg is allocated; a previous one is
 * freed). CUDA device memory needs every layer in it, on one device, and a usable CUDA runtime
 * (cuda/). Returns 0, KVF_EINVAL or KVF_ENOTSUP with one line in err. */
int kvf__pagemap_init(kvf__pagemap *pm, const kvf_layout *l, const kvf_kv_layer *layers,
                      uint32_t n_layers, char *err, size_t errlen);
void kvf__pagemap_free(kvf__pagemap *pm);

/* Copies layer `layer` of one chunk from the engine pages page_ids[0..pages_per_chunk) into seg. */
void kvf__pagemap_gather(const kvf__pagemap *pm, uint32_t layer, uint8_t *seg,
                         const uint32_t *page_ids);
/* Copies seg into the engine pages of one chunk. */
void kvf__pagemap_scatter(const kvf__pagemap *pm, uint32_t layer, const uint8_t *seg,
                          const uint32_t *page_ids);
/* The addresses of one chunk's pages of layer `layer`, in segment order (K pages, then V pages):
 * planes * pages_per_chunk of them into out. For CUDA registrations, whose pages only the copier
 * (cuda/) reads and writes. */
void kvf__pagemap_pages(const kvf__pagemap *pm, uint32_t layer, const uint32_t *page_ids,
                        void **out);

#endif
