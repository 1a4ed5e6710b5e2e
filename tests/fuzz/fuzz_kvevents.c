/*
 * libFuzzer target for the KV event decoders (proto/kvevents.c, kvevents_mp.c): what kvf-sched
 * reads from every publisher it subscribes to. Any crash, sanitizer report (an allocation a header
 * made up included), an event handed over with arrays that disagree with their counts, or the two
 * decoders (msgpuck's and msgpack-c's reference) answering differently is a bug.
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

/* Decoders kept across inputs, as kvf-sched keeps its own: what one batch leaves behind must not
 * change the next one's decoding. */
static kvf__kve_decoder *dec, *ref;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint64_t sum = 0, malformed = 0, malformed_ref = 0;
    char err[256] = "", err_ref[256] = "";
    if ((!dec && kvf__kve_decoder_new(&dec) != 0) || (!ref && kvf__kve_decoder_new(&ref) != 0))
        return 0;
    const kvf_kve *ev, *ev_ref;
    size_t n, n_ref;
    int rc = kvf__kve_decode_batch(dec, data, size, &ev, &n, &malformed, err, sizeof err);
    int rc_ref = kvf__kve_decode_batch_ref(ref, data, size, &ev_ref, &n_ref, &malformed_ref,
                                           err_ref, sizeof err_ref);
    if (rc != rc_ref || malformed != malformed_ref || strcmp(err, err_ref) != 0)
        __builtin_trap();
    if (rc == 0) {
        if (n != n_ref)
            __builtin_trap();
        for (size_t i = 0; i < n; i++) {
            if (!kvf__kve_equal(&ev[i], &ev_ref[i]))
                __builtin_trap();
            touch(&sum, &ev[i], err, sizeof err);
        }
    }
    return 0;
}
