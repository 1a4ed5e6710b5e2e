/*
 * HTTP/JSON between kvfabric's processes: the client side (libcurl) used by the connector, the
 * engines and the trace driver, and the server side (libmicrohttpd) used by kvf-sched and by
 * kvf-engine's serving mode. Bodies are JSON objects (jansson).
 */
#ifndef KVF_TRANSPORT_HTTP_H
#define KVF_TRANSPORT_HTTP_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

/* Sends method ("GET", "POST" or "DELETE") to url with body (may be NULL; borrowed) and waits up to
 * timeout_ms. On a reply, *status is its HTTP status and *reply its JSON body (NULL when empty or
 * not JSON; caller owns it; reply may be NULL to drop it). Replies over 64 MiB are refused.
 * Returns 0 on any HTTP reply, or KVF_ECONNREFUSED / KVF_ETIMEDOUT / KVF_ENOMEM with one line in
 * err. */
int kvf__http_call(const char *method, const char *url, json_t *body, int timeout_ms, long *status,
                   json_t **reply, char *err, size_t errlen);
/* The same with "Authorization: Bearer bearer" when bearer is not NULL or empty. */
int kvf__http_call_bearer(const char *method, const char *url, json_t *body, const char *bearer,
                          int timeout_ms, long *status, json_t **reply, char *err, size_t errlen);
/* Called once, on the calling thread, with a streamed reply's first line (borrowed): a JSON object
 * with "first_token", sent by an engine the moment its forward pass gives the first token. */
typedef void (*kvf__http_first_fn)(void *arg, json_t *line);
/* The same, for a reply that may stream (an engine's /v1/prefill or /v1/generate with "stream":
 * true; docs/python.md): lines of JSON, the first {"first_token": ...} given to on_first as soon
 * as it arrives, the last the reply (*reply), whose "status", where it has one, is the call's (an
 * error after the first line). A reply of one document is taken whole, as kvf__http_call's. */
int kvf__http_call_stream(const char *method, const char *url, json_t *body, const char *bearer,
                          int timeout_ms, kvf__http_first_fn on_first, void *arg, long *status,
                          json_t **reply, char *err, size_t errlen);
/* The token this process presents to kvf-sched's mutating endpoints: $KVF_SCHED_TOKEN, or NULL. */
const char *kvf__sched_token(void);
/* Sets $KVF_SCHED_TOKEN from the first "NAME TOKEN" line of a kvf-sched token file (a cluster's,
 * which the launcher writes), unless it is set already. Returns 0, or -1 when the file has no
 * such line. */
int kvf__sched_token_from_file(const char *path);

/* What a handler answers: a JSON body, or a text body (malloc'd, with its content type). */
typedef struct kvf__http_reply {
    json_t *json; /* owned by the server afterwards; NULL for none */
    char *text;   /* owned by the server afterwards (free()); used when json is NULL */
    size_t text_len;
    const char *content_type; /* of text; static */
    /* Input, set by the server before the handler runs: the name of the token that authenticated
     * a request that is not a GET, or NULL where the server requires none (kvf__httpd_tokens). */
    const char *caller;
    /* Input: the client's socket (-1: unknown), for kvf__http_client_gone(); never read it. */
    int client_fd;
} kvf__http_reply;

/* Whether the client of the request r answers has closed its side or the connection is broken
 * (its socket polled without waiting, nothing read): a handler that runs long (a generation)
 * checks it now and then and stops work nobody waits for. 0 where unknown. */
int kvf__http_client_gone(const kvf__http_reply *r);

/* A handler answers one request: body is the parsed JSON object of a POST (NULL for a GET or a
 * DELETE, whose body is not read). It fills *out and returns the HTTP status. */
typedef unsigned (*kvf__http_handler)(void *ctx, const char *method, const char *url, json_t *body,
                                      kvf__http_reply *out);

typedef struct kvf__httpd kvf__httpd;

/* Bearer tokens a server requires of every request but GETs: a name and its secret each. */
typedef struct kvf__http_tokens kvf__http_tokens;
/* Reads a token file: one "NAME TOKEN" a line (# starts a comment), names of 1-63 characters of
 * [A-Za-z0-9._-], tokens of 32-255 printable characters, no name twice. Returns 0, or KVF_EINVAL
 * / KVF_EIO / KVF_ENOMEM with the file and line in err. */
int kvf__http_tokens_load(kvf__http_tokens **out, const char *path, char *err, size_t errlen);
size_t kvf__http_tokens_count(const kvf__http_tokens *t);
void kvf__http_tokens_free(kvf__http_tokens **t);

/* Serves HTTP on host:port (0: a free port, written to *bound) with, by threads: 0, one polling
 * thread; 1 (KVF_HTTPD_PER_CONNECTION), one thread per connection (handlers may block); N >= 2,
 * a pool of N polling threads, each serving its share of the connections (handlers run
 * concurrently and must be thread-safe). Bodies over max_body get 413, bodies that are not JSON
 * objects get 400, both without calling the handler. Returns 0, or a KVF_E* code with one line
 * in err. */
#define KVF_HTTPD_PER_CONNECTION 1
int kvf__httpd_start(kvf__httpd **out, const char *host, uint16_t port, int threads,
                     size_t max_body, kvf__http_handler h, void *ctx, uint16_t *bound, char *err,
                     size_t errlen);
/* Requires one of tokens (borrowed; must outlive the server; NULL: none) of every request but
 * GETs, before the server serves any: a request without a valid "Authorization: Bearer" header
 * gets 401 without calling the handler; the handler learns the token's name (out->caller).
 * Tokens are compared in constant time. Call before the first request can arrive. */
void kvf__httpd_tokens(kvf__httpd *d, const kvf__http_tokens *tokens);
/* Requests answered and those answered with a status of 400 or more. */
void kvf__httpd_counts(kvf__httpd *d, uint64_t *requests, uint64_t *errors);
/* Stops serving, waits for the handlers running and frees. Accepts NULL and clears *d. */
void kvf__httpd_stop(kvf__httpd **d);
/* A JSON error body {"error": message}. */
json_t *kvf__http_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Answers GET /metrics with the registry m in Prometheus's text format (core/metrics.h): fills
 * *out and returns 200, or 500 with an error body when out of memory. */
struct kvf__metrics;
unsigned kvf__http_metrics_reply(struct kvf__metrics *m, kvf__http_reply *out);

#endif
