/*
 * A program outside kvfabric's tree, built against an installed libkvf (pkg-config or CMake):
 * stores one chunk in a running kvf-store and reads it back, byte for byte.
 *
 *   external HOST:PORT
 *
 * Exit status 0 when the chunk came back intact, 1 otherwise (the reason on stderr).
 */
#include <kvf/client.h>
#include <kvf/error.h>
#include <kvf/kvf.h>
#include <kvf/layout.h>
#include <kvf/object.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char *what, int rc)
{
    fprintf(stderr, "external: %s: %s\n", what, kvf_strerror(rc));
    return 1;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: external HOST:PORT\n");
        return 2;
    }
    kvf_layout l;
    kvf_keyspace ks;
    int rc = kvf_layout_preset("ref-tiny", &l);
    if (rc || (rc = kvf_keyspace_init(&ks, &l, "external", 8)) != 0)
        return fail("layout", rc);
    uint32_t *tokens = calloc(l.chunk_tokens, sizeof *tokens);
    for (uint32_t i = 0; i < l.chunk_tokens; i++)
        tokens[i] = i * 7u + 3u;
    kvf_key key = kvf_key_next(&ks, NULL, tokens);
    uint64_t seg = kvf_layout_segment_bytes(&l);
    uint8_t *data = malloc(seg * l.layers);
    const void **segs = malloc(l.layers * sizeof *segs);
    for (uint64_t i = 0; i < seg * l.layers; i++)
        data[i] = (uint8_t)(i * 31u + 5u);
    for (uint32_t i = 0; i < l.layers; i++)
        segs[i] = data + (uint64_t)i * seg;
    size_t cap = kvf_obj_raw_size(l.layers, seg), len = 0;
    uint8_t *obj = malloc(cap), *back = malloc(cap);
    rc = kvf_obj_encode(&key, ks.layout_fp, l.chunk_tokens, l.layers, segs, seg, KVF_CODEC_NONE,
                        obj, cap, &len, NULL);
    if (rc)
        return fail("encode", rc);

    const char *nodes[] = {argv[1]};
    kvf_client_opts o = {.nodes = nodes, .n_nodes = 1, .ns = ks.seed, .transport = "tcp"};
    kvf_client *c = NULL;
    char err[256] = "";
    if ((rc = kvf_client_open(&c, &o, err, sizeof err)) != 0) {
        fprintf(stderr, "external: open: %s: %s\n", kvf_strerror(rc), err);
        return 1;
    }
    int st = -1;
    const void *objs[] = {obj};
    uint64_t lens[] = {len};
    kvf_batch put = {.n = 1, .keys = &key, .objs = objs, .lens = lens, .status = &st};
    if ((rc = kvf_client_put(c, &put)) != 0 || (st != 0 && st != KVF_EEXIST))
        return fail("put", rc ? rc : st);
    void *bufs[] = {back};
    uint64_t caps[] = {cap}, got = 0;
    kvf_batch get = {
        .n = 1, .keys = &key, .bufs = bufs, .caps = caps, .out_lens = &got, .status = &st};
    if ((rc = kvf_client_get(c, &get)) != 0 || st != 0)
        return fail("get", rc ? rc : st);
    kvf_obj_info info;
    if ((rc = kvf_obj_verify(back, got, &info)) != 0)
        return fail("verify", rc);
    if (got != len || memcmp(back, obj, len) != 0) {
        fprintf(stderr, "external: the chunk came back different\n");
        return 1;
    }
    kvf_client_close(&c);
    printf("external: libkvf %s: a chunk of %zu bytes stored and read back intact\n",
           KVF_VERSION_STRING, len);
    free(tokens), free(data), free(segs), free(obj), free(back);
    return 0;
}
