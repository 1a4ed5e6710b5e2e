/*
 * The storage node's server (docs/protocol.md, docs/store.md): its event loops, which accept
 * connections, deal them out, drain their inboxes and run the periodic tick, and the server's
 * open, run, stop and close. Its threads and lock order are described in server_int.h.
 */
#include "server_int.h"

#include "tier.h"

#include "kvf/error.h"

#include "cache.h"
#include "clock.h"
#include "poller.h"
#include "rdma_serve.h"
#include "tcp.h"
#include "unixsock.h"
#include "cpus.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define TICK_NS    100000000ull
#define TICK_STEPS 4096u
/* Accepting paused after a failure that is not a connection's own (docs/store.md). */
#define ACCEPT_BACKOFF_MIN_NS 100000000ull
#define ACCEPT_BACKOFF_MAX_NS 1600000000ull
#define ACCEPT_LOG_EVERY_NS   1000000000ull
#define ACCEPT_QUIET_NS       1000000000ull

/* Opens the RDMA listener that opts ask for. "auto" without a device is no error: the reason is
 * kept for HELLO's capabilities, STATS and the log. */
static int rdma_open(kvf_server *s, const char *spec, char *err, size_t errlen)
{
    snprintf(s->rdma_why, sizeof s->rdma_why, "not asked for (--rdma off)");
    if (!spec || !strcmp(spec, "off"))
        return 0;
    char host[256];
    uint16_t port = 0;
    int autom = !strcmp(spec, "auto");
    if (autom) {
        snprintf(host, sizeof host, "%s", s->host);
    } else if (kvf__addr_parse(spec, host, sizeof host, &port) != 0) {
        snprintf(err, errlen, "rdma: expected off, auto or HOST:PORT, not \"%s\"", spec);
        return KVF_EINVAL;
    }
    kvf_cache_stats st;
    kvf__cache_lock(s->o.cache);
    kvf__cache_stats_locked(s->o.cache, &st);
    kvf__cache_unlock(s->o.cache);
    char why[200] = "";
    int rc = kvf__rserve_open(host, port, kvf__cache_base(s->o.cache), st.memory, s->o.log,
                              &s->rdma, why, sizeof why);
    if (!rc) {
        kvf_info(s->o.log, "rdma: serving %s:%u, arena of %" PRIu64 " MiB registered", host,
                 kvf__rserve_port(s->rdma), st.memory >> 20);
        return 0;
    }
    snprintf(s->rdma_why, sizeof s->rdma_why, "%s", why);
    if (!autom) {
        snprintf(err, errlen, "%s", why);
        return rc;
    }
    kvf_info(s->o.log, "rdma: not served: %s", why);
    return 0;
}

/* The listeners' tags in every loop's poller. */
static const int listener_tag = 0;
static const int unix_listener_tag = 0;

/* Watches the listeners (add) or stops watching them. 0 or the poller's error. */
static int listeners_watch(loop *lp, int add)
{
    kvf_server *s = lp->srv;
    if (!add) {
        kvf__poller_del(lp->poller, s->lfd);
        if (s->ufd >= 0)
            kvf__poller_del(lp->poller, s->ufd);
        return 0;
    }
    int rc = kvf__poller_add(lp->poller, s->lfd, KVF_POLL_IN, (void *)&listener_tag);
    if (!rc && s->ufd >= 0 &&
        (rc = kvf__poller_add(lp->poller, s->ufd, KVF_POLL_IN, (void *)&unix_listener_tag)) != 0)
        kvf__poller_del(lp->poller, s->lfd);
    return rc;
}

/* Opens an accept episode or adds to the one in progress: logged when it opens and then at most
 * once a second, with the connections shed meanwhile, whichever loops run into it. */
static void accept_episode_note(kvf_server *s, int rc, uint64_t shed)
{
    uint64_t t = kvf__now_ns();
    atomic_fetch_add(&s->n_shed, shed);
    pthread_mutex_lock(&s->acc_mu);
    s->acc_fail_ns = t;
    if (!s->acc_since_ns) {
        s->acc_since_ns = s->acc_logged_ns = t;
        s->acc_shed = shed;
        s->acc_shed_logged = shed;
        atomic_store(&s->acc_trouble, 1);
        kvf_warn(s->o.log,
                 "accept: %s: %spausing accepts (%llu ms, doubling to %llu ms while it lasts) "
                 "until descriptors free up",
                 kvf_strerror(rc), rc == KVF_EMFILE ? "closing new connections at once and " : "",
                 (unsigned long long)(ACCEPT_BACKOFF_MIN_NS / 1000000),
                 (unsigned long long)(ACCEPT_BACKOFF_MAX_NS / 1000000));
    } else {
        s->acc_shed += shed;
        if (t - s->acc_logged_ns >= ACCEPT_LOG_EVERY_NS) {
            kvf_warn(s->o.log,
                     "accept: still %s after %.1f s: %" PRIu64 " connections shed in the last "
                     "%.1f s, %" PRIu64 " in all",
                     kvf_strerror(rc), (double)(t - s->acc_since_ns) / 1e9,
                     s->acc_shed - s->acc_shed_logged, (double)(t - s->acc_logged_ns) / 1e9,
                     s->acc_shed);
            s->acc_logged_ns = t;
            s->acc_shed_logged = s->acc_shed;
        }
    }
    pthread_mutex_unlock(&s->acc_mu);
}

/* Closes the episode in progress, if any, with one line once an accept succeeded after the last
 * failure and none failed for ACCEPT_QUIET_NS: at the limit, where connections come and go, an
 * episode does not end and restart with every connection. Called by every loop's tick. */
static void accept_episode_check_end(kvf_server *s, uint64_t t)
{
    if (!atomic_load(&s->acc_trouble))
        return;
    pthread_mutex_lock(&s->acc_mu);
    if (s->acc_since_ns && atomic_load(&s->acc_ok_ns) > s->acc_fail_ns &&
        t - s->acc_fail_ns >= ACCEPT_QUIET_NS) {
        kvf_warn(s->o.log,
                 "accept: accepting again after %.1f s of failures; %" PRIu64 " connections shed",
                 (double)(s->acc_fail_ns - s->acc_since_ns) / 1e9, s->acc_shed);
        s->acc_since_ns = 0;
        atomic_store(&s->acc_trouble, 0);
    }
    pthread_mutex_unlock(&s->acc_mu);
}

/* Puts back a reserve descriptor r (taken with atomic_exchange, or freshly opened); a loop that
 * reopened one while another held its own keeps one of the two. */
static void reserve_put(kvf_server *s, int r)
{
    if (r < 0)
        return;
    int prev = atomic_exchange(&s->reserve_fd, r);
    if (prev >= 0)
        close(prev);
}

/* accept failed with rc, not for a connection's own reason, so the listener stays readable and
 * accepting again now would fail again: at the descriptor limit, sheds the pending connections
 * with the reserve descriptor's help; then stops watching the listener for a while, longer each
 * time the trouble is still there. */
static void accept_trouble(loop *lp, int rc, int lfd)
{
    kvf_server *s = lp->srv;
    uint64_t shed = 0;
    if (rc == KVF_EMFILE) {
        int r = atomic_exchange(&s->reserve_fd, -1);
        for (int i = 0; i < 64 && kvf__tcp_accept_shed(lfd, &r) == 0; i++)
            shed++;
        reserve_put(s, r);
    }
    uint64_t b = lp->accept_backoff_ns * 2;
    if (b < ACCEPT_BACKOFF_MIN_NS)
        b = ACCEPT_BACKOFF_MIN_NS;
    if (b > ACCEPT_BACKOFF_MAX_NS)
        b = ACCEPT_BACKOFF_MAX_NS;
    lp->accept_backoff_ns = b;
    lp->accept_resume_ns = kvf__now_ns() + b;
    lp->closed_seen = atomic_load(&s->n_closed);
    listeners_watch(lp, 0);
    accept_episode_note(s, rc, shed);
}

/* Watches the listener again once the back-off ran out or a connection closed meanwhile (its
 * descriptor is free), with a reserve descriptor again if there is none. */
static void accept_maybe_resume(loop *lp, uint64_t t)
{
    kvf_server *s = lp->srv;
    if (!lp->accept_resume_ns ||
        (t < lp->accept_resume_ns && atomic_load(&s->n_closed) == lp->closed_seen))
        return;
    if (atomic_load(&s->reserve_fd) < 0)
        reserve_put(s, kvf__fd_reserve_open());
    lp->accept_resume_ns = 0;
    if (listeners_watch(lp, 1) != 0) {
        lp->accept_resume_ns = t + lp->accept_backoff_ns; /* the poller is short: later */
        lp->closed_seen = atomic_load(&s->n_closed);
    }
}

/* Accepts what is pending and deals the connections out to the loops in turn: whichever loop
 * wins the accept, a client's several connections land on different loops and their transfers
 * run in parallel. */
static void loop_accept(loop *lp, int is_unix)
{
    kvf_server *s = lp->srv;
    int lfd = is_unix ? s->ufd : s->lfd;
    for (int i = 0; i < 64; i++) {
        int fd;
        int rc = is_unix ? kvf__unix_accept(lfd, &fd) : kvf__tcp_accept(lfd, &fd);
        if (rc == KVF_EAGAIN)
            return;
        if (rc) {
            accept_trouble(lp, rc, lfd);
            return;
        }
        if (is_unix)
            atomic_fetch_add(&s->shm_accepted, 1);
        lp->accept_backoff_ns = 0;
        if (atomic_load_explicit(&s->acc_trouble, memory_order_relaxed))
            atomic_store(&s->acc_ok_ns, kvf__now_ns());
        loop *to = &s->loops[atomic_fetch_add(&s->next_loop, 1) % (unsigned)s->nloops];
        deferred *d = to == lp ? NULL : malloc(sizeof *d);
        if (!d) {
            kvf__conn_adopt(lp, fd, is_unix);
            continue;
        }
        *d = (deferred){.fd = fd, .is_unix = is_unix};
        kvf__inbox_push(to, d);
    }
}

static void loop_drain_inbox(loop *lp)
{
    char buf[64];
    while (read(lp->wake[0], buf, sizeof buf) > 0) {
    }
    deferred *d = kvf__inbox_take(lp);
    while (d) {
        deferred *next = d->next;
        if (d->fd >= 0) {
            kvf__conn_adopt(lp, d->fd, d->is_unix);
            free(d);
            d = next;
            continue;
        }
        conn *c = lp->conns;
        while (c && c->id != d->conn_id)
            c = c->next;
        if (d->disk) {
            if (c)
                c->pending_jobs--;
            kvf__sdisk_finish(c, d->disk);
            if (c)
                kvf__conn_flush(c);
            free(d);
            d = next;
            continue;
        }
        if (c) {
            c->pending_jobs--;
            if (d->msg)
                kvf__conn_queue(c, d->msg);
            kvf__conn_flush(c);
        } else if (d->msg) {
            kvf__msg_release_refs(lp->srv, d->msg);
            free(d->msg);
        }
        free(d);
        d = next;
    }
}

static void *loop_main(void *arg)
{
    loop *lp = arg;
    kvf_server *s = lp->srv;
    static const int wake_tag = 0;
    listeners_watch(lp, 1);
    kvf__poller_add(lp->poller, lp->wake[0], KVF_POLL_IN, (void *)&wake_tag);
    kvf_poll_event evs[64];
    while (!atomic_load(&s->stopping)) {
        int n = kvf__poller_wait(lp->poller, evs, 64, 100);
        if (n < 0) {
            kvf_error(s->o.log, "loop %d: poll: %s", lp->idx, kvf_strerror(n));
            break;
        }
        for (int i = 0; i < n; i++) {
            if (evs[i].ud == &listener_tag || evs[i].ud == &unix_listener_tag) {
                loop_accept(lp, evs[i].ud == &unix_listener_tag);
                continue;
            }
            if (evs[i].ud == &wake_tag) {
                loop_drain_inbox(lp);
                continue;
            }
            conn *c = evs[i].ud;
            /* A connection destroyed earlier in this batch (by its own events, or by the inbox
             * when a COPY's reply completed a closing one) is dead until the batch ends. */
            if (c->dead || ((evs[i].events & KVF_POLL_OUT) && kvf__conn_flush(c) < 0))
                continue;
            if (evs[i].events & (KVF_POLL_IN | KVF_POLL_ERR))
                kvf__frame_on_readable(c);
        }
        kvf__loop_reap(lp);
        if (lp->idx == 0)
            kvf__auth_reload_if_asked(s);
        uint64_t t = kvf__now_ns();
        accept_maybe_resume(lp, t);
        if (t - lp->last_tick >= TICK_NS) {
            lp->last_tick = t;
            accept_episode_check_end(s, t);
            kvf__cache_lock(s->o.cache);
            if (lp->idx == 0)
                kvf__cache_tick_locked(s->o.cache, TICK_STEPS);
            for (conn *c = lp->conns; c; c = c->next)
                kvf__conn_leases_expire_locked(c, t);
            kvf__cache_unlock(s->o.cache);
            kvf__auth_sweep(lp, t);
        }
    }
    return NULL;
}

/* Sets up loop i of s: its poller (back-end poller), scratch buffer and nonblocking wake pipe.
 * Returns 0, or the error with one line in err; kvf__server_close() undoes what was done either
 * way. */
static int loop_init(kvf_server *s, int i, const char *poller, char *err, size_t errlen)
{
    loop *lp = &s->loops[i];
    int rc = kvf__poller_open(&lp->poller, poller);
    if (rc) {
        snprintf(err, errlen, "poller \"%s\": %s", poller ? poller : "default", kvf_strerror(rc));
        return rc;
    }
    lp->scratch = malloc(SCRATCH_BYTES);
    if (!lp->scratch || pipe(lp->wake) != 0) {
        snprintf(err, errlen, "loop setup: %s", strerror(errno));
        return KVF_ENOMEM;
    }
    for (int k = 0; k < 2; k++) {
        fcntl(lp->wake[k], F_SETFL, fcntl(lp->wake[k], F_GETFL) | O_NONBLOCK);
        fcntl(lp->wake[k], F_SETFD, FD_CLOEXEC);
    }
    return 0;
}

/* The Unix listener for clients on this host, where asked for, and the arena's read-only
 * descriptor where the arena is shared. 0 or the error, said in err. */
static int shm_open_listener(kvf_server *s, char *err, size_t errlen)
{
    s->o.shm = NULL;
    const char *name = s->shm_name;
    if (!name[0])
        return 0;
    int rc = kvf__unix_listen(name, 512, &s->ufd, err, errlen);
    if (rc)
        return rc;
    if (kvf__boot_id(s->boot_id) != 0)
        memset(s->boot_id, 0, sizeof s->boot_id);
    int afd = kvf__cache_arena_fd(s->o.cache);
    if (afd >= 0) {
        char p[64];
        snprintf(p, sizeof p, "/proc/self/fd/%d", afd);
        s->arena_fd = open(p, O_RDONLY | O_CLOEXEC);
    }
    return 0;
}

int kvf__server_open(kvf_server **out, const kvf_server_opts *o, char *err, size_t errlen)
{
    *out = NULL;
    if (!o->cache) {
        snprintf(err, errlen, "server: no cache");
        return KVF_EINVAL;
    }
    kvf_server *s = calloc(1, sizeof *s);
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return KVF_ENOMEM;
    }
    s->o = *o;
    snprintf(s->host, sizeof s->host, "%s", o->host ? o->host : "127.0.0.1");
    if (o->shm && *o->shm && strlen(o->shm) <= KVF_UNIX_PATH_MAX)
        snprintf(s->shm_name, sizeof s->shm_name, "%s", o->shm);
    else if (o->shm && *o->shm) {
        snprintf(err, errlen, "shm socket name \"%s\" is longer than %u bytes", o->shm,
                 KVF_UNIX_PATH_MAX);
        free(s);
        return KVF_EINVAL;
    }
    s->o.host = s->host;
    if (!s->o.threads)
        s->o.threads = 1;
    if (!s->o.max_request)
        s->o.max_request = 256ull << 20;
    if (!s->o.auth_timeout_ms)
        s->o.auth_timeout_ms = 10000;
    if (!s->o.copy_max_deadline_ms || s->o.copy_max_deadline_ms > KVF_COPY_MAX_DEADLINE_MS)
        s->o.copy_max_deadline_ms = KVF_COPY_MAX_DEADLINE_MS;
    if (!s->o.max_items || s->o.max_items > KVF_WIRE_MAX_ITEMS)
        s->o.max_items = KVF_WIRE_MAX_ITEMS;
    atomic_init(&s->next_conn_id, 1);
    s->ufd = s->arena_fd = -1;
    if (!s->o.shm_staging_max)
        s->o.shm_staging_max = 256ull << 20;
    if (!s->o.shm_staging_total)
        s->o.shm_staging_total = kvf__cache_mem_size(o->cache) / 4 > (4ull << 30)
                                     ? kvf__cache_mem_size(o->cache) / 4
                                     : 4ull << 30;
    int rc = kvf__tcp_listen(s->host, o->port, 512, &s->lfd, &s->port, err, errlen);
    if (rc) {
        free(s);
        return rc;
    }
    if ((rc = shm_open_listener(s, err, errlen)) != 0) {
        close(s->lfd);
        free(s);
        return rc;
    }
    pthread_mutex_init(&s->acc_mu, NULL);
    atomic_init(&s->reserve_fd, kvf__fd_reserve_open()); /* none is no error: tried again later */
    s->o.rdma = NULL;
    if ((rc = rdma_open(s, o->rdma, err, errlen)))
        goto out_close;
    s->nloops = s->o.threads;
    s->loops = calloc((size_t)s->nloops, sizeof *s->loops);
    if (!s->loops) {
        rc = KVF_ENOMEM;
        goto out_close;
    }
    /* Every loop is closable before any is set up: kvf__server_close() then undoes a setup that
     * failed half way. */
    for (int i = 0; i < s->nloops; i++) {
        loop *lp = &s->loops[i];
        lp->srv = s;
        lp->idx = i;
        lp->wake[0] = lp->wake[1] = -1;
        pthread_mutex_init(&lp->inbox_mu, NULL);
    }
    for (int i = 0; i < s->nloops; i++)
        if ((rc = loop_init(s, i, o->poller, err, errlen)))
            goto out_close;
    if ((rc = kvf__copy_pool_open(s, err, errlen)))
        goto out_close;
    /* Copiers for shared memory's puts: a core each, besides the loops' (docs/shm.md). */
    if (s->ufd >= 0 &&
        (rc = kvf__copiers_open(s, s->o.shm_copiers >= 0 ? s->o.shm_copiers
                                                         : kvf__cores() - s->nloops)) != 0) {
        snprintf(err, errlen, "out of memory for the copiers");
        goto out_close;
    }
    *out = s;
    return 0;

out_close:
    kvf__server_close(&s);
    return rc;
}

uint16_t kvf__server_port(const kvf_server *s)
{
    return s->port;
}

uint16_t kvf__server_rdma_port(const kvf_server *s, const char **why)
{
    if (why)
        *why = s->rdma ? "" : s->rdma_why;
    return s->rdma ? kvf__rserve_port(s->rdma) : 0;
}

int kvf__server_run(kvf_server *s)
{
    int started = 0;
    for (int i = 1; i < s->nloops; i++) {
        if (kvf__thread_start(&s->loops[i].th, loop_main, &s->loops[i]) != 0)
            break;
        started = i;
    }
    loop_main(&s->loops[0]);
    for (int i = 1; i <= started; i++)
        pthread_join(s->loops[i].th, NULL);
    return 0;
}

void kvf__server_stop(kvf_server *s)
{
    atomic_store(&s->stopping, 1);
    for (int i = 0; i < s->nloops; i++) {
        if (s->loops[i].wake[1] >= 0)
            kvf__inbox_wake(&s->loops[i]);
    }
}

void kvf__server_close(kvf_server **sp)
{
    if (!sp || !*sp)
        return;
    kvf_server *s = *sp;
    atomic_store(&s->stopping, 1);
    /* COPY's workers end within their capped deadline and are joined: none touches freed state. */
    kvf__copy_pool_close(s);
    /* the disk tier's requests in flight end (their I/O is bounded) and post to the inboxes */
    kvf__tier_quiesce(s->o.tier);
    for (int i = 0; s->loops && i < s->nloops; i++) {
        loop *lp = &s->loops[i];
        while (lp->conns)
            kvf__conn_destroy(lp->conns);
        kvf__loop_reap(lp);
        if (lp->poller) {
            deferred *d = kvf__inbox_take(lp);
            while (d) {
                deferred *next = d->next;
                if (d->disk)
                    kvf__sdisk_finish(NULL, d->disk);
                if (d->msg) {
                    kvf__msg_release_refs(s, d->msg);
                    free(d->msg);
                }
                if (d->fd >= 0)
                    close(d->fd);
                free(d);
                d = next;
            }
        }
        kvf__poller_close(&lp->poller);
        for (int k = 0; k < 2; k++)
            if (lp->wake[k] >= 0)
                close(lp->wake[k]);
        free(lp->scratch);
        pthread_mutex_destroy(&lp->inbox_mu);
    }
    free(s->loops);
    kvf__copiers_close(s);
    kvf__rserve_close(&s->rdma); /* after the connections: no descriptor is leased any more */
    if (s->lfd >= 0)
        close(s->lfd);
    if (s->ufd >= 0) {
        close(s->ufd);
        kvf__unix_unlink(s->shm_name);
    }
    if (s->arena_fd >= 0)
        close(s->arena_fd);
    int r = atomic_load(&s->reserve_fd);
    if (r >= 0)
        close(r);
    pthread_mutex_destroy(&s->acc_mu);
    free(s);
    *sp = NULL;
}
