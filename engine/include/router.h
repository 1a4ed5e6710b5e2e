/*
 * The router of a cluster of kvf-engine servers: it turns one request into the calls that serve
 * it. It asks kvf-sched where to run the request (POST /v1/place with the prompt, its chunk keys
 * and its output length), sends the prompt to the prefill engine (/v1/prefill: the cached prefix
 * is loaded, the rest computed, the new chunks saved, the first token answered), then hands the
 * request to the decode engine (/v1/decode with the first token and the number of tokens the
 * prefill saved, which the decode engine waits for in the stores before it loads them). When
 * kvf-sched places prefill and decode on one engine the request goes there whole (/v1/generate).
 * The engines' HTTP API is kvf-engine --serve's (engine/serve.c).
 *
 * Requests can also be sent to an engine the caller picks, without kvf-sched: kvfe_router_pick()
 * chooses one by load or by the prefix each engine was last sent (an engine's own prefix cache,
 * which holds its last sequence), for a cluster served without kvfabric.
 *
 * A router is opened on kvf-sched's address and lists the engines registered there once; engines
 * that register later are not known to it. Calls on one router may run concurrently from any
 * number of threads; each engine call waits up to KVFE_ROUTER_TIMEOUT_MS.
 */
#ifndef KVF_ENGINE_ROUTER_H
#define KVF_ENGINE_ROUTER_H

#include <stddef.h>
#include <stdint.h>

#include "kvf/layout.h"

/* How long one call to kvf-sched or an engine may take: an engine serves one sequence at a time,
 * so a request can wait minutes in its queue under load. */
#define KVFE_ROUTER_TIMEOUT_MS 600000

typedef struct kvfe_router kvfe_router;

/* An engine as kvf-sched lists it. */
typedef struct kvfe_router_engine {
    char id[64];        /* its instance id */
    char role[16];      /* prefill, decode or both */
    char endpoint[160]; /* HOST:PORT of its HTTP API */
} kvfe_router_engine;

typedef struct kvfe_route kvfe_route;

/* What an engine may reuse for a request sent to it directly (the "reuse" field of
 * /v1/generate and /v1/prefill, engine/serve.c). */
typedef enum kvfe_reuse {
    KVFE_REUSE_NONE,   /* nothing: every prompt token is computed */
    KVFE_REUSE_ENGINE, /* the engine's own pages only (its prefix cache); no store is used */
    KVFE_REUSE_ALL,    /* the engine's pages and kvfabric's stores, and new chunks are saved */
} kvfe_reuse;

/* How kvfe_router_pick() chooses an engine. */
typedef enum kvfe_pick {
    /* the fewest calls of this router in flight; the first listed on a tie */
    KVFE_PICK_LEAST_LOADED,
    /* the engine last sent the longest prefix of the prompt, when that prefix is at least half
     * of the prompt's whole chunks and the engine has at most KVFE_PICK_SLACK more calls in
     * flight than the least loaded; otherwise the least loaded (the rule of SGLang's cache-aware
     * router, over what each engine's pages hold) */
    KVFE_PICK_PREFIX,
} kvfe_pick;

/* The calls in flight an engine holding a request's prefix may have beyond the least loaded
 * engine's and still be picked for it. SGLang's router allows tens of requests between GPU workers
 * that batch dozens; an engine here runs one sequence at a time, so 2 calls are already about two
 * whole prefills, more than the cached half of one saves. */
#define KVFE_PICK_SLACK 2

/* Called on the calling thread once the prefill's reply has been taken into the route (the
 * prefill fields below are filled), before the decode is sent; for a request sent whole, once its
 * reply has been taken. Not called when the prefill fails. */
typedef void (*kvfe_route_cb)(const kvfe_route *q, void *arg);

/* One request and what serving it gave. Caller-allocated. kvfe_router_serve(),
 * kvfe_router_generate() and kvfe_router_prefill() read the input fields, clear the output fields
 * and fill them as the request goes; when a call fails, the outputs of the steps that completed
 * stay filled. They do not free what the route still holds: release it (kvfe_route_release())
 * before using it again. */
struct kvfe_route {
    /* input: the request; borrowed for the call */
    const uint32_t *tokens; /* the prompt */
    size_t n;               /* its length, >= 1 */
    const kvf_key *keys;    /* its chunk keys, for the placement */
    size_t n_keys;
    uint32_t max_tokens;      /* tokens to generate, the first one included */
    double slo_ttft_ms;       /* sent with the placement when > 0 */
    kvfe_route_cb on_prefill; /* may be NULL */
    void *arg;                /* passed to on_prefill */

    /* output of the placement */
    int rejected;            /* kvf-sched turned the request away (HTTP 429) */
    int colocated;           /* kvf-sched placed prefill and decode on one engine */
    double place_s;          /* kvf-sched's answer, as the router waited for it */
    double load_deadline_ms; /* the plan's deadline for loading the stores' prefix (0: none),
                              * passed to the prefill engine */
    uint64_t ticket;         /* the plan's ticket (0: none), passed to the prefill and decode
                              * engines, whose load reports then tell kvf-sched that they count
                              * the request */

    /* output of the prefill (for a colocated request, of the generate) */
    const kvfe_router_engine *prefill; /* borrowed; valid until kvfe_router_close() */
    const kvfe_router_engine *decode;  /* borrowed; valid until kvfe_router_close() */
    double first_token_at;             /* CLOCK_MONOTONIC seconds when its first token arrived: the
                                        * streamed reply's first line, else the reply */
    int first_token_streamed;          /* the engine sent the first token ahead of its reply */
    size_t device_tokens;              /* prompt tokens whose KV was still in the engine's pages */
    size_t loaded_tokens;              /* prompt tokens whose KV came from the stores */
    size_t saved_tokens;               /* prompt tokens the engine saves to the stores */
    double queue_s;                    /* the engine's wait before the request's turn */
    double prefill_s;                  /* the engine's prefill time */
    double compute_s;                  /* of which the forward pass proper */
    double load_wait_s;                /* of which waiting for loaded layers to arrive */
    double gpu_turn_s;                 /* before it, waiting for the shared GPU's turn (0: none) */
    double gpu_yielded_s;              /* in it, the turn given to shorter passes (0: none) */
    int gpu_beside;                    /* it ran beside the pass holding the turn */
    double pass_thread_cpu_s;          /* the pass's CPU time on the engine's thread (-1: not
                                        * given; kvfabric.passclock) */
    double pass_process_cpu_s;         /* on all the engine process's threads (-1: not given) */
    double pass_gpu_s;                 /* the span of its GPU work (-1: not given) */
    double save_s;                     /* after the pass, the save's part before the reply (0:
                                        * none, or an engine that does not say) */
    size_t prefetch_tokens;            /* fetched while it waited for the engine (0: none) */
    size_t prefetch_ready_tokens;      /* of those, arrived by the plan's deadline */
    int prefetch_deadline_missed;      /* the deadline cut the prefetch short */
    char transport[16];                /* how KV moved through kvfabric; empty: it did not */
    double shm_bytes, net_bytes;       /* what the engines' storage clients moved meanwhile, over
                                        * shared memory and over the network (both replies) */
    char transport_reason[240];        /* why that transport */

    /* output of the decode (for a colocated request, of the generate) */
    double done_at;      /* CLOCK_MONOTONIC seconds when the last reply arrived */
    uint32_t *generated; /* the generated tokens; caller owns, free with kvfe_route_release() */
    size_t n_generated;
    double *itl_s; /* each decode step's time; caller owns, free with kvfe_route_release() */
    size_t n_itl;
    double decode_s;          /* the engine's decode time after the first token */
    double decode_queue_s;    /* the decode engine's wait before the decode's turn */
    double handoff_s;         /* the decode engine's wait for the prefill's chunks in the stores */
    int first_token_mismatch; /* the decode engine computed another first token than the prefill */

    char err[256]; /* why the call failed, one line; empty on success */
};

/* Lists the engines registered with kvf-sched at sched (HOST:PORT) and opens a router over them.
 * Returns 0, KVF_ENOENT when none is registered, or the HTTP call's KVF_E* code, with one line in
 * err. Caller owns the result; free with kvfe_router_close(). */
int kvfe_router_open(kvfe_router **out, const char *sched, char *err, size_t errlen);
/* Frees the router; calls on it must have returned. Accepts NULL and clears *r. */
void kvfe_router_close(kvfe_router **r);

/* The number of engines the router knows (at least 1). */
size_t kvfe_router_engine_count(const kvfe_router *r);
/* Engine i (0 <= i < kvfe_router_engine_count()). Borrowed; valid until kvfe_router_close(). */
const kvfe_router_engine *kvfe_router_engine_at(const kvfe_router *r, size_t i);

/* Serves q through kvf-sched's placement: prefill then decode, or generate when colocated.
 * Returns 0; KVF_EAGAIN with q->rejected set when kvf-sched rejects the request; KVF_ENOENT when
 * it places the request on an engine the router does not know; KVF_EINVAL, KVF_E2BIG or KVF_EIO
 * when kvf-sched or an engine answers with an error status; KVF_ENOMEM; or the HTTP call's code.
 * The reason is in q->err. */
int kvfe_router_serve(kvfe_router *r, kvfe_route *q);
/* The engine for q (its keys and length are read) by the rule how. The prefix an engine holds is
 * the chunk keys of the last prompt this router sent it (any call); with its queue, the engine may
 * run others first, so the choice is a guess, as a router's is. Borrowed; valid until
 * kvfe_router_close(). */
const kvfe_router_engine *kvfe_router_pick(kvfe_router *r, const kvfe_route *q, kvfe_pick how);
/* Sends q whole to engine e (NULL: kvfe_router_pick(r, q, KVFE_PICK_LEAST_LOADED)), which
 * prefills and decodes it, reusing what reuse allows. Returns as kvfe_router_serve(). */
int kvfe_router_generate(kvfe_router *r, const kvfe_router_engine *e, kvfe_reuse reuse,
                         kvfe_route *q);
/* Prefills q's prompt on engine e, reusing what reuse allows (with KVFE_REUSE_ALL it saves its
 * new chunks to the stores); only the prefill's outputs are filled. Returns as
 * kvfe_router_serve(). */
int kvfe_router_prefill(kvfe_router *r, const kvfe_router_engine *e, kvfe_reuse reuse,
                        kvfe_route *q);
/* Frees q's generated tokens and decode step times and clears those fields. Accepts NULL. */
void kvfe_route_release(kvfe_route *q);

/* The bytes the engines' connectors have loaded from and saved to the stores since they started,
 * summed over the engines (GET /v1/health); an engine that does not answer within 5 s adds
 * nothing. */
void kvfe_router_kv_bytes(kvfe_router *r, uint64_t *load, uint64_t *save);

#endif
