/*
 * kvf cluster send: one request through a running cluster, as a client of the cluster sends it.
 * The engine module's router (engine/include/router.h) asks kvf-sched where to run it, prefills
 * on the prefill engine and decodes on the decode engine, or sends it whole to one engine where
 * kvf-sched colocates them. Prints where it ran, how much of the prompt was cached where, and
 * what each step took, measured here (real).
 */
#include "send.h"

#include "router.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void print_text(const kvfe_route *q, double t0, int rc)
{
    if (q->rejected) {
        printf("rejected by kvf-sched: %s\n", q->err);
        return;
    }
    if (q->prefill)
        printf("placed: prefill on %s (%s), decode on %s%s\n", q->prefill->id, q->prefill->endpoint,
               q->decode ? q->decode->id : "-", q->colocated ? " (colocated)" : "");
    printf("prompt %zu tokens: %zu in the engine's pages, %zu loaded from the stores, %zu saved\n",
           q->n, q->device_tokens, q->loaded_tokens, q->saved_tokens);
    if (q->first_token_at > 0)
        printf("TTFT %.1f ms (engine queue %.1f ms, prefill %.1f ms); transport %s\n",
               (q->first_token_at - t0) * 1e3, q->queue_s * 1e3, q->prefill_s * 1e3,
               q->transport[0] ? q->transport : "none");
    if (q->done_at > 0)
        printf("done after %.1f ms: %zu tokens, decode %.1f ms, handoff wait %.1f ms%s\n",
               (q->done_at - t0) * 1e3, q->n_generated, q->decode_s * 1e3, q->handoff_s * 1e3,
               q->first_token_mismatch ? "; FIRST TOKEN DIFFERS between prefill and decode" : "");
    if (q->n_generated) {
        printf("tokens:");
        for (size_t i = 0; i < q->n_generated; i++)
            printf(" %u", q->generated[i]);
        printf("\n");
    }
    if (rc)
        printf("failed: %s\n", q->err);
}

static void print_json(const kvfe_route *q, double t0, int rc)
{
    json_t *tokens = json_array();
    for (size_t i = 0; i < q->n_generated; i++)
        json_array_append_new(tokens, json_integer(q->generated[i]));
    json_t *o = json_pack(
        "{s:b,s:b,s:b,s:s,s:s,s:I,s:I,s:I,s:I,s:f,s:f,s:f,s:f,s:f,s:s,s:o,s:b,s:s,s:s}", "ok",
        rc == 0, "rejected", q->rejected, "colocated", q->colocated, "prefill",
        q->prefill ? q->prefill->id : "", "decode", q->decode ? q->decode->id : "", "prompt_tokens",
        (json_int_t)q->n, "device_tokens", (json_int_t)q->device_tokens, "store_tokens",
        (json_int_t)q->loaded_tokens, "saved_tokens", (json_int_t)q->saved_tokens, "ttft_s",
        q->first_token_at > 0 ? q->first_token_at - t0 : 0.0, "e2e_s",
        q->done_at > 0 ? q->done_at - t0 : 0.0, "queue_s", q->queue_s, "prefill_s", q->prefill_s,
        "decode_s", q->decode_s, "transport", q->transport, "tokens", tokens,
        "first_token_mismatch", q->first_token_mismatch, "error", q->err, "label", "real");
    char *t = json_dumps(o, JSON_COMPACT);
    printf("%s\n", t ? t : "{}");
    free(t);
    json_decref(o);
}

int kvf__cluster_send(const char *sched, const kvf__cli_target *t, uint32_t max_tokens, int json)
{
    kvf__cli_chunks ch;
    if (kvf__cli_chunks_load(t, "kvf cluster send", 1, &ch) != 0) {
        kvf__cli_chunks_free(&ch);
        return 2;
    }
    char err[256];
    kvfe_router *r = NULL;
    int rc = kvfe_router_open(&r, sched, err, sizeof err);
    if (rc) {
        fprintf(stderr, "kvf cluster send: %s\n", err);
        kvf__cli_chunks_free(&ch);
        return 1;
    }
    kvfe_route q = {.tokens = ch.tokens,
                    .n = ch.n_tokens,
                    .keys = ch.keys,
                    .n_keys = ch.n,
                    .max_tokens = max_tokens};
    double t0 = now_s();
    rc = kvfe_router_serve(r, &q);
    if (json)
        print_json(&q, t0, rc);
    else
        print_text(&q, t0, rc);
    kvfe_route_release(&q);
    kvfe_router_close(&r);
    kvf__cli_chunks_free(&ch);
    return rc || q.first_token_mismatch ? 1 : 0;
}
