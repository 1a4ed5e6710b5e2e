/*
 * A connection of the storage node's server, from its adoption by a loop to its teardown, and what
 * it holds meanwhile besides its bytes: the reservations of a PUT in progress, the read references
 * of its queued replies and of its RDMA leases. Everything here runs on the connection's loop.
 */
#include "server_int.h"

#include "hash.h"

#include "cache.h"
#include "clock.h"
#include "poller.h"

#include <inttypes.h>
#include <stdlib.h>
#include <unistd.h>

void kvf__conn_adopt(loop *lp, int fd, int is_unix)
{
    kvf_server *s = lp->srv;
    conn *c = calloc(1, sizeof *c);
    if (!c) {
        close(fd);
        return;
    }
    c->fd = fd;
    c->lp = lp;
    c->id = atomic_fetch_add(&s->next_conn_id, 1);
    c->events = KVF_POLL_IN;
    c->role = s->o.tenants ? KVF_ROLE_NONE : KVF_ROLE_ADMIN;
    c->accepted_ns = kvf__now_ns();
    c->is_unix = is_unix;
    if (kvf__poller_add(lp->poller, fd, KVF_POLL_IN, c) != 0) {
        close(fd);
        free(c);
        return;
    }
    c->next = lp->conns;
    if (lp->conns)
        lp->conns->prev = c;
    lp->conns = c;
    atomic_fetch_add(&s->n_conns, 1);
    atomic_fetch_add(&s->n_accepted, 1);
    kvf_debug(s->o.log, "loop %d: connection %" PRIu64 " accepted", lp->idx, c->id);
}

void kvf__msg_release_refs(kvf_server *s, out_msg *m)
{
    if (!m->nrefs)
        return;
    kvf__cache_lock(s->o.cache);
    for (uint32_t i = 0; i < m->nrefs; i++)
        kvf__cache_release_locked(s->o.cache, m->refs[i]);
    kvf__cache_unlock(s->o.cache);
    m->nrefs = 0;
}

void kvf__conn_destroy(conn *c)
{
    kvf_server *s = c->lp->srv;
    kvf__poller_del(c->lp->poller, c->fd);
    close(c->fd);
    kvf__cache_lock(s->o.cache);
    /* Held reservations of an unfinished PUT/COMMIT, then un-held ADMIT reservations. */
    if (c->rstate == R_DATA)
        for (uint32_t i = c->cur; i < c->n_items; i++)
            if (c->items[i].held)
                kvf__cache_abort_locked(s->o.cache, c->items[i].eid, c->id);
    kvf__cache_abort_owner_locked(s->o.cache, c->id);
    while (c->leases) {
        rlease *l = c->leases;
        c->leases = l->next;
        for (uint32_t i = 0; i < l->n; i++)
            kvf__cache_release_locked(s->o.cache, l->eids[i]);
        free(l);
        atomic_fetch_sub(&s->rdma_leases_open, 1);
    }
    c->n_leases = 0;
    kvf__cache_unlock(s->o.cache);
    while (c->oh) {
        out_msg *m = c->oh;
        c->oh = m->next;
        kvf__msg_unqueued(c, m);
        kvf__msg_release_refs(s, m);
        free(m);
    }
    if (c->prev)
        c->prev->next = c->next;
    else
        c->lp->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    kvf__shm_conn_free(c);
    free(c->rbuf);
    free(c->items);
    free(c->prec);
    XXH3_freeState(c->pxs);
    c->rbuf = NULL;
    c->items = NULL;
    c->dead = 1;
    c->next_dead = c->lp->dead;
    c->lp->dead = c;
    atomic_fetch_sub(&s->n_conns, 1);
    atomic_fetch_add(&s->n_closed, 1);
}

void kvf__loop_reap(loop *lp)
{
    while (lp->dead) {
        conn *c = lp->dead;
        lp->dead = c->next_dead;
        free(c);
    }
}

void kvf__conn_leases_expire_locked(conn *c, uint64_t t)
{
    kvf_server *s = c->lp->srv;
    for (rlease **pp = &c->leases; *pp;) {
        rlease *l = *pp;
        if (l->expires_ns > t) {
            pp = &l->next;
            continue;
        }
        for (uint32_t i = 0; i < l->n; i++)
            kvf__cache_release_locked(s->o.cache, l->eids[i]);
        atomic_fetch_add(&s->rdma_expired, 1);
        atomic_fetch_sub(&s->rdma_leases_open, 1);
        c->n_leases--;
        *pp = l->next;
        free(l);
    }
}

int kvf__conn_ns_ok(const conn *c, uint64_t ns)
{
    return ns != 0 && (c->ns_bound == 0 || c->ns_bound == ns);
}
