/*
 * Replicas of hot entries (replicate.h, docs/store.md "Replicas of hot chunks").
 *
 * The cache calls the hook under its lock at an entry's --replicate-hits-th read: the hook picks
 * the targets (the first `copies` live peers in the key's rendezvous order, this node left out),
 * queues the entry with the read reference the cache takes for it, and returns at once. One
 * worker thread takes what is queued, makes a push job per entry and target, groups the jobs by
 * target and namespace, pushes each group with a client of the library (the entry's bytes
 * straight from the arena: a push is a PUT of the same object, so the copy verifies as any object
 * does), then marks each entry's replicas made (every target has its copy) or not and drops its
 * reference. A target that cannot be reached is left out of the order for 5 s, so what is hot
 * meanwhile goes to the next node (so does one that refused every copy of a push); an entry
 * whose push failed is asked for again at its next read.
 *
 * Lock order: the cache's lock, then the replicator's (the hook runs under the first and takes
 * the second); the worker never holds both.
 */
#include "replicate.h"

#include "kvf/client.h"
#include "kvf/error.h"

#include "clock.h"
#include "cpus.h"
#include "rendezvous.h"
#include "tcp.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define PEER_DOWN_NS   (5ull * 1000000000ull)
#define PUSH_BATCH_MAX 256

typedef struct rep_peer {
    char addr[KVF_REP_ADDR];
    uint64_t seed;
    uint64_t down_until_ns;
    int warned; /* its being down was logged (once until it answers again) */
} rep_peer;

typedef struct rep_item {
    uint32_t eid;
    uint64_t ns;
    kvf_key key;
    const uint8_t *data;
    uint64_t len;
    uint64_t peer[KVF_REP_MAX_COPIES]; /* the targets' seeds: the peers may change meanwhile */
    uint32_t n_peer;
    uint32_t n_made; /* the worker's count of copies made */
    uint32_t n_left; /* and of copies not pushed yet */
} rep_item;

/* One copy to push: an entry and one of its targets. */
typedef struct rep_job {
    rep_item *it;
    uint64_t ns, peer;
} rep_job;

struct kvf__replicator {
    kvf_cache *cache;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint64_t self_seed;
    rep_peer *peers;
    size_t n_peers;
    rep_item *q;
    size_t nq, cap;
    int stop, started;
    pthread_t th;
    rep_item *wb;  /* the worker's batch: what it took from q */
    rep_job *jobs; /* and its copies to push (cap * copies) */
    uint32_t copies;
    char credential[512];
    int deadline_ms;
    uint32_t hits;
    const kvf_log *log;
    kvf__replicate_stats st;
};

static uint64_t seed_of(const char *addr)
{
    char host[256];
    uint16_t port;
    if (kvf__addr_parse(addr, host, sizeof host, &port) != 0)
        return 0;
    return kvf__rendezvous_seed(host, port);
}

/* The live peers that key's order ranks first, at most r->copies of them, into seeds; how many.
 * Called with r->mu held. */
static uint32_t targets_locked(const kvf__replicator *r, const kvf_key *key, uint64_t now,
                               uint64_t *seeds)
{
    uint32_t n = 0;
    uint64_t below = UINT64_MAX; /* the scores taken so far are above this one */
    int any_below = 1;
    while (n < r->copies && any_below) {
        size_t best = SIZE_MAX;
        uint64_t bs = 0;
        for (size_t i = 0; i < r->n_peers; i++) {
            if (r->peers[i].down_until_ns > now)
                continue;
            uint64_t s = kvf__rendezvous_score(key->lo, key->hi, r->peers[i].seed);
            if ((n == 0 || s < below) && (best == SIZE_MAX || s > bs))
                bs = s, best = i;
        }
        any_below = best != SIZE_MAX;
        if (any_below) {
            seeds[n++] = r->peers[best].seed;
            below = bs;
        }
    }
    return n;
}

/* The cache's hook, under its lock: queue the entry, or say no (0). */
static int on_hot(void *ctx, uint32_t eid, uint64_t ns, const kvf_key *key, const uint8_t *data,
                  uint64_t len, uint32_t hits, uint32_t tenant)
{
    (void)hits, (void)tenant;
    kvf__replicator *r = ctx;
    int taken = 0;
    pthread_mutex_lock(&r->mu);
    rep_item it = {.eid = eid, .ns = ns, .key = *key, .data = data, .len = len};
    it.n_peer = r->stop ? 0 : targets_locked(r, key, kvf__now_ns(), it.peer);
    if (it.n_peer == 0) {
        r->st.no_peer++;
    } else if (r->nq == r->cap) {
        r->st.full++;
    } else {
        r->q[r->nq++] = it;
        r->st.queued++;
        taken = 1;
        pthread_cond_signal(&r->cv);
    }
    pthread_mutex_unlock(&r->mu);
    return taken;
}

/* Pushes jobs j[0..n) (one target, one namespace) and says per job whether its copy is there
 * now. */
static void push(kvf__replicator *r, const char *addr, const rep_job *j, size_t n, int *made)
{
    const char *nodes[1] = {addr};
    kvf_client_opts co = {.nodes = nodes,
                          .n_nodes = 1,
                          .ns = j[0].ns,
                          .conns_per_node = 1,
                          .io_threads = 1,
                          .transport = "tcp",
                          .deadline_ms = r->deadline_ms,
                          .credential = r->credential};
    kvf_key keys[PUSH_BATCH_MAX];
    const void *objs[PUSH_BATCH_MAX];
    uint64_t lens[PUSH_BATCH_MAX];
    int status[PUSH_BATCH_MAX];
    for (size_t i = 0; i < n; i++) {
        keys[i] = j[i].it->key;
        objs[i] = j[i].it->data;
        lens[i] = j[i].it->len;
        status[i] = KVF_ECANCELED;
    }
    char err[256] = "";
    kvf_client *cl = NULL;
    int rc = kvf_client_open(&cl, &co, err, sizeof err);
    if (!rc) {
        kvf_batch b = {.n = n, .keys = keys, .objs = objs, .lens = lens, .status = status};
        rc = kvf_client_put(cl, &b);
    }
    kvf_client_close(&cl);
    int ok = 0;
    for (size_t i = 0; i < n; i++) {
        made[i] = !rc && (status[i] == 0 || status[i] == KVF_EEXIST);
        ok += made[i];
    }
    pthread_mutex_lock(&r->mu);
    r->st.made += (uint64_t)ok;
    r->st.failed += n - (size_t)ok;
    for (size_t i = 0; i < r->n_peers; i++) {
        rep_peer *p = &r->peers[i];
        if (p->seed != j[0].peer)
            continue;
        if (!ok) {
            /* unreachable, or refusing every copy (a credential it does not take, full): left
             * out for a while either way, so that hot entries are not sent at every read */
            p->down_until_ns = kvf__now_ns() + PEER_DOWN_NS;
            if (!p->warned++)
                kvf_warn(r->log,
                         "replication to %s: %s%s%s; hot entries go to the next node for 5 s", addr,
                         kvf_strerror(rc ? rc : status[0]), err[0] ? ": " : "", err);
        } else if (p->warned) {
            p->warned = 0;
            kvf_info(r->log, "replication to %s: it answers again", addr);
        }
    }
    pthread_mutex_unlock(&r->mu);
}

/* The peer of seed, copied into addr, where it is up; 0, or -1 where it left or was found down
 * since (a hung peer costs a batch one push deadline, not one per group). r->mu held. */
static int live_addr_locked(const kvf__replicator *r, uint64_t seed, char *addr, size_t n)
{
    uint64_t now = kvf__now_ns();
    for (size_t i = 0; i < r->n_peers; i++)
        if (r->peers[i].seed == seed) {
            if (r->peers[i].down_until_ns > now)
                return -1;
            snprintf(addr, n, "%s", r->peers[i].addr);
            return 0;
        }
    return -1;
}

/* Pushes a batch taken from the queue, a copy per entry and target, group by group. An entry's
 * replication ends (made where every target has its copy) and its reference goes as soon as its
 * last copy was pushed, not at the end of the batch. */
static void run_batch(kvf__replicator *r, rep_item *b, size_t n)
{
    rep_job *jb = r->jobs;
    size_t nj = 0;
    for (size_t i = 0; i < n; i++) {
        b[i].n_made = 0;
        b[i].n_left = b[i].n_peer;
        for (uint32_t k = 0; k < b[i].n_peer; k++)
            jb[nj++] = (rep_job){.it = &b[i], .ns = b[i].ns, .peer = b[i].peer[k]};
    }
    int made[PUSH_BATCH_MAX];
    size_t done = 0;
    while (done < nj) {
        /* the jobs like the first left: same target, same namespace, moved to the front */
        size_t g = 0;
        for (size_t i = done; i < nj && g < PUSH_BATCH_MAX; i++) {
            if (jb[i].peer != jb[done].peer || jb[i].ns != jb[done].ns)
                continue;
            rep_job t = jb[done + g];
            jb[done + g] = jb[i];
            jb[i] = t;
            g++;
        }
        char addr[KVF_REP_ADDR];
        pthread_mutex_lock(&r->mu);
        int skip = live_addr_locked(r, jb[done].peer, addr, sizeof addr);
        pthread_mutex_unlock(&r->mu);
        if (skip)
            memset(made, 0, g * sizeof *made); /* the target left or is down: asked again later */
        else
            push(r, addr, jb + done, g, made);
        kvf__cache_lock(r->cache);
        for (size_t i = 0; i < g; i++) {
            rep_item *it = jb[done + i].it;
            it->n_made += made[i] != 0;
            if (--it->n_left == 0) {
                kvf__cache_replicate_done_locked(r->cache, it->eid, it->n_made == it->n_peer);
                kvf__cache_release_locked(r->cache, it->eid);
            }
        }
        kvf__cache_unlock(r->cache);
        done += g;
    }
}

static void *worker(void *arg)
{
    kvf__replicator *r = arg;
    rep_item *b = r->wb;
    pthread_mutex_lock(&r->mu);
    while (!r->stop) {
        if (!r->nq) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_sec += 1;
            pthread_cond_timedwait(&r->cv, &r->mu, &ts);
            continue;
        }
        size_t n = r->nq;
        memcpy(b, r->q, n * sizeof *b);
        r->nq = 0;
        pthread_mutex_unlock(&r->mu);
        run_batch(r, b, n);
        pthread_mutex_lock(&r->mu);
    }
    pthread_mutex_unlock(&r->mu);
    return NULL;
}

void kvf__replicator_set_peers(kvf__replicator *r, const char *const *peers, size_t n)
{
    pthread_mutex_lock(&r->mu);
    rep_peer old[KVF_REP_MAX_PEERS];
    size_t n_old = r->n_peers;
    memcpy(old, r->peers, n_old * sizeof *old);
    r->n_peers = 0;
    for (size_t i = 0; i < n && r->n_peers < KVF_REP_MAX_PEERS; i++) {
        uint64_t seed = peers[i] ? seed_of(peers[i]) : 0;
        if (!seed || seed == r->self_seed || strlen(peers[i]) >= KVF_REP_ADDR)
            continue;
        rep_peer *p = &r->peers[r->n_peers++];
        *p = (rep_peer){.seed = seed};
        snprintf(p->addr, sizeof p->addr, "%s", peers[i]);
        for (size_t k = 0; k < n_old; k++) /* a peer that stays keeps its back-off */
            if (old[k].seed == seed)
                p->down_until_ns = old[k].down_until_ns, p->warned = old[k].warned;
    }
    pthread_mutex_unlock(&r->mu);
}

int kvf__replicator_open(kvf__replicator **out, const kvf__replicate_opts *o, char *err,
                         size_t errlen)
{
    *out = NULL;
    if (!o->cache || !o->self || !o->hits || o->hits > 255 || o->copies > KVF_REP_MAX_COPIES) {
        snprintf(err, errlen,
                 "replication: needs a cache, this node's address, 1..255 reads and 1..%d copies",
                 KVF_REP_MAX_COPIES);
        return KVF_EINVAL;
    }
    uint64_t self = seed_of(o->self);
    if (!self) {
        snprintf(err, errlen, "replication: this node's address \"%s\" is not host:port", o->self);
        return KVF_EINVAL;
    }
    for (size_t i = 0; i < o->n_peers; i++)
        if (!o->peers[i] || !seed_of(o->peers[i])) {
            snprintf(err, errlen, "replication: peer \"%s\" is not host:port",
                     o->peers[i] ? o->peers[i] : "");
            return KVF_EINVAL;
        }
    kvf__replicator *r = calloc(1, sizeof *r);
    if (!r)
        return KVF_ENOMEM;
    r->cap = o->queue ? o->queue : 4096;
    r->copies = o->copies ? o->copies : 1;
    r->q = calloc(r->cap, sizeof *r->q);
    r->wb = calloc(r->cap, sizeof *r->wb);
    r->jobs = calloc(r->cap * r->copies, sizeof *r->jobs);
    r->peers = calloc(KVF_REP_MAX_PEERS, sizeof *r->peers);
    if (!r->q || !r->wb || !r->jobs || !r->peers) {
        free(r->q);
        free(r->wb);
        free(r->jobs);
        free(r->peers);
        free(r);
        return KVF_ENOMEM;
    }
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    r->cache = o->cache;
    r->self_seed = self;
    r->deadline_ms = o->deadline_ms > 0 ? o->deadline_ms : 3000;
    r->hits = o->hits;
    r->log = o->log;
    snprintf(r->credential, sizeof r->credential, "%s", o->credential ? o->credential : "");
    kvf__replicator_set_peers(r, o->peers, o->n_peers);
    if (kvf__thread_start(&r->th, worker, r) != 0) {
        snprintf(err, errlen, "replication: no worker thread could start");
        kvf__replicator_close(&r);
        return KVF_EAGAIN;
    }
    r->started = 1;
    kvf__cache_set_replicate_hook(r->cache, on_hot, r, o->hits);
    *out = r;
    return 0;
}

void kvf__replicator_stats(kvf__replicator *r, kvf__replicate_stats *st)
{
    pthread_mutex_lock(&r->mu);
    *st = r->st;
    st->hits = r->hits;
    st->copies = r->copies;
    st->peers = r->n_peers;
    st->peers_down = 0;
    uint64_t now = kvf__now_ns();
    for (size_t i = 0; i < r->n_peers; i++)
        st->peers_down += r->peers[i].down_until_ns > now;
    pthread_mutex_unlock(&r->mu);
}

void kvf__replicator_close(kvf__replicator **rp)
{
    kvf__replicator *r = rp ? *rp : NULL;
    if (!r)
        return;
    *rp = NULL;
    kvf__cache_set_replicate_hook(r->cache, NULL, NULL, 0); /* no entry is queued after this */
    pthread_mutex_lock(&r->mu);
    r->stop = 1;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
    if (r->started)
        pthread_join(r->th, NULL);
    kvf__cache_lock(r->cache); /* what still waited: no replica, references dropped */
    for (size_t i = 0; i < r->nq; i++) {
        kvf__cache_replicate_done_locked(r->cache, r->q[i].eid, 0);
        kvf__cache_release_locked(r->cache, r->q[i].eid);
    }
    kvf__cache_unlock(r->cache);
    pthread_cond_destroy(&r->cv);
    pthread_mutex_destroy(&r->mu);
    free(r->q);
    free(r->wb);
    free(r->jobs);
    free(r->peers);
    free(r);
}
