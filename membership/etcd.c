/* etcd's v3 JSON gateway (etcd.h). */
#include "etcd.h"

#include "kvf/error.h"

#include "http.h"

#include <curl/curl.h>
#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Keys and values are short (names, addresses, small JSON records). */
#define MAX_TEXT 4096
/* A watch stream's message, at most (a burst of changes in one revision comes as one). */
#define MAX_MESSAGE (16u << 20)

struct kvf__etcd {
    char members[KVF_ETCD_MAX_MEMBERS][160];
    int n;
    _Atomic int cur; /* the member asked first */
    int timeout_ms;
};

int kvf__etcd_open(kvf__etcd **out, const char *endpoints, int timeout_ms, char *err, size_t errlen)
{
    *out = NULL;
    kvf__etcd *e = calloc(1, sizeof *e);
    if (!e) {
        snprintf(err, errlen, "etcd: out of memory");
        return KVF_ENOMEM;
    }
    e->timeout_ms = timeout_ms > 0 ? timeout_ms : 3000;
    const char *p = endpoints ? endpoints : "";
    while (*p) {
        size_t k = strcspn(p, ",");
        if (k == 0 || k >= 140 || e->n == KVF_ETCD_MAX_MEMBERS) {
            snprintf(err, errlen,
                     "etcd: \"%s\": expected 1 to %d http://HOST:PORT endpoints, comma-separated",
                     endpoints, KVF_ETCD_MAX_MEMBERS);
            free(e);
            return KVF_EINVAL;
        }
        int scheme = k > 7 && !strncmp(p, "http://", 7);
        if (!scheme && memchr(p, '/', k)) {
            snprintf(err, errlen, "etcd: \"%.*s\": only http:// endpoints are spoken", (int)k, p);
            free(e);
            return KVF_EINVAL;
        }
        snprintf(e->members[e->n++], sizeof e->members[0], "%s%.*s", scheme ? "" : "http://",
                 (int)k, p);
        p += k;
        if (*p == ',')
            p++;
    }
    if (!e->n) {
        snprintf(err, errlen, "etcd: no endpoint given");
        free(e);
        return KVF_EINVAL;
    }
    *out = e;
    return 0;
}

void kvf__etcd_close(kvf__etcd **e)
{
    if (e) {
        free(*e);
        *e = NULL;
    }
}

const char *kvf__etcd_member(const kvf__etcd *e)
{
    return e->members[atomic_load(&((kvf__etcd *)e)->cur) % e->n];
}

/* ---- encoding ------------------------------------------------------------------------------ */

static json_t *b64(const char *s, size_t n)
{
    char out[2 * MAX_TEXT];
    if (n > MAX_TEXT)
        return NULL;
    sodium_bin2base64(out, sizeof out, (const unsigned char *)s, n, sodium_base64_VARIANT_ORIGINAL);
    return json_string(out);
}

/* A base64 field of o, decoded into out (NUL-terminated); "" where absent. -1 when malformed. */
static int unb64(const json_t *o, const char *name, char *out, size_t outlen)
{
    const char *s = json_string_value(json_object_get(o, name));
    size_t n = 0;
    out[0] = 0;
    if (!s)
        return 0;
    if (sodium_base642bin((unsigned char *)out, outlen - 1, s, strlen(s), NULL, &n, NULL,
                          sodium_base64_VARIANT_ORIGINAL) != 0)
        return -1;
    out[n] = 0;
    return 0;
}

/* etcd's int64s come as JSON strings (proto3's mapping), or numbers; absent is 0. */
static int64_t i64(const json_t *o, const char *name)
{
    const json_t *v = json_object_get(o, name);
    if (json_is_integer(v))
        return (int64_t)json_integer_value(v);
    const char *s = json_string_value(v);
    return s ? (int64_t)strtoll(s, NULL, 10) : 0;
}

static json_t *str64(int64_t v)
{
    char b[32];
    snprintf(b, sizeof b, "%" PRId64, v);
    return json_string(b);
}

/* The range [prefix, prefix + 1) as etcd's key and range_end. */
static int prefix_range(json_t *o, const char *prefix)
{
    size_t n = strlen(prefix);
    char end[MAX_TEXT];
    if (!n || n >= sizeof end)
        return -1;
    memcpy(end, prefix, n);
    while (n && (unsigned char)end[n - 1] == 0xff)
        n--; /* etcd's rule: the last byte that can be incremented */
    if (!n)
        return -1;
    end[n - 1] = (char)((unsigned char)end[n - 1] + 1);
    return json_object_set_new(o, "key", b64(prefix, strlen(prefix))) ||
           json_object_set_new(o, "range_end", b64(end, n));
}

/* ---- unary calls --------------------------------------------------------------------------- */

/* POSTs body (taken) to path on the members in turn until one answers with HTTP 200: *reply its
 * JSON object. An answer that is not 200 is etcd's error, returned as is (not tried elsewhere). */
static int call(kvf__etcd *e, const char *path, json_t *body, json_t **reply, char *err,
                size_t errlen)
{
    *reply = NULL;
    if (!body) {
        snprintf(err, errlen, "etcd %s: out of memory, or a key or value too long", path);
        return KVF_EINVAL;
    }
    int rc = KVF_ECONNREFUSED, first = atomic_load(&e->cur);
    char why[256] = "";
    for (int t = 0; t < e->n; t++) {
        int m = (first + t) % e->n;
        char url[256];
        snprintf(url, sizeof url, "%s%s", e->members[m], path);
        long status = 0;
        json_t *r = NULL;
        rc = kvf__http_call("POST", url, body, e->timeout_ms, &status, &r, why, sizeof why);
        if (rc)
            continue; /* no answer from this member: the next */
        atomic_store(&e->cur, m);
        if (status != 200 || !json_is_object(r)) {
            const char *msg = json_string_value(json_object_get(r, "error"));
            if (!msg)
                msg = json_string_value(json_object_get(r, "message"));
            snprintf(err, errlen, "etcd %s: HTTP %ld: %s", url, status, msg ? msg : "no body");
            json_decref(r);
            json_decref(body);
            return status == 404 ? KVF_ENOENT : KVF_EPROTO;
        }
        *reply = r;
        json_decref(body);
        return 0;
    }
    snprintf(err, errlen, "etcd: no member answered (%s)", why);
    json_decref(body);
    return rc;
}

int kvf__etcd_grant(kvf__etcd *e, int ttl_s, int64_t *lease, char *err, size_t errlen)
{
    json_t *r;
    int rc = call(e, "/v3/lease/grant", json_pack("{s:o}", "TTL", str64(ttl_s)), &r, err, errlen);
    if (rc)
        return rc;
    *lease = i64(r, "ID");
    json_decref(r);
    if (!*lease) {
        snprintf(err, errlen, "etcd: a lease grant without an id");
        return KVF_EPROTO;
    }
    return 0;
}

int kvf__etcd_keepalive(kvf__etcd *e, int64_t lease, int64_t *ttl, char *err, size_t errlen)
{
    json_t *r;
    int rc =
        call(e, "/v3/lease/keepalive", json_pack("{s:o}", "ID", str64(lease)), &r, err, errlen);
    if (rc)
        return rc;
    /* the gateway streams {"result": {...}}; an expired lease has no TTL (0) */
    json_t *res = json_object_get(r, "result");
    *ttl = i64(res ? res : r, "TTL");
    json_decref(r);
    if (*ttl <= 0) {
        snprintf(err, errlen, "etcd: lease %" PRId64 " has expired", lease);
        return KVF_ENOENT;
    }
    return 0;
}

int kvf__etcd_revoke(kvf__etcd *e, int64_t lease, char *err, size_t errlen)
{
    json_t *r;
    int rc = call(e, "/v3/lease/revoke", json_pack("{s:o}", "ID", str64(lease)), &r, err, errlen);
    json_decref(r);
    return rc;
}

static json_t *put_req(const char *key, const char *value, int64_t lease)
{
    json_t *o = json_object();
    json_t *k = b64(key, strlen(key)), *v = b64(value, strlen(value));
    if (!o || !k || !v) {
        json_decref(o), json_decref(k), json_decref(v);
        return NULL;
    }
    json_object_set_new(o, "key", k);
    json_object_set_new(o, "value", v);
    if (lease)
        json_object_set_new(o, "lease", str64(lease));
    return o;
}

int kvf__etcd_put(kvf__etcd *e, const char *key, const char *value, int64_t lease, char *err,
                  size_t errlen)
{
    json_t *r;
    int rc = call(e, "/v3/kv/put", put_req(key, value, lease), &r, err, errlen);
    json_decref(r);
    return rc;
}

int kvf__etcd_create(kvf__etcd *e, const char *key, const char *value, int64_t lease, int *created,
                     char *holder, size_t hlen, char *err, size_t errlen)
{
    *created = 0;
    if (holder && hlen)
        holder[0] = 0;
    json_t *put = put_req(key, value, lease), *k = b64(key, strlen(key));
    json_t *body = put && k
                       ? json_pack("{s:[{s:O,s:s,s:s}],s:[{s:o}],s:[{s:{s:O}}]}", "compare", "key",
                                   k, "target", "CREATE", "create_revision", "0", "success",
                                   "request_put", put, "failure", "request_range", "key", k)
                       : NULL;
    if (!k)
        json_decref(put); /* json_pack takes "o" even when it fails; not where it never ran */
    json_decref(k);
    json_t *r;
    int rc = call(e, "/v3/kv/txn", body, &r, err, errlen);
    if (rc)
        return rc;
    *created = json_is_true(json_object_get(r, "succeeded"));
    if (!*created && holder && hlen) {
        /* responses[0].response_range.kvs[0].value */
        json_t *rr =
            json_object_get(json_array_get(json_object_get(r, "responses"), 0), "response_range");
        json_t *kv = json_array_get(json_object_get(rr, "kvs"), 0);
        char v[MAX_TEXT + 1];
        if (kv && unb64(kv, "value", v, sizeof v) == 0)
            snprintf(holder, hlen, "%s", v);
    }
    json_decref(r);
    return 0;
}

int kvf__etcd_delete(kvf__etcd *e, const char *key, char *err, size_t errlen)
{
    json_t *r, *k = b64(key, strlen(key));
    int rc =
        call(e, "/v3/kv/deleterange", k ? json_pack("{s:o}", "key", k) : NULL, &r, err, errlen);
    json_decref(r);
    return rc;
}

/* One kv of a range or a watch event, to fn. -1 when malformed. */
static int deliver(const json_t *kv, int put, kvf__etcd_kv_fn fn, void *ud)
{
    char key[MAX_TEXT + 1], value[MAX_TEXT + 1];
    if (!json_is_object(kv) || unb64(kv, "key", key, sizeof key) != 0 ||
        unb64(kv, "value", value, sizeof value) != 0)
        return -1;
    fn(ud, put, key, put ? value : "", i64(kv, "mod_revision"));
    return 0;
}

int kvf__etcd_range(kvf__etcd *e, const char *prefix, kvf__etcd_kv_fn fn, void *ud,
                    int64_t *revision, char *err, size_t errlen)
{
    json_t *body = json_object(), *r;
    if (body && prefix_range(body, prefix) != 0) {
        json_decref(body);
        body = NULL;
    }
    int rc = call(e, "/v3/kv/range", body, &r, err, errlen);
    if (rc)
        return rc;
    *revision = i64(json_object_get(r, "header"), "revision");
    json_t *kvs = json_object_get(r, "kvs"), *kv;
    size_t i;
    json_array_foreach(kvs, i, kv)
    {
        if (deliver(kv, 1, fn, ud) != 0) {
            snprintf(err, errlen, "etcd: a malformed key or value under %s", prefix);
            rc = KVF_EPROTO;
        }
    }
    json_decref(r);
    return rc;
}

/* ---- the watch stream ---------------------------------------------------------------------- */

typedef struct wstate {
    char *buf;
    size_t n, cap;
    kvf__etcd_kv_fn fn;
    void *ud;
    atomic_int *stop;
    int64_t next;
    int created, compacted, canceled, malformed;
} wstate;

/* One message of the stream: {"result": {header, created, canceled, compact_revision, events}}. */
static void on_message(wstate *w, const char *text, size_t n)
{
    json_error_t je;
    json_t *m = json_loadb(text, n, 0, &je);
    json_t *res = json_object_get(m, "result");
    if (!res) {
        w->malformed = 1; /* an error object, or not JSON: the stream is given up */
        json_decref(m);
        return;
    }
    if (json_is_true(json_object_get(res, "created")))
        w->created = 1;
    int64_t compact = i64(res, "compact_revision");
    if (compact > 0) {
        w->compacted = 1;
        w->next = compact;
    }
    if (json_is_true(json_object_get(res, "canceled")))
        w->canceled = 1;
    json_t *evs = json_object_get(res, "events"), *ev;
    size_t i;
    json_array_foreach(evs, i, ev)
    {
        const char *type = json_string_value(json_object_get(ev, "type"));
        int put = !type || !strcmp(type, "PUT");
        json_t *kv = json_object_get(ev, "kv");
        if (deliver(kv, put, w->fn, w->ud) != 0) {
            w->malformed = 1;
            continue;
        }
        int64_t rev = i64(kv, "mod_revision");
        if (rev >= w->next)
            w->next = rev + 1;
    }
    json_decref(m);
}

static size_t on_stream(char *data, size_t size, size_t nmemb, void *ud)
{
    wstate *w = ud;
    size_t add = size * nmemb;
    if (w->n + add > MAX_MESSAGE)
        return 0;
    if (w->n + add > w->cap) {
        size_t cap = w->cap ? w->cap : 4096;
        while (cap < w->n + add)
            cap *= 2;
        char *b = realloc(w->buf, cap);
        if (!b)
            return 0;
        w->buf = b, w->cap = cap;
    }
    memcpy(w->buf + w->n, data, add);
    w->n += add;
    /* messages are separated by newlines */
    size_t start = 0;
    for (size_t i = 0; i < w->n; i++) {
        if (w->buf[i] != '\n')
            continue;
        if (i > start)
            on_message(w, w->buf + start, i - start);
        start = i + 1;
    }
    memmove(w->buf, w->buf + start, w->n - start);
    w->n -= start;
    return w->malformed || w->canceled ? 0 : add;
}

static int on_progress(void *ud, curl_off_t a, curl_off_t b, curl_off_t c, curl_off_t d)
{
    (void)a, (void)b, (void)c, (void)d;
    wstate *w = ud;
    return atomic_load(w->stop) != 0;
}

int kvf__etcd_watch(kvf__etcd *e, const char *prefix, int64_t start, kvf__etcd_kv_fn fn, void *ud,
                    atomic_int *stop, int64_t *next, char *err, size_t errlen)
{
    *next = start;
    json_t *cr = json_object();
    if (!cr || prefix_range(cr, prefix) != 0) {
        json_decref(cr);
        snprintf(err, errlen, "etcd: watch %s: a bad prefix", prefix);
        return KVF_EINVAL;
    }
    json_object_set_new(cr, "start_revision", str64(start));
    json_t *body = json_pack("{s:o}", "create_request", cr);
    char *text = body ? json_dumps(body, JSON_COMPACT) : NULL;
    json_decref(body);
    CURL *cu = curl_easy_init();
    if (!text || !cu) {
        free(text);
        if (cu)
            curl_easy_cleanup(cu);
        snprintf(err, errlen, "etcd: watch: out of memory");
        return KVF_ENOMEM;
    }
    int m = atomic_load(&e->cur) % e->n;
    char url[256];
    snprintf(url, sizeof url, "%s/v3/watch", e->members[m]);
    wstate w = {.fn = fn, .ud = ud, .stop = stop, .next = start};
    struct curl_slist *hdr = curl_slist_append(NULL, "Content-Type: application/json");
    curl_easy_setopt(cu, CURLOPT_URL, url);
    curl_easy_setopt(cu, CURLOPT_POSTFIELDS, text);
    curl_easy_setopt(cu, CURLOPT_HTTPHEADER, hdr);
    curl_easy_setopt(cu, CURLOPT_WRITEFUNCTION, on_stream);
    curl_easy_setopt(cu, CURLOPT_WRITEDATA, &w);
    curl_easy_setopt(cu, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(cu, CURLOPT_XFERINFOFUNCTION, on_progress);
    curl_easy_setopt(cu, CURLOPT_XFERINFODATA, &w);
    curl_easy_setopt(cu, CURLOPT_CONNECTTIMEOUT_MS, (long)e->timeout_ms);
    curl_easy_setopt(cu, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(cu, CURLOPT_PROTOCOLS_STR, "http");
    /* an idle stream is silent: a member that vanished is found by keep-alive probes */
    curl_easy_setopt(cu, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(cu, CURLOPT_TCP_KEEPIDLE, 2L);
    curl_easy_setopt(cu, CURLOPT_TCP_KEEPINTVL, 1L);
    CURLcode cc = curl_easy_perform(cu);
    long status = 0;
    curl_easy_getinfo(cu, CURLINFO_RESPONSE_CODE, &status);
    curl_slist_free_all(hdr);
    curl_easy_cleanup(cu);
    free(text);
    free(w.buf);
    *next = w.next;
    if (atomic_load(stop))
        return 0;
    if (w.compacted) {
        snprintf(err, errlen, "etcd %s: revision %" PRId64 " is compacted; listing again", url,
                 start);
        return KVF_ERANGE;
    }
    /* the stream ended, broke or was refused: the caller resumes at *next, on the next member */
    atomic_store(&e->cur, (m + 1) % e->n);
    if (w.malformed || w.canceled) {
        snprintf(err, errlen, "etcd %s: the watch was %s", url,
                 w.canceled ? "canceled" : "answered with an error");
        return KVF_EPROTO;
    }
    snprintf(err, errlen, "etcd %s: the watch stream ended (%s, HTTP %ld)", url,
             curl_easy_strerror(cc), status);
    return cc == CURLE_COULDNT_CONNECT ? KVF_ECONNREFUSED : KVF_EIO;
}
