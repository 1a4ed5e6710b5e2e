/*
 * record.h - registration records and request bodies as kvf-sched reads them (record.c): a JSON
 * string or a range-checked number out of an object, and an engine instance's registration
 * record (POST /v1/instances' body, an engine's record in etcd).
 */
#ifndef KVF_SCHED_RECORD_H
#define KVF_SCHED_RECORD_H

#include "scheduler.h"

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

/* The ranges of the numbers the API accepts: wide enough for any engine, narrow enough that no
 * figure overflows the cost model or outweighs every other instance's by itself. */
#define MAX_BLOCK_TOKENS    65536.0
#define MAX_CAPACITY_BLOCKS 1099511627776.0 /* 2^40 */
#define MAX_QUEUED_TOKENS   1e12
#define MAX_QUEUED_SECONDS  1e7 /* a queue of 115 days: more is a broken reporter */
#define MAX_ACTIVE_DECODES  1000000.0
#define MAX_OUTPUT_TOKENS   1048576.0             /* 2^20 */
#define MAX_SLO_TTFT_MS     86400000.0            /* a day */
#define MAX_LOAD_TICKETS    1024                  /* placements a load report lists as taken in */
#define MAX_TICKET          ((json_int_t)1 << 53) /* exact in every JSON reader */

/* Copies the string member k of o into out (n bytes). A missing member is an error only when
 * required. Returns 0, or -1 with the reason in err (a member that is not a string shorter than
 * n). */
int kvf__sched_json_str(json_t *o, const char *k, char *out, size_t n, int required, char *err,
                        size_t errlen);
/* Reads the number member k of o into *out, or def when o has none. A present member must be a
 * JSON number from lo to hi (finite), and with `whole` have no fraction. Returns 0, or -1 with
 * the reason in err: the field, its range and what it was. */
int kvf__sched_json_num(json_t *o, const char *k, double lo, double hi, int whole, double def,
                        double *out, char *err, size_t errlen);
/* An instance's registration record into *in, its replay endpoint (rlen bytes) and the shards its
 * events are published in (*event_shards; 0: the record does not say). 0, or -1 with the reason
 * in err. */
int kvf__sched_instance_parse(json_t *o, kvf_instance_info *in, char *replay, size_t rlen,
                              uint32_t *event_shards, char *err, size_t errlen);

#endif
