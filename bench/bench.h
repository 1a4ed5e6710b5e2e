/*
 * kvf-bench subcommands. Each prints a human table and, with --json, one JSON object as its last
 * line; each measures the ceiling and the peer in the same run and reports ratios.
 */
#ifndef KVF_BENCH_H
#define KVF_BENCH_H

int bench_store_main(int argc, char **argv);
int bench_connector_main(int argc, char **argv);
/* kvf-bench connector --device cuda (connector_cuda.c): rounds 0 for the default; only NULL,
 * "pages" or "store". */
int bench_connector_cuda(int rounds, int json, const char *store_bin, const char *only);
int bench_sched_main(int argc, char **argv);
/* kvf-bench sched --ingest (sched_ingest.c): results into res; with shards > 1 also the index
 * split that many ways, a thread per shard. 0, or -1 after saying why. */
#include <jansson.h>
#include <stdint.h>
int bench_sched_ingest(json_t *res, int quick, int shards);
/* kvf-bench sched --relay (sched_relay.c): kvf-relay's rate against decoding alone. */
int bench_sched_relay(json_t *res, int quick, int shards);
/* A scheduler (kvf_cost, an index sized for 2M blocks) with n instances "inst-0".. that prefill
 * and decode, each of block_tokens and capacity_blocks: the benchmarks' index under test. NULL
 * out of memory. */
struct kvf_sched *bench_sched_uniform(int n, uint32_t block_tokens, uint64_t capacity_blocks);
int bench_soak_main(int argc, char **argv);
int bench_e2e_main(int argc, char **argv);
int bench_disk_main(int argc, char **argv);
int bench_save_main(int argc, char **argv);
/* kvf-bench replicas: placement throughput of N kvf-sched replicas vs one (sched_replicas.c). */
int bench_replicas_main(int argc, char **argv);

#endif
