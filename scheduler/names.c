/*
 * The names the scheduler's interface gives its enumerations: placement policies and queue
 * disciplines (from KVF_POLICY_MAP and KVF_QUEUE_MAP, so the enums and their names cannot
 * disagree) and plan labels. The daemon's
 * command line and replies, the trace replay and the engine use these spellings.
 */
#include "scheduler.h"

#include "kvf/error.h"

#include <string.h>

static const char *const policy_names[] = {
#define XX(e, name) name,
    KVF_POLICY_MAP(XX)
#undef XX
};

const char *kvf_policy_name(kvf_policy p)
{
    return (unsigned)p < KVF_POLICY_COUNT_ ? policy_names[p] : "?";
}

int kvf_policy_parse(const char *name, kvf_policy *out)
{
    for (int i = 0; i < KVF_POLICY_COUNT_; i++) {
        if (strcmp(name, policy_names[i]) == 0) {
            *out = (kvf_policy)i;
            return 0;
        }
    }
    return KVF_EINVAL;
}

static const char *const queue_names[] = {
#define XX(e, name) name,
    KVF_QUEUE_MAP(XX)
#undef XX
};

const char *kvf_queue_name(kvf_queue q)
{
    return (unsigned)q < KVF_QUEUE_COUNT_ ? queue_names[q] : "?";
}

int kvf_queue_parse(const char *name, kvf_queue *out)
{
    for (int i = 0; i < KVF_QUEUE_COUNT_; i++) {
        if (strcmp(name, queue_names[i]) == 0) {
            *out = (kvf_queue)i;
            return 0;
        }
    }
    return KVF_EINVAL;
}

const char *kvf_label_name(kvf_label l)
{
    switch (l) {
    case KVF_LABEL_REAL:
        return "real";
    case KVF_LABEL_BACKEND_INFEASIBLE:
        return "backend_infeasible";
    case KVF_LABEL_SIMULATED:
        return "simulated";
    }
    return "?";
}

const char *kvf_near_name(kvf_near n)
{
    switch (n) {
    case KVF_NEAR_HOST:
        return "host";
    case KVF_NEAR_ZONE:
        return "zone";
    case KVF_NEAR_REMOTE:
        return "remote";
    }
    return "?";
}
