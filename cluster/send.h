/* kvf cluster send (send.c). */
#ifndef KVF_CLUSTER_SEND_H
#define KVF_CLUSTER_SEND_H

#include <stdint.h>

#include "cli_common.h"

/* Sends t's token sequence through the cluster whose kvf-sched listens at sched (HOST:PORT), to
 * generate max_tokens tokens, and prints what happened (one JSON object with json). Returns the
 * exit status: 0 served, 1 rejected or failed, 2 a usage error in t. */
int kvf__cluster_send(const char *sched, const kvf__cli_target *t, uint32_t max_tokens, int json);

#endif
