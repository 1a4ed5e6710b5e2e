/*
 * The HTTP/JSON client (libcurl) and the error body shared with the server side (http.h).
 *
 * Each calling thread keeps one curl handle, reset between calls: libcurl keeps its connections
 * alive in the handle, so a thread's calls to one server (an engine asking kvf-sched where to
 * place every request) reuse one TCP connection instead of connecting, and leaving a TIME_WAIT
 * socket behind, each time. A connection the server closed is noticed and replaced by libcurl.
 */
#include "http.h"

#include "metrics.h"

#include "kvf/error.h"

#include <curl/curl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_REPLY (64u << 20)

typedef struct rbuf {
    char *p;
    size_t n;
    kvf__http_first_fn on_first; /* NULL: the reply is one JSON document */
    void *arg;
    size_t scanned; /* bytes looked through for the first line's end */
    int first;      /* the first line was a {"first_token": ...} line, given to on_first */
    int first_seen; /* the first line's end was found (whatever it held) */
} rbuf;

/* A streamed reply's first line, once it is whole: given to on_first where it is a JSON object
 * with "first_token" (a reply that does not stream is one document: no such line). */
static void first_line(rbuf *b)
{
    char *nl = memchr(b->p + b->scanned, '\n', b->n - b->scanned);
    if (!nl) {
        b->scanned = b->n;
        return;
    }
    b->first_seen = 1;
    json_t *o = json_loadb(b->p, (size_t)(nl - b->p), 0, NULL);
    if (json_is_object(o) && json_object_get(o, "first_token")) {
        b->first = 1;
        b->on_first(b->arg, o);
    }
    json_decref(o);
}

static size_t on_data(char *data, size_t size, size_t nmemb, void *ud)
{
    rbuf *b = ud;
    size_t add = size * nmemb;
    if (b->n + add > MAX_REPLY)
        return 0;
    char *np = realloc(b->p, b->n + add + 1);
    if (!np)
        return 0;
    memcpy(np + b->n, data, add);
    b->p = np;
    b->n += add;
    b->p[b->n] = '\0';
    if (b->on_first && !b->first_seen)
        first_line(b);
    return add;
}

/* The reply of a streamed call whose first line was a first token's: its last line, where an
 * error after the first line says its status ("status"). NULL where it does not parse. */
static json_t *last_line(const rbuf *b, long *status)
{
    size_t end = b->n;
    while (end > 0 && (b->p[end - 1] == '\n' || b->p[end - 1] == '\r'))
        end--;
    size_t from = end;
    while (from > 0 && b->p[from - 1] != '\n')
        from--;
    json_t *o = json_loadb(b->p + from, end - from, 0, NULL);
    json_t *st = json_object_get(o, "status");
    if (json_is_integer(st) && json_integer_value(st) >= 100 && json_integer_value(st) <= 599)
        *status = (long)json_integer_value(st);
    return o;
}

static pthread_key_t handle_key;
static pthread_once_t handle_once = PTHREAD_ONCE_INIT;

static void handle_free(void *cu)
{
    curl_easy_cleanup(cu);
}

static void handle_key_make(void)
{
    pthread_key_create(&handle_key, handle_free);
}

/* The calling thread's handle, with default options (each call resets it when done; its live
 * connections stay); NULL without memory. Freed when the thread exits. */
static CURL *thread_handle(void)
{
    pthread_once(&handle_once, handle_key_make);
    CURL *cu = pthread_getspecific(handle_key);
    if (cu)
        return cu;
    cu = curl_easy_init();
    if (cu && pthread_setspecific(handle_key, cu) != 0) {
        curl_easy_cleanup(cu);
        cu = NULL;
    }
    return cu;
}

const char *kvf__sched_token(void)
{
    const char *t = getenv("KVF_SCHED_TOKEN");
    return t && t[0] ? t : NULL;
}

int kvf__sched_token_from_file(const char *path)
{
    if (kvf__sched_token())
        return 0;
    FILE *f = path ? fopen(path, "r") : NULL;
    if (!f)
        return -1;
    char line[1024], name[128], tok[512];
    int rc = -1;
    while (rc && fgets(line, sizeof line, f)) {
        char *hash = strchr(line, '#');
        if (hash)
            *hash = '\0';
        if (sscanf(line, "%127s %511s", name, tok) == 2)
            rc = setenv("KVF_SCHED_TOKEN", tok, 1);
    }
    fclose(f);
    return rc ? -1 : 0;
}

int kvf__http_call(const char *method, const char *url, json_t *body, int timeout_ms, long *status,
                   json_t **reply, char *err, size_t errlen)
{
    return kvf__http_call_bearer(method, url, body, NULL, timeout_ms, status, reply, err, errlen);
}

int kvf__http_call_bearer(const char *method, const char *url, json_t *body, const char *bearer,
                          int timeout_ms, long *status, json_t **reply, char *err, size_t errlen)
{
    return kvf__http_call_stream(method, url, body, bearer, timeout_ms, NULL, NULL, status, reply,
                                 err, errlen);
}

int kvf__http_call_stream(const char *method, const char *url, json_t *body, const char *bearer,
                          int timeout_ms, kvf__http_first_fn on_first, void *arg, long *status,
                          json_t **reply, char *err, size_t errlen)
{
    if (reply)
        *reply = NULL;
    *status = 0;
    CURL *cu = thread_handle();
    char *text = body ? json_dumps(body, JSON_COMPACT) : NULL;
    if (!cu || (body && !text)) {
        free(text);
        snprintf(err, errlen, "%s %s: out of memory", method, url);
        return KVF_ENOMEM;
    }
    rbuf b = {.on_first = on_first, .arg = arg};
    struct curl_slist *hdr = NULL;
    curl_easy_setopt(cu, CURLOPT_URL, url);
    curl_easy_setopt(cu, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(cu, CURLOPT_WRITEDATA, &b);
    curl_easy_setopt(cu, CURLOPT_TIMEOUT_MS, (long)timeout_ms);
    curl_easy_setopt(cu, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(cu, CURLOPT_PROTOCOLS_STR, "http");
    char auth[300];
    if (bearer && bearer[0] && strlen(bearer) < sizeof auth - 32) {
        snprintf(auth, sizeof auth, "Authorization: Bearer %s", bearer);
        hdr = curl_slist_append(hdr, auth);
    }
    if (!strcmp(method, "POST")) {
        hdr = curl_slist_append(hdr, "Content-Type: application/json");
        curl_easy_setopt(cu, CURLOPT_POSTFIELDS, text ? text : "{}");
    } else if (!strcmp(method, "DELETE")) {
        curl_easy_setopt(cu, CURLOPT_CUSTOMREQUEST, "DELETE");
    }
    if (hdr)
        curl_easy_setopt(cu, CURLOPT_HTTPHEADER, hdr);
    CURLcode cc = curl_easy_perform(cu);
    curl_easy_getinfo(cu, CURLINFO_RESPONSE_CODE, status);
    /* The handle outlives the call: back to defaults, so that none of this call's header list,
     * body or reply buffer (all freed below) stays pointed to by it. */
    curl_easy_reset(cu);
    curl_slist_free_all(hdr);
    free(text);
    int rc = 0;
    if (cc != CURLE_OK) {
        snprintf(err, errlen, "%s %s: %s", method, url, curl_easy_strerror(cc));
        rc = cc == CURLE_OPERATION_TIMEDOUT ? KVF_ETIMEDOUT : KVF_ECONNREFUSED;
    } else if (reply && b.n) {
        *reply = b.first ? last_line(&b, status) : json_loadb(b.p, b.n, 0, NULL);
    }
    free(b.p);
    return rc;
}

json_t *kvf__http_error(const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return json_pack("{s:s}", "error", msg);
}

unsigned kvf__http_metrics_reply(struct kvf__metrics *m, kvf__http_reply *out)
{
    char *t = NULL;
    size_t len = 0;
    if (kvf__metrics_expose(m, &t, &len) != 0) {
        out->json = kvf__http_error("out of memory");
        return 500;
    }
    out->text = t;
    out->text_len = len;
    out->content_type = KVF_METRICS_CONTENT_TYPE;
    return 200;
}
