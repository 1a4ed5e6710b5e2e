/* kvf-store's registration in etcd (register.h). */
#include "register.h"

#include "kvf/error.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int kvf__store_register(const kvf__store_reg *r, kvf__member **m)
{
    char key[512], addr[300], ev[300], snap[300], err[600] = "";
    snprintf(key, sizeof key, "/kvfabric/%s/stores/%d", r->cluster, r->node);
    int bracket = strchr(r->advertise, ':') != NULL; /* IPv6 */
    snprintf(addr, sizeof addr, "%s%s%s:%u", bracket ? "[" : "", r->advertise, bracket ? "]" : "",
             (unsigned)r->port);
    kvf__member_reachable(r->events, r->advertise, ev, sizeof ev);
    kvf__member_reachable(r->snapshot, r->advertise, snap, sizeof snap);
    json_t *o = json_pack("{s:i,s:s,s:s,s:s,s:i,s:i}", "node", r->node, "addr", addr, "events", ev,
                          "snapshot", snap, "rdma", (int)r->rdma_port, "pid", (int)getpid());
    if (o && r->zone)
        json_object_set_new(o, "zone", json_string(r->zone));
    char *value = o ? json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
    json_decref(o);
    if (!value) {
        fprintf(stderr, "kvf-store: out of memory\n");
        return 1;
    }
    kvf__member_opts mo = {.endpoints = r->etcd,
                           .key = key,
                           .value = value,
                           .ttl_s = r->ttl_s,
                           .exclusive = 1,
                           .wait_ms = 2 * r->ttl_s * 1000 + 1000,
                           .log = r->log};
    int rc = kvf__member_start(m, &mo, err, sizeof err);
    free(value);
    if (rc) {
        fprintf(stderr, "kvf-store: --etcd: %s%s\n", err,
                rc == KVF_EEXIST ? "; give this node another --node" : "");
        return 1;
    }
    return 0;
}
