/*
 * Registration records and request bodies as kvf-sched reads them (record.h): strings and
 * range-checked numbers out of JSON, and an engine instance's record whole. The daemon's HTTP API
 * and its etcd watcher read records with it, and kvf-relay checks the record it registers for an
 * engine with the same rules before etcd has it.
 */
#include "record.h"

#include "kvf/events.h"

#include "member.h"
#include "tcp.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int kvf__sched_json_str(json_t *o, const char *k, char *out, size_t n, int required, char *err,
                        size_t errlen)
{
    json_t *v = json_object_get(o, k);
    if (!v) {
        if (required)
            snprintf(err, errlen, "\"%s\" is required", k);
        return required ? -1 : 0;
    }
    if (!json_is_string(v) || json_string_length(v) >= n) {
        snprintf(err, errlen, "\"%s\" must be a string shorter than %zu bytes", k, n);
        return -1;
    }
    /* printable: every such field is a name or an address that logs and replies repeat, and
     * a NUL inside would cut it short where C reads it */
    const unsigned char *t = (const unsigned char *)json_string_value(v);
    for (size_t i = 0; i < json_string_length(v); i++)
        if (t[i] < 0x20 || t[i] == 0x7f) {
            snprintf(err, errlen, "\"%s\" holds a control character (byte %zu)", k, i);
            return -1;
        }
    snprintf(out, n, "%s", json_string_value(v));
    return 0;
}

/* Reads the number member k of o into *out, or def when o has none. A present member must be a
 * JSON number from lo to hi (finite: jansson reads 1e400 as an error, but nothing else is
 * trusted), and with `whole` have no fraction (2 and 2.0 are taken alike). Integers are compared
 * as integers, so none wraps on its way to a double. Returns 0, or -1 with the reason in err:
 * the field, its range and what it was. */
int kvf__sched_json_num(json_t *o, const char *k, double lo, double hi, int whole, double def,
                        double *out, char *err, size_t errlen)
{
    json_t *v = json_object_get(o, k);
    *out = def;
    if (!v)
        return 0;
    int ok = 0;
    double x = 0;
    if (json_is_integer(v)) {
        json_int_t i = json_integer_value(v);
        ok = i >= (json_int_t)lo && i <= (json_int_t)hi;
        x = (double)i;
    } else if (json_is_real(v)) {
        x = json_real_value(v);
        ok = isfinite(x) && x >= lo && x <= hi && (!whole || x == floor(x));
    }
    if (ok) {
        *out = x;
        return 0;
    }
    char *got = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
    snprintf(err, errlen, "\"%s\" must be a %s from %.15g to %.15g, got %.40s", k,
             whole ? "whole number" : "finite number", lo, hi, got ? got : "?");
    free(got);
    return -1;
}

/* Whether s is HOST:PORT with a port, after an optional scheme prefix, HOST a name or an address
 * kvf-sched can connect to: letters, digits, '.', '-', '_', ':' (IPv6) and '%' (an IPv6 zone);
 * not ZeroMQ's wildcard "*", nor its "interface;host" form (which would bind a source interface),
 * nor spaces. */
static int host_port(const char *s, const char *scheme)
{
    size_t sl = strlen(scheme);
    char h[256];
    uint16_t port;
    if (kvf__addr_parse(strncmp(s, scheme, sl) ? s : s + sl, h, sizeof h, &port) != 0 || !port ||
        !h[0])
        return 0;
    for (const char *c = h; *c; c++)
        if (!isalnum((unsigned char)*c) && !strchr(".-_:%", *c))
            return 0;
    return 1;
}

int kvf__sched_instance_parse(json_t *o, kvf_instance_info *in, char *replay, size_t rlen,
                              uint32_t *event_shards, char *err, size_t errlen)
{
    memset(in, 0, sizeof *in);
    double es;
    if (kvf__sched_json_num(o, "event_shards", 0, KVF_EVENTS_MAX_SHARDS, 1, 0, &es, err, errlen))
        return -1;
    *event_shards = (uint32_t)es;
    char role[16] = "both";
    replay[0] = 0;
    if (kvf__sched_json_str(o, "replay", replay, rlen, 0, err, errlen) ||
        kvf__sched_json_str(o, "id", in->id, sizeof in->id, 1, err, errlen) ||
        kvf__sched_json_str(o, "role", role, sizeof role, 0, err, errlen) ||
        kvf__sched_json_str(o, "endpoint", in->endpoint, sizeof in->endpoint, 0, err, errlen) ||
        kvf__sched_json_str(o, "events", in->events, sizeof in->events, 0, err, errlen) ||
        kvf__sched_json_str(o, "compute", in->compute, sizeof in->compute, 0, err, errlen) ||
        kvf__sched_json_str(o, "host", in->host, sizeof in->host, 0, err, errlen) ||
        kvf__sched_json_str(o, "zone", in->zone, sizeof in->zone, 0, err, errlen))
        return -1;
    if (!strcmp(role, "prefill"))
        in->role = KVF_ROLE_PREFILL;
    else if (!strcmp(role, "decode"))
        in->role = KVF_ROLE_DECODE;
    else if (!strcmp(role, "both"))
        in->role = KVF_ROLE_BOTH;
    else
        return snprintf(err, errlen, "\"role\" must be prefill, decode or both"), -1;
    if (!kvf__member_zone_valid(in->id)) /* a path segment of DELETE /v1/instances/ID */
        return snprintf(err, errlen, "\"id\" must be 1 to 63 of [A-Za-z0-9._-]"), -1;
    if (in->endpoint[0] && !host_port(in->endpoint, "http://"))
        return snprintf(err, errlen, "\"endpoint\" must be HOST:PORT"), -1;
    /* ZeroMQ TCP only (tcp://HOST:PORT, or HOST:PORT): kvf-sched connects to what a record
     * names, and a record may come from any client */
    if (in->events[0] && !host_port(in->events, "tcp://"))
        return snprintf(err, errlen, "\"events\" must be tcp://HOST:PORT"), -1;
    if (replay[0] && !host_port(replay, "tcp://"))
        return snprintf(err, errlen, "\"replay\" must be tcp://HOST:PORT"), -1;
    if (in->zone[0] && !kvf__member_zone_valid(in->zone))
        return snprintf(err, errlen, "\"zone\" must be 1 to 63 of [A-Za-z0-9._-]"), -1;
    double bt, cap, slots, uses;
    if (kvf__sched_json_num(o, "block_tokens", 1, MAX_BLOCK_TOKENS, 1, 16, &bt, err, errlen) ||
        kvf__sched_json_num(o, "capacity_blocks", 0, MAX_CAPACITY_BLOCKS, 1, 0, &cap, err,
                            errlen) ||
        kvf__sched_json_num(o, "compute_slots", 0, 1 << 20, 1, 0, &slots, err, errlen) ||
        kvf__sched_json_num(o, "compute_uses", 0, 1 << 20, 1, 1, &uses, err, errlen))
        return -1;
    in->compute_slots = (uint32_t)slots;
    in->compute_uses = (uint32_t)uses;
    in->block_tokens = (uint32_t)bt;
    in->capacity_blocks = (uint64_t)cap;
    json_t *caps = json_object_get(o, "capabilities");
    if (caps && !json_is_object(caps))
        return snprintf(err, errlen, "\"capabilities\" must be a JSON object"), -1;
    if (caps) {
        char *t = json_dumps(caps, JSON_COMPACT);
        if (!t || strlen(t) >= sizeof in->capabilities) {
            free(t);
            return snprintf(err, errlen, "capabilities record too large"), -1;
        }
        snprintf(in->capabilities, sizeof in->capabilities, "%s", t);
        free(t);
    }
    return 0;
}
