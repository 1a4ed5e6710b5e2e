/*
 * Gets of the shared-memory path (shm_int.h): leased objects copied out of the node's read-only
 * view and verified, and staged gets for tenants.
 */
#define _GNU_SOURCE
#include "client_int.h"

#include "kvf/error.h"

#include "bytes.h"
#include "clock.h"
#include "cpus.h"
#include "errf.h"
#include "hash.h"
#include "objcopy.h"
#include "unixsock.h"
#include "wire.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include "shm_int.h"

/* RDMA_GET for the keys at pos (on node, whose arena w's process views): each hit's header
 * copied into its buffer and checked, its bytes located in the view. *l gets the hits. 0, or the
 * error that fails every key (the connection closed). */
int kvf__shm_lease_node(worker *w, sub *k, size_t node, const uint32_t *pos, size_t n,
                        uint64_t deadline_ns, int stream, uint32_t *layers, leased *l)
{
    struct kvf__shm_path *p = w->p;
    sconn *s;
    int rc = kvf__shm_conn_clear(w, node, deadline_ns, &s);
    if (rc)
        return rc;
    /* The addresses are those of the store this connection reaches: its view says where. */
    const sview *sn = s->view;
    if (!sn)
        return KVF_ENOTSUP;
    size_t plen = 16 + 16 * n;
    uint8_t *req = malloc(plen), *rep = NULL;
    l->pos = malloc(n * sizeof *l->pos);
    l->info = malloc(n * sizeof *l->info);
    l->src = malloc(n * sizeof *l->src);
    l->segoff = malloc(n * sizeof *l->segoff);
    if (!req || !l->pos || !l->info || !l->src || !l->segoff) {
        free(req);
        return KVF_ENOMEM;
    }
    kvf__put_u64(req, p->c->o.ns);
    l->asked_ms = atomic_load(&p->lease_ms);
    kvf__put_u32(req + 8, l->asked_ms);
    kvf__put_u32(req + 12, 0);
    for (size_t i = 0; i < n; i++)
        kvf__wire_key_put(req + 16 + 16 * i, &k->p.keys[pos[i]]);
    size_t rlen;
    uint64_t t0 = kvf__now_ns();
    rc = kvf__sync_call(s->fd, ++s->next_id, KVF_OP_RDMA_GET, (uint32_t)n, req, plen, &rep, &rlen,
                        NULL, NULL, deadline_ns, s->err, sizeof s->err);
    free(req);
    kvf__shm_count(p, 1, 0, 0, 0, 0, 0, 0);
    if (rc) {
        if (rc == KVF_ETIMEDOUT)
            kvf__node_mark_down(&p->c->nodes[node]);
        kvf__shm_conn_close(s);
        return rc;
    }
    if (rlen < 16 + 24 * n) {
        free(rep);
        kvf__shm_conn_close(s);
        return KVF_EPROTO;
    }
    l->node = node;
    l->id = kvf__get_u64(rep);
    l->epoch = atomic_load(&s->epoch);
    uint32_t lease = kvf__get_u32(rep + 12);
    l->until_ns = t0 + (uint64_t)lease * 1000000u;
    l->until_ns = l->until_ns > LEASE_MARGIN_NS ? l->until_ns - LEASE_MARGIN_NS : 0;
    size_t off = 16 + 24 * n;
    rc = 0;
    for (size_t i = 0; i < n && !rc; i++) {
        const uint8_t *e = rep + 16 + 24 * i;
        uint32_t x = pos[i];
        int st = (int)(int32_t)kvf__get_u32(e);
        uint32_t hl = kvf__get_u32(e + 4);
        uint64_t a = kvf__get_u64(e + 8), len = kvf__get_u64(e + 16);
        if (!kvf_err_is_known(st)) {
            rc = KVF_EPROTO;
            break;
        }
        k->p.st[x] = st;
        if (st)
            continue;
        /* What the node says must lie inside the view, and the header inside the reply. */
        if (hl > rlen - off || hl > len || a < sn->base || a - sn->base > sn->len ||
            len > sn->len - (a - sn->base)) {
            rc = KVF_EPROTO;
            break;
        }
        const uint8_t *hdr = rep + off;
        off += hl;
        if (len > k->p.caps[x]) {
            k->p.st[x] = KVF_E2BIG;
            continue;
        }
        memcpy(k->p.bufs[x], hdr, hl);
        kvf_obj_info *in = &l->info[l->n];
        if (kvf_obj_parse(k->p.bufs[x], hl, in) != 0 || in->header_len != hl ||
            hl + in->stored_bytes != len || !kvf_key_eq(&in->key, &k->p.keys[x])) {
            k->p.st[x] = KVF_EPROTO;
            continue;
        }
        if (stream && *layers && in->layers != *layers) {
            k->p.st[x] = KVF_ELAYOUT;
            continue;
        }
        if (stream && !*layers)
            *layers = in->layers;
        k->p.out_lens[x] = len;
        l->segoff[l->n] = hl;
        l->src[l->n] = sn->map + (a - sn->base);
        l->pos[l->n++] = x;
    }
    free(rep);
    if (rc)
        kvf__shm_conn_close(s); /* the lease ends with the connection */
    return rc;
}

void kvf__shm_release(worker *w, leased *l, uint64_t deadline_ns)
{
    sconn *s = &w->cn[l->node];
    /* A connection closed since took the lease with it; its successor's ids are not ours. */
    if (!l->id || s->fd < 0 || atomic_load(&s->epoch) != l->epoch)
        return;
    (void)deadline_ns;
    if (s->n_rel == RELEASES_MAX && kvf__shm_drain_releases(s) != 0)
        return;
    uint8_t req[16];
    kvf__put_u64(req, w->p->c->o.ns);
    kvf__put_u64(req + 8, l->id);
    /* Sent now, its reply read before the next request: the get is over once its copies are. */
    uint64_t d = kvf__now_ns() + 1000000000ull, id = ++s->next_id;
    if (kvf__sync_send(s->fd, id, KVF_OP_RDMA_RELEASE, 0, req, sizeof req, d, s->err,
                       sizeof s->err) != 0)
        kvf__shm_conn_close(s);
    else
        s->rel[s->n_rel++] = id;
}

/* Whether the lease l still held now: after a copy, what it read is then the object. */
static int lease_held(const leased *l)
{
    return kvf__now_ns() < l->until_ns;
}

/* Copies and verifies the leased hits: whole objects, or layer by layer (reporting each layer of
 * the share once every hit has it). A hit whose lease ended before its copy was checked is asked
 * again over TCP: a whole object's key goes to again (its first node's; a nearer holder's key is
 * the caller's to ask again, by its status), a stream's to kvf__shm_retry_tail. Returns the bytes
 * delivered. */
uint64_t kvf__shm_copy_leased(sub *k, leased *ls, size_t nl, int stream, uint32_t L,
                              uint64_t *expired, uint64_t *failed, uint32_t *again, size_t *n_again)
{
    uint64_t bytes = 0;
    if (!stream) {
        for (size_t g = 0; g < nl; g++) {
            leased *l = &ls[g];
            for (size_t h = 0; h < l->n; h++) {
                uint32_t x = l->pos[h];
                uint64_t len = l->info[h].header_len + l->info[h].stored_bytes;
                kvf_obj_info in;
                int rc = kvf__obj_copy_verify(k->p.bufs[x], l->src[h], len, &in);
                if (!lease_held(l)) {
                    k->p.st[x] = KVF_ENOENT;
                    (*expired)++;
                    if (!k->near[x])
                        again[(*n_again)++] = x;
                } else if (rc || !kvf_key_eq(&in.key, &k->p.keys[x])) {
                    k->p.st[x] = rc ? rc : KVF_EPROTO;
                    (*failed)++;
                } else {
                    bytes += len;
                }
            }
        }
        return bytes;
    }
    for (uint32_t layer = 0; layer < L; layer++) {
        for (size_t g = 0; g < nl; g++) {
            leased *l = &ls[g];
            for (size_t h = 0; h < l->n; h++) {
                uint32_t x = l->pos[h];
                kvf_obj_seg sg = kvf_obj_seg_at(&l->info[h], layer);
                uint64_t o = l->segoff[h];
                l->segoff[h] += sg.stored_len;
                if (k->p.st[x])
                    continue;
                uint8_t *d = (uint8_t *)k->p.bufs[x] + o;
                memcpy(d, l->src[h] + o, sg.stored_len);
                if (kvf__xxh3(d, sg.stored_len) != sg.stored_xxh) {
                    if (!lease_held(l))
                        continue; /* overwritten once the lease ended: asked again below */
                    k->p.st[x] = KVF_ECHECKSUM;
                    (*failed)++;
                } else {
                    bytes += sg.stored_len;
                }
            }
            if (!lease_held(l)) {
                /* the hits are asked again over TCP, a nearer holder's of their first node (the
                 * layers they lack, once it has them) */
                size_t *hs = malloc(l->n * sizeof *hs), nr = 0;
                for (size_t h = 0; h < l->n; h++) {
                    uint32_t x = l->pos[h];
                    if (k->p.st[x])
                        continue;
                    (*expired)++;
                    if (hs)
                        hs[nr++] = h;
                    else
                        k->p.st[x] = KVF_ENOENT;
                }
                kvf__shm_retry_tail(k, l, hs, nr, layer);
                free(hs);
            }
        }
        kvf__shm_sub_layers(k, layer + 1);
    }
    return bytes;
}

/* Staged get of the keys at pos (on node): SHM_GET in rounds that fit w's staging region; each
 * object copied out into its buffer and verified there. */
void kvf__shm_get_staged(worker *w, sub *k, size_t node, const uint32_t *pos, size_t n,
                         uint64_t deadline_ns, int stream, uint32_t *layers, uint32_t *fb,
                         size_t *n_fb)
{
    struct kvf__shm_path *p = w->p;
    sconn *s;
    int rc = kvf__shm_conn_clear(w, node, deadline_ns, &s);
    if (rc) {
        kvf__shm_keys_fail(k, pos, n, rc, fb, n_fb);
        return;
    }
    uint8_t *req = malloc(8 + 32 * (size_t)(n < MAX_KEYS ? n : MAX_KEYS));
    uint64_t *offs = malloc((n < MAX_KEYS ? n : MAX_KEYS) * sizeof *offs);
    if (!req || !offs) {
        free(req), free(offs);
        kvf__shm_keys_fail(k, pos, n, KVF_ENOMEM, NULL, NULL);
        return;
    }
    for (size_t i = 0; i < n;) {
        uint64_t off = 0;
        size_t j = i;
        kvf__put_u64(req, p->c->o.ns);
        while (j < n && j - i < MAX_KEYS && kvf__shm_align(off) + k->p.caps[pos[j]] <= s->stg_len) {
            off = kvf__shm_align(off);
            uint8_t *it = req + 8 + 32 * (j - i);
            kvf__wire_key_put(it, &k->p.keys[pos[j]]);
            kvf__put_u64(it + 16, off);
            kvf__put_u64(it + 24, k->p.caps[pos[j]]);
            offs[j - i] = off;
            off += k->p.caps[pos[j]];
            j++;
        }
        uint8_t *rep = NULL;
        size_t rlen;
        uint32_t m = (uint32_t)(j - i);
        rc = kvf__sync_call(s->fd, ++s->next_id, KVF_OP_SHM_GET, m, req, 8 + 32 * (size_t)m, &rep,
                            &rlen, NULL, NULL, deadline_ns, s->err, sizeof s->err);
        if (!rc && rlen != 16 * (size_t)m) {
            free(rep);
            rep = NULL;
            rc = KVF_EPROTO;
        }
        uint64_t got = 0, failed = 0;
        for (size_t x = i; x < j && !rc; x++) {
            uint32_t q = pos[x];
            int st = (int)(int32_t)kvf__get_u32(rep + 16 * (x - i));
            uint64_t len = kvf__get_u64(rep + 16 * (x - i) + 8);
            kvf_obj_info in;
            if (!kvf_err_is_known(st))
                st = KVF_EPROTO;
            else if (!st && len > k->p.caps[q])
                st = KVF_EPROTO;
            if (!st) {
                if (kvf__obj_copy_verify(k->p.bufs[q], s->stg + offs[x - i], len, &in) != 0)
                    st = KVF_ECHECKSUM;
                else if (!kvf_key_eq(&in.key, &k->p.keys[q]))
                    st = KVF_EPROTO;
                else if (stream && *layers && in.layers != *layers)
                    st = KVF_ELAYOUT;
                else if (stream && !*layers)
                    *layers = in.layers;
            }
            k->p.st[q] = st;
            if (!st) {
                k->p.out_lens[q] = len;
                got += len;
            }
            failed += st && st != KVF_ENOENT;
        }
        free(rep);
        kvf__shm_count(p, 1, got, 0, failed, 0, 0, 0);
        if (rc) {
            if (rc == KVF_ETIMEDOUT)
                kvf__node_mark_down(&p->c->nodes[node]);
            kvf__shm_conn_close(s);
            for (size_t x = i; x < n; x++)
                k->p.st[pos[x]] = rc;
            break;
        }
        i = j;
    }
    free(req);
    free(offs);
}
