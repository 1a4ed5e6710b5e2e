/*
 * The storage client (include/kvf/client.h): opening and closing, gets and puts through the data
 * path chosen at open, and the client's counters. client_int.h describes how the files of this
 * module fit together.
 */
#include "kvf/client.h"

#include "client_int.h"

#include "kvf/error.h"

#include "cpus.h"
#include "errf.h"
#include "rendezvous.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ------------------------------------------------------------------------------------------ */
/* Gets and puts */

static int submit_kind(kvf_client *c, const kvf_batch *b, kvf_op **out, int kind, uint32_t opcode)
{
    *out = NULL;
    int rc = c ? kvf__op_validate(b, kind) : KVF_EINVAL;
    if (rc)
        return rc;
    atomic_fetch_add(&c->submitting, 1);
    if (atomic_load(&c->closing)) {
        atomic_fetch_sub(&c->submitting, 1);
        return KVF_ECLOSED;
    }
    kvf_op *op = kvf__op_new(c, NULL, kind, opcode, b);
    if (!op) {
        atomic_fetch_sub(&c->submitting, 1);
        return KVF_ENOMEM;
    }
    /* *out is set before the op can complete: a completion callback may run, and its owner free
     * the memory *out lives in, before submit returns. */
    *out = op;
    op->transport = c->path->name;
    rc = c->path->submit(c, op);
    atomic_fetch_sub(&c->submitting, 1);
    if (rc) {
        *out = NULL;
        kvf__op_destroy(op);
        return rc;
    }
    return 0;
}

int kvf_client_put_async(kvf_client *c, const kvf_batch *b, kvf_op **op)
{
    return submit_kind(c, b, op, KVF__OPK_PUT, KVF_OP_ADMIT);
}

int kvf_client_get_async(kvf_client *c, const kvf_batch *b, kvf_op **op)
{
    return submit_kind(c, b, op, KVF__OPK_GET, KVF_OP_GET);
}

int kvf_client_put_parts(kvf_client *c, const kvf_batch *b, uint64_t head_len, kvf_op **out)
{
    if (!out)
        return KVF_EINVAL;
    *out = NULL;
    int rc = c ? kvf__op_validate(b, KVF__OPK_PUT) : KVF_EINVAL;
    if (rc)
        return rc;
    uint64_t len = b->n ? b->lens[0] : 0;
    for (size_t i = 1; i < b->n; i++)
        if (b->lens[i] != len)
            return KVF_EINVAL;
    if (b->n == 0 || head_len == 0 || head_len >= len || head_len >= UINT32_MAX)
        return KVF_EINVAL;
    /* The parts are requests of the engines' connections (nor any node's limit on a request: a
     * part is never larger than the put's own requests): TCP, or the node's Unix socket where the
     * client reaches it over shared memory (the engines' connections go there), whose WRITEs carry
     * the bytes inline instead of through a staging region. Not beside RDMA. */
    if (c->path != &kvf__path_tcp && c->path != &kvf__path_shm)
        return KVF_ENOTSUP;
    /* and only on nodes that said they take parts (an older node, or one not heard from yet:
     * the caller puts whole) */
    for (size_t i = 0; i < c->n_nodes; i++)
        if (!atomic_load(&c->nodes[i].hello_seen) ||
            !(atomic_load(&c->nodes[i].caps) & KVF_CAP_PARTS))
            return KVF_ENOTSUP;
    atomic_fetch_add(&c->submitting, 1);
    if (atomic_load(&c->closing)) {
        atomic_fetch_sub(&c->submitting, 1);
        return KVF_ECLOSED;
    }
    /* One child put in parts per engine where the batch keeps more than one busy (as a whole
     * put is split, tcp_path.c): one engine's connection to a node carries about what one
     * loopback stream does, which a pass on a many-core host outruns. Else the engines in turn. */
    int split = kvf__split_worth(c, b, KVF__OPK_PUT);
    kvf__io *io = split ? NULL : c->io[atomic_fetch_add(&c->parts_rr, 1) % (unsigned)c->n_io];
    kvf_op *op = kvf__op_new(c, io, KVF__OPK_PUT, KVF_OP_ADMIT, b);
    if (!op || kvf__op_parts_init(op, head_len, len)) {
        if (op)
            kvf__op_destroy(op);
        atomic_fetch_sub(&c->submitting, 1);
        return KVF_ENOMEM;
    }
    op->parts_split = split;
    op->transport = "tcp";
    *out = op; /* before it can complete, as kvf_client_put_async */
    rc = split ? kvf__split_submit(c, op) : kvf__io_submit(io, op);
    atomic_fetch_sub(&c->submitting, 1);
    if (rc) {
        *out = NULL;
        kvf__op_destroy(op);
    }
    return rc;
}

/* Says more of a put in parts: state 0 (bytes up to upto final), 1 (sealed) or 2 (aborted). */
static int parts_say(kvf_op *op, uint64_t upto, int state)
{
    if (!op || !op->parts)
        return KVF_EINVAL;
    if (upto > op->obj_len)
        upto = op->obj_len;
    /* Under the op's lock to the end: once it completed, its engine may be gone with its client
     * (nothing of it is touched then), and the engine marks an op done under this lock and is
     * freed only after, so the kick below never reaches a freed engine. */
    pthread_mutex_lock(&op->mu);
    int rc = 0;
    if (atomic_load(&op->parts_state)) {
        rc = state == 2 ? 0 : KVF_EINVAL; /* sealed or aborted: an abort is harmless */
    } else if (op->done) {
        rc = 0; /* over (every key there or refused, or failed): its statuses say so */
    } else if (op->parts_split) {
        /* its children hold the parts; none left running: it is about to complete */
        if (state)
            atomic_store(&op->parts_state, state);
        if (op->split)
            kvf__split_say(op->split, upto, state);
    } else {
        uint64_t last = op->n_bounds ? op->bounds[op->n_bounds - 1] : op->head_len;
        if (upto > last) {
            if (op->n_bounds == op->cap_bounds && op->cap_bounds < 4096) {
                uint32_t cap = 2 * op->cap_bounds;
                uint64_t *p = realloc(op->bounds, cap * sizeof *p);
                if (p) {
                    op->bounds = p;
                    op->cap_bounds = cap;
                }
            }
            if (op->n_bounds < op->cap_bounds)
                op->bounds[op->n_bounds++] = upto;
            else
                op->bounds[op->n_bounds - 1] = upto; /* no room: the last part grows */
        }
        if (state)
            atomic_store(&op->parts_state, state);
        kvf__io_kick_parts(op->io);
    }
    pthread_mutex_unlock(&op->mu);
    return rc;
}

int kvf_op_put_ready(kvf_op *op, uint64_t upto)
{
    return parts_say(op, upto, 0);
}

int kvf_op_put_seal(kvf_op *op)
{
    return parts_say(op, op ? op->obj_len : 0, 1);
}

int kvf_op_put_abort(kvf_op *op)
{
    return parts_say(op, 0, 2);
}

static int run_sync(kvf_client *c, const kvf_batch *b, int kind, uint32_t opcode)
{
    kvf_batch bb = *b;
    bb.cb = NULL;
    kvf_op *op;
    int rc = submit_kind(c, &bb, &op, kind, opcode);
    if (rc)
        return rc;
    rc = kvf_op_wait(op);
    if (kind == KVF__OPK_PUT)
        kvf__op_put_fixup(b);
    kvf_op_free(&op);
    return rc;
}

int kvf_client_put(kvf_client *c, const kvf_batch *b)
{
    return run_sync(c, b, KVF__OPK_PUT, KVF_OP_ADMIT);
}

int kvf_client_get(kvf_client *c, const kvf_batch *b)
{
    return run_sync(c, b, KVF__OPK_GET, KVF_OP_GET);
}

/* ------------------------------------------------------------------------------------------ */
/* Counters and transport */

void kvf_client_counters_get(kvf_client *c, kvf_client_counters *out)
{
    memset(out, 0, sizeof *out);
    for (int i = 0; i < c->n_io; i++) {
        kvf_client_counters one;
        kvf__client_io_counters(c, i, &one);
        out->bytes_sent += one.bytes_sent;
        out->bytes_received += one.bytes_received;
        out->requests += one.requests;
        out->failed_keys += one.failed_keys;
        out->reconnects += one.reconnects;
        out->named_reasked += one.named_reasked;
    }
    kvf__shm_counters(c, out);
}

int kvf__client_io_counters(kvf_client *c, int i, kvf_client_counters *out)
{
    if (i < 0 || i >= c->n_io)
        return KVF_EINVAL;
    kvf__io *io = c->io[i];
    pthread_mutex_lock(&io->cmu);
    *out = io->counters;
    pthread_mutex_unlock(&io->cmu);
    return 0;
}

int kvf_client_io_threads(const kvf_client *c)
{
    return c ? c->n_io : 0;
}

const char *kvf_client_transport(const kvf_client *c, char *why, size_t len)
{
    if (why)
        snprintf(why, len, "%s", c->transport_why);
    return c->path->name;
}

/* The data path: shared memory for the nodes on this host that serve it where asked for (or
 * "auto"), else RDMA where asked for (or "auto") and possible with every node, TCP otherwise,
 * with the reason. "shm" or "rdma" that is not possible fails the open. */
static int transport_choose(kvf_client *c, const char *mode, const char *found)
{
    c->path = &kvf__path_tcp;
    if (!mode || !*mode)
        mode = "auto";
    if (!strcmp(mode, "tcp")) {
        snprintf(c->transport_why, sizeof c->transport_why, "tcp: asked for");
        return 0;
    }
    if (strcmp(mode, "auto") && strcmp(mode, "rdma") && strcmp(mode, "shm") &&
        strcmp(mode, "shm+tcp"))
        return kvf__errf(c->transport_why, sizeof c->transport_why, KVF_EINVAL,
                         "transport must be auto, tcp, shm, shm+tcp or rdma, not \"%s\"", mode);
    char why[360] = "", shm_why[400] = "";
    if (strcmp(mode, "rdma")) {
        int rc = kvf__path_shm_open(c, why, sizeof why);
        if (!rc) {
            c->path = &kvf__path_shm;
            if (snprintf(c->transport_why, sizeof c->transport_why, "shm: %s%s", why, found) < 0)
                c->transport_why[0] = 0;
            return 0;
        }
        if (!strcmp(mode, "shm"))
            return kvf__errf(c->transport_why, sizeof c->transport_why, rc,
                             "shm: no node serves shared memory on this host%s%s", why, found);
        if (snprintf(shm_why, sizeof shm_why, " (no shared memory%s%s)", why, found) < 0)
            shm_why[0] = 0;
        if (!strcmp(mode, "shm+tcp")) {
            if (snprintf(c->transport_why, sizeof c->transport_why,
                         "tcp: asked for where no "
                         "shared memory%s",
                         shm_why) < 0)
                c->transport_why[0] = 0;
            return 0;
        }
    }
    int rc = kvf__path_rdma_open(c, c->o.connect_timeout_ms, why, sizeof why);
    if (!rc)
        c->path = &kvf__path_rdma;
    if (snprintf(c->transport_why, sizeof c->transport_why, "%s: %s%s", c->path->name, why,
                 rc ? shm_why : "") < 0)
        c->transport_why[0] = 0;
    if (rc && !strcmp(mode, "rdma"))
        return rc;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Open and close */

/* Reads the credential to authenticate with: path, or $KVF_CREDENTIAL where path is NULL; none
 * where that is empty. */
static int load_credential(kvf_client *c, const char *path, char *err, size_t errlen)
{
    if (!path)
        path = getenv("KVF_CREDENTIAL");
    if (!path || !*path)
        return 0;
    char why[300];
    int rc = kvf__cred_load(path, &c->cred, why, sizeof why);
    if (rc)
        return kvf__errf(err, errlen, rc, "client: %s", why);
    c->has_cred = 1;
    return 0;
}

/* The options with their defaults filled in; the node list and credential path are not kept. I/O
 * threads: auto (cpus.h) where not given; connections: 4, or one per I/O thread where more. */
static void normalize(kvf_client_opts *o)
{
    o->nodes = NULL;
    o->credential = NULL;
    if (o->io_threads <= 0)
        o->io_threads = kvf__auto_threads();
    if (o->conns_per_node <= 0)
        o->conns_per_node = o->io_threads > 4 ? o->io_threads : 4;
    if (o->conns_per_node > KVF_CLIENT_MAX_CONNS)
        o->conns_per_node = KVF_CLIENT_MAX_CONNS;
    if (o->connect_timeout_ms <= 0)
        o->connect_timeout_ms = 1000;
    if (o->deadline_ms <= 0)
        o->deadline_ms = 5000;
    if (!o->stripe_bytes)
        o->stripe_bytes = 4u << 20;
}

static int parse_nodes(kvf_client *c, const char *const *addrs, char *err, size_t errlen)
{
    c->nodes = calloc(c->n_nodes, sizeof *c->nodes);
    if (!c->nodes)
        return kvf__errf(err, errlen, KVF_ENOMEM, "out of memory");
    for (size_t i = 0; i < c->n_nodes; i++) {
        kvf__node *N = &c->nodes[i];
        if (!addrs[i] || kvf__addr_parse(addrs[i], N->host, sizeof N->host, &N->port) != 0)
            return kvf__errf(err, errlen, KVF_EINVAL,
                             "node %zu: bad address \"%s\" (expected host:port)", i,
                             addrs[i] ? addrs[i] : "(null)");
        snprintf(N->addr, sizeof N->addr, "%s:%u", N->host, N->port);
        N->seed = kvf__rendezvous_seed(N->host, N->port);
    }
    return 0;
}

/* I/O engines: one unless asked, each with its share of the connections. On a host with few
 * cores the storage node's threads and the client's compete, and one client thread measured
 * faster (docs/benchmarks.md). The RDMA path needs only the first, for its control requests. */
static int open_engines(kvf_client *c, const kvf_client_opts *o, char *err, size_t errlen)
{
    int conns = c->o.conns_per_node;
    int k = c->o.io_threads;
    k = k < KVF_CLIENT_MAX_IO ? k : KVF_CLIENT_MAX_IO;
    k = k < conns ? k : conns;
    /* Nodes on this host that serve shared memory are found before the engines connect, so that
     * their connections go to the Unix sockets from the start. */
    char found[300] = "";
    const char *mode = o->transport && *o->transport ? o->transport : "auto";
    if (!strcmp(mode, "auto") || !strcmp(mode, "shm") || !strcmp(mode, "shm+tcp")) {
        kvf__shm_discover(c, found, sizeof found);
        c->shm_engines = 1;
    }
    int rc = kvf__io_open(c, conns / k, &c->io[0], err, errlen);
    if (rc)
        return rc;
    c->n_io = 1;
    if ((rc = transport_choose(c, o->transport, found)) != 0)
        return kvf__errf(err, errlen, rc, "%s", c->transport_why);
    for (int i = 1; i < k && c->path != &kvf__path_rdma; i++) {
        if ((rc = kvf__io_open(c, conns / k, &c->io[i], err, errlen)) != 0)
            return rc;
        c->n_io++;
    }
    return 0;
}

int kvf_client_open(kvf_client **out, const kvf_client_opts *o, char *err, size_t errlen)
{
    *out = NULL;
    if (!o || !o->nodes || o->n_nodes == 0 || o->n_nodes > KVF_CLIENT_MAX_NODES || o->ns == 0)
        return kvf__errf(err, errlen, KVF_EINVAL,
                         "client: need 1..%d nodes and a nonzero namespace", KVF_CLIENT_MAX_NODES);
    kvf_client *c = calloc(1, sizeof *c);
    if (!c)
        return kvf__errf(err, errlen, KVF_ENOMEM, "out of memory");
    c->o = *o;
    normalize(&c->o);
    c->n_nodes = o->n_nodes;
    c->path = &kvf__path_tcp;
    pthread_mutex_init(&c->shm_mu, NULL);
    int rc = load_credential(c, o->credential, err, errlen);
    if (!rc)
        rc = parse_nodes(c, o->nodes, err, errlen);
    if (!rc)
        rc = open_engines(c, o, err, errlen);
    if (rc) {
        kvf_client_close(&c);
        return rc;
    }
    *out = c;
    return 0;
}

void kvf_client_close(kvf_client **cp)
{
    if (!cp || !*cp)
        return;
    kvf_client *c = *cp;
    /* No get or put reaches a data path from now on (a completion callback's included), and none
     * under way is left in one: their ops are queued where the closes below cancel them. */
    atomic_store(&c->closing, 1);
    for (int i = 0; i < 100000 && atomic_load(&c->submitting); i++)
        nanosleep(&(struct timespec){0, 100000}, NULL);
    /* The data path first: the RDMA path's requests still need the engines. */
    c->path->close(c);
    for (int i = c->n_io - 1; i >= 0; i--)
        kvf__io_close(&c->io[i]);
    free(c->nodes);
    pthread_mutex_destroy(&c->shm_mu);
    kvf__auth_wipe(&c->cred, sizeof c->cred);
    free(c);
    *cp = NULL;
}
