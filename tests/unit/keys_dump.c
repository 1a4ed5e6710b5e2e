/*
 * Writes JSON test cases for tests/keys_ref.py: layouts, salts and token sequences (the golden
 * sequence of docs/keys.md and random ones from a fixed seed) with the fingerprint, seed and keys
 * the C library computes. The Python reference recomputes them from the specification.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvf/kvf.h"

#include "bytes.h"

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint32_t rnd(void)
{
    /* A fixed, portable sequence, so that failures reproduce. */
    return (uint32_t)(kvf__splitmix64(&rng_state) >> 16);
}

static int emit(const kvf_layout *l, const char *salt, size_t salt_len, const uint32_t *t, size_t n,
                int first)
{
    kvf_keyspace ks;
    if (kvf_keyspace_init(&ks, l, salt, salt_len) != 0)
        return -1;
    size_t maxk = n / l->chunk_tokens + 1, nk;
    kvf_key *keys = calloc(maxk, sizeof *keys);
    if (!keys || kvf_keys_compute(&ks, t, n, keys, maxk, &nk, NULL) != 0) {
        free(keys);
        return -1;
    }
    char lj[512];
    kvf_layout_to_json(l, lj, sizeof lj);
    printf("%s{\"layout\":%s,\"salt_hex\":\"", first ? "" : ",\n", lj);
    for (size_t i = 0; i < salt_len; i++)
        printf("%02x", (unsigned char)salt[i]);
    printf("\",\"fingerprint\":\"%016" PRIx64 "\",\"seed\":\"%016" PRIx64 "\",\"tokens\":[",
           ks.layout_fp, ks.seed);
    for (size_t i = 0; i < n; i++)
        printf("%s%" PRIu32, i ? "," : "", t[i]);
    printf("],\"keys\":[");
    for (size_t i = 0; i < nk; i++) {
        char hex[33];
        printf("%s\"%s\"", i ? "," : "", kvf_key_to_hex(&keys[i], hex));
    }
    printf("]}");
    free(keys);
    return 0;
}

int main(void)
{
    static uint32_t tokens[4096];
    kvf_layout l;
    printf("[");
    /* The golden case of docs/keys.md. */
    kvf_layout_preset("ref-tiny", &l);
    for (uint32_t i = 0; i < 3 * 64; i++)
        tokens[i] = 1000 + i;
    if (emit(&l, "", 0, tokens, 3 * 64, 1) || emit(&l, "tenant-a", 8, tokens, 3 * 64, 0))
        return 1;
    /* Random layouts from every preset, random chunk sizes, salts and sequences. */
    for (int c = 0; c < 60; c++) {
        size_t np = 0;
        while (kvf_layout_preset_name(np))
            np++;
        kvf_layout_preset(kvf_layout_preset_name(rnd() % np), &l);
        l.page_tokens = 1u << (rnd() % 5);
        l.chunk_tokens = l.page_tokens * (1 + rnd() % 16);
        l.dtype = (kvf_dtype)(rnd() % KVF_DTYPE_COUNT_);
        char salt[32];
        size_t salt_len = rnd() % 3 == 0 ? 0 : 1 + rnd() % 31;
        for (size_t i = 0; i < salt_len; i++)
            salt[i] = (char)(rnd() & 0xff);
        size_t n = rnd() % 1500;
        for (size_t i = 0; i < n; i++)
            tokens[i] = rnd() % 4 == 0 ? rnd() * 65537u : rnd() % 152064;
        if (kvf_layout_validate(&l, NULL, 0) != 0)
            continue;
        if (emit(&l, salt, salt_len, tokens, n, 0))
            return 1;
    }
    printf("]\n");
    return 0;
}
