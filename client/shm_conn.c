/*
 * The shared-memory path's connections to a node's Unix socket and the views of its arena
 * (shm_int.h).
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

void kvf__shm_count(struct kvf__shm_path *p, uint64_t reqs, uint64_t in, uint64_t out,
                    uint64_t failed, uint64_t expired, uint64_t reconnects, uint64_t fallback)
{
    pthread_mutex_lock(&p->cmu);
    p->cnt.requests += reqs;
    p->cnt.bytes_received += in;
    p->cnt.bytes_sent += out;
    p->cnt.shm_bytes_received += in;
    p->cnt.shm_bytes_sent += out;
    p->cnt.failed_keys += failed;
    p->cnt.shm_lease_expired += expired;
    p->cnt.reconnects += reconnects;
    p->cnt.shm_fallback_keys += fallback;
    pthread_mutex_unlock(&p->cmu);
}

/* ------------------------------------------------------------------------------------------ */
/* Connections */

void kvf__shm_conn_close(sconn *s)
{
    if (s->fd >= 0) {
        atomic_fetch_add(&s->epoch, 1); /* before the node can see the close */
        close(s->fd);
    }
    if (s->view)
        kvf__shm_view_put(s->p, s->node, s->view);
    s->view = NULL;
    if (s->stg)
        munmap(s->stg, s->stg_len);
    s->fd = -1;
    s->stg = NULL;
    s->stg_len = 0;
    s->n_rel = 0;
}

/* Reads the replies of s's releases in flight. 0, or the error (s is then closed). */
int kvf__shm_drain_releases(sconn *s)
{
    /* A release that cannot be answered costs nothing but its lease's remaining time. */
    uint64_t d = kvf__now_ns() + 1000000000ull;
    for (int i = 0; i < s->n_rel && s->fd >= 0; i++) {
        uint8_t *rep;
        size_t rlen;
        if (kvf__sync_recv(s->fd, s->rel[i], KVF_OP_RDMA_RELEASE, &rep, &rlen, NULL, NULL, d,
                           s->err, sizeof s->err) != 0) {
            kvf__shm_conn_close(s);
            return KVF_ECONNRESET;
        }
        free(rep);
    }
    s->n_rel = 0;
    return 0;
}

int kvf__shm_node_name(kvf_client *c, size_t node, char *name, size_t len)
{
    pthread_mutex_lock(&c->shm_mu);
    int ok = c->nodes[node].shm_local && c->nodes[node].shm_name[0];
    snprintf(name, len, "%s", ok ? c->nodes[node].shm_name : "");
    pthread_mutex_unlock(&c->shm_mu);
    return ok;
}

/* The view of the arena whose descriptor fd is (the store's address of its base, its length):
 * one already mapped for the same store process, or a new one. NULL when it cannot be mapped.
 * Takes the path's vmu. */
static const sview *view_of(struct kvf__shm_path *p, size_t node, int fd, uint64_t base,
                            uint64_t len)
{
    struct stat st;
    if (fstat(fd, &st) != 0 || len == 0)
        return NULL;
    pthread_mutex_lock(&p->vmu);
    sview *v = p->nodes[node].views;
    while (v && !(v->dev == st.st_dev && v->ino == st.st_ino && v->base == base && v->len == len))
        v = v->next;
    if (v)
        v->refs++;
    if (!v && (v = calloc(1, sizeof *v)) != NULL) {
        void *m = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED) {
            free(v);
            v = NULL;
        } else {
            *v = (sview){.next = p->nodes[node].views,
                         .map = m,
                         .base = base,
                         .len = len,
                         .dev = st.st_dev,
                         .ino = st.st_ino,
                         .refs = 1};
            p->nodes[node].views = v;
            /* The views before it that nobody holds any more go now. */
            for (sview **pp = &v->next; *pp;) {
                sview *o = *pp;
                if (o->refs || o->pinned) {
                    pp = &o->next;
                    continue;
                }
                *pp = o->next;
                munmap((void *)o->map, o->len);
                free(o);
            }
        }
    }
    pthread_mutex_unlock(&p->vmu);
    return v;
}

/* Lets one hold of v on node go: a view nobody holds that is not the node's newest is unmapped. */
void kvf__shm_view_put(struct kvf__shm_path *p, size_t node, const sview *cv)
{
    if (!cv)
        return;
    pthread_mutex_lock(&p->vmu);
    sview *v = (sview *)cv;
    if (--v->refs == 0 && !v->pinned && p->nodes[node].views != v) {
        for (sview **pp = &p->nodes[node].views; *pp; pp = &(*pp)->next) {
            if (*pp == v) {
                *pp = v->next;
                munmap((void *)v->map, v->len);
                free(v);
                break;
            }
        }
    }
    pthread_mutex_unlock(&p->vmu);
}

/* Connects s to node's socket: HELLO (and AUTH), SHM_MAP of a staging region (and, where
 * want_view, the arena, whose view becomes s->view; where need_view, a connection not handed it
 * fails). 0, or the error with the reason in s->err. */
int kvf__shm_conn_open(struct kvf__shm_path *p, size_t node, sconn *s, int want_view, int need_view,
                       uint64_t staging, uint64_t deadline_ns)
{
    kvf_client *c = p->c;
    s->view = NULL;
    s->p = p;
    s->node = node;
    char name[128];
    if (!kvf__shm_node_name(c, node, name, sizeof name))
        return kvf__errf(s->err, sizeof s->err, KVF_ENOTSUP, "node %zu serves no shared memory",
                         node);
    int rc = kvf__unix_connect_nb(name, &s->fd, s->err, sizeof s->err);
    s->gone = rc != 0;
    if (rc)
        return rc;
    kvf__hello h;
    rc = kvf__sync_hello(s->fd, c, &s->next_id, &h, deadline_ns, s->err, sizeof s->err);
    if (rc)
        goto out_close;
    uint8_t req[16], *rep = NULL;
    size_t rlen;
    int fds[KVF_UNIX_MAX_FDS], nfd = KVF_UNIX_MAX_FDS;
    kvf__put_u64(req, staging);
    kvf__put_u32(req + 8, want_view ? KVF_SHM_MAP_ARENA : 0);
    kvf__put_u32(req + 12, 0);
    rc = kvf__sync_call(s->fd, ++s->next_id, KVF_OP_SHM_MAP, 0, req, sizeof req, &rep, &rlen, fds,
                        &nfd, deadline_ns, s->err, sizeof s->err);
    if (rc) {
        /* The node has no staging region to spare (its --shm-staging-total), or none this
         * large: this connection's keys go over TCP rather than fail. */
        s->gone = rc == KVF_ENOMEM || rc == KVF_E2BIG;
        goto out_close;
    }
    uint64_t base = rlen >= 32 ? kvf__get_u64(rep) : 0,
             alen = rlen >= 32 ? kvf__get_u64(rep + 8) : 0;
    uint64_t slen = rlen >= 32 ? kvf__get_u64(rep + 16) : 0;
    int granted = rlen >= 32 && (kvf__get_u32(rep + 24) & KVF_SHM_MAP_ARENA);
    free(rep);
    if (rlen < 32 || nfd != (slen ? 1 : 0) + granted || slen < staging) {
        for (int i = 0; i < nfd; i++)
            close(fds[i]);
        rc = kvf__errf(s->err, sizeof s->err, KVF_EPROTO,
                       "SHM_MAP answered %zu bytes and %d descriptors", rlen, nfd);
        goto out_close;
    }
    if (slen) {
        void *m = mmap(NULL, slen, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
        close(fds[0]);
        if (m == MAP_FAILED) {
            if (granted)
                close(fds[1]);
            rc = kvf__errf(s->err, sizeof s->err, KVF_ENOMEM,
                           "cannot map a staging region of %llu bytes", (unsigned long long)slen);
            goto out_close;
        }
        s->stg = m;
        s->stg_len = slen;
    }
    if (granted) {
        s->view = view_of(p, node, fds[slen ? 1 : 0], base, alen);
        close(fds[slen ? 1 : 0]);
    }
    if (need_view && !s->view) {
        /* Leased gets need the arena: a node that no longer hands it out (or a view that cannot
         * be mapped) sends this connection's keys over TCP rather than fail them. */
        s->gone = 1;
        rc = kvf__errf(s->err, sizeof s->err, KVF_ENOTSUP, "node %zu did not hand out its arena",
                       node);
        goto out_close;
    }
    return 0;

out_close:
    kvf__shm_conn_close(s);
    return rc;
}

/* Worker w's connection to node, made (again) where needed. 0 or the error (the connection
 * stays closed until RETRY_NS have passed). */
int kvf__shm_conn_of(worker *w, size_t node, uint64_t deadline_ns, sconn **out)
{
    sconn *s = &w->cn[node];
    *out = s;
    if (s->fd >= 0)
        return 0;
    uint64_t t = kvf__now_ns();
    if (t < s->retry_at)
        return s->last_rc;
    /* A connection that asks for leased descriptors must hold the arena too (the node hands
     * them only to those). */
    int hv = w->p->nodes[node].has_view;
    int rc = kvf__shm_conn_open(w->p, node, s, hv, hv, w->p->staging, deadline_ns);
    if (rc) {
        s->retry_at = t + RETRY_NS;
        s->last_rc = rc;
        kvf__node *nd = &w->p->c->nodes[node];
        /* a node that does not answer is down; with rerouting so is one whose socket refuses or
         * resets (it died, or restarts): its keys go to the next node until a probe finds it
         * again (io.c). A node that only cannot serve shared memory now (no staging to spare,
         * no arena handed out) is not down: its keys go over TCP. */
        int refused = rc == KVF_ECONNREFUSED || rc == KVF_ECONNRESET || rc == KVF_ENOENT;
        if (rc == KVF_ETIMEDOUT ||
            (refused && atomic_load_explicit(&w->p->c->reroute, memory_order_relaxed) &&
             !atomic_load(&nd->down_until)))
            kvf__node_mark_down(nd);
        return rc;
    }
    kvf__shm_count(w->p, 0, 0, 0, 0, 0, 1, 0);
    return 0;
}

int kvf__shm_conn_clear(worker *w, size_t node, uint64_t deadline_ns, sconn **out)
{
    int rc = kvf__shm_conn_of(w, node, deadline_ns, out);
    if (!rc && (*out)->n_rel && kvf__shm_drain_releases(*out) != 0)
        rc = kvf__shm_conn_of(w, node, deadline_ns, out);
    return rc;
}

/* Whether w may send node its keys now: 0 once connected. A node that is down (a request to it
 * timed out) fails them at once with KVF_EHOSTUNREACH; once its backoff has passed, the first
 * worker to ask probes it with a fresh connection of a short deadline, whose answer brings it up,
 * as the engines do: a hung node costs one deadline, not one per request. */
int kvf__shm_node_ready(worker *w, size_t node, uint64_t deadline_ns)
{
    kvf__node *nd = &w->p->c->nodes[node];
    sconn *s;
    uint64_t until = atomic_load(&nd->down_until);
    if (!until)
        return kvf__shm_conn_of(w, node, deadline_ns, &s);
    int idle = 0;
    uint64_t t = kvf__now_ns();
    if (t < until || !atomic_compare_exchange_strong(&nd->probing, &idle, 1))
        return KVF_EHOSTUNREACH;
    kvf__shm_conn_close(&w->cn[node]);
    w->cn[node].retry_at = 0;
    uint64_t d = t + PROBE_NS < deadline_ns ? t + PROBE_NS : deadline_ns;
    int rc = kvf__shm_conn_of(w, node, d, &s);
    if (rc) {
        kvf__node_mark_down(nd);
        return w->cn[node].gone ? rc : KVF_EHOSTUNREACH;
    }
    kvf__node_mark_up(nd);
    return 0;
}
