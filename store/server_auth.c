/*
 * Authentication on the storage node's connections (docs/security.md, docs/protocol.md "HELLO and
 * AUTH"). Where the node has a tenants file, a connection may send HELLO and AUTH and nothing
 * else until AUTH has proved its tenant: HELLO hands it a fresh random challenge, AUTH carries the
 * tenant's name and its Ed25519 signature over that challenge and the node's id. A tenant's
 * namespaces are then scoped by its name, so whatever namespace it names it can only reach its own
 * entries; an admin names namespaces as they are kept. Checked once per connection, never per
 * frame: the data path pays one comparison of the role.
 */
#include "server_int.h"

#include "kvf/error.h"

#include "bytes.h"

#include <inttypes.h>
#include <string.h>

_Static_assert(KVF_AUTH_MAX_TENANTS == KVF_CACHE_MAX_TENANTS,
               "a tenant's number is its index in the cache's quotas");

uint64_t kvf__conn_ns_scope(const conn *c, uint64_t ns)
{
    return c->role == KVF_ROLE_TENANT ? kvf__auth_ns(c->who.scope, ns) : ns;
}

uint32_t kvf__conn_tenant(const conn *c)
{
    return c->role == KVF_ROLE_TENANT ? c->who.index : 0;
}

int kvf__auth_gate(conn *c, uint16_t opcode)
{
    if (c->role != KVF_ROLE_NONE || opcode == KVF_OP_HELLO || opcode == KVF_OP_AUTH)
        return 1;
    kvf_server *s = c->lp->srv;
    atomic_fetch_add(&s->auth_refused, 1);
    kvf__reply_error(c, KVF_EACCES, 1,
                     "%s before AUTH: this node requires a credential (HELLO, then AUTH)",
                     kvf__wire_opcode_name(opcode));
    return 0;
}

void kvf__req_auth(conn *c)
{
    kvf_server *s = c->lp->srv;
    const uint8_t *p = c->rbuf;
    uint32_t name_len = kvf__get_u32(p);
    char name[KVF_AUTH_NAME_MAX + 1] = "";
    if (!s->o.tenants) {
        kvf__reply_error(c, KVF_ENOTSUP, 0, "this node authenticates nobody: no tenants file");
        return;
    }
    if (c->role != KVF_ROLE_NONE) {
        kvf__reply_error(c, KVF_EPROTO, 1, "this connection is authenticated already (as %s)",
                         c->who.name);
        return;
    }
    if (!c->challenged) {
        kvf__reply_error(c, KVF_EPROTO, 1, "AUTH before HELLO: there is no challenge to sign");
        return;
    }
    if (name_len >= 1 && name_len <= KVF_AUTH_NAME_MAX && kvf__get_u32(p + 4) == 0)
        memcpy(name, p + 8, name_len);
    kvf__tenant_id id;
    /* The challenge is spent whatever the outcome: a second AUTH needs a new HELLO. */
    c->challenged = 0;
    if (!kvf__auth_name_valid(name) || strlen(name) != name_len ||
        !kvf__tenants_check(s->o.tenants, name, c->nonce, s->o.node_id, p + 8 + 64, &id)) {
        atomic_fetch_add(&s->auth_failed, 1);
        /* The name goes into the log and the reply only where it is a valid one: no control
         * bytes of a stranger's choosing in either. */
        kvf__reply_error(c, KVF_EACCES, 1, "authentication failed for tenant \"%s\"",
                         kvf__auth_name_valid(name) ? name : "(not a valid name)");
        return;
    }
    c->role = id.role;
    c->who = id;
    atomic_fetch_add(&s->auth_ok, 1);
    kvf_debug(s->o.log, "connection %" PRIu64 ": tenant %s (%s)", c->id, id.name,
              kvf__auth_role_name(id.role));
    uint8_t r[KVF_AUTH_REPLY_LEN];
    kvf__put_u32(r, (uint32_t)id.role);
    kvf__put_u32(r + 4, 0);
    kvf__put_u64(r + 8, id.scope);
    kvf__reply_copy(c, 0, 0, 0, r, sizeof r);
}

void kvf__tenants_apply_quotas(kvf__tenants *t, kvf_cache *cache)
{
    size_t keys, names;
    kvf__tenants_count(t, &keys, &names);
    for (uint32_t idx = 1; idx <= names && idx < KVF_CACHE_MAX_TENANTS; idx++) {
        uint64_t bytes;
        uint32_t resv;
        kvf__tenants_quota(t, idx, &bytes, &resv);
        kvf__cache_lock(cache);
        kvf__cache_quota_set_locked(cache, idx, bytes, resv);
        kvf__cache_unlock(cache);
    }
}

void kvf__auth_sweep(loop *lp, uint64_t now_ns)
{
    kvf_server *s = lp->srv;
    if (!s->o.tenants)
        return;
    unsigned gen = kvf__tenants_generation(s->o.tenants);
    int reloaded = gen != lp->tenants_gen;
    lp->tenants_gen = gen;
    uint64_t limit = (uint64_t)s->o.auth_timeout_ms * 1000000u;
    for (conn *c = lp->conns, *next; c; c = next) {
        next = c->next;
        if (c->role == KVF_ROLE_NONE) {
            /* Not authenticated in time: a connection that only holds a descriptor. */
            if (now_ns - c->accepted_ns < limit || c->closing)
                continue;
            atomic_fetch_add(&s->auth_timeouts, 1);
            kvf_debug(s->o.log, "connection %" PRIu64 " closed: no AUTH within %u ms", c->id,
                      s->o.auth_timeout_ms);
            kvf__conn_destroy(c);
        } else if (reloaded && !kvf__tenants_has_key(s->o.tenants, &c->who)) {
            kvf_info(s->o.log, "connection %" PRIu64 " of tenant %s closed: its key was revoked",
                     c->id, c->who.name);
            if (c->shm_arena) /* a mapping handed out cannot be taken back */
                kvf_warn(s->o.log,
                         "connection %" PRIu64 " (%s) had mapped the arena read-only: its "
                         "process keeps that view of every tenant's objects until it exits; "
                         "restart the node to end it (docs/security.md)",
                         c->id, c->who.name);
            kvf__conn_destroy(c);
        }
    }
}

void kvf__server_reload_tenants(kvf_server *s)
{
    atomic_store(&s->reload_tenants, 1);
    if (s->nloops > 0 && s->loops[0].wake[1] >= 0)
        kvf__inbox_wake(&s->loops[0]);
}

void kvf__auth_reload_if_asked(kvf_server *s)
{
    if (!atomic_exchange(&s->reload_tenants, 0) || !s->o.tenants)
        return;
    char err[256] = "";
    if (kvf__tenants_reload(s->o.tenants, err, sizeof err) != 0) {
        kvf_error(s->o.log, "tenants not reloaded, the old keys stay: %s", err);
        return;
    }
    kvf__tenants_apply_quotas(s->o.tenants, s->o.cache);
    size_t keys, names;
    kvf__tenants_count(s->o.tenants, &keys, &names);
    kvf_info(s->o.log, "tenants reloaded: %zu key(s) of %zu tenant(s)", keys, names);
}
