/*
 * Blocking request/reply exchanges on one socket, bounded by a deadline (client_int.h): what the
 * shared-memory path speaks on its own Unix connections, and what the open probes a node on this
 * host with. One request in flight at a time; a connection whose exchange failed midway is
 * useless (its framing is lost) and the caller closes it.
 */
#include "client_int.h"

#include "kvf/error.h"

#include "auth.h"
#include "bytes.h"
#include "clock.h"
#include "errf.h"
#include "unixsock.h"
#include "wire.h"

#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int kvf__sync_call(int fd, uint64_t id, uint32_t opcode, uint32_t count, const void *payload,
                   size_t plen, uint8_t **reply, size_t *rlen, int *fds, int *n_fds,
                   uint64_t deadline_ns, char *err, size_t errlen)
{
    *reply = NULL;
    *rlen = 0;
    int rc = kvf__sync_send(fd, id, opcode, count, payload, plen, deadline_ns, err, errlen);
    return rc ? rc
              : kvf__sync_recv(fd, id, opcode, reply, rlen, fds, n_fds, deadline_ns, err, errlen);
}

int kvf__sync_send(int fd, uint64_t id, uint32_t opcode, uint32_t count, const void *payload,
                   size_t plen, uint64_t deadline_ns, char *err, size_t errlen)
{
    uint8_t hdr[KVF_WIRE_HEADER_LEN];
    kvf_wire_hdr h = {.version = KVF_WIRE_VERSION,
                      .opcode = (uint16_t)opcode,
                      .request_id = id,
                      .item_count = count,
                      .payload_len = plen};
    kvf__wire_hdr_encode(hdr, &h);
    int rc = kvf__sock_write_all(fd, hdr, sizeof hdr, deadline_ns);
    if (!rc && plen)
        rc = kvf__sock_write_all(fd, payload, plen, deadline_ns);
    if (rc)
        return kvf__errf(err, errlen, rc, "sending %s: %s", kvf__wire_opcode_name(opcode),
                         kvf_strerror(rc));
    return 0;
}

int kvf__sync_recv(int fd, uint64_t id, uint32_t opcode, uint8_t **reply, size_t *rlen, int *fds,
                   int *n_fds, uint64_t deadline_ns, char *err, size_t errlen)
{
    *reply = NULL;
    *rlen = 0;
    uint8_t hdr[KVF_WIRE_HEADER_LEN];
    int rc;
    int room = n_fds ? *n_fds : 0;
    if (n_fds)
        *n_fds = 0;
    int hfds = room;
    rc = kvf__sock_read_all(fd, hdr, sizeof hdr, fds, &hfds, deadline_ns);
    if (rc) {
        for (int i = 0; i < hfds; i++)
            close(fds[i]);
        return kvf__errf(err, errlen, rc, "waiting for the %s reply: %s",
                         kvf__wire_opcode_name(opcode), kvf_strerror(rc));
    }
    kvf_wire_limits lim = {.max_request = KVF_CLIENT_RAW_MAX, .expect_reply = 1};
    kvf_wire_hdr rh;
    char msg[200];
    if ((rc = kvf__wire_hdr_decode(hdr, &lim, &rh, msg, sizeof msg)) != 0 || rh.request_id != id ||
        (rh.opcode != opcode && !(rh.flags & KVF_WF_FATAL))) {
        for (int i = 0; i < hfds; i++)
            close(fds[i]);
        return kvf__errf(err, errlen, KVF_EPROTO, "bad %s reply: %s", kvf__wire_opcode_name(opcode),
                         rc ? msg : "wrong id or opcode");
    }
    uint8_t *p = malloc(rh.payload_len + 1);
    if (!p) {
        for (int i = 0; i < hfds; i++)
            close(fds[i]);
        return kvf__errf(err, errlen, KVF_ENOMEM, "out of memory");
    }
    int pfds = room - hfds;
    rc = rh.payload_len ? kvf__sock_read_all(fd, p, rh.payload_len, fds ? fds + hfds : NULL, &pfds,
                                             deadline_ns)
                        : 0;
    if (rc) {
        for (int i = 0; i < hfds + (fds ? pfds : 0); i++)
            close(fds[i]);
        free(p);
        return kvf__errf(err, errlen, rc, "reading the %s reply: %s", kvf__wire_opcode_name(opcode),
                         kvf_strerror(rc));
    }
    if (n_fds)
        *n_fds = hfds + (rh.payload_len ? pfds : 0);
    p[rh.payload_len] = 0;
    if (rh.status) {
        kvf__errf(err, errlen, rh.status, "%s: %s", kvf__wire_opcode_name(opcode), (char *)p);
        if (n_fds) {
            for (int i = 0; i < *n_fds; i++)
                close(fds[i]);
            *n_fds = 0;
        }
        free(p);
        return rh.status;
    }
    *reply = p;
    *rlen = rh.payload_len;
    return 0;
}

int kvf__sync_hello(int fd, const kvf_client *c, uint64_t *id, kvf__hello *out,
                    uint64_t deadline_ns, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    uint8_t req[24], *rep;
    size_t rlen;
    kvf__put_u32(req, KVF_WIRE_VERSION);
    kvf__put_u32(req + 4, KVF_WIRE_VERSION);
    kvf__put_u64(req + 8, c->o.ns);
    kvf__put_u64(req + 16, KVF_CAP_ALL | KVF_CAP_SHM);
    int rc = kvf__sync_call(fd, ++*id, KVF_OP_HELLO, 0, req, sizeof req, &rep, &rlen, NULL, NULL,
                            deadline_ns, err, errlen);
    if (rc)
        return rc;
    if (rlen < KVF_HELLO_REPLY_LEN) {
        free(rep);
        return kvf__errf(err, errlen, KVF_EPROTO, "hello reply of %zu bytes", rlen);
    }
    out->caps = kvf__get_u64(rep + 8);
    out->node_id = kvf__get_u64(rep + 32);
    out->holders = kvf__get_u32(rep + 44);
    int have = kvf__hello_shm_parse(rep, rlen, out->caps, out->shm_name, sizeof out->shm_name,
                                    out->boot_id);
    if (!have)
        out->caps &= ~KVF_CAP_SHM;
    if ((out->caps & KVF_CAP_AUTH) && rlen >= KVF_HELLO_REPLY_AUTH_LEN)
        memcpy(out->nonce, rep + KVF_HELLO_REPLY_LEN, KVF_AUTH_NONCE_LEN);
    else if (out->caps & KVF_CAP_AUTH)
        rc = kvf__errf(err, errlen, KVF_EPROTO, "hello reply without its challenge");
    free(rep);
    if (rc || !(out->caps & KVF_CAP_AUTH))
        return rc;
    if (!c->has_cred)
        return kvf__errf(err, errlen, KVF_EACCES,
                         "the node requires authentication: no credential (KVF_CREDENTIAL)");
    uint8_t a[KVF_AUTH_REQ_LEN] = {0};
    size_t name_len = strlen(c->cred.tenant);
    kvf__put_u32(a, (uint32_t)name_len);
    memcpy(a + 8, c->cred.tenant, name_len);
    if ((rc = kvf__auth_sign(&c->cred, out->nonce, out->node_id, a + 8 + 64)) != 0)
        return kvf__errf(err, errlen, rc, "cannot sign the challenge");
    rc = kvf__sync_call(fd, ++*id, KVF_OP_AUTH, 0, a, sizeof a, &rep, &rlen, NULL, NULL,
                        deadline_ns, err, errlen);
    if (rc)
        return rc;
    out->role = rlen >= 4 ? kvf__get_u32(rep) : 0;
    free(rep);
    return 0;
}

int kvf__hello_shm_parse(const uint8_t *rep, size_t rlen, uint64_t caps, char *name, size_t namelen,
                         uint8_t boot_id[16])
{
    const size_t at = KVF_HELLO_REPLY_AUTH_LEN;
    if (!(caps & KVF_CAP_SHM) || rlen < at + 24)
        return 0;
    uint32_t nl = kvf__get_u32(rep + at + 16);
    if (nl == 0 || nl > KVF_UNIX_PATH_MAX || nl >= namelen || rlen < at + 24 + nl)
        return 0;
    memcpy(boot_id, rep + at, 16);
    memcpy(name, rep + at + 24, nl);
    name[nl] = 0;
    return memchr(name, 0, nl) == NULL;
}
