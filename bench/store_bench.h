/*
 * kvf-bench store's parts: the workloads and kvfabric's rates (store_workload.c), the ceiling
 * and the peer they are compared with (store_peers.c); store_bench.c runs them in rounds.
 */
#ifndef KVF_BENCH_STORE_BENCH_H
#define KVF_BENCH_STORE_BENCH_H

#include "kvf/kvf.h"

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#define STORE_LAYERS 4
#define STORE_NS     0xbe4c4b17ull /* the namespace of every key the benchmark stores */

/* n objects of `payload` bytes each (STORE_LAYERS layers), with keys that PUT can renew, and the
 * destination buffers a GET reads them into. */
typedef struct workload {
    size_t n;
    uint64_t payload;   /* bytes of one object's segments */
    uint64_t obj_bytes; /* object size on the wire */
    kvf_key *keys;
    uint8_t **objs;
    uint64_t *lens;
    uint8_t **bufs;
    uint64_t *caps;
    uint64_t *out_lens;
    int *st;
} workload;

/* 0, or -1 when out of memory (w is then freed). */
int wl_init(workload *w, size_t n, uint64_t payload);
/* Renames the objects for round `round` (fresh keys for PUTs). */
void wl_rekey(workload *w, uint64_t round);
void wl_free(workload *w);
/* GETs w's keys as they are into its buffers (statuses in w->st, lengths in w->out_lens):
 * kvf_client_get's result. */
int wl_get(kvf_client *c, workload *w);

/* GB/s of batched kvfabric GETs (verified) or PUTs (fresh keys every call) over secs; *errors gets
 * the keys that failed. */
double kvf_rate(kvf_client *c, workload *w, int put, double secs, int *errors);
/* As kvf_rate, on w's keys as they are: a GET stores nothing first (the keys are there). */
double wl_rate(kvf_client *c, workload *w, int put, double secs, int *errors);

/* Lookup-prefix latency of 128 stored keys from `clients` concurrent clients for secs, while
 * another client GETs 4 x 16 MiB batches without a pause from the store at 127.0.0.1:port. Each
 * client is a kvfabric client of its own with one connection, or (raw) a blocking socket that
 * sends the LOOKUP frame itself: the ceiling, what the kernel and the store cost without the
 * library. A lookup that fails or does not find every key counts in errors, not in the latency. */
typedef struct lookup_result {
    double p50, p99; /* us */
    size_t samples, errors;
} lookup_result;
int lookup_under_load(uint16_t port, int clients, int raw, double secs, lookup_result *r);

/* The same LOOKUP frame over one blocking socket, iters times, nothing else running: lat (us).
 * The socket is TCP to 127.0.0.1:port, or the store's Unix socket unix_name where given. */
int raw_lookup_rtt(uint16_t port, const char *unix_name, uint64_t ns, const kvf_key *keys,
                   int iters, double *lat);

/* The TCP ceiling: GB/s of `streams` concurrent loopback streams of writes of `write_bytes` each,
 * over secs: a sending and a receiving thread per stream (blocking calls), or, polled, one thread
 * sending on every stream and one receiving from every stream (poll(), as kvf-store's loop and the
 * client's I/O thread do). 0 where the sockets or threads cannot be made. */
double tcp_ceiling(int streams, size_t write_bytes, int polled, double secs);

/* --auth (store_auth.c): GET through a store with --auth against one without, alternating in
 * rounds, and a fresh client's first request on each; printed and into res's "auth". Returns the
 * exit status. */
/* --transport shm: shared memory against a one-thread memcpy of the same bytes and against TCP
 * loopback, per round, into res; printed. Returns the exit status (1: keys failed). */
/* store_tier.c: kvf-bench store --tier disk: the disk tier through kvf-store against fio, with
 * the disk file in dir (gather_us >= 0: the store's --disk-gather-us, else its default; nice > 0:
 * its --disk-nice; hot_mib > 0: the DRAM readers' set, else 256 MiB, at most a quarter of the
 * arena). 0, or -1 (said). */
int bench_store_tier(const char *dir, int quick, const char *memory, const char *bin, int threads,
                     int gather_us, int nice, int hot_mib, int json, json_t *res);
int bench_store_shm(int quick, int store_threads, const char *memory, const char *bin, int json,
                    json_t *res);
/* --sources (store_sources.c): prefetches that follow a plan's sources against prefetches from
 * each chunk's own node, the other zone's store behind a link of link_gbps. The exit status. */
int bench_store_sources(int quick, int store_threads, double link_gbps, const char *bin, int json,
                        json_t *res);
/* kvf-bench store --near (store_near.c): hot keys from the holder on this host against their
 * first node over TCP. 0, or 1 (said). */
int bench_store_near(int quick, int store_threads, const char *memory, const char *bin, int json,
                     json_t *res);
int bench_store_auth(int streams, int threads, const char *memory, const char *bin, int quick,
                     json_t *res);

/* Redis with `conns` connections (kvfabric's connection count), for the same batches. */
typedef struct redis_peer redis_peer;
/* Starts redis-server and connects to it. NULL (no server left running) where redis-server is
 * missing or does not answer. */
redis_peer *redis_peer_open(int conns);
void redis_peer_close(redis_peer **p);
/* GB/s of w's batch over the connections, each taking every conns-th key, the values of a GET
 * copied into the destination as a connector must: Redis at the better of its two forms for a
 * batch, MGET/MSET and GET/SET pipelined (on a 2-core VM MGET of 64 x 64 KiB measured a quarter
 * of the pipelined GETs' rate), each measured for secs (each connection runs its share again and
 * again). *pipelined_best says which form won, *errors gets the keys that failed in either. */
double redis_peer_rate(redis_peer *p, workload *w, int set, double secs, int *errors,
                       int *pipelined_best);

#endif
