/*
 * Copying a chunk object out of memory that someone else may write meanwhile (a client's staging
 * region, a store's arena under a lease) and verifying the copy: what is verified is the copy,
 * never the source, so that a source changed during the copy is caught and never trusted.
 */
#ifndef KVF_PROTO_OBJCOPY_H
#define KVF_PROTO_OBJCOPY_H

#include <stddef.h>

#include "kvf/object.h"

/* Copies the len-byte object at src to dst and verifies dst as kvf_obj_verify() does (header,
 * length, every segment's checksum), hashing each piece while it is still in cache: one pass
 * over memory instead of two. Returns 0 with *info parsed from dst, or KVF_EPROTO /
 * KVF_ECHECKSUM (dst then holds bytes nobody may use). */
int kvf__obj_copy_verify(void *dst, const void *src, size_t len, kvf_obj_info *info);

/* The two halves of it, for copies split across threads: the header (copied, parsed from dst,
 * the length checked against it), then segments [from, to), the first of which starts at byte
 * off of the object, each copied and verified. Each returns 0 or the error as above. */
int kvf__obj_copy_header(void *dst, const void *src, size_t len, kvf_obj_info *info);
int kvf__obj_copy_segs(void *dst, const void *src, const kvf_obj_info *info, uint32_t from,
                       uint32_t to, uint64_t off);

/* kvf_obj_verify(), with some segments' checksums known already: for each segment (its offset in
 * the object and stored length), known() may give the checksum of exactly those bytes, taken as
 * they landed (it returns 1 with *xxh), and the segment is not read again; the others are hashed.
 * known NULL: kvf_obj_verify() itself. Returns as kvf_obj_verify(). */
int kvf__obj_verify_known(const void *buf, size_t len, kvf_obj_info *info,
                          int (*known)(void *ud, uint64_t off, uint64_t len, uint64_t *xxh),
                          void *ud);

#endif
