/*
 * Helpers of the shared-memory transport's integration tests (test_store_shm,
 * test_store_shm_hostile): objects whose every byte says which key and version they are, raw local
 * clients that speak the wire protocol on a node's Unix socket, and the node's STATS figures.
 */
#ifndef KVF_TEST_SHM_UTIL_H
#define KVF_TEST_SHM_UTIL_H

#include <stddef.h>
#include <stdint.h>

#include "kvf/kvf.h"

#include "harness.h"

#define LAYERS 4
#define SEG    16384

static const uint64_t NS = 0x5a3e5a3e5a3e5a3eull;

/* A raw connection to a node's Unix socket, after HELLO; id: the last request's. */
typedef struct raw {
    int fd;
    uint64_t id;
} raw;

/* One request and its reply on a raw connection, within 5 s: the reply's status. */
int kvf__sync_call_test(int fd, uint64_t id, uint32_t opcode, uint32_t count, const void *payload,
                        size_t plen, uint8_t **reply, size_t *rlen, int *fds, int *n_fds);
kvf_key key_of(uint64_t i);
/* The object of key i, version v, with LAYERS segments of seg bytes: every byte says (i, v). */
uint8_t *make_obj(uint64_t i, uint8_t v, size_t seg, uint64_t *len);
/* The node's STATS figure `name` once it reads `want`, or its last value after 10 s. */
long long stat_settles(kvf_client *c, const char *name, long long want);
/* A client of d alone, in namespace NS, with o's other options. */
kvf_client *client_open_opts(const daemon_t *d, kvf_client_opts o);
/* A raw local client of d's Unix socket, HELLO done (shared memory offered). */
raw raw_open(const daemon_t *d);

#endif
