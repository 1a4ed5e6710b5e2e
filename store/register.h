/*
 * kvf-store's registration in etcd (docs/membership.md): the key
 * /kvfabric/CLUSTER/stores/NODE, held under a lease kept alive while the node serves, says where
 * to reach it: {"node", "addr", "events", "snapshot", "rdma", "pid"}, and "zone" where it has one.
 * The node's number is exclusive: a second store started with a number that a live one holds is
 * refused.
 */
#ifndef KVF_STORE_REGISTER_H
#define KVF_STORE_REGISTER_H

#include "log.h"
#include "member.h"

#include <stdint.h>

typedef struct kvf__store_reg {
    const char *etcd;      /* --etcd */
    const char *cluster;   /* --cluster */
    const char *advertise; /* the host others reach it at */
    int ttl_s, node;
    uint16_t port, rdma_port;
    const char *events, *snapshot; /* bound endpoints ("tcp://HOST:PORT"), or "-" */
    const char *zone;              /* --zone, or NULL */
    const kvf_log *log;
} kvf__store_reg;

/* Registers (waiting up to 2 TTLs + 1 s for a previous holder of the number to lapse). 0 with
 * *m, or the exit status 1 after saying why on stderr. */
int kvf__store_register(const kvf__store_reg *r, kvf__member **m);

#endif
