/*
 * The shared-memory path on the caller's own thread (shm_int.h): EXISTS over a control
 * connection per node, leases for engines that read the view themselves (kvf_client_lease), and
 * finding the nodes on this host at open.
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

/* ------------------------------------------------------------------------------------------ */
/* Control requests on the caller's thread */

/* The control connection to node, made where needed: HELLO and AUTH, and where the node's arena
 * is mapped, SHM_MAP of it (no staging region), so that leases may be asked for on it. Its lock
 * held. 0 or the error. */
static int ctl_connect(struct kvf__shm_path *p, size_t node, uint64_t deadline_ns)
{
    sconn *s = &p->ctl[node];
    if (s->fd >= 0)
        return 0;
    int hv = p->nodes[node].has_view;
    return kvf__shm_conn_open(p, node, s, hv, hv, 0, deadline_ns);
}

/* EXISTS of the keys at pos on node over its control connection (made where needed, HELLO and
 * AUTH only), bits into present. 0 or the error (the connection is then closed). */
static int ctl_exists(struct kvf__shm_path *p, size_t node, const kvf_key *keys,
                      const uint32_t *pos, size_t m, uint8_t *present, uint64_t deadline_ns)
{
    kvf_client *c = p->c;
    sconn *s = &p->ctl[node];
    int rc = ctl_connect(p, node, deadline_ns);
    if (rc)
        return rc;
    size_t plen = 8 + 16 * m;
    uint8_t stackbuf[8 + 16 * 256], *req = plen <= sizeof stackbuf ? stackbuf : malloc(plen);
    if (!req)
        return KVF_ENOMEM;
    kvf__put_u64(req, c->o.ns);
    for (size_t i = 0; i < m; i++)
        kvf__wire_key_put(req + 8 + 16 * i, &keys[pos[i]]);
    uint8_t *rep;
    size_t rlen;
    rc = kvf__sync_call(s->fd, ++s->next_id, KVF_OP_EXISTS, (uint32_t)m, req, plen, &rep, &rlen,
                        NULL, NULL, deadline_ns, s->err, sizeof s->err);
    if (req != stackbuf)
        free(req);
    if (!rc && rlen != (m + 7) / 8) {
        free(rep);
        rc = KVF_EPROTO;
    }
    if (rc) {
        if (rc == KVF_ETIMEDOUT)
            kvf__node_mark_down(&c->nodes[node]);
        kvf__shm_conn_close(s);
        return rc;
    }
    for (size_t i = 0; i < m; i++)
        present[pos[i]] = (rep[i / 8] >> (i % 8)) & 1;
    free(rep);
    return 0;
}

int kvf__shm_exists(kvf_client *c, size_t n, const kvf_key *keys, uint8_t *present, int deadline_ms,
                    int *rc)
{
    struct kvf__shm_path *p = c->shm;
    if (!p || !p->ctl || n == 0 || n > KVF_WIRE_MAX_ITEMS)
        return 0;
    /* Every key's node must be one on this host that is up, and its connection free. Each key's
     * node is chosen once: with rerouting it can change meanwhile (a node marked down or up),
     * and a key looked up again by node could fall between two nodes. */
    uint32_t *kn = malloc(n * sizeof *kn);
    if (!kn)
        return 0;
    size_t n_nodes = 0, nodes[8];
    for (size_t i = 0; i < n; i++) {
        size_t nd = kvf_client_node_of(c, &keys[i]);
        kn[i] = (uint32_t)nd;
        size_t j = 0;
        while (j < n_nodes && nodes[j] != nd)
            j++;
        if (j < n_nodes)
            continue;
        if (n_nodes == 8 || !p->nodes[nd].on || atomic_load(&c->nodes[nd].down_until)) {
            free(kn);
            return 0;
        }
        nodes[n_nodes++] = nd;
    }
    size_t locked = 0;
    for (; locked < n_nodes; locked++)
        if (pthread_mutex_trylock(&p->ctl_mu[nodes[locked]]) != 0)
            break;
    int mine = locked == n_nodes;
    uint32_t *pos = mine ? malloc(n * sizeof *pos) : NULL;
    uint64_t deadline_ns =
        kvf__now_ns() + (uint64_t)(deadline_ms > 0 ? deadline_ms : c->o.deadline_ms) * 1000000u;
    *rc = 0;
    if (mine && !pos)
        *rc = KVF_ENOMEM;
    for (size_t j = 0; mine && pos && j < n_nodes && !*rc; j++) {
        size_t m = 0;
        for (size_t i = 0; i < n; i++)
            if (kn[i] == nodes[j])
                pos[m++] = (uint32_t)i;
        *rc = ctl_exists(p, nodes[j], keys, pos, m, present, deadline_ns);
    }
    free(kn);
    free(pos);
    for (size_t j = 0; j < locked; j++)
        pthread_mutex_unlock(&p->ctl_mu[nodes[j]]);
    if (mine && *rc && *rc != KVF_ENOMEM)
        return 0; /* the engines try, and say what is wrong */
    return mine;
}

/* ------------------------------------------------------------------------------------------ */
/* Discovery at open */

/* Asks node i over TCP, with a short deadline, for its HELLO; records its socket where it is on
 * this host. Returns 1 when it is, else 0 with the reason appended to why. */
static int discover_one(kvf_client *c, size_t i, char *why, size_t whylen)
{
    kvf__node *N = &c->nodes[i];
    char err[240] = "";
    int fd, rc;
    int ms = c->o.connect_timeout_ms < 500 ? c->o.connect_timeout_ms : 500;
    size_t used = strlen(why);
#define WHY(...)                                              \
    do {                                                      \
        if (used < whylen)                                    \
            snprintf(why + used, whylen - used, __VA_ARGS__); \
    } while (0)
    if ((rc = kvf__tcp_connect(N->host, N->port, ms, &fd, err, sizeof err)) != 0) {
        WHY("; node %zu: %s", i, err);
        return 0;
    }
    kvf__hello h;
    uint64_t id = 0;
    /* HELLO only: authenticating here would cost a signature for nothing. */
    kvf_client probe = *c;
    probe.has_cred = 0;
    rc = kvf__sync_hello(fd, &probe, &id, &h, kvf__now_ns() + (uint64_t)ms * 1000000u, err,
                         sizeof err);
    close(fd);
    if (rc == KVF_EACCES)
        rc = 0; /* the node asks for AUTH: its HELLO said what it serves all the same */
    if (rc) {
        WHY("; node %zu: %s", i, err);
        return 0;
    }
    if (!(h.caps & KVF_CAP_SHM)) {
        WHY("; node %zu serves no shared memory", i);
        return 0;
    }
    if (memcmp(h.boot_id, c->boot_id, 16) != 0) {
        WHY("; node %zu runs on another host (boot id differs)", i);
        return 0;
    }
#undef WHY
    atomic_store(&N->holders,
                 h.holders <= KVF_CLIENT_MAX_HOLDERS ? h.holders : KVF_CLIENT_MAX_HOLDERS);
    /* what the node takes, with hello_seen: a save in parts asks both (kvf_client_put_parts),
     * and the engines' own HELLOs may not be answered yet */
    atomic_store(&N->caps, h.caps & ~KVF_CAP_AUTH);
    atomic_store(&N->hello_seen, 1);
    pthread_mutex_lock(&c->shm_mu);
    snprintf(N->shm_name, sizeof N->shm_name, "%s", h.shm_name);
    N->shm_local = 1;
    pthread_mutex_unlock(&c->shm_mu);
    return 1;
}

void kvf__shm_discover(kvf_client *c, char *why, size_t whylen)
{
    why[0] = 0;
    uint8_t boot[16];
    if (kvf__boot_id(boot) != 0) {
        snprintf(why, whylen, "; this system does not say its boot id");
        return;
    }
    /* under shm_mu, as the engines' HELLO replies read it (reply.c): at open no engine runs yet,
     * but a probe made again (test_store_shm) runs beside them */
    pthread_mutex_lock(&c->shm_mu);
    memcpy(c->boot_id, boot, sizeof boot);
    pthread_mutex_unlock(&c->shm_mu);
    for (size_t i = 0; i < c->n_nodes; i++) {
        if (!kvf__host_is_local(c->nodes[i].host)) {
            size_t used = strlen(why);
            if (used < whylen)
                snprintf(why + used, whylen - used, "; node %zu is not on this host", i);
            continue;
        }
        discover_one(c, i, why, whylen);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Leases for the caller (kvf_client_lease) */

struct kvf_lease {
    kvf_client *c; /* NULL once the client closed: the lease is then only its memory */
    struct kvf_lease *prev, *next; /* in the path's list of leases held (p->leases) while c */
    size_t n;
    struct {
        size_t node;
        uint64_t id, epoch;
        const sview *view; /* held: the objects stay mapped until the release */
    } held[KVF_CLIENT_MAX_NODES];
    uint64_t until_ns;  /* the earliest of the nodes' leases' ends, less a margin */
    uint32_t grow_from; /* the client's default lease, which it asked (0: the caller's own) */
};

/* RDMA_GET of the keys at pos (all on node) over its control connection (lock held): each hit's
 * place in the view into objs and lens. The lease's id into l. 0 or the error. */
static int lease_on(struct kvf__shm_path *p, size_t node, const kvf_key *keys, const uint32_t *pos,
                    size_t m, uint32_t lease_ms, const void **objs, uint64_t *lens, int *status,
                    kvf_lease *l, uint64_t deadline_ns)
{
    int rc = ctl_connect(p, node, deadline_ns);
    if (rc)
        return rc;
    sconn *s = &p->ctl[node];
    const sview *sn = s->view;
    if (!sn)
        return KVF_ENOTSUP;
    size_t plen = 16 + 16 * m;
    uint8_t *req = malloc(plen), *rep = NULL;
    if (!req)
        return KVF_ENOMEM;
    kvf__put_u64(req, p->c->o.ns);
    kvf__put_u32(req + 8, lease_ms);
    kvf__put_u32(req + 12, 0);
    for (size_t i = 0; i < m; i++)
        kvf__wire_key_put(req + 16 + 16 * i, &keys[pos[i]]);
    size_t rlen;
    uint64_t t0 = kvf__now_ns();
    rc = kvf__sync_call(s->fd, ++s->next_id, KVF_OP_RDMA_GET, (uint32_t)m, req, plen, &rep, &rlen,
                        NULL, NULL, deadline_ns, s->err, sizeof s->err);
    free(req);
    if (!rc && rlen < 16 + 24 * m) {
        free(rep);
        rc = KVF_EPROTO;
    }
    if (rc) {
        kvf__shm_conn_close(s);
        return rc;
    }
    uint64_t bytes = 0;
    uint64_t until = t0 + (uint64_t)kvf__get_u32(rep + 12) * 1000000u;
    until = until > LEASE_MARGIN_NS ? until - LEASE_MARGIN_NS : 0;
    if (!l->until_ns || until < l->until_ns)
        l->until_ns = until;
    l->held[l->n].node = node;
    l->held[l->n].epoch = atomic_load(&s->epoch);
    pthread_mutex_lock(&p->vmu);
    ((sview *)sn)->refs++;
    pthread_mutex_unlock(&p->vmu);
    l->held[l->n].view = sn;
    l->held[l->n++].id = kvf__get_u64(rep);
    for (size_t i = 0; i < m; i++) {
        const uint8_t *e = rep + 16 + 24 * i;
        int st = (int)(int32_t)kvf__get_u32(e);
        uint64_t a = kvf__get_u64(e + 8), len = kvf__get_u64(e + 16);
        if (!kvf_err_is_known(st))
            st = KVF_EPROTO;
        if (!st && (a < sn->base || a - sn->base > sn->len || len > sn->len - (a - sn->base)))
            st = KVF_EPROTO; /* outside the view: not trusted */
        status[pos[i]] = st;
        objs[pos[i]] = st ? NULL : sn->map + (a - sn->base);
        lens[pos[i]] = st ? 0 : len;
        bytes += st ? 0 : len;
    }
    free(rep);
    /* The caller reads them out of the view: bytes moved over shared memory. */
    kvf__shm_count(p, 1, bytes, 0, 0, 0, 0, 0);
    return 0;
}

int kvf_client_lease(kvf_client *c, size_t n, const kvf_key *keys, uint32_t lease_ms,
                     const void **objs, uint64_t *lens, int *status, kvf_lease **out)
{
    if (!out)
        return KVF_EINVAL;
    *out = NULL;
    if (!c || !keys || !objs || !lens || !status || n == 0 || n > KVF_WIRE_MAX_ITEMS)
        return KVF_EINVAL;
    struct kvf__shm_path *p = c->shm;
    if (!p || !p->ctl)
        return KVF_ENOTSUP;
    /* Each key's node, chosen once (as in kvf__shm_exists): every key is asked of exactly one
     * node, so every status is set. */
    uint32_t *kn = malloc(n * sizeof *kn);
    if (!kn)
        return KVF_ENOMEM;
    for (size_t i = 0; i < n; i++) {
        kn[i] = (uint32_t)kvf_client_node_of(c, &keys[i]);
        if (!p->nodes[kn[i]].has_view) {
            free(kn);
            return KVF_ENOTSUP;
        }
    }
    kvf_lease *l = calloc(1, sizeof *l);
    uint32_t *pos = malloc(n * sizeof *pos);
    if (!l || !pos) {
        free(l), free(pos), free(kn);
        return KVF_ENOMEM;
    }
    l->c = c;
    uint32_t asked = lease_ms ? lease_ms : atomic_load(&p->lease_ms);
    l->grow_from = lease_ms || p->lease_set ? 0 : asked;
    pthread_mutex_lock(&p->lmu); /* listed from the start: kvf_lease_release() unlinks it */
    l->next = p->leases;
    if (p->leases)
        p->leases->prev = l;
    p->leases = l;
    pthread_mutex_unlock(&p->lmu);
    uint64_t deadline_ns = kvf__now_ns() + (uint64_t)c->o.deadline_ms * 1000000u;
    int rc = 0;
    for (size_t node = 0; node < p->n && !rc; node++) {
        size_t m = 0;
        for (size_t i = 0; i < n; i++)
            if (kn[i] == node)
                pos[m++] = (uint32_t)i;
        if (!m)
            continue;
        if (atomic_load(&c->nodes[node].down_until)) {
            for (size_t i = 0; i < m; i++)
                status[pos[i]] = KVF_EHOSTUNREACH, objs[pos[i]] = NULL, lens[pos[i]] = 0;
            continue;
        }
        pthread_mutex_lock(&p->ctl_mu[node]);
        rc = lease_on(p, node, keys, pos, m, asked, objs, lens, status, l, deadline_ns);
        pthread_mutex_unlock(&p->ctl_mu[node]);
        if (rc == KVF_ETIMEDOUT)
            kvf__node_mark_down(&c->nodes[node]);
    }
    free(pos);
    free(kn);
    if (rc) {
        kvf_lease_release(&l);
        return rc;
    }
    *out = l;
    return 0;
}

void kvf__shm_leases_orphan(struct kvf__shm_path *p)
{
    pthread_mutex_lock(&p->lmu);
    for (kvf_lease *l = p->leases, *next; l; l = next) {
        next = l->next;
        l->c = NULL; /* its views are unmapped with the path's; the node ends its lease with the
                        connection */
        l->prev = l->next = NULL;
    }
    p->leases = NULL;
    pthread_mutex_unlock(&p->lmu);
}

int kvf_lease_valid(const kvf_lease *l)
{
    if (!l || !l->c)
        return 0;
    if (kvf__now_ns() >= l->until_ns) {
        if (l->grow_from) /* the caller reads slower than the default lease allows */
            kvf__shm_lease_grow(l->c->shm, l->grow_from);
        return 0;
    }
    /* A connection closed since (and its leases with it, on the node) ends the lease too. */
    for (size_t i = 0; i < l->n; i++)
        if (atomic_load(&l->c->shm->ctl[l->held[i].node].epoch) != l->held[i].epoch)
            return 0;
    return 1;
}

void kvf_lease_release(kvf_lease **lp)
{
    if (!lp || !*lp)
        return;
    kvf_lease *l = *lp;
    *lp = NULL;
    struct kvf__shm_path *p = l->c ? l->c->shm : NULL;
    if (p) {
        pthread_mutex_lock(&p->lmu);
        if (l->prev)
            l->prev->next = l->next;
        else
            p->leases = l->next;
        if (l->next)
            l->next->prev = l->prev;
        pthread_mutex_unlock(&p->lmu);
    }
    for (size_t i = 0; p && i < l->n; i++) {
        size_t node = l->held[i].node;
        if (!l->held[i].id) { /* no hit: nothing to release on the node */
            kvf__shm_view_put(p, node, l->held[i].view);
            continue;
        }
        uint8_t req[16], *rep;
        size_t rlen;
        kvf__put_u64(req, l->c->o.ns);
        kvf__put_u64(req + 8, l->held[i].id);
        pthread_mutex_lock(&p->ctl_mu[node]);
        sconn *s = &p->ctl[node];
        /* A connection closed since took the lease with it (and a new one numbers its leases
         * afresh: releasing this id there would drop another's). A release that cannot be said
         * costs the node the lease's remaining time, no more. */
        if (atomic_load(&s->epoch) != l->held[i].epoch) {
            pthread_mutex_unlock(&p->ctl_mu[node]);
            kvf__shm_view_put(p, node, l->held[i].view);
            continue;
        }
        if (s->fd >= 0 && kvf__sync_call(s->fd, ++s->next_id, KVF_OP_RDMA_RELEASE, 0, req,
                                         sizeof req, &rep, &rlen, NULL, NULL,
                                         kvf__now_ns() + 1000000000ull, s->err, sizeof s->err) == 0)
            free(rep);
        else
            kvf__shm_conn_close(s);
        pthread_mutex_unlock(&p->ctl_mu[node]);
        kvf__shm_view_put(p, node, l->held[i].view);
    }
    free(l);
    *lp = NULL;
}
