/*
 * kvf-bench soak --auth's rival (soak_rival.c): a second tenant of the same storage node that,
 * while the soak's churn runs, puts its own objects under the very keys and namespace the churn
 * uses, evicts those keys and reads them back. Authentication scopes each tenant's namespace, so
 * the churn must still read only its own bytes, and the rival only its own.
 */
#ifndef KVF_BENCH_SOAK_RIVAL_H
#define KVF_BENCH_SOAK_RIVAL_H

#include "kvf/kvf.h"

#include <stdatomic.h>
#include <stdint.h>

typedef struct soak_rival soak_rival;

typedef struct soak_rival_opts {
    const char *node;               /* "host:port" */
    const char *credential;         /* the rival tenant's */
    uint64_t ns;                    /* the churn's namespace */
    kvf_key (*key_of)(uint64_t id); /* the churn's keys */
    atomic_uint_fast64_t *next_id;  /* the churn's next id: the rival works below it */
    uint64_t window, object_bytes;  /* ids the churn still reads; bytes of one object */
    int layers, batch;
} soak_rival_opts;

typedef struct soak_rival_totals {
    uint64_t puts, evictions, verified, mismatches, errors;
} soak_rival_totals;

/* Starts the rival's thread. 0, or -1 after saying why. */
int soak_rival_start(soak_rival **out, const soak_rival_opts *o);
/* Stops it and gives its totals. Accepts NULL (totals zero). */
void soak_rival_stop(soak_rival **r, soak_rival_totals *t);

#endif
