/*
 * The segment codecs of chunk objects (kvf/object.h names them): LZ4 in liblz4's block format,
 * and byte-shuffled LZ4, which first groups the low and high bytes of 16-bit values (as HDF5's
 * and Blosc's shuffle filters do) so that bf16/f16 tensors compress.
 */
#ifndef KVF_PROTO_CODEC_H
#define KVF_PROTO_CODEC_H

#include <stddef.h>

#include "kvf/codec.h"

/* Compresses n bytes into dst (cap bytes); shuffled LZ4 needs n even and scratch of n bytes.
 * *out gets the compressed size; KVF_E2BIG when it does not fit or is not smaller than n. */
int kvf__codec_compress(kvf_codec c, const void *src, size_t n, void *dst, size_t cap, size_t *out,
                        void *scratch);
/* Decompresses exactly raw_n bytes; KVF_ECHECKSUM when the input does not decode to raw_n bytes. */
int kvf__codec_decompress(kvf_codec c, const void *src, size_t n, void *dst, size_t raw_n,
                          void *scratch);
/* Worst-case compressed size of n bytes (0 beyond LZ4's largest input). */
size_t kvf__codec_bound(size_t n);

#endif
