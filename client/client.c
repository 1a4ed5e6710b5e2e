/*
 * The storage client (include/kvf/client.h).
 *
 * Structure: an op is one user call; it is split into requests, one per (node, stripe), each
 * carried by one connection. A connection holds a send queue (requests with bytes left to write)
 * and an in-flight list (requests waiting for their reply). One I/O thread owns every connection
 * and drives them with a poller; user threads only submit ops through a locked queue and a wake
 * pipe, and wait on the op's condition variable.
 *
 * Replies are read by a chain of read targets: each step names where the next bytes go (a header
 * buffer, a reply table, the caller's object buffer, or nowhere) and what to do once they are in,
 * so object bytes land in the caller's buffer with no copy. A put is two-phase: ADMIT asks the
 * node to reserve room for each key and says which keys it already has; COMMIT then sends only the
 * reserved objects, on the same connection (reservations belong to the connection).
 *
 * Placement is rendezvous hashing ("A name-based mapping scheme for rendezvous", Thaler and
 * Ravishankar, 1996): a key goes to the node with the highest hash(key, node).
 */
#include "kvf/client.h"
#include "kvf/error.h"

#include "bytes.h"
#include "hash.h"
#include "client_int.h"
#include "clock.h"
#include "kvf/object.h"
#include "poller.h"
#include "tcp.h"
#include "wire.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_CONNS_PER_NODE 16
#define SCRATCH_BYTES      (1u << 20)
#define HASH_CHUNK         (256u << 10)
#define MAX_ERR_TEXT       4096u
#define BACKOFF_MIN_NS     100000000ull
#define BACKOFF_MAX_NS     2000000000ull

enum { OPK_PUT, OPK_GET, OPK_CTRL };
enum { CS_DOWN, CS_UP };

typedef struct creq creq;
typedef struct cconn cconn;
typedef struct node node;

struct kvf_op {
    kvf_client *cl;
    struct kvf_op *next_active, *prev_active;
    int kind;
    uint32_t opcode;
    kvf_batch b;
    uint64_t deadline_ns;
    int pending;          /* requests not yet finished */
    int completing;       /* all requests finished; signalled at the end of the I/O iteration */
    atomic_int done_flag; /* mirrors done, readable without the mutex */
    struct kvf_op *next_completed;
    int target; /* control ops: -1 by placement, -2 every node, else one node */
    int done;
    int result;
    int freed_by_cb;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    const char *transport; /* "tcp" or "rdma": how its bytes moved */
    /* raw control requests (client_priv.h): the payload sent, the reply payload received */
    const uint8_t *raw_req;
    size_t raw_len;
    uint32_t raw_count;
    uint8_t *raw_rep;
    size_t raw_rep_len;
    int conn; /* control ops: the node's connection to use; -1: the next in turn */
    /* control extras */
    uint32_t lease_ms, codec;
    uint8_t *present;
    uint64_t removed;
    char *json;
    char addr[KVF_WIRE_MAX_ADDR + 1];
    int leading_mode;
    /* streamed get */
    uint32_t layers; /* layer count once a header arrived */
    uint32_t layers_fired;
    creq **reqs; /* every request of the op, for the layer frontier */
    int n_reqs;
};

struct creq {
    creq *next;
    kvf_op *op;
    cconn *cn;
    uint32_t opcode;
    uint32_t flags;
    uint64_t id;
    uint32_t n;
    uint32_t *idx; /* op item indices */
    uint8_t *buf;  /* header + payload built for sending */
    struct iovec *iov;
    int iovcnt, first;
    int sending; /* some bytes written */
    int finished;
    int phase;            /* put: 0 admit, 1 commit */
    uint32_t *commit_map; /* commit: request item -> index into idx */
    uint32_t n_commit;
    /* reply state */
    uint8_t *rtab;
    uint64_t rtab_len;
    uint32_t item;  /* GET: current item */
    uint32_t layer; /* stream: frames seen after the first */
    uint32_t layers_delivered;
    uint64_t *segoff;   /* stream: running offset in each item's buffer */
    kvf_obj_info *info; /* stream: parsed headers */
    kvf_obj_info cur;   /* plain GET: the current item's header */
    uint32_t cur_seg;
    uint64_t cur_off, cur_len;
    uint64_t seg_start; /* plain GET: where the current segment starts in the object */
    int cur_state;      /* plain GET: 0 header pending, 1 in segments, 2 failed */
};

struct cconn {
    node *nd;
    int idx;
    int fd;
    int state;
    uint64_t retry_at;
    uint64_t backoff;
    creq *sq_head, *sq_tail; /* to send */
    creq *fl_head, *fl_tail; /* in flight */
    uint32_t events;
    /* reply reader */
    uint8_t hdr[KVF_WIRE_HEADER_LEN];
    kvf_wire_hdr h;
    creq *rreq;
    uint8_t *rdst;
    uint64_t rleft;
    int (*on_read)(cconn *cn);
    int hashing; /* hash bytes as they arrive into rdst (segment checksums) */
    /* Called with each run of bytes as it lands in rdst (plain GET objects): parses and hashes
     * while the bytes are in cache, without splitting the reads. */
    void (*on_bytes)(cconn *cn, size_t n);
    XXH3_state_t *xs; /* allocated once per connection */
    kvf_lowat lowat;  /* receive low-water mark of fd */
    char errtext[MAX_ERR_TEXT];
    uint64_t bytes_pending_items;
};

struct node {
    char host[256];
    uint16_t port;
    char addr[280];
    uint64_t seed;
    cconn conns[MAX_CONNS_PER_NODE];
    atomic_int rr; /* next connection to stripe onto */
    /* what HELLO said: capabilities and the RDMA port (0: none) */
    atomic_uint_fast64_t caps;
    atomic_uint rdma_port;
};

struct kvf_client {
    kvf_client_opts o;
    node *nodes;
    size_t n_nodes;
    int conns;
    kvf_poller *poller;
    int wake[2];
    pthread_t th;
    int stop;
    pthread_mutex_t mu; /* guards the submit queue and stop */
    creq *subq_head, *subq_tail;
    kvf_op *active;
    kvf_op *completed; /* completed on this iteration: signalled at its end */
    atomic_uint_fast64_t next_id;
    uint8_t *scratch;
    pthread_mutex_t cmu; /* counters */
    kvf_client_counters counters;
    kvf__crdma *rd; /* the RDMA data path, or NULL: every transfer is TCP */
    char transport_why[240];
    /* I/O threads: shards[0] is this client; the others are clients of their own, each with its
     * share of the connections, that large gets and puts are split across */
    kvf_client *shards[KVF_CLIENT_MAX_SHARDS];
    int n_shards;
};

static const char wake_byte = 'w';

/* ------------------------------------------------------------------------------------------ */
/* Placement */

size_t kvf_client_node_of(const kvf_client *c, const kvf_key *key)
{
    size_t best = 0;
    uint64_t bs = 0;
    for (size_t i = 0; i < c->n_nodes; i++) {
        uint64_t s = kvf__fmix64(key->lo ^ kvf__fmix64(key->hi ^ c->nodes[i].seed));
        if (i == 0 || s > bs) {
            bs = s;
            best = i;
        }
    }
    return best;
}

size_t kvf_client_node_count(const kvf_client *c)
{
    return c->n_nodes;
}

/* ------------------------------------------------------------------------------------------ */
/* Ops and requests */

static void count_failed(kvf_client *c, uint64_t n)
{
    pthread_mutex_lock(&c->cmu);
    c->counters.failed_keys += n;
    pthread_mutex_unlock(&c->cmu);
}

static void req_free(creq *r)
{
    if (!r)
        return;
    free(r->idx);
    free(r->buf);
    free(r->iov);
    free(r->commit_map);
    free(r->rtab);
    free(r->segoff);
    free(r->info);
    free(r);
}

static void fire_layers(kvf_op *op, uint32_t upto)
{
    while (op->layers_fired < upto && op->layers_fired < op->layers) {
        if (op->b.layer_cb)
            op->b.layer_cb(op, op->layers_fired, op->b.ud);
        op->layers_fired++;
    }
}

/* The layer frontier of a streamed get: the fewest layers any unfinished request delivered. */
static void stream_progress(kvf_op *op)
{
    uint32_t lo = UINT32_MAX;
    for (int i = 0; i < op->n_reqs; i++) {
        creq *r = op->reqs[i];
        if (r && !r->finished && r->layers_delivered < lo)
            lo = r->layers_delivered;
    }
    fire_layers(op, lo);
}

static void op_complete(kvf_op *op)
{
    kvf_client *c = op->cl;
    if (op->prev_active)
        op->prev_active->next_active = op->next_active;
    else if (c->active == op)
        c->active = op->next_active;
    if (op->next_active)
        op->next_active->prev_active = op->prev_active;
    op->next_active = op->prev_active = NULL;
    if (op->kind == OPK_GET && (op->b.flags & KVF_GET_STREAM))
        fire_layers(op, UINT32_MAX);
    for (int i = 0; i < op->n_reqs; i++) {
        req_free(op->reqs[i]);
        op->reqs[i] = NULL;
    }
    /* Waiters and callbacks may free op: they run only once the I/O thread has finished the
     * current iteration and holds no pointer into it (flush_completed). */
    op->completing = 1;
    op->next_completed = c->completed;
    c->completed = op;
}

/* Marks op done and runs its callback or wakes its waiter. */
static void op_signal(kvf_op *op)
{
    kvf_op_cb cb = op->b.cb;
    void *ud = op->b.ud;
    int result = op->result;
    if (cb) {
        /* With a callback the caller may free op inside it; nobody waits on it. */
        pthread_mutex_lock(&op->mu);
        op->done = 1;
        pthread_mutex_unlock(&op->mu);
        cb(op, result, ud);
        return;
    }
    pthread_mutex_lock(&op->mu);
    op->done = 1;
    atomic_store_explicit(&op->done_flag, 1, memory_order_release);
    pthread_cond_broadcast(&op->cv);
    pthread_mutex_unlock(&op->mu);
}

static void flush_completed(kvf_client *c)
{
    while (c->completed) {
        kvf_op *op = c->completed;
        c->completed = op->next_completed;
        op_signal(op);
    }
}

/* Marks a request finished; its items already carry their statuses. */
static void req_finish(creq *r)
{
    if (r->finished)
        return;
    r->finished = 1;
    kvf_op *op = r->op;
    if (op->kind == OPK_GET && (op->b.flags & KVF_GET_STREAM))
        stream_progress(op);
    if (--op->pending == 0)
        op_complete(op);
}

/* Fails every item of r that has no final status yet, then finishes it. */
static void req_fail(creq *r, int status)
{
    kvf_op *op = r->op;
    uint64_t failed = 0;
    /* A plain GET's items before the current one are complete and verified: they stand. */
    uint32_t from = (op->kind == OPK_GET && !(op->b.flags & KVF_GET_STREAM)) ? r->item : 0;
    for (uint32_t i = from; i < r->n; i++) {
        int *st = &op->b.status[r->idx[i]];
        if (op->kind == OPK_CTRL || *st == 0 || *st == 1) {
            *st = status;
            failed++;
        }
    }
    if (op->kind == OPK_CTRL && op->b.n == 0 && op->result == 0)
        op->result = status;
    count_failed(op->cl, failed);
    req_finish(r);
}

/* ------------------------------------------------------------------------------------------ */
/* Connections */

static void cn_set_events(kvf_client *c, cconn *cn)
{
    if (cn->fd < 0)
        return;
    uint32_t ev = KVF_POLL_IN;
    if (cn->sq_head)
        ev |= KVF_POLL_OUT;
    if (ev != cn->events) {
        kvf__poller_mod(c->poller, cn->fd, ev, cn);
        cn->events = ev;
    }
}

static void q_push(creq **h, creq **t, creq *r)
{
    r->next = NULL;
    if (*t)
        (*t)->next = r;
    else
        *h = r;
    *t = r;
}

/* Closes the connection and fails every request on it. */
static void cn_reset(kvf_client *c, cconn *cn, int status)
{
    if (cn->fd >= 0) {
        kvf__poller_del(c->poller, cn->fd);
        close(cn->fd);
        cn->fd = -1;
    }
    uint64_t t = kvf__now_ns();
    cn->backoff = cn->backoff ? cn->backoff * 2 : BACKOFF_MIN_NS;
    if (cn->backoff > BACKOFF_MAX_NS)
        cn->backoff = BACKOFF_MAX_NS;
    cn->retry_at = status == KVF_ECONNREFUSED || status == KVF_ETIMEDOUT ? t + cn->backoff : t;
    cn->state = CS_DOWN;
    cn->events = 0;
    cn->rreq = NULL;
    creq *lists[2] = {cn->fl_head, cn->sq_head};
    cn->fl_head = cn->fl_tail = cn->sq_head = cn->sq_tail = NULL;
    for (int k = 0; k < 2; k++) {
        for (creq *r = lists[k]; r;) {
            creq *next = r->next;
            r->next = NULL;
            req_fail(r, status);
            r = next;
        }
    }
}

static int cn_connect(kvf_client *c, cconn *cn);
static int cn_write(kvf_client *c, cconn *cn);
static void send_hello(kvf_client *c, cconn *cn);

/* Queues r on its connection, connecting first if needed. */
static void cn_submit(kvf_client *c, creq *r)
{
    cconn *cn = r->cn;
    if (cn->state == CS_DOWN) {
        if (kvf__now_ns() < cn->retry_at) {
            req_fail(r, KVF_ECONNREFUSED);
            return;
        }
        if (cn_connect(c, cn) != 0) {
            req_fail(r, KVF_ECONNREFUSED);
            return;
        }
    }
    q_push(&cn->sq_head, &cn->sq_tail, r);
    /* Write now rather than on the next poll round: a small request leaves at once. */
    if (cn_write(c, cn) != 0)
        cn_reset(c, cn, KVF_ECONNRESET);
}

/* ------------------------------------------------------------------------------------------ */
/* Building frames */

static creq *req_new(kvf_op *op, cconn *cn, uint32_t opcode, uint32_t n)
{
    creq *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->idx = calloc(n ? n : 1, sizeof *r->idx);
    if (!r->idx) {
        free(r);
        return NULL;
    }
    r->op = op;
    r->cn = cn;
    r->opcode = opcode;
    return r;
}

static void put_hdr(uint8_t *p, uint32_t opcode, uint32_t flags, uint64_t id, uint32_t n,
                    uint64_t payload)
{
    kvf_wire_hdr h = {.version = KVF_WIRE_VERSION,
                      .opcode = (uint16_t)opcode,
                      .flags = flags,
                      .request_id = id,
                      .item_count = n,
                      .payload_len = payload};
    kvf__wire_hdr_encode(p, &h);
}

/* Builds r's frame: header plus payload in r->buf, plus object iovecs for COMMIT. */
static int req_build(kvf_client *c, creq *r)
{
    kvf_op *op = r->op;
    uint32_t n = r->n;
    uint64_t ns = c->o.ns;
    size_t plen = 0;
    uint32_t flags = 0;
    r->id = atomic_fetch_add(&c->next_id, 1) + 1;
    free(r->buf);
    free(r->iov);
    r->buf = NULL;
    r->iov = NULL;
    if (op->raw_req) {
        /* A raw control request: the payload is the caller's, whole. */
        r->buf = malloc(KVF_WIRE_HEADER_LEN + op->raw_len);
        r->iov = calloc(1, sizeof *r->iov);
        if (!r->buf || !r->iov)
            return KVF_ENOMEM;
        memcpy(r->buf + KVF_WIRE_HEADER_LEN, op->raw_req, op->raw_len);
        put_hdr(r->buf, r->opcode, 0, r->id, op->raw_count, op->raw_len);
        r->flags = 0;
        r->iov[0] = (struct iovec){r->buf, KVF_WIRE_HEADER_LEN + op->raw_len};
        r->iovcnt = 1;
        r->first = 0;
        r->sending = 0;
        return 0;
    }
    switch (r->opcode) {
    case KVF_OP_COMMIT:
        plen = kvf__wire_put_table_len(r->n_commit);
        break;
    case KVF_OP_ADMIT:
        plen = 8 + 24 * (size_t)n;
        break;
    case KVF_OP_PIN:
    case KVF_OP_COMPRESS:
        plen = 16 + 16 * (size_t)n;
        break;
    case KVF_OP_COPY:
        plen = 16 + ((strlen(op->addr) + 7) & ~(size_t)7) + 16 * (size_t)n;
        break;
    case KVF_OP_CLEAR:
        plen = 8;
        break;
    case KVF_OP_STATS:
        plen = 0;
        break;
    case KVF_OP_HELLO:
        plen = 24;
        break;
    default:
        plen = 8 + 16 * (size_t)n;
    }
    r->buf = calloc(1, KVF_WIRE_HEADER_LEN + plen);
    int niov = 1 + (r->opcode == KVF_OP_COMMIT ? (int)r->n_commit : 0);
    r->iov = calloc((size_t)niov, sizeof *r->iov);
    if (!r->buf || !r->iov)
        return KVF_ENOMEM;
    uint8_t *p = r->buf + KVF_WIRE_HEADER_LEN;
    uint64_t data = 0;
    uint32_t count = n;
    if (r->opcode == KVF_OP_HELLO) {
        kvf__put_u32(p, KVF_WIRE_VERSION);
        kvf__put_u32(p + 4, KVF_WIRE_VERSION);
        kvf__put_u64(p + 8, ns);
        kvf__put_u64(p + 16, KVF_CAP_ALL);
        count = 0;
    } else if (r->opcode == KVF_OP_STATS) {
        count = 0;
    } else if (r->opcode == KVF_OP_CLEAR) {
        kvf__put_u64(p, ns);
        count = 0;
    } else if (r->opcode == KVF_OP_COMMIT) {
        kvf__put_u64(p, ns);
        for (uint32_t i = 0; i < r->n_commit; i++) {
            uint32_t k = r->idx[r->commit_map[i]];
            kvf__wire_key_put(p + 8 + 24 * (size_t)i, &op->b.keys[k]);
            kvf__put_u64(p + 8 + 24 * (size_t)i + 16, op->b.lens[k]);
            r->iov[1 + i].iov_base = (void *)op->b.objs[k];
            r->iov[1 + i].iov_len = op->b.lens[k];
            data += op->b.lens[k];
        }
        count = r->n_commit;
    } else {
        kvf__put_u64(p, ns);
        uint8_t *keys = p + 8;
        size_t stride = 16;
        if (r->opcode == KVF_OP_PIN || r->opcode == KVF_OP_COMPRESS) {
            kvf__put_u32(p + 8, r->opcode == KVF_OP_PIN ? op->lease_ms : op->codec);
            keys = p + 16;
        } else if (r->opcode == KVF_OP_COPY) {
            uint32_t alen = (uint32_t)strlen(op->addr);
            kvf__put_u32(p + 8, alen);
            uint64_t left = op->deadline_ns > kvf__now_ns() ? op->deadline_ns - kvf__now_ns() : 1;
            kvf__put_u32(p + 12, (uint32_t)(left / 1000000u) + 1);
            memcpy(p + 16, op->addr, alen);
            keys = p + 16 + ((alen + 7) & ~7u);
        } else if (r->opcode == KVF_OP_ADMIT) {
            stride = 24;
        }
        for (uint32_t i = 0; i < n; i++) {
            uint32_t k = r->idx[i];
            kvf__wire_key_put(keys + stride * i, &op->b.keys[k]);
            if (r->opcode == KVF_OP_ADMIT)
                kvf__put_u64(keys + stride * i + 16, op->b.lens[k]);
        }
        if (r->opcode == KVF_OP_GET && (op->b.flags & KVF_GET_STREAM))
            flags |= KVF_WF_STREAM;
    }
    put_hdr(r->buf, r->opcode, flags, r->id, count, plen + data);
    r->flags = flags;
    r->iov[0].iov_base = r->buf;
    r->iov[0].iov_len = KVF_WIRE_HEADER_LEN + plen;
    r->iovcnt = niov;
    r->first = 0;
    r->sending = 0;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Reply reading */

static int rd_header(cconn *cn);

static void rd_expect(cconn *cn, void *dst, uint64_t len, int (*fn)(cconn *))
{
    cn->rdst = dst;
    cn->rleft = len;
    cn->on_read = fn;
    cn->hashing = 0;
    cn->on_bytes = NULL;
}

/* As rd_expect, hashing the bytes as they land, while they are still in cache; the handler
 * compares XXH3_64bits_digest(cn->xs) with the expected checksum. */
static void rd_expect_hashed(cconn *cn, void *dst, uint64_t len, int (*fn)(cconn *))
{
    rd_expect(cn, dst, len, fn);
    if (dst) {
        XXH3_64bits_reset(cn->xs);
        cn->hashing = 1;
    }
}

static void rd_next_frame(cconn *cn)
{
    cn->rreq = NULL;
    rd_expect(cn, cn->hdr, KVF_WIRE_HEADER_LEN, rd_header);
}

static void fl_remove(cconn *cn, creq *r)
{
    creq **pp = &cn->fl_head;
    creq *prev = NULL;
    while (*pp && *pp != r) {
        prev = *pp;
        pp = &(*pp)->next;
    }
    if (!*pp)
        return;
    *pp = r->next;
    if (cn->fl_tail == r)
        cn->fl_tail = prev;
    r->next = NULL;
}

/* The reply to r is complete: take it off the in-flight list and finish it. */
static void reply_done(cconn *cn, creq *r)
{
    fl_remove(cn, r);
    rd_next_frame(cn);
    req_finish(r);
}

static int rd_errtext(cconn *cn)
{
    creq *r = cn->rreq;
    int status = cn->h.status;
    int fatal = (cn->h.flags & KVF_WF_FATAL) != 0;
    fl_remove(cn, r);
    rd_next_frame(cn);
    req_fail(r, status);
    return fatal ? KVF_EPROTO : 0;
}

static int rd_hello(cconn *cn)
{
    creq *r = cn->rreq;
    uint32_t ver = kvf__get_u32(r->rtab);
    if (ver != KVF_WIRE_VERSION)
        return KVF_EVERSION;
    atomic_store(&cn->nd->caps, kvf__get_u64(r->rtab + 8));
    atomic_store(&cn->nd->rdma_port, kvf__get_u32(r->rtab + 40) & 0xffffu);
    cn->state = CS_UP;
    cn->backoff = 0;
    reply_done(cn, r);
    return 0;
}

/* Per-key status replies: ADMIT, COMMIT, EVICT, PIN, UNPIN, COMPRESS, COPY. */
static int rd_statuses(cconn *cn)
{
    creq *r = cn->rreq;
    kvf_op *op = r->op;
    kvf_client *c = op->cl;
    uint32_t n = r->opcode == KVF_OP_COMMIT ? r->n_commit : r->n;
    for (uint32_t i = 0; i < n; i++) {
        int st = (int)(int32_t)kvf__get_u32(r->rtab + 4 * (size_t)i);
        if (!kvf_err_is_known(st))
            return KVF_EPROTO;
        uint32_t k = r->opcode == KVF_OP_COMMIT ? r->idx[r->commit_map[i]] : r->idx[i];
        op->b.status[k] = st;
    }
    if (r->opcode != KVF_OP_ADMIT) {
        reply_done(cn, r);
        return 0;
    }
    /* Admit answered: commit what was reserved, on this connection. Keys the node already has
     * are done (KVF_EEXIST); keys it refused keep their error. */
    uint32_t m = 0;
    r->commit_map = calloc(r->n ? r->n : 1, sizeof *r->commit_map);
    if (!r->commit_map)
        return KVF_ENOMEM;
    for (uint32_t i = 0; i < r->n; i++) {
        if (op->b.status[r->idx[i]] == 0) {
            op->b.status[r->idx[i]] = 1; /* reserved, not yet committed */
            r->commit_map[m++] = i;
        }
    }
    fl_remove(cn, r);
    rd_next_frame(cn);
    if (m == 0) {
        req_finish(r);
        return 0;
    }
    r->n_commit = m;
    r->opcode = KVF_OP_COMMIT;
    r->phase = 1;
    int rc = req_build(c, r);
    if (rc) {
        req_fail(r, rc);
        return 0;
    }
    q_push(&cn->sq_head, &cn->sq_tail, r);
    cn_set_events(c, cn);
    return 0;
}

static int rd_bitmap(cconn *cn)
{
    creq *r = cn->rreq;
    kvf_op *op = r->op;
    size_t off = r->opcode == KVF_OP_LOOKUP ? 8 : 0;
    for (uint32_t i = 0; i < r->n; i++) {
        int hit = (r->rtab[off + i / 8] >> (i % 8)) & 1;
        op->present[r->idx[i]] = (uint8_t)hit;
        op->b.status[r->idx[i]] = hit ? 0 : KVF_ENOENT;
    }
    reply_done(cn, r);
    return 0;
}

static int rd_clear(cconn *cn)
{
    creq *r = cn->rreq;
    r->op->removed += kvf__get_u64(r->rtab);
    reply_done(cn, r);
    return 0;
}

/* Raw control replies (RDMA descriptors): the payload goes to the op whole. */
static int rd_raw(cconn *cn)
{
    creq *r = cn->rreq;
    kvf_op *op = r->op;
    free(op->raw_rep);
    op->raw_rep = r->rtab;
    op->raw_rep_len = r->rtab_len;
    r->rtab = NULL;
    reply_done(cn, r);
    return 0;
}

static int rd_stats(cconn *cn)
{
    creq *r = cn->rreq;
    kvf_op *op = r->op;
    free(op->json);
    op->json = malloc(r->rtab_len + 1);
    if (!op->json)
        return KVF_ENOMEM;
    memcpy(op->json, r->rtab, r->rtab_len);
    op->json[r->rtab_len] = '\0';
    reply_done(cn, r);
    return 0;
}

/* GET, not streamed: the table, then each hit's object into its buffer: the fixed header, the
 * rest of the header, then each segment, hashed as it arrives and checked against the header. */
static int rd_get_start_item(cconn *cn);

static uint64_t item_len(const creq *r, uint32_t i)
{
    return kvf__get_u64(r->rtab + 16 * (size_t)i + 8);
}

static void item_fail(creq *r, int status)
{
    kvf_op *op = r->op;
    op->b.status[r->idx[r->item]] = status;
    count_failed(op->cl, 1);
}

static int rd_get_item_end(cconn *cn)
{
    creq *r = cn->rreq;
    r->item++;
    return rd_get_start_item(cn);
}

/* Consumes the n bytes of the current object that just landed at offset cur_off of its buffer:
 * parses the header once it is complete, then hashes segment by segment and checks each
 * checksum at its end. A failure stops the work; the rest of the object still lands, unused. */
static void get_item_bytes(cconn *cn, size_t n)
{
    creq *r = cn->rreq;
    kvf_op *op = r->op;
    uint32_t k = r->idx[r->item];
    uint8_t *buf = op->b.bufs[k];
    uint64_t pos = r->cur_off, end = r->cur_off + n;
    r->cur_off = end;
    while (pos < end && r->cur_state != 2) {
        if (r->cur_state == 0) {
            if (end < 64)
                return;
            uint32_t layers = kvf__get_u32(buf + 36);
            uint32_t hlen = kvf_obj_header_len(layers);
            if (layers == 0 || layers > KVF_OBJ_MAX_LAYERS || hlen > r->cur_len) {
                r->cur_state = 2;
                return;
            }
            if (end < hlen)
                return;
            if (kvf_obj_parse(buf, hlen, &r->cur) != 0 ||
                r->cur.header_len + r->cur.stored_bytes != r->cur_len ||
                !kvf_key_eq(&r->cur.key, &op->b.keys[k])) {
                r->cur_state = 2;
                return;
            }
            r->cur_state = 1;
            r->cur_seg = 0;
            r->seg_start = hlen;
            pos = hlen;
            XXH3_64bits_reset(cn->xs);
            continue;
        }
        kvf_obj_seg sg = kvf_obj_seg_at(&r->cur, r->cur_seg);
        uint64_t seg_end = r->seg_start + sg.stored_len;
        uint64_t take = (end < seg_end ? end : seg_end) - pos;
        kvf__xxh3_update(cn->xs, buf + pos, take);
        pos += take;
        if (pos == seg_end) {
            if (XXH3_64bits_digest(cn->xs) != sg.stored_xxh) {
                r->cur_state = 2;
                return;
            }
            r->cur_seg++;
            r->seg_start = seg_end;
            XXH3_64bits_reset(cn->xs);
        }
    }
}

static int rd_get_item_done(cconn *cn)
{
    creq *r = cn->rreq;
    kvf_op *op = r->op;
    uint32_t k = r->idx[r->item];
    if (r->cur_state == 1 && r->cur_seg == r->cur.layers) {
        op->b.status[k] = 0;
        if (op->b.out_lens)
            op->b.out_lens[k] = r->cur_len;
    } else {
        item_fail(r, KVF_ECHECKSUM);
    }
    return rd_get_item_end(cn);
}

static int rd_get_start_item(cconn *cn)
{
    creq *r = cn->rreq;
    kvf_op *op = r->op;
    while (r->item < r->n) {
        uint32_t i = r->item;
        int st = (int)(int32_t)kvf__get_u32(r->rtab + 16 * (size_t)i);
        uint64_t len = item_len(r, i);
        uint32_t k = r->idx[i];
        op->b.status[k] = st;
        if (st != 0) {
            r->item++;
            continue;
        }
        r->cur_len = len;
        r->cur_off = 0;
        if (len > op->b.caps[k]) {
            op->b.status[k] = KVF_E2BIG;
            rd_expect(cn, NULL, len, rd_get_item_end);
        } else if (len < 72) {
            item_fail(r, KVF_ECHECKSUM);
            rd_expect(cn, NULL, len, rd_get_item_end);
        } else {
            /* Until its last segment verifies, the item is not a hit. */
            op->b.status[k] = 1;
            r->cur_state = 0;
            rd_expect(cn, op->b.bufs[k], len, rd_get_item_done);
            cn->on_bytes = get_item_bytes;
        }
        return 0;
    }
    reply_done(cn, r);
    return 0;
}

static int rd_get_table(cconn *cn)
{
    creq *r = cn->rreq;
    uint64_t sum = 0;
    for (uint32_t i = 0; i < r->n; i++) {
        int st = (int)(int32_t)kvf__get_u32(r->rtab + 16 * (size_t)i);
        uint64_t len = kvf__get_u64(r->rtab + 16 * (size_t)i + 8);
        if (!kvf_err_is_known(st) || (st && len) || len > cn->h.payload_len)
            return KVF_EPROTO;
        sum += len;
    }
    if (sum != cn->h.payload_len - 16 * (uint64_t)r->n)
        return KVF_EPROTO;
    r->item = 0;
    return rd_get_start_item(cn);
}

/* Streamed GET. First frame: table (status, header length, stored length) and the headers. */
static int rd_stream_hdr(cconn *cn);

static int rd_stream_next_hdr(cconn *cn)
{
    creq *r = cn->rreq;
    kvf_op *op = r->op;
    while (r->item < r->n) {
        uint32_t i = r->item;
        const uint8_t *row = r->rtab + 16 * (size_t)i;
        int st = (int)(int32_t)kvf__get_u32(row);
        uint32_t hlen = kvf__get_u32(row + 4);
        uint64_t stored = kvf__get_u64(row + 8);
        uint32_t k = r->idx[i];
        op->b.status[k] = st;
        if (st) {
            r->item++;
            continue;
        }
        if (hlen + stored > op->b.caps[k]) {
            op->b.status[k] = KVF_E2BIG;
            rd_expect(cn, NULL, hlen, rd_stream_hdr);
        } else {
            rd_expect(cn, op->b.bufs[k], hlen, rd_stream_hdr);
        }
        return 0;
    }
    /* All headers in. A reply without MORE had no hits. */
    fl_remove(cn, r);
    if (!(cn->h.flags & KVF_WF_MORE)) {
        rd_next_frame(cn);
        r->layers_delivered = UINT32_MAX;
        req_finish(r);
        return 0;
    }
    /* Keep r in flight (at the head) for its layer frames. */
    r->next = cn->fl_head;
    cn->fl_head = r;
    if (!cn->fl_tail)
        cn->fl_tail = r;
    rd_next_frame(cn);
    return 0;
}

static int rd_stream_hdr(cconn *cn)
{
    creq *r = cn->rreq;
    kvf_op *op = r->op;
    uint32_t i = r->item;
    uint32_t k = r->idx[i];
    uint32_t hlen = kvf__get_u32(r->rtab + 16 * (size_t)i + 4);
    if (op->b.status[k] == 0) {
        int rc = kvf_obj_parse(op->b.bufs[k], hlen, &r->info[i]);
        if (rc == 0 && (r->info[i].header_len != hlen ||
                        r->info[i].stored_bytes != kvf__get_u64(r->rtab + 16 * (size_t)i + 8) ||
                        !kvf_key_eq(&r->info[i].key, &op->b.keys[k])))
            rc = KVF_ECHECKSUM;
        if (rc == 0 && op->layers && r->info[i].layers != op->layers)
            rc = KVF_ELAYOUT;
        op->b.status[k] = rc;
        if (rc) {
            count_failed(op->cl, 1);
            return KVF_EPROTO; /* the layer frames' sizes can no longer be trusted */
        }
        op->layers = r->info[i].layers;
        r->segoff[i] = hlen;
    }
    r->item++;
    return rd_stream_next_hdr(cn);
}

static int rd_stream_table(cconn *cn)
{
    creq *r = cn->rreq;
    for (uint32_t i = 0; i < r->n; i++) {
        int st = (int)(int32_t)kvf__get_u32(r->rtab + 16 * (size_t)i);
        if (!kvf_err_is_known(st))
            return KVF_EPROTO;
    }
    r->info = calloc(r->n, sizeof *r->info);
    r->segoff = calloc(r->n, sizeof *r->segoff);
    if (!r->info || !r->segoff)
        return KVF_ENOMEM;
    r->item = 0;
    return rd_stream_next_hdr(cn);
}

/* Layer frames: an 8-byte prefix naming the layer, then that layer's segment of every hit. */
static int rd_layer_seg(cconn *cn);

static int rd_layer_next(cconn *cn)
{
    creq *r = cn->rreq;
    kvf_op *op = r->op;
    while (r->item < r->n) {
        uint32_t i = r->item;
        uint32_t k = r->idx[i];
        int st = (int)(int32_t)kvf__get_u32(r->rtab + 16 * (size_t)i);
        if (st) {
            r->item++;
            continue;
        }
        kvf_obj_seg sg = kvf_obj_seg_at(&r->info[i], r->layer);
        if (op->b.status[k] == 0)
            rd_expect_hashed(cn, (uint8_t *)op->b.bufs[k] + r->segoff[i], sg.stored_len,
                             rd_layer_seg);
        else
            rd_expect(cn, NULL, sg.stored_len, rd_layer_seg);
        return 0;
    }
    /* Layer complete. */
    r->layer++;
    r->layers_delivered = r->layer;
    int last = !(cn->h.flags & KVF_WF_MORE);
    if (last) {
        for (uint32_t i = 0; i < r->n; i++) {
            uint32_t k = r->idx[i];
            if (op->b.status[k] == 0 && op->b.out_lens)
                op->b.out_lens[k] = r->segoff[i];
        }
        if (r->layer != op->layers)
            return KVF_EPROTO;
        r->layers_delivered = UINT32_MAX;
        reply_done(cn, r);
        return 0;
    }
    rd_next_frame(cn);
    stream_progress(op);
    return 0;
}

static int rd_layer_seg(cconn *cn)
{
    creq *r = cn->rreq;
    kvf_op *op = r->op;
    uint32_t i = r->item;
    uint32_t k = r->idx[i];
    kvf_obj_seg sg = kvf_obj_seg_at(&r->info[i], r->layer);
    if (op->b.status[k] == 0) {
        if (XXH3_64bits_digest(cn->xs) != sg.stored_xxh) {
            op->b.status[k] = KVF_ECHECKSUM;
            count_failed(op->cl, 1);
        }
    }
    r->segoff[i] += sg.stored_len;
    r->item++;
    return rd_layer_next(cn);
}

static int rd_layer_prefix(cconn *cn)
{
    creq *r = cn->rreq;
    if (kvf__get_u32((const uint8_t *)cn->errtext) != r->layer)
        return KVF_EPROTO;
    uint64_t want = 8;
    uint32_t hits = 0;
    for (uint32_t i = 0; i < r->n; i++) {
        if (kvf__get_u32(r->rtab + 16 * (size_t)i) == 0) {
            want += kvf_obj_seg_at(&r->info[i], r->layer).stored_len;
            hits++;
        }
    }
    if (want != cn->h.payload_len || hits != cn->h.item_count)
        return KVF_EPROTO;
    r->item = 0;
    return rd_layer_next(cn);
}

static int rd_payload_into_rtab(cconn *cn, creq *r, uint64_t len, int (*fn)(cconn *))
{
    free(r->rtab);
    r->rtab = malloc(len ? len : 1);
    if (!r->rtab)
        return KVF_ENOMEM;
    r->rtab_len = len;
    rd_expect(cn, r->rtab, len, fn);
    if (len == 0)
        return fn(cn);
    return 0;
}

static int rd_header(cconn *cn)
{
    kvf_wire_limits lim = {.max_request = UINT64_MAX >> 1, .expect_reply = 1};
    int rc = kvf__wire_hdr_decode(cn->hdr, &lim, &cn->h, NULL, 0);
    if (rc)
        return KVF_EPROTO;
    creq *r = cn->fl_head;
    while (r && r->id != cn->h.request_id)
        r = r->next;
    if (!r || r->opcode != cn->h.opcode)
        return KVF_EPROTO;
    cn->rreq = r;
    if (cn->h.status < 0) {
        uint64_t len = cn->h.payload_len;
        if (len >= MAX_ERR_TEXT)
            return KVF_EPROTO;
        cn->errtext[len] = '\0';
        rd_expect(cn, cn->errtext, len, rd_errtext);
        return len == 0 ? rd_errtext(cn) : 0;
    }
    uint64_t plen = cn->h.payload_len;
    uint32_t n = r->opcode == KVF_OP_COMMIT ? r->n_commit : r->n;
    switch (r->opcode) {
    case KVF_OP_HELLO:
        return plen < 48 ? KVF_EPROTO : rd_payload_into_rtab(cn, r, plen, rd_hello);
    case KVF_OP_ADMIT:
    case KVF_OP_COMMIT:
    case KVF_OP_EVICT:
    case KVF_OP_PIN:
    case KVF_OP_UNPIN:
    case KVF_OP_COMPRESS:
    case KVF_OP_COPY:
        if (plen != 4 * (uint64_t)n || cn->h.item_count != n)
            return KVF_EPROTO;
        return rd_payload_into_rtab(cn, r, plen, rd_statuses);
    case KVF_OP_EXISTS:
    case KVF_OP_LOOKUP: {
        uint64_t want = (r->opcode == KVF_OP_LOOKUP ? 8 : 0) + (n + 7) / 8;
        if (plen != want)
            return KVF_EPROTO;
        return rd_payload_into_rtab(cn, r, plen, rd_bitmap);
    }
    case KVF_OP_CLEAR:
        return plen != 8 ? KVF_EPROTO : rd_payload_into_rtab(cn, r, plen, rd_clear);
    case KVF_OP_STATS:
        return plen > (1u << 20) ? KVF_EPROTO : rd_payload_into_rtab(cn, r, plen, rd_stats);
    case KVF_OP_RDMA_GET:
    case KVF_OP_RDMA_RELEASE:
    case KVF_OP_RDMA_RESERVE:
    case KVF_OP_RDMA_COMMIT:
        return plen > KVF_CLIENT_RAW_MAX ? KVF_EPROTO : rd_payload_into_rtab(cn, r, plen, rd_raw);
    case KVF_OP_GET:
        if (r->flags & KVF_WF_STREAM) {
            if (!r->rtab) {
                if (plen < 16 * (uint64_t)n || cn->h.item_count != n)
                    return KVF_EPROTO;
                return rd_payload_into_rtab(cn, r, 16 * (uint64_t)n, rd_stream_table);
            }
            if (plen < 8)
                return KVF_EPROTO;
            rd_expect(cn, cn->errtext, 8, rd_layer_prefix);
            return 0;
        }
        if (plen < 16 * (uint64_t)n || cn->h.item_count != n)
            return KVF_EPROTO;
        return rd_payload_into_rtab(cn, r, 16 * (uint64_t)n, rd_get_table);
    default:
        return KVF_EPROTO;
    }
}

/* Before waiting for more: a large payload's reader wakes once a large piece of it is there. */
static void cn_set_lowat(cconn *cn)
{
    kvf__sock_lowat(cn->fd, &cn->lowat, cn->rdst ? cn->rleft : 0);
}

/* Reads what the socket has and runs the read steps. Returns 0 or the error that breaks the
 * connection. */
static int cn_read(kvf_client *c, cconn *cn)
{
    uint64_t budget = 64u << 20;
    while (budget) {
        if (cn->rleft == 0) {
            int rc = cn->on_read(cn);
            if (rc)
                return rc;
            if (cn->fd < 0)
                return 0;
            if (cn->rleft == 0)
                continue;
        }
        uint8_t *dst = cn->rdst;
        size_t want = cn->rleft > budget ? budget : cn->rleft;
        /* Bytes that are hashed as they land are read in pieces that stay in the cache for the
         * hash: hashing a large read afterwards would fetch it from memory again. */
        if ((cn->hashing || cn->on_bytes) && want > HASH_CHUNK)
            want = HASH_CHUNK;
        if (!dst) {
            dst = c->scratch;
            if (want > SCRATCH_BYTES)
                want = SCRATCH_BYTES;
        }
        /* A header is only expected while a request is in flight. */
        if (cn->on_read == rd_header && !cn->fl_head)
            dst = cn->hdr;
        size_t got;
        int rc = kvf__sock_read(cn->fd, dst, want, &got);
        if (rc == KVF_EAGAIN) {
            cn_set_lowat(cn);
            return 0;
        }
        if (rc)
            return rc;
        if (got == 0)
            return KVF_ECONNRESET;
        if (cn->on_read == rd_header && !cn->fl_head)
            return KVF_EPROTO; /* bytes nobody asked for */
        pthread_mutex_lock(&c->cmu);
        c->counters.bytes_received += got;
        pthread_mutex_unlock(&c->cmu);
        budget -= got;
        if (cn->hashing)
            kvf__xxh3_update(cn->xs, cn->rdst, got);
        else if (cn->on_bytes)
            cn->on_bytes(cn, got);
        if (cn->rdst)
            cn->rdst += got;
        cn->rleft -= got;
    }
    cn_set_lowat(cn); /* the budget is spent: the poller calls again for the rest */
    return 0;
}

static int cn_write(kvf_client *c, cconn *cn)
{
    while (cn->sq_head) {
        creq *r = cn->sq_head;
        size_t done = 0;
        int rc = kvf__sock_writev(cn->fd, r->iov + r->first, r->iovcnt - r->first, &done);
        if (rc == KVF_EAGAIN)
            break;
        if (rc)
            return rc;
        r->sending = 1;
        pthread_mutex_lock(&c->cmu);
        c->counters.bytes_sent += done;
        pthread_mutex_unlock(&c->cmu);
        r->first = kvf__iov_advance(r->iov, r->iovcnt, r->first, done);
        if (r->first < r->iovcnt)
            break;
        cn->sq_head = r->next;
        if (!cn->sq_head)
            cn->sq_tail = NULL;
        q_push(&cn->fl_head, &cn->fl_tail, r);
    }
    cn_set_events(c, cn);
    return 0;
}

static void hello_done(kvf_op *op, int status, void *ud)
{
    (void)status;
    kvf_op_free(&op);
    free(ud);
}

/* Each connection opens with a HELLO that binds it to the client's namespace. It is pipelined:
 * requests queue behind it without waiting for its reply. */
static void send_hello(kvf_client *c, cconn *cn)
{
    kvf_op *op = calloc(1, sizeof *op);
    int *st = calloc(1, sizeof *st);
    creq *r = op ? req_new(op, cn, KVF_OP_HELLO, 0) : NULL;
    if (!op || !st || !r) {
        free(op);
        free(st);
        req_free(r);
        return;
    }
    op->cl = c;
    op->kind = OPK_CTRL;
    op->target = cn->nd - c->nodes;
    op->b.status = st;
    op->b.cb = hello_done;
    op->b.ud = st;
    op->pending = 1;
    op->reqs = calloc(1, sizeof *op->reqs);
    pthread_mutex_init(&op->mu, NULL);
    pthread_cond_init(&op->cv, NULL);
    if (!op->reqs || req_build(c, r) != 0) {
        req_free(r);
        free(op->reqs);
        free(op);
        free(st);
        return;
    }
    op->reqs[0] = r;
    op->n_reqs = 1;
    op->deadline_ns = UINT64_MAX;
    q_push(&cn->sq_head, &cn->sq_tail, r);
}

static int cn_connect(kvf_client *c, cconn *cn)
{
    char err[256];
    int fd;
    /* The connect itself is bounded by the connect timeout; the node is on loopback or a LAN. */
    int rc =
        kvf__tcp_connect(cn->nd->host, cn->nd->port, c->o.connect_timeout_ms, &fd, err, sizeof err);
    if (rc) {
        uint64_t t = kvf__now_ns();
        cn->backoff = cn->backoff ? cn->backoff * 2 : BACKOFF_MIN_NS;
        if (cn->backoff > BACKOFF_MAX_NS)
            cn->backoff = BACKOFF_MAX_NS;
        cn->retry_at = t + cn->backoff;
        return rc;
    }
    cn->fd = fd;
    kvf__sock_lowat_init(fd, &cn->lowat);
    cn->state = CS_UP;
    cn->events = KVF_POLL_IN;
    if (kvf__poller_add(c->poller, fd, KVF_POLL_IN, cn) != 0) {
        close(fd);
        cn->fd = -1;
        cn->state = CS_DOWN;
        return KVF_ENOMEM;
    }
    rd_next_frame(cn);
    pthread_mutex_lock(&c->cmu);
    c->counters.reconnects++;
    pthread_mutex_unlock(&c->cmu);
    send_hello(c, cn);
    cn_set_events(c, cn);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* The I/O thread */

static void op_activate(kvf_client *c, kvf_op *op)
{
    op->next_active = c->active;
    op->prev_active = NULL;
    if (c->active)
        c->active->prev_active = op;
    c->active = op;
}

static kvf_op *first_expired(kvf_client *c, uint64_t t)
{
    for (kvf_op *op = c->active; op; op = op->next_active)
        if (op->deadline_ns <= t)
            return op;
    return NULL;
}

/* Fails every request of each op past its deadline. Requests not yet written are dropped; a
 * request partly written or awaiting its reply cannot be taken back, so its connection is reset
 * (failing what else it carries). Each pass completes the op it handles, which leaves the active
 * list, so the scan restarts from the head and ends. */
static void check_deadlines(kvf_client *c)
{
    uint64_t t = kvf__now_ns();
    kvf_op *op;
    while ((op = first_expired(c, t)) != NULL) {
        for (int i = 0; i < op->n_reqs && !op->completing; i++) {
            creq *r = op->reqs[i];
            if (!r || r->finished)
                continue;
            cconn *cn = r->cn;
            if (!r->sending) {
                creq **pp = &cn->sq_head;
                creq *prev = NULL;
                while (*pp && *pp != r) {
                    prev = *pp;
                    pp = &(*pp)->next;
                }
                if (*pp) {
                    *pp = r->next;
                    if (cn->sq_tail == r)
                        cn->sq_tail = prev;
                    r->next = NULL;
                    req_fail(r, KVF_ETIMEDOUT);
                    continue;
                }
            }
            cn_reset(c, cn, KVF_ETIMEDOUT);
        }
    }
}

static int next_timeout_ms(kvf_client *c)
{
    uint64_t t = kvf__now_ns(), best = UINT64_MAX;
    for (kvf_op *op = c->active; op; op = op->next_active)
        if (op->deadline_ns < best)
            best = op->deadline_ns;
    if (best == UINT64_MAX)
        return 100;
    if (best <= t)
        return 0;
    uint64_t ms = (best - t) / 1000000u + 1;
    return ms > 100 ? 100 : (int)ms;
}

static void drain_submissions(kvf_client *c)
{
    char buf[64];
    while (read(c->wake[0], buf, sizeof buf) > 0) {
    }
    pthread_mutex_lock(&c->mu);
    creq *r = c->subq_head;
    c->subq_head = c->subq_tail = NULL;
    pthread_mutex_unlock(&c->mu);
    while (r) {
        creq *next = r->next;
        r->next = NULL;
        kvf_op *op = r->op;
        if (!op->next_active && !op->prev_active && c->active != op)
            op_activate(c, op);
        cn_submit(c, r);
        r = next;
    }
}

static void *io_main(void *arg)
{
    kvf_client *c = arg;
    static const int wake_tag = 0;
    kvf__poller_add(c->poller, c->wake[0], KVF_POLL_IN, (void *)&wake_tag);
    kvf_poll_event evs[64];
    for (;;) {
        pthread_mutex_lock(&c->mu);
        int stop = c->stop;
        pthread_mutex_unlock(&c->mu);
        if (stop)
            break;
        int n = kvf__poller_wait(c->poller, evs, 64, next_timeout_ms(c));
        for (int i = 0; i < n; i++) {
            if (evs[i].ud == &wake_tag) {
                drain_submissions(c);
                continue;
            }
            cconn *cn = evs[i].ud;
            if (cn->fd < 0)
                continue;
            int rc = 0;
            if (evs[i].events & KVF_POLL_OUT)
                rc = cn_write(c, cn);
            if (!rc && (evs[i].events & (KVF_POLL_IN | KVF_POLL_ERR)))
                rc = cn_read(c, cn);
            if (rc)
                cn_reset(c, cn, rc == KVF_EPROTO ? KVF_EPROTO : KVF_ECONNRESET);
        }
        check_deadlines(c);
        flush_completed(c);
    }
    /* Closing: fail whatever is left. */
    drain_submissions(c);
    for (size_t i = 0; i < c->n_nodes; i++)
        for (int k = 0; k < c->conns; k++)
            cn_reset(c, &c->nodes[i].conns[k], KVF_ECANCELED);
    flush_completed(c);
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Submission */

static kvf_op *op_new(kvf_client *c, int kind, uint32_t opcode, const kvf_batch *b)
{
    kvf_op *op = calloc(1, sizeof *op);
    if (!op)
        return NULL;
    op->cl = c;
    op->target = -1;
    op->conn = -1;
    op->kind = kind;
    op->opcode = opcode;
    op->b = *b;
    int dl = b->deadline_ms > 0 ? b->deadline_ms : c->o.deadline_ms;
    op->deadline_ns = kvf__now_ns() + (uint64_t)dl * 1000000u;
    pthread_mutex_init(&op->mu, NULL);
    pthread_cond_init(&op->cv, NULL);
    return op;
}

static void op_destroy(kvf_op *op)
{
    for (int i = 0; i < op->n_reqs; i++)
        req_free(op->reqs[i]);
    free(op->reqs);
    free(op->json);
    free(op->raw_rep);
    pthread_mutex_destroy(&op->mu);
    pthread_cond_destroy(&op->cv);
    free(op);
}

/* Splits op's keys into requests: by node, and for puts and gets by stripes of about
 * stripe_bytes over the node's connections. Control ops use one connection per node. */
static int op_split(kvf_client *c, kvf_op *op)
{
    size_t n = op->b.n;
    size_t *node_of = malloc((n ? n : 1) * sizeof *node_of);
    size_t *count = calloc(c->n_nodes, sizeof *count);
    if (!node_of || !count) {
        free(node_of);
        free(count);
        return KVF_ENOMEM;
    }
    for (size_t i = 0; i < n; i++) {
        node_of[i] = op->target >= 0 ? (size_t)op->target : kvf_client_node_of(c, &op->b.keys[i]);
        count[node_of[i]]++;
    }
    int max_reqs = (int)c->n_nodes * c->conns;
    op->reqs = calloc((size_t)max_reqs, sizeof *op->reqs);
    if (!op->reqs) {
        free(node_of);
        free(count);
        return KVF_ENOMEM;
    }
    int rc = 0;
    for (size_t nd = 0; nd < c->n_nodes && !rc; nd++) {
        int chosen = op->target == -2 || op->target == (int)nd;
        if (!count[nd] && !(n == 0 && chosen))
            continue;
        /* Bytes of this node's share decide the stripes. */
        uint64_t bytes = 0;
        for (size_t i = 0; i < n; i++)
            if (node_of[i] == nd)
                bytes += op->kind == OPK_PUT   ? op->b.lens[i]
                         : op->kind == OPK_GET ? op->b.caps[i]
                                               : 0;
        int stripes = 1;
        if (op->kind != OPK_CTRL && c->conns > 1) {
            uint64_t sb = c->o.stripe_bytes;
            stripes = (int)(bytes / sb);
            if (stripes < 1)
                stripes = 1;
            if (stripes > c->conns)
                stripes = c->conns;
            if ((size_t)stripes > count[nd])
                stripes = (int)count[nd];
        }
        node *N = &c->nodes[nd];
        creq *rq[MAX_CONNS_PER_NODE] = {0};
        int base = op->conn >= 0 ? op->conn : atomic_fetch_add(&N->rr, stripes);
        for (int s = 0; s < stripes && !rc; s++) {
            cconn *cn = &N->conns[(unsigned)(base + s) % (unsigned)c->conns];
            rq[s] = req_new(op, cn, op->opcode, (uint32_t)count[nd]);
            if (!rq[s])
                rc = KVF_ENOMEM;
            else
                op->reqs[op->n_reqs++] = rq[s];
        }
        if (rc)
            break;
        /* Stripe s takes the keys whose cumulative bytes fall in its s-th share, so equal
         * objects spread evenly; there are never more stripes than keys. */
        uint64_t acc = 0;
        for (size_t i = 0; i < n; i++) {
            if (node_of[i] != nd)
                continue;
            uint64_t w = op->kind == OPK_PUT   ? op->b.lens[i]
                         : op->kind == OPK_GET ? op->b.caps[i]
                                               : 0;
            int s = bytes ? (int)((acc * (uint64_t)stripes) / bytes) : 0;
            if (s >= stripes)
                s = stripes - 1;
            rq[s]->idx[rq[s]->n++] = (uint32_t)i;
            acc += w;
        }
        /* A stripe left empty (uneven sizes) is dropped: a request carries at least one key. */
        int kept = 0;
        for (int k = 0; k < stripes; k++) {
            if (rq[k]->n == 0 && count[nd] > 0) {
                op->n_reqs--;
                req_free(rq[k]);
                continue;
            }
            rq[kept++] = rq[k];
        }
        for (int k = 0; k < kept; k++)
            op->reqs[op->n_reqs - kept + k] = rq[k];
        stripes = kept;
        for (int k = 0; k < stripes && !rc; k++)
            rc = req_build(c, rq[k]);
    }
    free(node_of);
    free(count);
    op->pending = op->n_reqs;
    return rc;
}

static int op_submit(kvf_client *c, kvf_op *op)
{
    for (size_t i = 0; i < op->b.n; i++)
        op->b.status[i] = 0;
    int rc = op_split(c, op);
    if (rc)
        return rc;
    if (op->n_reqs == 0) {
        /* Nothing to send (an empty batch): it completes at once, on the caller's thread. */
        pthread_mutex_lock(&op->mu);
        op->done = 1;
        pthread_mutex_unlock(&op->mu);
        if (op->b.cb)
            op->b.cb(op, 0, op->b.ud);
        return 0;
    }
    pthread_mutex_lock(&c->cmu);
    c->counters.requests += (uint64_t)op->n_reqs;
    pthread_mutex_unlock(&c->cmu);
    pthread_mutex_lock(&c->mu);
    if (c->stop) {
        pthread_mutex_unlock(&c->mu);
        return KVF_ECLOSED;
    }
    for (int i = 0; i < op->n_reqs; i++) {
        creq *r = op->reqs[i];
        r->next = NULL;
        if (c->subq_tail)
            c->subq_tail->next = r;
        else
            c->subq_head = r;
        c->subq_tail = r;
    }
    pthread_mutex_unlock(&c->mu);
    ssize_t w = write(c->wake[1], &wake_byte, 1);
    (void)w;
    return 0;
}

static int validate_batch(const kvf_batch *b, int kind)
{
    if (!b || (b->n && (!b->keys || !b->status)) || b->n > KVF_WIRE_MAX_ITEMS)
        return KVF_EINVAL;
    if (kind == OPK_PUT && b->n && (!b->objs || !b->lens))
        return KVF_EINVAL;
    if (kind == OPK_GET && b->n && (!b->bufs || !b->caps))
        return KVF_EINVAL;
    if (kind == OPK_PUT)
        for (size_t i = 0; i < b->n; i++)
            if (!b->objs[i] || b->lens[i] == 0)
                return KVF_EINVAL;
    return 0;
}

/* A batch is split across the I/O threads when it is large enough to keep more than one busy:
 * at least two stripes' worth of bytes, and two keys. */
static int worth_sharding(const kvf_client *c, const kvf_batch *b, int kind)
{
    if (c->n_shards < 2 || b->n < 2)
        return 0;
    uint64_t bytes = 0;
    for (size_t i = 0; i < b->n; i++)
        bytes += kind == OPK_PUT ? b->lens[i] : b->caps[i];
    return bytes >= 2 * c->o.stripe_bytes;
}

/* may_shard 0: the op runs on c's own I/O thread (a shard's share of a split op, which must not
 * be split again: the first shard is the client itself). */
static int submit_kind(kvf_client *c, const kvf_batch *b, kvf_op **out, int kind, uint32_t opcode,
                       int may_shard)
{
    *out = NULL;
    int rc = c ? validate_batch(b, kind) : KVF_EINVAL;
    if (rc)
        return rc;
    kvf_op *op = op_new(c, kind, opcode, b);
    if (!op)
        return KVF_ENOMEM;
    /* *out is set before the I/O thread can see the op: a completion callback may run, and its
     * owner free the memory *out lives in, before op_submit() returns. */
    *out = op;
    op->transport = c->rd ? "rdma" : "tcp";
    if (c->rd)
        rc = kvf__crdma_submit(c->rd, op);
    else if (may_shard && worth_sharding(c, b, kind))
        rc = kvf__shards_submit(c->shards, c->n_shards, op, kind == OPK_GET);
    else
        rc = op_submit(c, op);
    if (rc) {
        *out = NULL;
        op_destroy(op);
        return rc;
    }
    return 0;
}

int kvf_client_put_async(kvf_client *c, const kvf_batch *b, kvf_op **op)
{
    return submit_kind(c, b, op, OPK_PUT, KVF_OP_ADMIT, 1);
}

int kvf_client_get_async(kvf_client *c, const kvf_batch *b, kvf_op **op)
{
    return submit_kind(c, b, op, OPK_GET, KVF_OP_GET, 1);
}

int kvf__client_submit_own(kvf_client *c, const kvf_batch *b, kvf_op **op, int get)
{
    return get ? submit_kind(c, b, op, OPK_GET, KVF_OP_GET, 0)
               : submit_kind(c, b, op, OPK_PUT, KVF_OP_ADMIT, 0);
}

int kvf_op_wait(kvf_op *op)
{
    if (!op)
        return KVF_EINVAL;
    /* Short operations (lookups) complete within tens of microseconds: yielding a few times
     * before sleeping saves the condition variable's wake-up on the way back. */
    for (int i = 0; i < 64 && !atomic_load_explicit(&op->done_flag, memory_order_acquire); i++)
        sched_yield();
    pthread_mutex_lock(&op->mu);
    while (!op->done)
        pthread_cond_wait(&op->cv, &op->mu);
    pthread_mutex_unlock(&op->mu);
    return op->result;
}

int kvf_op_free(kvf_op **opp)
{
    if (!opp || !*opp)
        return 0;
    kvf_op *op = *opp;
    pthread_mutex_lock(&op->mu);
    int done = op->done;
    pthread_mutex_unlock(&op->mu);
    if (!done)
        return KVF_EBUSY;
    op_destroy(op);
    *opp = NULL;
    return 0;
}

/* Puts leave 1 ("reserved") only on keys whose commit never ran; the op ended before it. */
static void put_fixup(const kvf_batch *b)
{
    for (size_t i = 0; i < b->n; i++)
        if (b->status[i] == 1)
            b->status[i] = KVF_ETIMEDOUT;
}

static int run_sync(kvf_client *c, const kvf_batch *b, int kind, uint32_t opcode, kvf_op **keep)
{
    kvf_batch bb = *b;
    bb.cb = NULL;
    kvf_op *op;
    int rc = submit_kind(c, &bb, &op, kind, opcode, 1);
    if (rc)
        return rc;
    rc = kvf_op_wait(op);
    if (kind == OPK_PUT)
        put_fixup(b);
    if (keep)
        *keep = op;
    else
        kvf_op_free(&op);
    return rc;
}

int kvf_client_put(kvf_client *c, const kvf_batch *b)
{
    return run_sync(c, b, OPK_PUT, KVF_OP_ADMIT, NULL);
}

int kvf_client_get(kvf_client *c, const kvf_batch *b)
{
    return run_sync(c, b, OPK_GET, KVF_OP_GET, NULL);
}

/* A control op: submitted like a batch, with extras set before submission. target: -1 places
 * keys by hashing, -2 sends to every node, k sends everything to node k. */
typedef struct ctrl_args {
    uint8_t *present;
    uint32_t lease_ms, codec;
    const char *addr;
    uint64_t removed;
    char *json;
} ctrl_args;

static int ctrl(kvf_client *c, uint32_t opcode, int target, size_t n, const kvf_key *keys,
                int *status, int deadline_ms, ctrl_args *a)
{
    if (!c || (n && (!keys || !status)) || n > KVF_WIRE_MAX_ITEMS)
        return KVF_EINVAL;
    if (target >= 0 && (size_t)target >= c->n_nodes)
        return KVF_EINVAL;
    kvf_batch b = {.n = n, .keys = keys, .status = status, .deadline_ms = deadline_ms};
    kvf_op *op = op_new(c, OPK_CTRL, opcode, &b);
    if (!op)
        return KVF_ENOMEM;
    op->target = target;
    if (a) {
        op->present = a->present;
        op->lease_ms = a->lease_ms;
        op->codec = a->codec;
        if (a->addr)
            snprintf(op->addr, sizeof op->addr, "%s", a->addr);
    }
    int rc = op_submit(c, op);
    if (rc) {
        op_destroy(op);
        return rc;
    }
    rc = kvf_op_wait(op);
    if (a) {
        a->removed = op->removed;
        a->json = op->json;
        op->json = NULL;
    }
    op_destroy(op);
    return rc;
}

int kvf_client_exists(kvf_client *c, size_t n, const kvf_key *keys, uint8_t *present,
                      int deadline_ms)
{
    if (!present && n)
        return KVF_EINVAL;
    int *st = calloc(n ? n : 1, sizeof *st);
    if (!st)
        return KVF_ENOMEM;
    if (n)
        memset(present, 0, n);
    ctrl_args a = {.present = present};
    int rc = ctrl(c, KVF_OP_EXISTS, -1, n, keys, st, deadline_ms, &a);
    /* An unreachable node's keys are not present. */
    for (size_t i = 0; i < n; i++)
        if (st[i] != 0)
            present[i] = 0;
    free(st);
    return rc;
}

int kvf_client_lookup_prefix(kvf_client *c, size_t n, const kvf_key *keys, size_t *hits,
                             int deadline_ms)
{
    if (!c || !hits)
        return KVF_EINVAL;
    *hits = 0;
    uint8_t *present = calloc(n ? n : 1, 1);
    int *st = calloc(n ? n : 1, sizeof *st);
    if (!present || !st) {
        free(present);
        free(st);
        return KVF_ENOMEM;
    }
    /* One node answers LOOKUP; several answer EXISTS for their share. Either way one round trip
     * per node, in parallel, and the leading run is counted here. */
    ctrl_args a = {.present = present};
    uint32_t opcode = c->n_nodes == 1 ? KVF_OP_LOOKUP : KVF_OP_EXISTS;
    int rc = ctrl(c, opcode, -1, n, keys, st, deadline_ms, &a);
    size_t h = 0;
    while (h < n && present[h] && st[h] == 0)
        h++;
    *hits = h;
    free(present);
    free(st);
    return rc;
}

int kvf_client_evict(kvf_client *c, size_t n, const kvf_key *keys, int *status, int deadline_ms)
{
    return ctrl(c, KVF_OP_EVICT, -1, n, keys, status, deadline_ms, NULL);
}

int kvf_client_pin(kvf_client *c, size_t n, const kvf_key *keys, uint32_t lease_ms, int *status,
                   int deadline_ms)
{
    ctrl_args a = {.lease_ms = lease_ms};
    return ctrl(c, KVF_OP_PIN, -1, n, keys, status, deadline_ms, &a);
}

int kvf_client_unpin(kvf_client *c, size_t n, const kvf_key *keys, int *status, int deadline_ms)
{
    return ctrl(c, KVF_OP_UNPIN, -1, n, keys, status, deadline_ms, NULL);
}

int kvf_client_compress(kvf_client *c, size_t n, const kvf_key *keys, const char *codec,
                        int *status, int deadline_ms)
{
    kvf_codec cd;
    if (!codec || kvf_codec_parse(codec, &cd) != 0)
        return KVF_EINVAL;
    ctrl_args a = {.codec = (uint32_t)cd};
    return ctrl(c, KVF_OP_COMPRESS, -1, n, keys, status, deadline_ms, &a);
}

int kvf_client_clear(kvf_client *c, uint64_t *removed, int deadline_ms)
{
    ctrl_args a = {0};
    int rc = ctrl(c, KVF_OP_CLEAR, -2, 0, NULL, NULL, deadline_ms, &a);
    if (removed)
        *removed = a.removed;
    return rc;
}

int kvf_client_copy(kvf_client *c, size_t node_idx, const char *addr, size_t n, const kvf_key *keys,
                    int *status, int deadline_ms)
{
    char host[256];
    uint16_t port;
    if (!addr || strlen(addr) > KVF_WIRE_MAX_ADDR ||
        kvf__addr_parse(addr, host, sizeof host, &port) != 0 || n == 0)
        return KVF_EINVAL;
    ctrl_args a = {.addr = addr};
    return ctrl(c, KVF_OP_COPY, (int)node_idx, n, keys, status, deadline_ms, &a);
}

int kvf_client_stats(kvf_client *c, size_t node_idx, char **json, int deadline_ms)
{
    if (!json)
        return KVF_EINVAL;
    *json = NULL;
    ctrl_args a = {0};
    int rc = ctrl(c, KVF_OP_STATS, (int)node_idx, 0, NULL, NULL, deadline_ms, &a);
    if (rc == 0)
        *json = a.json;
    else
        free(a.json);
    return rc;
}

void kvf_client_counters_get(kvf_client *c, kvf_client_counters *out)
{
    memset(out, 0, sizeof *out);
    for (int i = 0; i < (c->n_shards ? c->n_shards : 1); i++) {
        kvf_client *s = c->n_shards ? c->shards[i] : c;
        pthread_mutex_lock(&s->cmu);
        out->bytes_sent += s->counters.bytes_sent;
        out->bytes_received += s->counters.bytes_received;
        out->requests += s->counters.requests;
        out->failed_keys += s->counters.failed_keys;
        out->reconnects += s->counters.reconnects;
        pthread_mutex_unlock(&s->cmu);
    }
}

int kvf__client_shard_counters(kvf_client *c, int i, kvf_client_counters *out)
{
    int n = c->n_shards ? c->n_shards : 1;
    if (i < 0 || i >= n)
        return KVF_EINVAL;
    kvf_client *s = c->n_shards ? c->shards[i] : c;
    pthread_mutex_lock(&s->cmu);
    *out = s->counters;
    pthread_mutex_unlock(&s->cmu);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* The internal interface of client_priv.h (the RDMA data path) */

int kvf__client_raw(kvf_client *c, size_t node_idx, int conn, uint32_t opcode, uint32_t count,
                    const void *payload, size_t plen, uint8_t **reply, size_t *rlen,
                    int deadline_ms)
{
    *reply = NULL;
    *rlen = 0;
    kvf_batch b = {.deadline_ms = deadline_ms};
    kvf_op *op = op_new(c, OPK_CTRL, opcode, &b);
    if (!op)
        return KVF_ENOMEM;
    op->target = (int)node_idx;
    op->conn = conn >= 0 ? conn % c->conns : -1;
    op->raw_req = payload;
    op->raw_len = plen;
    op->raw_count = count;
    int rc = op_submit(c, op);
    if (rc) {
        op_destroy(op);
        return rc;
    }
    rc = kvf_op_wait(op);
    if (!rc) {
        *reply = op->raw_rep;
        *rlen = op->raw_rep_len;
        op->raw_rep = NULL;
    }
    op_destroy(op);
    return rc;
}

void kvf__client_node(const kvf_client *c, size_t i, const char **host, uint16_t *rdma_port,
                      uint64_t *caps)
{
    node *N = &c->nodes[i];
    *host = N->host;
    *rdma_port = (uint16_t)atomic_load(&N->rdma_port);
    *caps = atomic_load(&N->caps);
}

uint64_t kvf__client_ns(const kvf_client *c)
{
    return c->o.ns;
}

const kvf_batch *kvf__op_batch(const kvf_op *op)
{
    return &op->b;
}

int kvf__op_is_get(const kvf_op *op)
{
    return op->kind == OPK_GET;
}

uint64_t kvf__op_deadline_ns(const kvf_op *op)
{
    return op->deadline_ns;
}

void kvf__op_finish(kvf_op *op, int result)
{
    op->result = result;
    op_signal(op);
}

void kvf__client_count(kvf_client *c, uint64_t requests, uint64_t sent, uint64_t received,
                       uint64_t failed, uint64_t reconnects)
{
    pthread_mutex_lock(&c->cmu);
    c->counters.requests += requests;
    c->counters.bytes_sent += sent;
    c->counters.bytes_received += received;
    c->counters.failed_keys += failed;
    c->counters.reconnects += reconnects;
    pthread_mutex_unlock(&c->cmu);
}

const char *kvf_op_transport(const kvf_op *op)
{
    return op && op->transport ? op->transport : "tcp";
}

const char *kvf_client_transport(const kvf_client *c, char *why, size_t len)
{
    if (why)
        snprintf(why, len, "%s", c->transport_why);
    return c->rd ? "rdma" : "tcp";
}

/* The data path: RDMA where asked for (or "auto") and possible with every node, TCP otherwise,
 * with the reason. "rdma" that is not possible fails the open. */
static int transport_choose(kvf_client *c, const char *mode)
{
    if (!mode || !*mode)
        mode = "auto";
    if (!strcmp(mode, "tcp")) {
        snprintf(c->transport_why, sizeof c->transport_why, "tcp: asked for");
        return 0;
    }
    if (strcmp(mode, "auto") && strcmp(mode, "rdma")) {
        snprintf(c->transport_why, sizeof c->transport_why,
                 "transport must be auto, tcp or rdma, not \"%s\"", mode);
        return KVF_EINVAL;
    }
    char why[200] = "";
    int rc = kvf__crdma_open(c, c->o.connect_timeout_ms, &c->rd, why, sizeof why);
    snprintf(c->transport_why, sizeof c->transport_why, "%s%s", c->rd ? "rdma: " : "tcp: ", why);
    if (!c->rd && !strcmp(mode, "rdma"))
        return rc ? rc : KVF_ENOTSUP;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Open and close */

/* One shard: its I/O thread and connections; the first also chooses the data path. */
static int shard_open(kvf_client **out, const kvf_client_opts *o, int first, char *err,
                      size_t errlen)
{
    *out = NULL;
    if (!o || !o->nodes || o->n_nodes == 0 || o->n_nodes > KVF_CLIENT_MAX_NODES || o->ns == 0) {
        snprintf(err, errlen, "client: need 1..%d nodes and a nonzero namespace",
                 KVF_CLIENT_MAX_NODES);
        return KVF_EINVAL;
    }
    kvf_client *c = calloc(1, sizeof *c);
    if (!c) {
        snprintf(err, errlen, "out of memory");
        return KVF_ENOMEM;
    }
    c->o = *o;
    c->o.nodes = NULL;
    if (c->o.conns_per_node <= 0)
        c->o.conns_per_node = 4;
    if (c->o.conns_per_node > MAX_CONNS_PER_NODE)
        c->o.conns_per_node = MAX_CONNS_PER_NODE;
    if (c->o.connect_timeout_ms <= 0)
        c->o.connect_timeout_ms = 1000;
    if (c->o.deadline_ms <= 0)
        c->o.deadline_ms = 5000;
    if (!c->o.stripe_bytes)
        c->o.stripe_bytes = 4u << 20;
    c->conns = c->o.conns_per_node;
    c->wake[0] = c->wake[1] = -1;
    pthread_mutex_init(&c->mu, NULL);
    pthread_mutex_init(&c->cmu, NULL);
    int rc = KVF_ENOMEM;
    c->n_nodes = o->n_nodes;
    c->nodes = calloc(o->n_nodes, sizeof *c->nodes);
    c->scratch = malloc(SCRATCH_BYTES);
    if (!c->nodes || !c->scratch) {
        snprintf(err, errlen, "out of memory");
        goto out_free;
    }
    for (size_t i = 0; i < o->n_nodes; i++) {
        node *N = &c->nodes[i];
        if (!o->nodes[i] || kvf__addr_parse(o->nodes[i], N->host, sizeof N->host, &N->port) != 0) {
            snprintf(err, errlen, "node %zu: bad address \"%s\" (expected host:port)", i,
                     o->nodes[i] ? o->nodes[i] : "(null)");
            rc = KVF_EINVAL;
            goto out_free;
        }
        snprintf(N->addr, sizeof N->addr, "%s:%u", N->host, N->port);
        N->seed = XXH3_64bits(N->addr, strlen(N->addr));
        for (int k = 0; k < MAX_CONNS_PER_NODE; k++) {
            N->conns[k].nd = N;
            N->conns[k].idx = k;
            N->conns[k].fd = -1;
            if (k < c->conns && !(N->conns[k].xs = XXH3_createState())) {
                snprintf(err, errlen, "out of memory");
                rc = KVF_ENOMEM;
                goto out_free;
            }
        }
    }
    rc = kvf__poller_open(&c->poller, NULL);
    if (rc) {
        snprintf(err, errlen, "poller: %s", kvf_strerror(rc));
        goto out_free;
    }
    if (pipe(c->wake) != 0) {
        rc = kvf_err_from_errno(errno);
        snprintf(err, errlen, "pipe: %s", strerror(errno));
        goto out_free;
    }
    for (int k = 0; k < 2; k++) {
        fcntl(c->wake[k], F_SETFL, fcntl(c->wake[k], F_GETFL) | O_NONBLOCK);
        fcntl(c->wake[k], F_SETFD, FD_CLOEXEC);
    }
    /* Connect up front, so that a first operation does not pay for it; a node that refuses is
     * retried on demand. */
    for (size_t i = 0; i < c->n_nodes; i++)
        for (int k = 0; k < c->conns; k++)
            if (cn_connect(c, &c->nodes[i].conns[k]) != 0)
                break;
    if (pthread_create(&c->th, NULL, io_main, c) != 0) {
        snprintf(err, errlen, "cannot start the I/O thread");
        rc = KVF_EAGAIN;
        goto out_free;
    }
    rc = first ? transport_choose(c, o->transport) : 0;
    if (rc) {
        snprintf(err, errlen, "%s", c->transport_why);
        kvf_client_close(&c);
        return rc;
    }
    *out = c;
    return 0;

out_free:
    for (size_t i = 0; c->nodes && i < c->n_nodes; i++)
        for (int k = 0; k < c->conns; k++)
            if (c->nodes[i].conns[k].fd >= 0)
                cn_reset(c, &c->nodes[i].conns[k], KVF_ECANCELED);
    flush_completed(c);
    kvf__poller_close(&c->poller);
    for (int k = 0; k < 2; k++)
        if (c->wake[k] >= 0)
            close(c->wake[k]);
    for (size_t i = 0; c->nodes && i < c->n_nodes; i++)
        for (int k = 0; k < MAX_CONNS_PER_NODE; k++)
            XXH3_freeState(c->nodes[i].conns[k].xs);
    free(c->nodes);
    free(c->scratch);
    pthread_mutex_destroy(&c->mu);
    pthread_mutex_destroy(&c->cmu);
    free(c);
    return rc;
}

int kvf_client_open(kvf_client **out, const kvf_client_opts *o, char *err, size_t errlen)
{
    *out = NULL;
    if (!o) {
        snprintf(err, errlen, "client: no options");
        return KVF_EINVAL;
    }
    /* I/O threads: one unless asked; each gets its share of the connections. On a host with
     * few cores the storage node's threads and the client's compete, and one client thread
     * measured faster (docs/benchmarks.md). */
    int conns = o->conns_per_node > 0 ? o->conns_per_node : 4;
    conns = conns < MAX_CONNS_PER_NODE ? conns : MAX_CONNS_PER_NODE;
    int k = o->io_threads > 0 ? o->io_threads : 1;
    k = k < KVF_CLIENT_MAX_SHARDS ? k : KVF_CLIENT_MAX_SHARDS;
    k = k < conns ? k : conns;
    kvf_client_opts so = *o;
    so.conns_per_node = conns / k;
    kvf_client *c = NULL;
    int rc = shard_open(&c, &so, 1, err, errlen);
    if (rc)
        return rc;
    c->shards[0] = c;
    c->n_shards = 1;
    so.transport = "tcp";
    for (int i = 1; i < k && !c->rd; i++) {
        if ((rc = shard_open(&c->shards[i], &so, 0, err, errlen))) {
            kvf_client_close(&c);
            return rc;
        }
        c->n_shards++;
    }
    *out = c;
    return 0;
}

void kvf_client_close(kvf_client **cp)
{
    if (!cp || !*cp)
        return;
    kvf_client *c = *cp;
    for (int i = 1; i < c->n_shards; i++)
        kvf_client_close(&c->shards[i]);
    kvf__crdma_close(&c->rd); /* its requests still need the I/O thread */
    pthread_mutex_lock(&c->mu);
    c->stop = 1;
    pthread_mutex_unlock(&c->mu);
    ssize_t w = write(c->wake[1], &wake_byte, 1);
    (void)w;
    pthread_join(c->th, NULL);
    kvf__poller_close(&c->poller);
    close(c->wake[0]);
    close(c->wake[1]);
    for (size_t i = 0; i < c->n_nodes; i++)
        for (int k = 0; k < MAX_CONNS_PER_NODE; k++)
            XXH3_freeState(c->nodes[i].conns[k].xs);
    free(c->nodes);
    free(c->scratch);
    pthread_mutex_destroy(&c->mu);
    pthread_mutex_destroy(&c->cmu);
    free(c);
    *cp = NULL;
}
