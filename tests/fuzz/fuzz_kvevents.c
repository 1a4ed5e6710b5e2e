/*
 * libFuzzer target for the KV event decoder (proto/kvevents.c): what kvf-sched reads from every
 * publisher it subscribes to. Any crash, sanitizer report (an allocation a header made up
 * included), or an event handed over with arrays that disagree with their counts is a bug.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "kvf/kvf.h"

#include "kvevents.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Reads every element the event says it has, so that a count that disagrees with its array is
 * caught by ASan. */
static int touch(void *ud, const kvf_kve *ev, char *err, size_t errlen)
{
    (void)err, (void)errlen;
    uint64_t *sum = ud;
    for (size_t i = 0; i < ev->n_hashes; i++)
        *sum += ev->hashes[i];
    for (size_t i = 0; i < ev->n_tokens; i++)
        *sum += ev->tokens[i];
    for (size_t i = 0; i < ev->n_keys; i++)
        *sum += ev->keys[i].lo ^ ev->keys[i].hi;
    if (ev->type == KVF_KVE_BLOCK_STORED && ev->n_tokens != ev->n_hashes * ev->block_size)
        __builtin_trap();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint64_t sum = 0, malformed = 0;
    char err[256];
    kvf__kve_decode(data, size, touch, &sum, &malformed, err, sizeof err);
    return 0;
}
