/*
 * The scheduler's life and its engine instances: the handle that owns the index, the instances
 * and the prefix walk's scratch; registration (checked, and its capability record classified once
 * for whether the instance can load from the stores) into the lowest free slot, removal, lookup by
 * id, and load reports.
 */
#include "sched_int.h"

#include "kvf/error.h"
#include "kvf/feasibility.h"

#include <stdlib.h>
#include <string.h>

int kvf_sched_new(kvf_sched **out, const kvf_sched_opts *o)
{
    *out = NULL;
    kvf_sched *s = calloc(1, sizeof *s);
    if (!s)
        return KVF_ENOMEM;
    s->o = *o;
    if (!s->o.store_chunk_tokens)
        s->o.store_chunk_tokens = 256;
    if (s->o.cost.prefill_tokens_per_s <= 0)
        kvf_sched_cost_defaults(&s->o.cost);
    kvf_caps_builtin("kvf-store", &s->store_caps);
    if (kvf__sched_index_open(s, s->o.expected_blocks) != 0)
        goto out_destroy;
    s->inst = calloc(KVF_SCHED_MAX_INSTANCES, sizeof *s->inst);
    if (!s->inst)
        goto out_destroy;
    if (kvf__sched_walk_open(s) != 0)
        goto out_destroy;
    *out = s;
    return 0;

out_destroy: /* kvf_sched_destroy() takes a partly built scheduler */
    kvf_sched_destroy(&s);
    return KVF_ENOMEM;
}

void kvf_sched_destroy(kvf_sched **sp)
{
    if (!sp || !*sp)
        return;
    kvf_sched *s = *sp;
    kvf__sched_walk_close(s);
    free(s->inst);
    kvf__sched_index_close(s);
    free(s);
    *sp = NULL;
}

void kvf_sched_set_policy(kvf_sched *s, kvf_policy p)
{
    s->o.policy = p;
}

int kvf_sched_instance_find(const kvf_sched *s, const char *id)
{
    for (size_t i = 0; i < s->n_inst; i++)
        if (s->inst[i].live && strcmp(s->inst[i].info.id, id) == 0)
            return (int)i;
    return -1;
}

/* The lowest free slot, or -1 when every one is taken. */
static int free_slot(const kvf_sched *s)
{
    for (size_t i = 0; i < s->n_inst; i++)
        if (!s->inst[i].live)
            return (int)i;
    return s->n_inst < KVF_SCHED_MAX_INSTANCES ? (int)s->n_inst : -1;
}

int kvf_sched_instance_add(kvf_sched *s, const kvf_instance_info *info, int *idx)
{
    if (!info->id[0] || strnlen(info->id, sizeof info->id) == sizeof info->id ||
        (info->role & KVF_ROLE_BOTH) == 0 || (info->role & ~KVF_ROLE_BOTH) ||
        info->block_tokens == 0 || info->block_tokens > 65536 ||
        strnlen(info->host, sizeof info->host) == sizeof info->host ||
        strnlen(info->zone, sizeof info->zone) == sizeof info->zone)
        return KVF_EINVAL;
    kvf_caps caps;
    if (info->capabilities[0]) {
        char err[200];
        if (kvf_caps_from_json(info->capabilities, strlen(info->capabilities), &caps, err,
                               sizeof err) != 0)
            return KVF_EINVAL;
    } else {
        kvf_caps_builtin("reference", &caps);
    }
    int i = kvf_sched_instance_find(s, info->id);
    if (i < 0) {
        if ((i = free_slot(s)) < 0)
            return KVF_ENOSPC;
        if ((size_t)i == s->n_inst)
            s->n_inst++;
        memset(&s->inst[i], 0, sizeof s->inst[i]);
        s->inst[i].live = 1;
        s->n_live++;
    }
    s->inst[i].info = *info;
    kvf__sched_inst_where(&s->inst[i]);
    s->inst[i].caps = caps;
    kvf_verdict v;
    kvf_classify(caps.layerwise_hooks ? KVF_ACTION_LAYERWISE_LOAD : KVF_ACTION_RETRIEVE, &caps,
                 &s->store_caps, 0, &v);
    s->inst[i].can_load = v.label == KVF_FEAS_REAL;
    if (idx)
        *idx = i;
    return 0;
}

int kvf_sched_instance_remove(kvf_sched *s, int idx)
{
    if (!kvf__sched_live(s, idx))
        return KVF_ENOENT;
    kvf__sched_index_drop(s, idx);
    memset(&s->inst[idx], 0, sizeof s->inst[idx]);
    s->n_live--;
    while (s->n_inst > 0 && !s->inst[s->n_inst - 1].live)
        s->n_inst--;
    return 0;
}

void kvf_sched_set_no_stores(kvf_sched *s, int no_stores)
{
    s->o.no_stores = no_stores != 0;
}

size_t kvf_sched_instance_count(const kvf_sched *s)
{
    return s->n_live;
}

size_t kvf_sched_instance_slots(const kvf_sched *s)
{
    return s->n_inst;
}

const kvf_instance_info *kvf_sched_instance_get(const kvf_sched *s, int idx)
{
    return kvf__sched_live(s, idx) ? &s->inst[idx].info : NULL;
}

int kvf_sched_instance_load(kvf_sched *s, int idx, const kvf_instance_load *load)
{
    if (!kvf__sched_live(s, idx))
        return KVF_ENOENT;
    s->inst[idx].load = *load;
    return 0;
}

int kvf_sched_instance_load_get(const kvf_sched *s, int idx, kvf_instance_load *load)
{
    if (!kvf__sched_live(s, idx))
        return KVF_ENOENT;
    *load = s->inst[idx].load;
    return 0;
}
