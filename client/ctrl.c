/*
 * The control calls of include/kvf/client.h: one request per node that holds keys of the batch
 * (or to every node, or to one), on the first I/O engine, waited for by the caller.
 */
#include "client_int.h"

#include "kvf/error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A control op: submitted like a batch, with extras set before submission. target: -1 places
 * keys by hashing, -2 sends to every node, k sends everything to node k. */
typedef struct ctrl_args {
    uint8_t *present, *on_disk;
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
    kvf_op *op = kvf__op_new(c, c->io[0], KVF__OPK_CTRL, opcode, &b);
    if (!op)
        return KVF_ENOMEM;
    op->target = target;
    if (a) {
        op->present = a->present;
        op->on_disk = a->on_disk;
        op->lease_ms = a->lease_ms;
        op->codec = a->codec;
        if (a->addr)
            snprintf(op->addr, sizeof op->addr, "%s", a->addr);
    }
    int rc = kvf__io_submit(c->io[0], op);
    if (rc) {
        kvf__op_destroy(op);
        return rc;
    }
    rc = kvf_op_wait(op);
    if (a) {
        a->removed = op->removed;
        a->json = op->json;
        op->json = NULL;
    }
    kvf__op_destroy(op);
    return rc;
}

/* EXISTS of keys[0..n) asked of target (-1: each key's node), present[] cleared first; a key
 * whose node did not answer is not present. Over shared memory where every key's node serves
 * it (shm: each key's own node). */
static int exists_at(kvf_client *c, int target, int shm, size_t n, const kvf_key *keys,
                     uint8_t *present, int deadline_ms)
{
    if (!present && n)
        return KVF_EINVAL;
    int *st = calloc(n ? n : 1, sizeof *st);
    if (!st)
        return KVF_ENOMEM;
    if (n)
        memset(present, 0, n);
    int rc;
    if (shm && c && kvf__shm_exists(c, n, keys, present, deadline_ms, &rc)) {
        free(st);
        return rc;
    }
    ctrl_args a = {.present = present};
    rc = ctrl(c, KVF_OP_EXISTS, target, n, keys, st, deadline_ms, &a);
    /* An unreachable node's keys are not present. */
    for (size_t i = 0; i < n; i++)
        if (st[i] != 0)
            present[i] = 0;
    free(st);
    return rc;
}

int kvf_client_exists(kvf_client *c, size_t n, const kvf_key *keys, uint8_t *present,
                      int deadline_ms)
{
    return exists_at(c, -1, 1, n, keys, present, deadline_ms);
}

int kvf_client_exists_on(kvf_client *c, size_t node, size_t n, const kvf_key *keys,
                         uint8_t *present, int deadline_ms)
{
    if (!c || node >= c->n_nodes)
        return KVF_EINVAL;
    return exists_at(c, (int)node, 0, n, keys, present, deadline_ms);
}

int kvf_client_exists_tiers(kvf_client *c, size_t n, const kvf_key *keys, uint8_t *present,
                            uint8_t *on_disk, int deadline_ms)
{
    if ((!present || !on_disk) && n)
        return KVF_EINVAL;
    int *st = calloc(n ? n : 1, sizeof *st);
    if (!st)
        return KVF_ENOMEM;
    if (n) {
        memset(present, 0, n);
        memset(on_disk, 0, n);
    }
    /* over the network even to a node on this host: its arena's index, which the shared-memory
     * path reads, does not know the disk tier */
    ctrl_args a = {.present = present, .on_disk = on_disk};
    int rc = ctrl(c, KVF_OP_EXISTS, -1, n, keys, st, deadline_ms, &a);
    for (size_t i = 0; i < n; i++)
        if (st[i] != 0)
            present[i] = on_disk[i] = 0;
    free(st);
    return rc;
}

int kvf_client_lookup_prefix(kvf_client *c, size_t n, const kvf_key *keys, size_t *hits,
                             int deadline_ms)
{
    int why;
    return kvf_client_lookup_prefix_why(c, n, keys, hits, &why, deadline_ms);
}

static int unreachable(int st)
{
    return st == KVF_ECONNREFUSED || st == KVF_EHOSTUNREACH || st == KVF_ECONNRESET;
}

int kvf_client_lookup_prefix_why(kvf_client *c, size_t n, const kvf_key *keys, size_t *hits,
                                 int *why, int deadline_ms)
{
    if (!c || !hits || !why)
        return KVF_EINVAL;
    *hits = 0;
    *why = 0;
    uint8_t *present = calloc(n ? n : 1, 1);
    int *st = calloc(n ? n : 1, sizeof *st);
    if (!present || !st) {
        free(present);
        free(st);
        return KVF_ENOMEM;
    }
    /* Nodes on this host answer EXISTS on the caller's own thread where their connection is free
     * (no hand-off to an engine and back). Otherwise one node answers LOOKUP, several EXISTS for
     * their share: one round trip per node, in parallel. The leading run is counted here. */
    int rc;
    if (!kvf__shm_exists(c, n, keys, present, deadline_ms, &rc)) {
        ctrl_args a = {.present = present};
        uint32_t opcode = c->n_nodes == 1 ? KVF_OP_LOOKUP : KVF_OP_EXISTS;
        rc = ctrl(c, opcode, -1, n, keys, st, deadline_ms, &a);
    }
    size_t h = 0;
    while (h < n && present[h] && st[h] == 0)
        h++;
    /* The run ended at a node that did not answer, which rerouting now passes by (it was just
     * marked down, or is being probed): the rest is asked once more, of the next nodes, where
     * a replica of a hot chunk is. */
    if (h < n && !rc && unreachable(st[h]) && kvf__client_rerouted(c, &keys[h])) {
        size_t more = 0;
        int why2 = 0;
        if (!kvf_client_lookup_prefix_why(c, n - h, keys + h, &more, &why2, deadline_ms)) {
            free(present);
            free(st);
            *hits = h + more;
            *why = why2;
            return 0;
        }
    }
    *hits = h;
    if (h < n && st[h] != 0 && st[h] != KVF_ENOENT)
        *why = st[h];
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
