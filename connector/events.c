/*
 * An engine's KV events publisher (include/kvf/events.h): the sockets of transport/pubsub.c, the
 * encoding of proto/kvevents.c and the CURVE identity of proto/auth.c behind one handle, so that
 * kvf-engine and engines in other languages (the Python package) publish the same stream.
 */
#include "kvf/events.h"

#include "kvf/error.h"

#include "auth.h"
#include "errf.h"
#include "kvevents.h"
#include "pubsub.h"
#include "tcp.h"
#include "tenants.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

struct kvf_events {
    pthread_mutex_t mu; /* one thread at a time on the socket, and the sequence */
    kvf__zpub *pub;
    kvf__tenants *tenants;
    uint64_t seq;
    char endpoint[160], topic[128], replay[160];
};

static int allow(void *ud, const uint8_t pk[32], char *name, size_t namelen, int *admin)
{
    return kvf__tenants_curve_allow(ud, pk, name, namelen, admin);
}

/* The CURVE secret of o->credential, the tenants and the topic of the engine's tenant into sec,
 * ev->tenants and ev->topic. */
static int secure(kvf_events *ev, const kvf_events_opts *o, kvf__zsec *sec, char *err,
                  size_t errlen)
{
    kvf_credential c;
    uint8_t pk[32];
    if (!o->tenants)
        return kvf__errf(err, errlen, KVF_EINVAL, "a secured publisher needs a tenants file");
    int rc = kvf__cred_load(o->credential, &c, err, errlen);
    if (!rc && kvf__auth_curve_pair(&c, pk, sec->secret) != 0)
        rc = kvf__errf(err, errlen, KVF_EINVAL, "%s: no CURVE key in it", o->credential);
    kvf__auth_wipe(&c, sizeof c);
    if (!rc)
        rc = kvf__tenants_open(&ev->tenants, o->tenants, err, errlen);
    const char *mine = o->tenant_credential ? o->tenant_credential : getenv("KVF_CREDENTIAL");
    if (!rc && !mine)
        rc = kvf__errf(err, errlen, KVF_EINVAL,
                       "needs the engine's credential ($KVF_CREDENTIAL): the events go under its "
                       "tenant's topic");
    if (!rc)
        rc = kvf__cred_load(mine, &c, err, errlen);
    if (rc)
        return rc;
    snprintf(ev->topic, sizeof ev->topic, "kv-events/t/%s/", c.tenant);
    kvf__auth_wipe(&c, sizeof c);
    sec->allow = allow;
    sec->ud = ev->tenants;
    sec->tenant_prefix = "kv-events/t/";
    return 0;
}

int kvf_events_open(kvf_events **out, const kvf_events_opts *o, char *err, size_t errlen)
{
    char host[128];
    uint16_t port;
    *out = NULL;
    if (!o || !o->listen || kvf__addr_parse(o->listen, host, sizeof host, &port) != 0)
        return kvf__errf(err, errlen, KVF_EINVAL, "events address: expected HOST:PORT, got \"%s\"",
                         o && o->listen ? o->listen : "(none)");
    kvf_events *ev = calloc(1, sizeof *ev);
    if (!ev)
        return kvf__errf(err, errlen, KVF_ENOMEM, "out of memory");
    pthread_mutex_init(&ev->mu, NULL);
    snprintf(ev->topic, sizeof ev->topic, "kv-events");
    kvf__zsec sec = {0};
    int rc = o->credential ? secure(ev, o, &sec, err, errlen) : 0;
    if (!rc)
        rc = o->credential ? kvf__zpub_open_secure(&ev->pub, host, port, 0, &sec, ev->endpoint,
                                                   sizeof ev->endpoint, err, errlen)
                           : kvf__zpub_open(&ev->pub, host, port, 0, ev->endpoint,
                                            sizeof ev->endpoint, err, errlen);
    kvf__auth_wipe(sec.secret, sizeof sec.secret);
    if (!rc && o->replay) {
        char rh[128];
        uint16_t rp;
        if (kvf__addr_parse(o->replay, rh, sizeof rh, &rp) != 0)
            rc = kvf__errf(err, errlen, KVF_EINVAL,
                           "replay address: expected HOST:PORT, got \"%s\"", o->replay);
        else
            rc = kvf__zpub_replay(ev->pub, rh, rp, o->replay_batches ? o->replay_batches : 4096,
                                  o->replay_bytes ? o->replay_bytes : (size_t)64 << 20, ev->replay,
                                  sizeof ev->replay, err, errlen);
    }
    if (rc) {
        kvf_events_close(&ev);
        return rc;
    }
    *out = ev;
    return 0;
}

const char *kvf_events_replay_endpoint(const kvf_events *ev)
{
    return ev ? ev->replay : "";
}

const char *kvf_events_endpoint(const kvf_events *ev)
{
    return ev ? ev->endpoint : "";
}

const char *kvf_events_topic(const kvf_events *ev)
{
    return ev ? ev->topic : "";
}

int kvf_events_hash_blocks(const uint32_t *tokens, size_t n_blocks, uint32_t block_tokens,
                           uint64_t parent, uint64_t *out)
{
    if (!block_tokens || (n_blocks && (!tokens || !out)))
        return KVF_EINVAL;
    for (size_t b = 0; b < n_blocks; b++)
        parent = out[b] = XXH3_64bits_withSeed(tokens + b * block_tokens,
                                               (size_t)block_tokens * sizeof *tokens, parent);
    return 0;
}

int kvf_events_publish(kvf_events *ev, const uint64_t *removed, size_t n_removed,
                       const uint64_t *stored, size_t n_stored, int has_parent, uint64_t parent,
                       const uint32_t *tokens, uint32_t block_tokens, const char *medium)
{
    if (!ev || (n_removed && !removed) || (n_stored && (!stored || !tokens || !block_tokens)))
        return KVF_EINVAL;
    if (!n_removed && !n_stored)
        return 0;
    medium = medium ? medium : "GPU";
    kvf__kve_enc *e = NULL;
    const void *data;
    size_t len;
    int rc = kvf__kve_enc_begin(&e, (n_removed > 0) + (n_stored > 0));
    if (!rc && n_removed)
        kvf__kve_enc_block_removed(e, removed, n_removed, medium);
    if (!rc && n_stored)
        kvf__kve_enc_block_stored(e, stored, n_stored, has_parent, parent, tokens, block_tokens,
                                  medium);
    if (!rc)
        rc = kvf__kve_enc_end(e, &data, &len);
    pthread_mutex_lock(&ev->mu);
    ++ev->seq; /* a batch that could not be encoded leaves a gap the subscriber sees */
    if (!rc)
        rc = kvf__zpub_send(ev->pub, ev->topic, ev->seq, data, len);
    pthread_mutex_unlock(&ev->mu);
    kvf__kve_enc_free(&e);
    return rc;
}

uint64_t kvf_events_sequence(const kvf_events *ev)
{
    if (!ev)
        return 0;
    pthread_mutex_lock((pthread_mutex_t *)&ev->mu);
    uint64_t s = ev->seq;
    pthread_mutex_unlock((pthread_mutex_t *)&ev->mu);
    return s;
}

void kvf_events_close(kvf_events **p)
{
    kvf_events *ev = p ? *p : NULL;
    if (!ev)
        return;
    kvf__zpub_close(&ev->pub);
    kvf__tenants_close(&ev->tenants);
    pthread_mutex_destroy(&ev->mu);
    free(ev);
    *p = NULL;
}
