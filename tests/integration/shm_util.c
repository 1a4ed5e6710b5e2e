/*
 * Helpers of the shared-memory transport's integration tests (shm_util.h).
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvf/object.h"

#include "shm_util.h"

#include "bytes.h"
#include "client_int.h"
#include "clock.h"
#include "unixsock.h"
#include "wire.h"

/* One request and its reply on a raw connection, within 5 s. */
int kvf__sync_call_test(int fd, uint64_t id, uint32_t opcode, uint32_t count, const void *payload,
                        size_t plen, uint8_t **reply, size_t *rlen, int *fds, int *n_fds)
{
    char err[300];
    int rc = kvf__sync_call(fd, id, opcode, count, payload, plen, reply, rlen, fds, n_fds,
                            kvf__now_ns() + 5000000000ull, err, sizeof err);
    if (rc)
        print_message("%s -> %s\n", kvf__wire_opcode_name(opcode), err);
    return rc;
}

kvf_key key_of(uint64_t i)
{
    return (kvf_key){.lo = i * 0x9E3779B97F4A7C15ull + 99, .hi = i ^ 0x3c3c};
}

/* The object of key i, version v, with segments of seg bytes: every byte says (i, v). */
uint8_t *make_obj(uint64_t i, uint8_t v, size_t seg, uint64_t *len)
{
    uint8_t *s = malloc(seg * LAYERS);
    const void *segs[LAYERS];
    for (int l = 0; l < LAYERS; l++) {
        uint8_t *p = s + (size_t)l * seg;
        for (size_t b = 0; b < seg; b++)
            p[b] = (uint8_t)(i * 31 + (uint64_t)l * 7 + b + v);
        kvf__put_u64(p, i);
        p[8] = v;
        segs[l] = p;
    }
    size_t cap = kvf_obj_raw_size(LAYERS, seg), out;
    uint8_t *obj = malloc(cap);
    kvf_key k = key_of(i);
    assert_int_equal(
        kvf_obj_encode(&k, 9, 16, LAYERS, segs, seg, KVF_CODEC_NONE, obj, cap, &out, NULL), 0);
    free(s);
    *len = out;
    return obj;
}

/* The node's STATS figure `name` once it reads `want`, or its last value after 10 s. */
long long stat_settles(kvf_client *c, const char *name, long long want)
{
    char key[64];
    snprintf(key, sizeof key, "\"%s\":", name);
    long long v = -1;
    for (int i = 0; i < 200 && v != want; i++) {
        char *json = NULL;
        usleep(50000);
        assert_int_equal(kvf_client_stats(c, 0, &json, 2000), 0);
        const char *p = strstr(json, key);
        v = p ? atoll(p + strlen(key)) : -1;
        free(json);
    }
    return v;
}

kvf_client *client_open_opts(const daemon_t *d, kvf_client_opts o)
{
    const char *nodes[1] = {d->addr};
    o.nodes = nodes;
    o.n_nodes = 1;
    o.ns = NS;
    if (!o.deadline_ms)
        o.deadline_ms = 5000;
    kvf_client *c = NULL;
    char err[400];
    if (kvf_client_open(&c, &o, err, sizeof err) != 0)
        fail_msg("client open: %s", err);
    return c;
}

raw raw_open(const daemon_t *d)
{
    char name[64];
    snprintf(name, sizeof name, "@kvf-store-%d", (int)d->pid);
    raw r = {.fd = -1};
    char err[200];
    assert_int_equal(kvf__unix_connect(name, &r.fd, err, sizeof err), 0);
    uint8_t h[24];
    kvf__put_u32(h, KVF_WIRE_VERSION);
    kvf__put_u32(h + 4, KVF_WIRE_VERSION);
    kvf__put_u64(h + 8, NS);
    kvf__put_u64(h + 16, KVF_CAP_ALL | KVF_CAP_SHM);
    uint8_t *rep;
    size_t rlen;
    assert_int_equal(
        kvf__sync_call_test(r.fd, ++r.id, KVF_OP_HELLO, 0, h, sizeof h, &rep, &rlen, NULL, NULL),
        0);
    assert_true(kvf__get_u64(rep + 8) & KVF_CAP_SHM);
    free(rep);
    return r;
}
