/*
 * Where things are (docs/scheduler.md, "The nearest replica"): the storage nodes' addresses and
 * zones, the instances' hosts, and which node a planned load takes each chunk from. A chunk that
 * several nodes hold (a hot prefix's replicas, docs/membership.md) is taken from the nearest:
 * a node on the loading instance's host (reached over shared memory), then one in its zone, then
 * any other; at the same nearness, one that holds it in DRAM before one that holds it on disk
 * only, then the lowest node. A node that left (its lease lapsed, or it was cleared) holds
 * nothing in the index, so it is never named.
 */
#include "sched_int.h"

#include "kvf/error.h"

#include <ctype.h>
#include <stdio.h>
#include <string.h>

void kvf_sched_host_of(const char *addr, char *out, size_t n)
{
    if (!n)
        return;
    out[0] = 0;
    if (!addr)
        return;
    const char *p = strstr(addr, "://");
    p = p ? p + 3 : addr;
    const char *end;
    if (*p == '[') { /* [IPv6]:port */
        p++;
        end = strchr(p, ']');
        if (!end)
            end = p + strlen(p);
    } else {
        end = p + strcspn(p, ":/");
        /* a bare IPv6 literal (two colons or more, no brackets): all of it is the host */
        const char *c = strchr(p, ':');
        if (c && strchr(c + 1, ':'))
            end = p + strcspn(p, "/");
    }
    size_t len = (size_t)(end - p);
    char h[256];
    if (len >= sizeof h)
        len = sizeof h - 1;
    for (size_t i = 0; i < len; i++)
        h[i] = (char)tolower((unsigned char)p[i]);
    h[len] = 0;
    if (!strcmp(h, "localhost") || !strcmp(h, "::1") || !strncmp(h, "127.", 4) ||
        !strcmp(h, "ip6-localhost"))
        snprintf(out, n, "127.0.0.1");
    else
        snprintf(out, n, "%s", h);
}

int kvf_sched_store_where(kvf_sched *s, int node, const char *addr, const char *zone)
{
    if (node < 0 || node >= KVF_SCHED_MAX_STORES)
        return KVF_EINVAL;
    struct kvf__sched_where *w = &s->where[node];
    if (!addr || !addr[0]) {
        memset(w, 0, sizeof *w);
        return 0;
    }
    if (strlen(addr) >= sizeof w->addr || (zone && strlen(zone) >= sizeof w->zone))
        return KVF_EINVAL;
    snprintf(w->addr, sizeof w->addr, "%s", addr);
    snprintf(w->zone, sizeof w->zone, "%s", zone ? zone : "");
    kvf_sched_host_of(addr, w->host, sizeof w->host);
    return 0;
}

const char *kvf_sched_store_addr(const kvf_sched *s, int node)
{
    return node >= 0 && node < KVF_SCHED_MAX_STORES ? s->where[node].addr : "";
}

void kvf__sched_inst_where(kvf__sched_inst *in)
{
    if (in->info.host[0])
        kvf_sched_host_of(in->info.host, in->host, sizeof in->host);
    else
        kvf_sched_host_of(in->info.endpoint, in->host, sizeof in->host);
}

/* How near node is to instance in. */
static kvf_near near_of(const kvf_sched *s, const kvf__sched_inst *in, int node)
{
    const struct kvf__sched_where *w = &s->where[node];
    if (w->host[0] && in->host[0] && !strcmp(w->host, in->host))
        return KVF_NEAR_HOST;
    if (w->zone[0] && in->info.zone[0] && !strcmp(w->zone, in->info.zone))
        return KVF_NEAR_ZONE;
    return KVF_NEAR_REMOTE;
}

void kvf__sched_sources(kvf_sched *s, const kvf_place_req *req, kvf_place_res *res)
{
    res->n_sources = 0;
    res->sources_truncated = 0;
    size_t ct = s->o.store_chunk_tokens;
    if (!res->cached_store || !req->chunk_keys || !ct || !kvf__sched_live(s, res->prefill))
        return;
    const kvf__sched_inst *in = &s->inst[res->prefill];
    size_t from = res->cached_device, to = res->cached_device + res->cached_store;
    enum { MAXH = 64 };
    uint32_t h[MAXH];
    for (size_t k = from / ct; k < req->n_chunks && k * ct < to; k++) {
        size_t nh = kvf__sched_store_holders(s, &req->chunk_keys[k], h, MAXH);
        int best = -1, best_disk = 0;
        kvf_near best_near = KVF_NEAR_REMOTE;
        for (size_t j = 0; j < nh; j++) {
            int node = KVF__HOLDER_NODE(h[j]);
            if (node >= KVF_SCHED_MAX_STORES)
                continue;
            int disk = !(KVF__HOLDER_TIERS(h[j]) & KVF__STORE_DRAM);
            kvf_near nr = near_of(s, in, node);
            if (best < 0 || nr < best_near || (nr == best_near && disk < best_disk) ||
                (nr == best_near && disk == best_disk && node < best)) {
                best = node;
                best_near = nr;
                best_disk = disk;
            }
        }
        if (best < 0) /* the match said the stores hold it: not any more */
            break;
        size_t lo = k * ct > from ? k * ct : from, hi = (k + 1) * ct < to ? (k + 1) * ct : to;
        kvf_store_source *last = res->n_sources ? &res->sources[res->n_sources - 1] : NULL;
        if (last && last->node == best) {
            last->tokens += hi - lo;
            last->disk_only = last->disk_only && best_disk;
        } else if (res->n_sources < KVF_PLAN_MAX_SOURCES) {
            res->sources[res->n_sources++] = (kvf_store_source){.node = best,
                                                                .near = best_near,
                                                                .disk_only = best_disk,
                                                                .from = lo,
                                                                .tokens = hi - lo};
        } else {
            res->sources_truncated = 1;
            break;
        }
    }
}
