/*
 * The HTTP/JSON server side (http.h) over libmicrohttpd: reads the body of a request, parses it,
 * calls the handler and sends its JSON reply.
 */
#include "http.h"

#include "clock.h"
#include "kvf/error.h"
#include "tcp.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <microhttpd.h>
#include <sodium.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define TOKEN_MIN  32
#define TOKEN_MAX  255
#define NAME_MAX_  63
#define TOKENS_MAX 1024
/* A request's body must arrive within this long of its headers: a client that sends a byte now
 * and then (never idle long enough for the idle timeout) is cut off then. */
#define BODY_DEADLINE_NS (60ull * 1000000000ull)
/* Request bodies buffered at once, all connections together: this many times the largest body
 * one may have, at least BODIES_MIN. Beyond it a request is refused with 503 (its length known
 * from Content-Length) or its connection closed (a chunked body that grows past it). */
#define BODIES_FACTOR 4
#define BODIES_MIN    (64u << 20)

struct kvf__http_tokens {
    size_t n;
    struct {
        char name[NAME_MAX_ + 1];
        char token[TOKEN_MAX + 1];
        size_t len;
    } t[];
};

struct kvf__httpd {
    struct MHD_Daemon *mhd;
    kvf__http_handler h;
    void *ctx;
    size_t max_body;
    size_t bodies_max;    /* the budget of every connection's body together */
    atomic_size_t bodies; /* bytes of it reserved now */
    const kvf__http_tokens *_Atomic tokens;
    atomic_uint_fast64_t requests, errors;
};

typedef struct body {
    char *buf;
    size_t len;
    size_t reserved;    /* of d->bodies, given back when the request ends */
    const char *caller; /* the token's name that authenticated it (early_refusal), or NULL */
    uint64_t t0;        /* when its headers were read */
    int too_big;
} body;

static enum MHD_Result send_reply(kvf__httpd *d, struct MHD_Connection *c, unsigned status,
                                  kvf__http_reply *o)
{
    atomic_fetch_add(&d->requests, 1);
    if (status >= 400)
        atomic_fetch_add(&d->errors, 1);
    char *t = o->text;
    size_t len = o->text_len;
    const char *type = o->content_type ? o->content_type : "text/plain";
    if (o->json) {
        free(t);
        t = json_dumps(o->json, JSON_COMPACT | JSON_SORT_KEYS | JSON_REAL_PRECISION(9));
        len = t ? strlen(t) : 0;
        type = "application/json";
        json_decref(o->json);
    }
    struct MHD_Response *r =
        t ? MHD_create_response_from_buffer(len, t, MHD_RESPMEM_MUST_FREE)
          : MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
    if (!r) {
        free(t);
        return MHD_NO;
    }
    MHD_add_response_header(r, "Content-Type", type);
    enum MHD_Result ret = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result send_error(kvf__httpd *d, struct MHD_Connection *c, unsigned status,
                                  json_t *e)
{
    kvf__http_reply o = {.json = e};
    return send_reply(d, c, status, &o);
}

static int name_ok(const char *n)
{
    size_t l = strlen(n);
    if (l < 1 || l > NAME_MAX_)
        return 0;
    for (size_t i = 0; i < l; i++)
        if (!isalnum((unsigned char)n[i]) && !strchr("._-", n[i]))
            return 0;
    return 1;
}

int kvf__http_tokens_load(kvf__http_tokens **out, const char *path, char *err, size_t errlen)
{
    *out = NULL;
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "%s: cannot open the token file", path);
        return KVF_EIO;
    }
    kvf__http_tokens *t = calloc(1, sizeof *t + TOKENS_MAX * sizeof t->t[0]);
    if (!t) {
        fclose(f);
        return KVF_ENOMEM;
    }
    char line[1024];
    int rc = 0, ln = 0;
    while (!rc && fgets(line, sizeof line, f)) {
        ln++;
        char *hash = strchr(line, '#');
        if (hash)
            *hash = '\0';
        char name[128], tok[512], extra[8];
        int k = sscanf(line, "%127s %511s %7s", name, tok, extra);
        if (k <= 0)
            continue;
        size_t tl = k >= 2 ? strlen(tok) : 0;
        if (k != 2 || !name_ok(name) || tl < TOKEN_MIN || tl > TOKEN_MAX) {
            snprintf(err, errlen,
                     "%s:%d: expected \"NAME TOKEN\" (a name of 1-%d of [A-Za-z0-9._-], a token of "
                     "%d-%d printable characters)",
                     path, ln, NAME_MAX_, TOKEN_MIN, TOKEN_MAX);
            rc = KVF_EINVAL;
            break;
        }
        for (size_t i = 0; i < t->n && !rc; i++) {
            if (!strcmp(t->t[i].name, name)) {
                snprintf(err, errlen, "%s:%d: name %s given twice", path, ln, name);
                rc = KVF_EINVAL;
            }
        }
        if (!rc && t->n == TOKENS_MAX) {
            snprintf(err, errlen, "%s:%d: more than %d tokens", path, ln, TOKENS_MAX);
            rc = KVF_EINVAL;
        }
        if (rc)
            break;
        memcpy(t->t[t->n].name, name, strlen(name) + 1); /* name_ok: at most NAME_MAX_ */
        memcpy(t->t[t->n].token, tok, tl + 1);
        t->t[t->n].len = tl;
        t->n++;
    }
    sodium_memzero(line, sizeof line);
    fclose(f);
    if (!rc && t->n == 0) {
        snprintf(err, errlen, "%s: no token in the file", path);
        rc = KVF_EINVAL;
    }
    if (rc) {
        kvf__http_tokens_free(&t);
        return rc;
    }
    *out = t;
    return 0;
}

size_t kvf__http_tokens_count(const kvf__http_tokens *t)
{
    return t ? t->n : 0;
}

void kvf__http_tokens_free(kvf__http_tokens **tp)
{
    if (!tp || !*tp)
        return;
    sodium_memzero((*tp)->t, (*tp)->n * sizeof(*tp)->t[0]);
    free(*tp);
    *tp = NULL;
}

void kvf__httpd_tokens(kvf__httpd *d, const kvf__http_tokens *tokens)
{
    atomic_store(&d->tokens, tokens);
}

/* The name of the token that "Authorization: Bearer ..." names, or NULL. Every token is compared
 * (in constant time each), so the time taken says nothing of which matched or how much of one. */
static const char *token_caller(const kvf__http_tokens *t, const char *hdr)
{
    static const char scheme[] = "Bearer ";
    if (!hdr || strncmp(hdr, scheme, sizeof scheme - 1) != 0)
        return NULL;
    const char *v = hdr + sizeof scheme - 1;
    size_t vl = strlen(v);
    const char *who = NULL;
    for (size_t i = 0; i < t->n; i++) {
        int same = vl == t->t[i].len && sodium_memcmp(v, t->t[i].token, vl) == 0;
        if (same && !who)
            who = t->t[i].name;
    }
    return who;
}

/* Takes n bytes of the bodies' budget: 1, or 0 where it would go over. */
static int reserve(kvf__httpd *d, size_t n)
{
    size_t was = atomic_fetch_add(&d->bodies, n);
    if (was + n <= d->bodies_max && was + n >= was)
        return 1;
    atomic_fetch_sub(&d->bodies, n);
    return 0;
}

static enum MHD_Result count_length(void *cls, enum MHD_ValueKind kind, const char *key,
                                    const char *value)
{
    (void)kind;
    (void)value;
    *(int *)cls += key && !strcasecmp(key, MHD_HTTP_HEADER_CONTENT_LENGTH);
    return MHD_YES;
}

/* Whether a request says it has a body (a length above 0, or a transfer encoding). */
static int has_body(struct MHD_Connection *c)
{
    const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Length");
    return (cl && strspn(cl, "0") != strlen(cl)) ||
           MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Transfer-Encoding") != NULL;
}

/* Whether a request is refused on its headers alone, before its body is read: a method not
 * served (405), two Content-Length headers (400: which one frames the body is ambiguous), a body
 * said to be too large (413), no valid token where one is needed (401), or no room left in the
 * bodies' budget (503). Returns the error body with *status, or NULL; reserves the body's
 * declared length otherwise. */
static json_t *early_refusal(kvf__httpd *d, struct MHD_Connection *c, const char *method,
                             const char *url, body *b, unsigned *status)
{
    int post = !strcmp(method, "POST");
    if (!post && strcmp(method, "GET") != 0 && strcmp(method, "DELETE") != 0) {
        *status = 405;
        return kvf__http_error("%s %s: not served", method, url);
    }
    int lengths = 0;
    MHD_get_connection_values(c, MHD_HEADER_KIND, count_length, &lengths);
    if (lengths > 1) {
        *status = 400;
        return kvf__http_error("%d Content-Length headers: one at most", lengths);
    }
    const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Length");
    unsigned long long declared = 0;
    if (cl) {
        char *end;
        errno = 0;
        declared = strtoull(cl, &end, 10);
        if (errno || end == cl || *end || !isdigit((unsigned char)cl[0]))
            declared = ULLONG_MAX;
    }
    if (post && declared > d->max_body) {
        *status = 413;
        return kvf__http_error("body larger than %zu bytes", d->max_body);
    }
    const kvf__http_tokens *tokens = atomic_load(&d->tokens);
    if (tokens && strcmp(method, "GET") != 0 &&
        !(b->caller =
              token_caller(tokens, MHD_lookup_connection_value(c, MHD_HEADER_KIND,
                                                               MHD_HTTP_HEADER_AUTHORIZATION)))) {
        *status = 401;
        return kvf__http_error("%s %s needs \"Authorization: Bearer TOKEN\" with a token of "
                               "this server's token file",
                               method, url);
    }
    if (post && declared) {
        if (!reserve(d, (size_t)declared + 1)) {
            *status = 503;
            return kvf__http_error("busy: %zu bytes of request bodies are being received, the "
                                   "most this server holds; retry later",
                                   d->bodies_max);
        }
        b->reserved = (size_t)declared + 1;
    }
    return NULL;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version, const char *upload,
                                  size_t *upload_size, void **con_cls)
{
    (void)version;
    kvf__httpd *d = cls;
    body *b = *con_cls;
    if (!b) {
        if (!(b = calloc(1, sizeof *b)))
            return MHD_NO;
        b->t0 = kvf__now_ns();
        *con_cls = b;
        /* refused before its body is read (MHD then closes the connection): a client that may
         * not, or asks too much, costs no memory */
        unsigned status = 0;
        json_t *e = early_refusal(d, c, method, url, b, &status);
        if (e && strcmp(method, "POST") != 0 && strcmp(method, "PUT") != 0 && has_body(c)) {
            /* libmicrohttpd stops reading a refused body only for POST and PUT; for another
             * method it would read (and drop) all of it before answering, at the client's pace:
             * the connection is closed instead */
            json_decref(e);
            atomic_fetch_add(&d->errors, 1);
            return MHD_NO;
        }
        return e ? send_error(d, c, status, e) : MHD_YES;
    }
    if (*upload_size) {
        if (kvf__now_ns() - b->t0 > BODY_DEADLINE_NS) {
            atomic_fetch_add(&d->errors, 1);
            return MHD_NO; /* closes the connection */
        }
        if (b->too_big || b->len + *upload_size > d->max_body) {
            b->too_big = 1;
        } else {
            size_t need = b->len + *upload_size + 1;
            if (need > b->reserved) { /* a chunked body, its length not told */
                size_t more = need - b->reserved;
                if (!reserve(d, more)) {
                    atomic_fetch_add(&d->errors, 1);
                    return MHD_NO;
                }
                b->reserved += more;
            }
            char *nb = realloc(b->buf, b->reserved);
            if (!nb)
                return MHD_NO;
            b->buf = nb;
            memcpy(b->buf + b->len, upload, *upload_size);
            b->len += *upload_size;
            b->buf[b->len] = '\0';
        }
        *upload_size = 0;
        return MHD_YES;
    }
    json_t *in = NULL;
    if (!strcmp(method, "POST")) {
        if (b->too_big)
            return send_error(d, c, 413,
                              kvf__http_error("body larger than %zu bytes", d->max_body));
        json_error_t je;
        in = b->len ? json_loadb(b->buf, b->len, JSON_REJECT_DUPLICATES, &je) : NULL;
        if (!in || !json_is_object(in)) {
            const char *why = !b->len             ? " (no body)"
                              : !in               ? ": "
                              : json_is_array(in) ? " (an array)"
                                                  : " (a JSON scalar)";
            json_decref(in);
            return send_error(d, c, 400,
                              kvf__http_error("body is not a JSON object%s%s", why,
                                              b->len && !in ? je.text : ""));
        }
    }
    kvf__http_reply out = {.client_fd = -1};
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (ci)
        out.client_fd = ci->connect_fd;
    out.caller = b->caller; /* checked on the headers (early_refusal) */
    unsigned status = d->h(d->ctx, method, url, in, &out);
    json_decref(in);
    return send_reply(d, c, status, &out);
}

int kvf__http_client_gone(const kvf__http_reply *r)
{
    if (!r || r->client_fd < 0)
        return 0;
    struct pollfd p = {.fd = r->client_fd, .events = POLLIN};
    if (poll(&p, 1, 0) != 1)
        return 0; /* nothing to read: still there */
    if (p.revents & (POLLHUP | POLLERR | POLLNVAL))
        return 1;
    /* readable: the end of its stream (its side closed) or the next request (kept alive), told
     * apart by a peek that takes nothing */
    char c;
    ssize_t n = recv(r->client_fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    (void)c;
    (void)toe;
    kvf__httpd *d = cls;
    body *b = *con_cls;
    if (b) {
        atomic_fetch_sub(&d->bodies, b->reserved);
        free(b->buf);
        free(b);
    }
    *con_cls = NULL;
}

/* Decodes %HH in a request's path and arguments, as libmicrohttpd would, but leaves %00 and %2F
 * (any case) as they are: a NUL would cut the path short where the handler reads it
 * ("/v1/instances/a%00/b" served as ".../a") and a '/' would make two segments of one. An id that
 * holds them is then taken as written, and is no id the server knows. */
static size_t unescape(void *cls, struct MHD_Connection *c, char *s)
{
    (void)cls;
    (void)c;
    char *w = s;
    for (const char *r = s; *r; r++) {
        int hi, lo;
        if (r[0] == '%' && isxdigit((unsigned char)r[1]) && isxdigit((unsigned char)r[2])) {
            hi = isdigit((unsigned char)r[1]) ? r[1] - '0'
                                              : (tolower((unsigned char)r[1]) - 'a' + 10);
            lo = isdigit((unsigned char)r[2]) ? r[2] - '0'
                                              : (tolower((unsigned char)r[2]) - 'a' + 10);
            int v = hi * 16 + lo;
            if (v != 0 && v != '/') {
                *w++ = (char)v;
                r += 2;
                continue;
            }
        }
        *w++ = *r;
    }
    *w = '\0';
    return (size_t)(w - s);
}

/* Connections an HTTP server takes at once: what the process's descriptor limit leaves, less
 * room for its other sockets and files, 16,384 at most. The soft limit is raised to the hard one
 * first (never lowered): a daemon's default of 1,024 would cap it there. */
static unsigned connection_limit(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return 900;
    if (rl.rlim_cur < rl.rlim_max) {
        struct rlimit up = {.rlim_cur = rl.rlim_max < 65536 ? rl.rlim_max : 65536,
                            .rlim_max = rl.rlim_max};
        if (up.rlim_cur > rl.rlim_cur && setrlimit(RLIMIT_NOFILE, &up) == 0)
            rl.rlim_cur = up.rlim_cur;
    }
    if (rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur > 16384 + 256)
        return 16384;
    return rl.rlim_cur > 512 ? (unsigned)(rl.rlim_cur - 256) : (unsigned)(rl.rlim_cur / 2);
}

int kvf__httpd_start(kvf__httpd **out, const char *host, uint16_t port, int threads,
                     size_t max_body, kvf__http_handler h, void *ctx, uint16_t *bound, char *err,
                     size_t errlen)
{
    *out = NULL;
    kvf__httpd *d = calloc(1, sizeof *d);
    if (!d) {
        snprintf(err, errlen, "out of memory");
        return KVF_ENOMEM;
    }
    d->h = h;
    d->ctx = ctx;
    d->max_body = max_body;
    d->bodies_max = max_body <= SIZE_MAX / BODIES_FACTOR ? max_body * BODIES_FACTOR : SIZE_MAX;
    if (d->bodies_max < BODIES_MIN)
        d->bodies_max = BODIES_MIN;
    /* The socket is ours (port 0 resolves to a free one), handed to libmicrohttpd. */
    int lfd;
    int rc = kvf__tcp_listen(host, port, 128, &lfd, bound, err, errlen);
    if (rc) {
        free(d);
        return rc;
    }
    /* epoll or poll, never select(): select() stops at descriptor 1,024, and a client holding a
     * thousand idle connections would shut every other client out (the load reports, the
     * placements) until its connections time out */
    unsigned flags = (threads == KVF_HTTPD_PER_CONNECTION
                          ? MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD
                          : MHD_USE_INTERNAL_POLLING_THREAD) |
                     MHD_USE_AUTO;
    unsigned pool = threads >= 2 ? (unsigned)threads : 0;
    /* one address may hold half the connections where there are many (a host that opens them
     * all, half-sent requests kept open, leaves the others room; loopback clients share one
     * address); with a low descriptor limit, none: half would be too few for one host's clients
     * (0: no per-address limit) */
    unsigned limit = connection_limit();
    unsigned per_ip = limit >= 4096 ? limit / 2 : 0;
    d->mhd = MHD_start_daemon(
        flags, 0, NULL, NULL, on_request, d, MHD_OPTION_LISTEN_SOCKET, lfd,
        MHD_OPTION_NOTIFY_COMPLETED, on_completed, d, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)120,
        MHD_OPTION_CONNECTION_LIMIT, limit, MHD_OPTION_PER_IP_CONNECTION_LIMIT, per_ip,
        MHD_OPTION_UNESCAPE_CALLBACK, unescape, NULL,
        pool ? MHD_OPTION_THREAD_POOL_SIZE : MHD_OPTION_END, pool, MHD_OPTION_END);
    if (!d->mhd) {
        close(lfd);
        free(d);
        snprintf(err, errlen, "cannot start the HTTP server on %s:%u", host, (unsigned)*bound);
        return KVF_EIO;
    }
    *out = d;
    return 0;
}

void kvf__httpd_counts(kvf__httpd *d, uint64_t *requests, uint64_t *errors)
{
    *requests = atomic_load(&d->requests);
    *errors = atomic_load(&d->errors);
}

void kvf__httpd_stop(kvf__httpd **dp)
{
    if (!dp || !*dp)
        return;
    MHD_stop_daemon((*dp)->mhd);
    free(*dp);
    *dp = NULL;
}
