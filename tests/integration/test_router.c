/*
 * The router (engine/include/router.h) carries kvf-sched's plan to the engines: a fake kvf-sched
 * and fake engines on one loopback HTTP server of this test answer as the real ones do, and
 * record what the router sends. A plan that loads from the stores gives the prefill engine
 * (/v1/prefill, or /v1/generate where kvf-sched colocates) its load deadline and its sources as
 * the plan lists them; the decode engine gets neither; a plan that loads nothing sends no
 * sources.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <jansson.h>
#include <pthread.h>

#include "http.h"
#include "kvf/kvf.h"
#include "router.h"

typedef struct fake {
    pthread_mutex_t mu;
    uint16_t port;
    int colocated, loads;
    json_t *sources;                /* the plan's */
    json_t *prefill, *decode, *gen; /* the last bodies the engines received */
    int places;
} fake;

static unsigned handle(void *ctx, const char *method, const char *url, json_t *body,
                       kvf__http_reply *out)
{
    fake *f = ctx;
    char ep[64];
    snprintf(ep, sizeof ep, "127.0.0.1:%u", f->port);
    pthread_mutex_lock(&f->mu);
    unsigned st = 200;
    if (!strcmp(method, "GET") && !strcmp(url, "/v1/instances")) {
        out->json =
            json_pack("{s:[{s:s,s:s,s:s},{s:s,s:s,s:s}]}", "instances", "id", "p1", "role",
                      "prefill", "endpoint", ep, "id", "d1", "role", "decode", "endpoint", ep);
    } else if (!strcmp(method, "GET") && !strcmp(url, "/v1/index/stats")) {
        out->json = json_pack("{s:i}", "shards", 1);
    } else if (!strcmp(method, "GET") && !strcmp(url, "/v1/health")) {
        out->json = json_pack("{s:b}", "running", 0);
    } else if (!strcmp(url, "/v1/place")) {
        f->places++;
        json_t *acts = json_array();
        if (f->loads)
            json_array_append_new(acts, json_pack("{s:s,s:s,s:i,s:f,s:s,s:O}", "action",
                                                  "load_from_store", "instance", "p1", "tokens", 64,
                                                  "seconds", 0.01, "label", "real", "sources",
                                                  f->sources));
        json_array_append_new(acts,
                              json_pack("{s:s,s:s,s:i,s:f,s:s}", "action", "prefill", "instance",
                                        "p1", "tokens", 64, "seconds", 0.02, "label", "real"));
        out->json =
            json_pack("{s:s,s:s,s:b,s:o}", "prefill", "p1", "decode", f->colocated ? "p1" : "d1",
                      "colocated", f->colocated, "actions", acts);
        if (f->loads)
            json_object_set_new(out->json, "load_deadline_ms", json_real(250));
    } else if (!strcmp(url, "/v1/prefill") || !strcmp(url, "/v1/generate") ||
               !strcmp(url, "/v1/decode")) {
        json_t **slot = !strcmp(url, "/v1/prefill")  ? &f->prefill
                        : !strcmp(url, "/v1/decode") ? &f->decode
                                                     : &f->gen;
        json_decref(*slot);
        *slot = json_incref(body);
        out->json = json_pack("{s:[i,i],s:[f],s:i}", "tokens", 5, 6, "itl_s", 0.001,
                              "loaded_tokens", f->loads ? 64 : 0);
    } else {
        out->json = kvf__http_error("no %s %s here", method, url);
        st = 404;
    }
    pthread_mutex_unlock(&f->mu);
    return st;
}

static void serve_one(kvfe_router *r, uint32_t *t, kvf_key *keys)
{
    kvfe_route q = {.tokens = t, .n = 128, .keys = keys, .n_keys = 2, .max_tokens = 2};
    int rc = kvfe_router_serve(r, &q);
    if (rc)
        fail_msg("serve: %d %s", rc, q.err);
    assert_int_equal(q.n_generated, 2);
    kvfe_route_release(&q);
}

static void test_router_carries_the_plan(void **state)
{
    (void)state;
    fake f = {.loads = 1};
    pthread_mutex_init(&f.mu, NULL);
    f.sources = json_pack("[{s:i,s:s,s:s,s:s,s:i,s:i},{s:b}]", "node", 1, "store", "10.0.0.9:7400",
                          "near", "zone", "tier", "dram", "from", 0, "tokens", 64, "more", 1);
    kvf__httpd *d;
    char err[300];
    assert_int_equal(kvf__httpd_start(&d, "127.0.0.1", 0, KVF_HTTPD_PER_CONNECTION, 1 << 20, handle,
                                      &f, &f.port, err, sizeof err),
                     0);
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%u", f.port);
    kvfe_router *r;
    if (kvfe_router_open(&r, addr, err, sizeof err) != 0)
        fail_msg("router: %s", err);
    uint32_t t[128];
    for (int i = 0; i < 128; i++)
        t[i] = (uint32_t)(i * 7 + 1);
    kvf_key keys[2] = {{.lo = 1, .hi = 2}, {.lo = 3, .hi = 4}};

    /* disaggregated: the prefill gets deadline and sources, the decode neither */
    serve_one(r, t, keys);
    pthread_mutex_lock(&f.mu);
    assert_non_null(f.prefill);
    assert_true(json_equal(json_object_get(f.prefill, "sources"), f.sources));
    assert_true(json_number_value(json_object_get(f.prefill, "load_deadline_ms")) == 250);
    assert_non_null(f.decode);
    assert_null(json_object_get(f.decode, "sources"));
    pthread_mutex_unlock(&f.mu);

    /* colocated: the generate gets them */
    f.colocated = 1;
    serve_one(r, t, keys);
    pthread_mutex_lock(&f.mu);
    assert_non_null(f.gen);
    assert_true(json_equal(json_object_get(f.gen, "sources"), f.sources));
    pthread_mutex_unlock(&f.mu);

    /* a plan that loads nothing: no sources, no deadline */
    f.loads = 0;
    f.colocated = 0;
    serve_one(r, t, keys);
    pthread_mutex_lock(&f.mu);
    assert_null(json_object_get(f.prefill, "sources"));
    assert_null(json_object_get(f.prefill, "load_deadline_ms"));
    assert_int_equal(f.places, 3);
    pthread_mutex_unlock(&f.mu);

    kvfe_router_close(&r);
    kvf__httpd_stop(&d);
    json_decref(f.prefill), json_decref(f.decode), json_decref(f.gen), json_decref(f.sources);
    pthread_mutex_destroy(&f.mu);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_router_carries_the_plan),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
