/*
 * A part of an op's batch run as an op of its own (client_int.h, kvf__part): the arrays both the
 * TCP path's children and the shared-memory path's shares are made of.
 */
#include "client_int.h"

#include "kvf/error.h"

#include <stdlib.h>

int kvf__part_alloc(kvf__part *p, size_t n, int get)
{
    size_t m = n ? n : 1;
    p->b.n = 0;
    p->idx = malloc(m * sizeof *p->idx);
    p->keys = malloc(m * sizeof *p->keys);
    p->st = calloc(m, sizeof *p->st);
    if (get) {
        p->bufs = malloc(m * sizeof *p->bufs);
        p->caps = malloc(m * sizeof *p->caps);
        p->out_lens = calloc(m, sizeof *p->out_lens);
        p->nodes = malloc(m * sizeof *p->nodes);
    } else {
        p->objs = malloc(m * sizeof *p->objs);
        p->lens = malloc(m * sizeof *p->lens);
    }
    int ok = p->idx && p->keys && p->st &&
             (get ? p->bufs && p->caps && p->out_lens && p->nodes : p->objs && p->lens);
    return ok ? 0 : KVF_ENOMEM;
}

void kvf__part_add(kvf__part *p, const kvf_batch *pb, uint32_t i)
{
    size_t j = p->b.n++;
    p->idx[j] = i;
    p->keys[j] = pb->keys[i];
    if (p->bufs) {
        p->bufs[j] = pb->bufs[i];
        p->caps[j] = pb->caps[i];
        p->nodes[j] = pb->nodes ? pb->nodes[i] : KVF_NODE_ANY;
    } else {
        p->objs[j] = pb->objs[i];
        p->lens[j] = pb->lens[i];
    }
}

void kvf__part_batch(kvf__part *p, const kvf_batch *pb, kvf_op_cb cb, kvf_layer_cb layer_cb,
                     void *ud)
{
    p->b = (kvf_batch){.n = p->b.n,
                       .keys = p->keys,
                       .objs = p->objs,
                       .lens = p->lens,
                       .bufs = (void *const *)p->bufs,
                       .caps = p->caps,
                       .out_lens = p->out_lens,
                       .status = p->st,
                       .flags = pb->flags,
                       .deadline_ms = pb->deadline_ms,
                       .cb = cb,
                       .layer_cb = pb->layer_cb ? layer_cb : NULL,
                       .ud = ud,
                       .nodes = p->nodes};
}

void kvf__part_free(kvf__part *p)
{
    free(p->idx), free(p->keys), free(p->objs), free(p->lens), free(p->bufs), free(p->caps);
    free(p->out_lens), free(p->nodes), free(p->st);
    p->nodes = NULL;
    p->idx = NULL, p->keys = NULL, p->objs = NULL, p->lens = NULL, p->bufs = NULL;
    p->caps = NULL, p->out_lens = NULL, p->st = NULL;
}
