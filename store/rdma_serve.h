/*
 * The storage node's RDMA side (docs/rdma.md): an rdma_cm listener, the arena registered once for
 * remote read and write, and a thread that accepts engine connections and closes those whose peer
 * went away. Clients move object bytes with one-sided READs and WRITEs against the descriptors
 * that the TCP requests RDMA_GET and RDMA_RESERVE hand out (docs/protocol.md); the node itself
 * posts nothing.
 */
#ifndef KVF_STORE_RDMA_SERVE_H
#define KVF_STORE_RDMA_SERVE_H

#include <stddef.h>
#include <stdint.h>

#include "log.h"

typedef struct kvf__rserve kvf__rserve;

/* Listens on host:port (0: any free port) and registers [arena, arena + len). Returns 0, or the
 * error with one line in err: KVF_ENOTSUP (no RDMA in this build), KVF_ENODEV (no device, or the
 * address is not an RDMA interface's), KVF_ENOMEM (registration refused: memlock limit). */
int kvf__rserve_open(const char *host, uint16_t port, void *arena, size_t len, const kvf_log *log,
                     kvf__rserve **out, char *err, size_t errlen);
uint16_t kvf__rserve_port(const kvf__rserve *r);
uint32_t kvf__rserve_rkey(const kvf__rserve *r);
/* Connections open now and accepted since start. */
void kvf__rserve_counts(kvf__rserve *r, uint64_t *open, uint64_t *accepted);
/* Stops the thread, closes every connection, the listener and the registration. Accepts NULL. */
void kvf__rserve_close(kvf__rserve **r);

#endif
