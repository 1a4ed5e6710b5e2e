/*
 * A rate-limited link for the benchmarks: a TCP relay on loopback whose direction from the
 * upstream server to its clients is one link of a given rate, shared by every connection through
 * it, as a network port is. It lets a benchmark put a transfer next to a computation of comparable
 * length on one host, where loopback alone moves bytes hundreds of times faster than a
 * datacentre link relative to the reference engine's compute.
 */
#ifndef KVF_BENCH_RATELINK_H
#define KVF_BENCH_RATELINK_H

#include <stdint.h>

typedef struct bench_link bench_link;

/* Starts a relay on 127.0.0.1 (a free port) to 127.0.0.1:upstream, unlimited until a rate is
 * set. Returns 0, or -1 with the reason on stderr. Caller owns *out; free with
 * bench_link_stop(). */
int bench_link_start(bench_link **out, uint16_t upstream);
/* The port clients connect to. */
uint16_t bench_link_port(const bench_link *l);
/* Sets the link's rate from the upstream server to the clients in bytes per second (0:
 * unlimited). Bytes already paced keep their times; later bytes follow the new rate. */
void bench_link_set_rate(bench_link *l, double bytes_per_s);
/* Closes every connection, joins the relay's threads and frees it. Accepts NULL and clears *l. */
void bench_link_stop(bench_link **l);

#endif
